//! End-to-end tests of `hookflow replay` and `hookflow stats`: the binary runs as a child
//! process against a real receiver on 127.0.0.1, the real local log, state store, ledger and
//! Parquet archive.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use hookflow::receiver::{Behaviour, ReceivedRequest, Receiver};
use hookflow_connectors::read_attempts;
use hookflow_schemas::AttemptRow;
use serde_json::Value;

mod support;
use support::process::{self, wait_for};

/// The Standard Webhooks test secret S1 (key bytes `webhook-test-secret-0123456789ab`).
const S1: &str = "whsec_d2ViaG9vay10ZXN0LXNlY3JldC0wMTIzNDU2Nzg5YWI=";

/// The 158-byte payload of the serializer-change case (raw UTF-8, an escaped U+2028, `1.10`,
/// `1e2` and an integer above 2^64) and its SHA-256.
const B02_PAYLOAD: &str = r#"{"id":"evt_b02","type":"place.updated","data":{"name":"Plaça Pau Vila 1","emoji":"😊","note":"a\u2028b","price":1.10,"qty":1e2,"big":12345678901234567890}}"#;
const B02_SHA256: &str = "7b5d0ec547c15e2b8ed6b19d11af555c990ea83ffa8107462f9b32f1b177f1c4";

/// The retry-signature case's payload and its SHA-256.
const B04_PAYLOAD: &str =
    r#"{"id":"evt_b04","type":"contact.updated","data":{"contact_id":"c_1"}}"#;
const B04_SHA256: &str = "7c68eca7c8ec748c7b627602eb6618baa64b66c9ac6abf28bb2d47a0c6de863d";

struct Fixture {
    dir: tempfile::TempDir,
    receiver: Receiver,
}

impl Fixture {
    fn new(behaviours: &[(&str, Behaviour)]) -> Fixture {
        let behaviours: HashMap<String, Behaviour> = behaviours
            .iter()
            .map(|(path, behaviour)| (path.to_string(), *behaviour))
            .collect();
        Fixture {
            dir: tempfile::tempdir().expect("temporary directory"),
            receiver: Receiver::start(behaviours).expect("receiver on 127.0.0.1"),
        }
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn archive_dir(&self) -> PathBuf {
        self.data_dir().join("archive")
    }

    /// Writes `name` with one endpoint per (id, tenant, path, patterns) and no retries. The
    /// circuit breaker's cooldown is short, because these tests make endpoints fail on
    /// purpose and the replay then passes the open breaker's probe like any delivery.
    fn write_config(&self, name: &str, endpoints: &[(&str, &str, &str, &str)]) -> PathBuf {
        let mut text = String::from(
            "[delivery]\nallowed_private_cidrs = [\"127.0.0.1/32\"]\n\
             [retry]\nschedule_ms = []\n\
             [archive]\nmax_file_age_secs = 1\n\
             [health]\nbreaker_cooldown_ms = 100\nbreaker_max_cooldown_ms = 400\n",
        );
        for (id, tenant, path, patterns) in endpoints {
            text.push_str(&format!(
                "\n[[endpoints]]\nid = \"{id}\"\ntenant = \"{tenant}\"\nurl = \"{}\"\n\
                 event_types = {patterns}\nsecret = \"{S1}\"\ntimeout_ms = 5000\n",
                self.receiver.url(path)
            ));
        }
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).expect("write config");
        path
    }

    fn publish(&self, lines: &[String]) {
        let file = self.dir.path().join("events.ndjson");
        std::fs::write(&file, lines.join("\n")).expect("write events");
        let output = hookflow()
            .arg("publish")
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg(&file)
            .output()
            .expect("run hookflow publish");
        assert!(
            output.status.success(),
            "publish failed: {}",
            stderr(&output)
        );
    }

    fn run_until_idle(&self, config: &Path) {
        let output = hookflow()
            .args(["run", "--until-idle", "--config"])
            .arg(config)
            .arg("--data-dir")
            .arg(self.data_dir())
            .output()
            .expect("run hookflow run");
        assert!(
            output.status.success(),
            "hookflow run failed: {}",
            stderr(&output)
        );
    }

    /// Runs `hookflow replay --data-dir D --config C ARGS…`.
    fn replay(&self, config: &Path, args: &[&str]) -> Output {
        self.replay_command(config, args)
            .output()
            .expect("run hookflow replay")
    }

    fn replay_command(&self, config: &Path, args: &[&str]) -> Command {
        let mut command = hookflow();
        command
            .arg("replay")
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("--config")
            .arg(config)
            .args(args);
        command
    }

    /// Runs a dry run and returns its JSON summary.
    fn dry_run(&self, config: &Path, args: &[&str]) -> Value {
        let mut all = vec!["--dry-run", "--json"];
        all.extend_from_slice(args);
        let output = self.replay(config, &all);
        assert!(
            output.status.success(),
            "dry run failed: {}",
            stderr(&output)
        );
        serde_json::from_slice(&output.stdout).expect("dry run prints JSON")
    }

    fn rows(&self) -> Vec<AttemptRow> {
        read_attempts(&self.archive_dir()).expect("archive reads back")
    }
}

fn hookflow() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_hookflow"));
    command.env("RUST_LOG", "warn");
    command
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn event(tenant: &str, id: &str, event_type: &str, payload: &str) -> String {
    format!(
        r#"{{"id":"{id}","tenant":"{tenant}","type":"{event_type}","created_at":"2023-11-14T22:13:20Z","payload":{payload}}}"#
    )
}

/// Requests per `webhook-id`.
fn per_id(requests: &[ReceivedRequest]) -> BTreeMap<String, Vec<&ReceivedRequest>> {
    let mut by_id: BTreeMap<String, Vec<&ReceivedRequest>> = BTreeMap::new();
    for request in requests {
        let id = request.header("webhook-id").unwrap_or_default().to_string();
        by_id.entry(id).or_default().push(request);
    }
    by_id
}

fn sha256_hex(bytes: &[u8]) -> String {
    hookflow_replay::select::sha256_hex(bytes)
}

fn verify(request: &ReceivedRequest) {
    let mut headers = axum::http::HeaderMap::new();
    for (name, value) in &request.headers {
        if let (Ok(name), Ok(value)) = (
            axum::http::HeaderName::from_bytes(name.as_bytes()),
            axum::http::HeaderValue::from_str(value),
        ) {
            headers.insert(name, value);
        }
    }
    standardwebhooks::Webhook::new(S1)
        .expect("secret")
        .verify(&request.body, &headers)
        .expect("signature verifies with standardwebhooks");
}

fn terminate(mut child: Child) {
    let status = process::terminate(&mut child);
    assert!(status.success(), "hookflow run exited with {status}");
}

/// An endpoint fails the first attempt of every event and no retries are configured, so
/// every delivery to it dead-letters. Once it is back, a replay of its dead-lettered
/// deliveries, run while the pipeline is running, delivers each exactly once. The replay
/// keeps the original bytes and `webhook-id`, and is archived as a new generation.
#[test]
fn outage_replay_delivers_dead_letters_once() {
    let fixture = Fixture::new(&[(
        "/down",
        Behaviour::FailFirst {
            failures: 1,
            status: 500,
        },
    )]);
    let config = fixture.write_config(
        "hookflow.toml",
        &[
            ("ep_down", "acme", "/down", r#"["*"]"#),
            ("ep_up", "acme", "/up", r#"["*"]"#),
        ],
    );
    let mut lines = vec![
        event("acme", "msg_b02", "place.updated", B02_PAYLOAD),
        event("acme", "msg_b04", "contact.updated", B04_PAYLOAD),
    ];
    for n in 0..18 {
        lines.push(event(
            "acme",
            &format!("evt_{n}"),
            "charge.succeeded",
            &format!(r#"{{ "n" : {n} }}"#),
        ));
    }
    fixture.publish(&lines);
    fixture.run_until_idle(&config);

    let rows = fixture.rows();
    let dead: Vec<&AttemptRow> = rows
        .iter()
        .filter(|r| r.endpoint_id.as_deref() == Some("ep_down"))
        .collect();
    assert_eq!(dead.len(), 20);
    assert!(
        dead.iter().all(|r| r.outcome == "dead_lettered"),
        "{dead:?}"
    );

    let summary = fixture.dry_run(
        &config,
        &["--outcome", "dead-lettered", "--endpoint", "ep_down"],
    );
    assert_eq!(summary["events"], 20);
    assert_eq!(summary["deliveries"], 20);
    assert_eq!(summary["endpoints"]["ep_down"]["deliveries"], 20);
    assert!(summary["endpoints"].get("ep_up").is_none(), "{summary}");
    assert_eq!(
        fixture.receiver.requests_to("/down").len(),
        20,
        "a dry run sends nothing"
    );
    assert!(
        !fixture.data_dir().join("replay").exists(),
        "a dry run writes no ledger"
    );

    let pipeline = hookflow()
        .args(["run", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(fixture.data_dir())
        .stderr(Stdio::null())
        .spawn()
        .expect("start hookflow run");
    let output = fixture.replay(
        &config,
        &[
            "--outcome",
            "dead-lettered",
            "--endpoint",
            "ep_down",
            "--id",
            "outage",
            "--rate",
            "1000",
        ],
    );
    assert!(
        output.status.success(),
        "replay failed: {}",
        stderr(&output)
    );
    let delivered = wait_for(Duration::from_secs(30), || {
        fixture.receiver.requests_to("/down").len() >= 40
    });
    // Give a stray second delivery time to show up before counting.
    std::thread::sleep(Duration::from_millis(500));
    terminate(pipeline);
    assert!(delivered, "the replay was not delivered within 30 s");

    let down = fixture.receiver.requests_to("/down");
    assert_eq!(
        down.len(),
        40,
        "each event once originally and once replayed"
    );
    for (id, requests) in per_id(&down) {
        assert_eq!(requests.len(), 2, "{id}");
        assert_eq!(requests[0].status, 500, "{id}");
        assert_eq!(requests[1].status, 200, "{id}");
        assert_eq!(
            requests[0].body, requests[1].body,
            "{id}: replay body differs"
        );
        for request in &requests {
            verify(request);
        }
    }
    let by_id = per_id(&down);
    assert_eq!(sha256_hex(&by_id["msg_b02"][1].body), B02_SHA256);
    assert_eq!(sha256_hex(&by_id["msg_b04"][1].body), B04_SHA256);
    assert_eq!(
        String::from_utf8_lossy(&by_id["evt_3"][1].body),
        r#"{ "n" : 3 }"#,
        "spacing kept, never re-serialized"
    );
    assert_eq!(
        fixture.receiver.requests_to("/up").len(),
        20,
        "ep_up is not replayed"
    );

    let rows = fixture.rows();
    let replayed: Vec<&AttemptRow> = rows.iter().filter(|r| r.generation > 0).collect();
    assert_eq!(replayed.len(), 20);
    for row in &replayed {
        assert_eq!(row.replay_id.as_deref(), Some("outage"));
        assert_eq!(row.endpoint_id.as_deref(), Some("ep_down"));
        assert_eq!(row.outcome, "delivered");
        let original = rows
            .iter()
            .find(|r| {
                r.generation == 0 && r.event_id == row.event_id && r.endpoint_id == row.endpoint_id
            })
            .expect("original row");
        assert_eq!(
            row.body_sha256, original.body_sha256,
            "archived body hash differs"
        );
    }

    let again = fixture.replay(
        &config,
        &[
            "--outcome",
            "dead-lettered",
            "--endpoint",
            "ep_down",
            "--id",
            "outage",
        ],
    );
    assert!(
        !again.status.success(),
        "a second run of the same replay must be refused"
    );
    assert!(stderr(&again).contains("already ran"), "{}", stderr(&again));
    let after = fixture.dry_run(
        &config,
        &["--outcome", "dead-lettered", "--endpoint", "ep_down"],
    );
    assert_eq!(
        after["events"], 0,
        "the replayed deliveries are delivered now: {after}"
    );
}

/// A new endpoint receives exactly the selected past events of its tenant and types,
/// including events published before it existed, and the dry run's counts are what the
/// real run then sends.
#[test]
fn backfill_new_endpoint() {
    let fixture = Fixture::new(&[]);
    let before = fixture.write_config(
        "before.toml",
        &[
            ("ep_users", "acme", "/users", r#"["user.*"]"#),
            ("ep_globex", "globex", "/globex", r#"["*"]"#),
        ],
    );
    let mut lines = Vec::new();
    for n in 0..30 {
        let (tenant, event_type) = match n % 3 {
            0 => ("acme", "charge.succeeded"),
            1 => ("acme", "user.created"),
            _ => ("globex", "charge.succeeded"),
        };
        lines.push(event(
            tenant,
            &format!("evt_{n}"),
            event_type,
            &format!(r#"{{"n":{n}}}"#),
        ));
    }
    fixture.publish(&lines);
    fixture.run_until_idle(&before);
    assert_eq!(fixture.receiver.requests_to("/users").len(), 10);

    let after = fixture.write_config(
        "after.toml",
        &[
            ("ep_users", "acme", "/users", r#"["user.*"]"#),
            ("ep_globex", "globex", "/globex", r#"["*"]"#),
            ("ep_new", "acme", "/new", r#"["charge.*"]"#),
        ],
    );
    let summary = fixture.dry_run(&after, &["--to-endpoint", "ep_new"]);
    assert_eq!(summary["events"], 10, "{summary}");
    assert_eq!(summary["endpoints"]["ep_new"]["deliveries"], 10);

    let mismatch = fixture.replay(&after, &["--to-endpoint", "ep_new", "--tenant", "globex"]);
    assert!(!mismatch.status.success());
    assert!(
        stderr(&mismatch).contains("differs from the tenant"),
        "{}",
        stderr(&mismatch)
    );

    let output = fixture.replay(&after, &["--to-endpoint", "ep_new", "--id", "backfill"]);
    assert!(
        output.status.success(),
        "replay failed: {}",
        stderr(&output)
    );
    fixture.run_until_idle(&after);

    let received: Vec<String> = per_id(&fixture.receiver.requests_to("/new"))
        .into_iter()
        .map(|(id, requests)| {
            assert_eq!(requests.len(), 1, "{id} sent more than once");
            id
        })
        .collect();
    let mut expected: Vec<String> = (0..30)
        .filter(|n| n % 3 == 0)
        .map(|n| format!("evt_{n}"))
        .collect();
    expected.sort();
    assert_eq!(received, expected);
    assert_eq!(
        fixture.receiver.requests_to("/users").len(),
        10,
        "no other endpoint gets the replay"
    );
    assert_eq!(fixture.receiver.requests_to("/globex").len(), 10);

    let repeat = fixture.dry_run(&after, &["--to-endpoint", "ep_new"]);
    assert_eq!(repeat["events"], 0, "{repeat}");
    assert_eq!(repeat["skipped"]["already_delivered"], 10);
}

/// A replay interrupted halfway by SIGINT resumes where it stopped. Records that a run
/// appended without recording them in the ledger are appended again on resume, and dedup
/// drops the copies, so each event reaches the endpoint once.
#[test]
fn interrupted_replay_resumes_without_duplicates() {
    let fixture = Fixture::new(&[(
        "/down",
        Behaviour::FailFirst {
            failures: 1,
            status: 503,
        },
    )]);
    let config = fixture.write_config("hookflow.toml", &[("ep_down", "acme", "/down", r#"["*"]"#)]);
    let lines: Vec<String> = (0..40)
        .map(|n| {
            event(
                "acme",
                &format!("evt_{n:02}"),
                "charge.succeeded",
                &format!(r#"{{"n":{n}}}"#),
            )
        })
        .collect();
    fixture.publish(&lines);
    fixture.run_until_idle(&config);
    let planned = fixture.dry_run(&config, &["--outcome", "failed"]);
    assert_eq!(planned["events"], 40);

    let mut child = fixture
        .replay_command(
            &config,
            &["--outcome", "failed", "--id", "slow", "--rate", "20"],
        )
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("start hookflow replay");
    let progress = BufReader::new(child.stderr.take().expect("stderr"));
    let mut lines_seen = Vec::new();
    for line in progress.lines().map_while(Result::ok) {
        lines_seen.push(line.clone());
        let appended: Option<u64> = line
            .strip_prefix("replay slow: ")
            .and_then(|rest| rest.split('/').next())
            .and_then(|n| n.parse().ok());
        if appended.is_some_and(|n| n >= 10) {
            let _ = Command::new("kill")
                .args(["-INT", &child.id().to_string()])
                .status();
            break;
        }
    }
    let status = child.wait().expect("wait for replay");
    assert!(
        !status.success(),
        "an interrupted replay exits non-zero: {lines_seen:?}"
    );

    let ledger = hookflow_replay::ledger::Ledger::open(&fixture.data_dir()).expect("ledger");
    let run = ledger
        .runs(Some("slow"))
        .expect("runs")
        .pop()
        .expect("the run");
    assert!(run.finished_at_ms.is_none());
    assert!(
        run.appended >= 10 && run.appended < 40,
        "appended {}",
        run.appended
    );

    // The window a crash can hit: records appended, progress not yet recorded. Append the
    // next five planned items' records behind the ledger's back; resume appends them again.
    let planned_items = ledger.planned_items(run.generation).expect("planned items");
    let mut log = hookflow_connectors::LocalLog::open(
        &fixture.data_dir(),
        &hookflow_connectors::LocalLogOptions::default(),
    )
    .expect("log");
    for (_, item) in planned_items.iter().take(5) {
        let event = hookflow_replay::select::original_record(item, &mut log)
            .expect("read")
            .expect("original record");
        let replay = hookflow_schemas::Replay {
            id: "slow".into(),
            generation: run.generation,
            endpoints: item.endpoints.clone(),
            from_partition: Some(item.partition),
            from_offset: Some(item.offset),
        };
        let record = hookflow_schemas::encode_replay_record(&event, &replay);
        log.append(&[(item.tenant.as_bytes(), record.as_slice())], 0)
            .expect("append");
    }
    drop(ledger);

    let fresh = fixture.replay(&config, &["--outcome", "failed", "--id", "slow"]);
    assert!(!fresh.status.success());
    assert!(
        stderr(&fresh).contains("--resume slow"),
        "{}",
        stderr(&fresh)
    );

    let resumed = fixture.replay(&config, &["--resume", "slow", "--rate", "1000"]);
    assert!(
        resumed.status.success(),
        "resume failed: {}",
        stderr(&resumed)
    );
    fixture.run_until_idle(&config);

    let down = fixture.receiver.requests_to("/down");
    for (id, requests) in per_id(&down) {
        assert_eq!(requests.len(), 2, "{id}: once failed, once replayed");
        assert_eq!(requests[1].status, 200, "{id}");
    }
    assert_eq!(down.len(), 80);
    let replay_rows = fixture
        .rows()
        .into_iter()
        .filter(|r| r.generation > 0)
        .count();
    assert_eq!(replay_rows, 40, "one attempt row per replayed delivery");
}

/// `hookflow stats --json` agrees with DuckDB and pyarrow reading the same archive. CI sets
/// HOOKFLOW_REQUIRE_PYTHON_READERS=1 after installing both; elsewhere the check runs when
/// python3 has them.
#[test]
fn stats_match_duckdb() {
    let fixture = Fixture::new(&[
        (
            "/flaky",
            Behaviour::FailFirst {
                failures: 1,
                status: 503,
            },
        ),
        ("/broken", Behaviour::Status(500)),
    ]);
    let config = fixture.write_config(
        "hookflow.toml",
        &[
            ("ep_flaky", "acme", "/flaky", r#"["*"]"#),
            ("ep_broken", "acme", "/broken", r#"["charge.*"]"#),
            ("ep_ok", "globex", "/ok", r#"["*"]"#),
        ],
    );
    let text = std::fs::read_to_string(&config)
        .expect("config")
        .replace("schedule_ms = []", "schedule_ms = [50]");
    std::fs::write(&config, text).expect("config");
    let mut lines = Vec::new();
    for n in 0..24 {
        let (tenant, event_type) = match n % 4 {
            0 => ("acme", "charge.succeeded"),
            1 => ("acme", "user.created"),
            2 => ("globex", "order.placed"),
            _ => ("initech", "charge.succeeded"),
        };
        lines.push(event(tenant, &format!("evt_{n}"), event_type, "{}"));
    }
    fixture.publish(&lines);
    fixture.run_until_idle(&config);

    let output = hookflow()
        .args(["stats", "--json", "--data-dir"])
        .arg(fixture.data_dir())
        .output()
        .expect("run hookflow stats");
    assert!(output.status.success(), "stats failed: {}", stderr(&output));
    let ours: Value = serde_json::from_slice(&output.stdout).expect("stats JSON");
    let endpoints: BTreeMap<String, &Value> = ours["endpoints"]
        .as_array()
        .expect("endpoints")
        .iter()
        .map(|e| (e["endpoint_id"].as_str().unwrap_or_default().to_string(), e))
        .collect();
    assert_eq!(endpoints["ep_flaky"]["deliveries"], 12);
    assert_eq!(endpoints["ep_flaky"]["delivered"], 12);
    assert_eq!(endpoints["ep_flaky"]["attempts"], 24);
    assert_eq!(endpoints["ep_broken"]["delivered"], 0);
    assert_eq!(endpoints["ep_broken"]["deliveries"], 6);
    assert_eq!(endpoints["ep_broken"]["failures"], 12);
    assert_eq!(ours["unrouted"], 6, "initech has no endpoint");

    let table = hookflow()
        .args(["stats", "--endpoint", "ep_broken", "--data-dir"])
        .arg(fixture.data_dir())
        .output()
        .expect("run hookflow stats");
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains("ep_broken") && table.contains("http_status 12"),
        "{table}"
    );
    assert!(!table.contains("ep_flaky"), "{table}");

    let required = std::env::var("HOOKFLOW_REQUIRE_PYTHON_READERS").is_ok_and(|v| v == "1");
    let available = Command::new("python3")
        .args(["-c", "import pyarrow, duckdb"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !available {
        assert!(
            !required,
            "python3 with pyarrow and duckdb is required (pip install pyarrow duckdb)"
        );
        eprintln!("skipping the DuckDB comparison: python3 lacks pyarrow or duckdb");
        return;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/check_stats.py");
    let output = Command::new("python3")
        .arg(script)
        .arg(fixture.archive_dir())
        .output()
        .expect("run python3");
    assert!(
        output.status.success(),
        "check_stats.py failed: {}",
        stderr(&output)
    );
    let theirs: Value = serde_json::from_slice(&output.stdout).expect("DuckDB JSON");
    let theirs = theirs.as_object().expect("object");
    assert_eq!(theirs.len(), endpoints.len());
    for (endpoint, figures) in theirs {
        let ours = endpoints[endpoint];
        for field in [
            "deliveries",
            "delivered",
            "attempts",
            "failures",
            "first_failure_ms",
            "last_failure_ms",
        ] {
            assert_eq!(ours[field], figures[field], "{endpoint} {field}");
        }
        let our_kinds: BTreeMap<String, u64> = ours["top_error_kinds"]
            .as_array()
            .expect("kinds")
            .iter()
            .map(|pair| {
                (
                    pair[0].as_str().unwrap_or_default().to_string(),
                    pair[1].as_u64().unwrap_or(0),
                )
            })
            .collect();
        let their_kinds: BTreeMap<String, u64> = figures["error_kinds"]
            .as_object()
            .expect("kinds")
            .iter()
            .map(|(kind, count)| (kind.clone(), count.as_u64().unwrap_or(0)))
            .collect();
        assert_eq!(our_kinds, their_kinds, "{endpoint} error kinds");
    }
}
