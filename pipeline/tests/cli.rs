//! End-to-end tests of the `hookflow` binary: publish to the local log, run the pipeline as a
//! child process against a real receiver on 127.0.0.1, and read the Parquet archive back.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use hookflow::receiver::{Behaviour, ReceivedRequest, Receiver};
use hookflow_connectors::read_attempts;
use hookflow_schemas::AttemptRow;

mod support;
use support::process::{self, wait_for};

const SECRET: &str = "whsec_RTPHghziaKPNKV/Y78ALF6hfDn11pL7egmdm4fV+DaE=";
const SECOND_SECRET: &str = "whsec_mjOP7/3gtxkwXFj1XjnnpUxQm2lQ9k2B95Uj5ocmvGY=";

/// A data directory, a config file and a receiver for one test.
struct Fixture {
    dir: tempfile::TempDir,
    receiver: Receiver,
}

impl Fixture {
    fn new(behaviours: HashMap<String, Behaviour>) -> Fixture {
        let dir = tempfile::tempdir().expect("temporary directory");
        let receiver = Receiver::start(behaviours).expect("receiver on 127.0.0.1");
        Fixture { dir, receiver }
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn archive_dir(&self) -> PathBuf {
        self.data_dir().join("archive")
    }

    /// Writes a config with one endpoint per (id, tenant, path, patterns), and no retries.
    fn write_config(&self, endpoints: &[(&str, &str, &str, &str)]) -> PathBuf {
        self.write_config_with(endpoints, "[retry]\nschedule_ms = []\n", "")
    }

    /// Writes a config with one endpoint per (id, tenant, path, patterns); `tables` is added
    /// after `[delivery]` and `endpoint_extra` to every endpoint.
    fn write_config_with(
        &self,
        endpoints: &[(&str, &str, &str, &str)],
        tables: &str,
        endpoint_extra: &str,
    ) -> PathBuf {
        let mut text = String::from("[delivery]\nallowed_private_cidrs = [\"127.0.0.1/32\"]\n");
        text.push_str(tables);
        for (id, tenant, path, patterns) in endpoints {
            text.push_str(&format!(
                "\n[[endpoints]]\nid = \"{id}\"\ntenant = \"{tenant}\"\nurl = \"{}\"\n\
                 event_types = {patterns}\nsecrets = [\"{SECRET}\", \"{SECOND_SECRET}\"]\n\
                 timeout_ms = 5000\n{endpoint_extra}\n",
                self.receiver.url(path)
            ));
        }
        let path = self.dir.path().join("hookflow.toml");
        std::fs::write(&path, text).expect("write config");
        path
    }

    fn publish(&self, lines: &[String], raw: bool) -> Output {
        let file = self
            .dir
            .path()
            .join(format!("events-{}.ndjson", lines.len()));
        std::fs::write(&file, lines.join("\n")).expect("write events");
        let mut command = hookflow();
        command
            .arg("publish")
            .arg("--data-dir")
            .arg(self.data_dir());
        if raw {
            command.arg("--raw");
        }
        command.arg(&file).output().expect("run hookflow publish")
    }

    fn run_until_idle(&self, config: &Path) -> Output {
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
        output
    }

    /// Starts `hookflow run` without `--until-idle`; stop it with [`terminate`].
    fn spawn_run(&self, config: &Path) -> Child {
        hookflow()
            .args(["run", "--config"])
            .arg(config)
            .arg("--data-dir")
            .arg(self.data_dir())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start hookflow run")
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
        r#"{{"id":"{id}","tenant":"{tenant}","type":"{event_type}","created_at":"2026-12-04T10:00:00Z","payload":{payload}}}"#
    )
}

/// (event id, endpoint id, outcome, attempt, HTTP status) of one attempt row.
type RowSummary = (Option<String>, Option<String>, String, u32, Option<u16>);

fn outcomes(rows: &[AttemptRow]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for row in rows {
        *counts.entry(row.outcome.clone()).or_insert(0) += 1;
    }
    counts
}

fn ids(requests: &[ReceivedRequest]) -> Vec<String> {
    let mut ids: Vec<String> = requests
        .iter()
        .map(|r| r.header("webhook-id").unwrap_or_default().to_string())
        .collect();
    ids.sort();
    ids
}

#[test]
fn dedup_same_tenant_and_id() {
    let fixture = Fixture::new(HashMap::new());
    let config = fixture.write_config(&[
        ("ep_a", "acme", "/a", r#"["*"]"#),
        ("ep_g", "globex", "/g", r#"["*"]"#),
    ]);
    let lines = vec![
        event("acme", "evt_1", "charge.succeeded", r#"{"n":1}"#),
        event("acme", "evt_1", "charge.succeeded", r#"{"n":2}"#),
        event("globex", "evt_1", "charge.succeeded", r#"{"n":3}"#),
    ];
    assert!(fixture.publish(&lines, false).status.success());
    fixture.run_until_idle(&config);

    let to_acme = fixture.receiver.requests_to("/a");
    assert_eq!(to_acme.len(), 1, "same (tenant, id) is delivered once");
    assert_eq!(to_acme[0].body, br#"{"n":1}"#, "the first occurrence wins");
    assert_eq!(
        fixture.receiver.requests_to("/g").len(),
        1,
        "another tenant's evt_1 is delivered"
    );
    assert_eq!(
        outcomes(&fixture.rows()),
        BTreeMap::from([("delivered".to_string(), 2)])
    );
}

#[test]
fn fan_out_stays_within_tenant() {
    let fixture = Fixture::new(HashMap::new());
    let config = fixture.write_config(&[
        ("ep_billing", "acme", "/billing", r#"["charge.*"]"#),
        ("ep_audit", "acme", "/audit", r#"["*"]"#),
        ("ep_other", "globex", "/other", r#"["*"]"#),
        ("ep_invoices", "acme", "/invoices", r#"["invoice.paid"]"#),
    ]);
    let lines = vec![event("acme", "evt_1", "charge.succeeded", "{}")];
    assert!(fixture.publish(&lines, false).status.success());
    fixture.run_until_idle(&config);

    assert_eq!(ids(&fixture.receiver.requests_to("/billing")), ["evt_1"]);
    assert_eq!(ids(&fixture.receiver.requests_to("/audit")), ["evt_1"]);
    assert!(
        fixture.receiver.requests_to("/other").is_empty(),
        "another tenant's endpoint"
    );
    assert!(
        fixture.receiver.requests_to("/invoices").is_empty(),
        "pattern does not match"
    );
    let mut endpoints: Vec<String> = fixture
        .rows()
        .into_iter()
        .filter_map(|r| r.endpoint_id)
        .collect();
    endpoints.sort();
    assert_eq!(endpoints, ["ep_audit", "ep_billing"]);
}

#[test]
fn malformed_line_is_dead_lettered() {
    let fixture = Fixture::new(HashMap::new());
    let config = fixture.write_config(&[("ep_a", "acme", "/a", r#"["*"]"#)]);
    let lines = vec![
        event("acme", "evt_1", "t.a", "{}"),
        r#"{"id":"evt_2","tenant":"acme","type":"#.to_string(),
        event("acme", "evt_3", "t.a", "{}"),
        r#"{"id":"evt_4","tenant":"acme","created_at":"2026-12-04T10:00:00Z","payload":{}}"#
            .to_string(),
        event("acme", "evt_5", "t.a", "{}"),
    ];
    let output = fixture.publish(&lines, true);
    assert!(output.status.success(), "{}", stderr(&output));
    fixture.run_until_idle(&config);

    assert_eq!(
        ids(&fixture.receiver.requests_to("/a")),
        ["evt_1", "evt_3", "evt_5"]
    );
    let rows = fixture.rows();
    let invalid: Vec<&AttemptRow> = rows.iter().filter(|r| r.outcome == "invalid").collect();
    assert_eq!(invalid.len(), 2);
    let kinds: Vec<&str> = invalid
        .iter()
        .filter_map(|r| r.error_kind.as_deref())
        .collect();
    assert!(kinds.contains(&"invalid_json"), "{kinds:?}");
    assert!(kinds.contains(&"missing_field"), "{kinds:?}");
    let messages: Vec<&str> = invalid
        .iter()
        .filter_map(|r| r.error_message.as_deref())
        .collect();
    assert!(
        messages.iter().any(|m| m.contains("missing field `type`")),
        "{messages:?}"
    );
    assert_eq!(outcomes(&rows).get("delivered"), Some(&3));
}

#[test]
fn body_and_signature_are_exact() {
    let fixture = Fixture::new(HashMap::new());
    let config = fixture.write_config(&[("ep_a", "acme", "/a", r#"["*"]"#)]);
    let payload = r#"{ "amount" :  12345678901234567890, "name": "Zoë 🚀 \u00e9",
 "nested": {"b": 1.50, "a": [ ]} }"#
        .replace('\n', "");
    let lines = vec![event("acme", "evt_exact", "charge.succeeded", &payload)];
    assert!(fixture.publish(&lines, false).status.success());
    fixture.run_until_idle(&config);

    let requests = fixture.receiver.requests_to("/a");
    assert_eq!(requests.len(), 1);
    let request = &requests[0];
    assert_eq!(
        request.body,
        payload.as_bytes(),
        "body must be the payload byte for byte"
    );
    assert_eq!(request.header("content-type"), Some("application/json"));
    assert_eq!(request.header("webhook-id"), Some("evt_exact"));

    let mut headers = axum::http::HeaderMap::new();
    for (name, value) in &request.headers {
        let name = axum::http::HeaderName::from_bytes(name.as_bytes()).expect("header name");
        headers.insert(name, value.parse().expect("header value"));
    }
    for secret in [SECRET, SECOND_SECRET] {
        let verifier = standardwebhooks::Webhook::new(secret).expect("secret");
        verifier
            .verify(&request.body, &headers)
            .expect("signature verifies with standardwebhooks");
    }
    let other =
        standardwebhooks::Webhook::new("whsec_dGhpcyBpcyBub3QgdGhlIHJpZ2h0IGtleSBhdCBhbGw=")
            .expect("secret");
    assert!(
        other.verify(&request.body, &headers).is_err(),
        "a wrong key must not verify"
    );
}

#[test]
fn publish_while_running() {
    let fixture = Fixture::new(HashMap::new());
    let config = fixture.write_config(&[("ep_a", "acme", "/a", r#"["*"]"#)]);
    let first: Vec<String> = (0..50)
        .map(|n| event("acme", &format!("evt_{n:03}"), "t.a", "{}"))
        .collect();
    assert!(fixture.publish(&first, false).status.success());

    let mut child = fixture.spawn_run(&config);

    let second: Vec<String> = (50..150)
        .map(|n| event("acme", &format!("evt_{n:03}"), "t.a", "{}"))
        .collect();
    for chunk in second.chunks(25) {
        assert!(fixture.publish(chunk, false).status.success());
        std::thread::sleep(Duration::from_millis(50));
    }

    let delivered = wait_for(Duration::from_secs(30), || {
        fixture.receiver.requests().len() >= 150
    });
    let _ = terminate(&mut child);
    assert!(
        delivered,
        "only {} of 150 delivered",
        fixture.receiver.requests().len()
    );
    let unique: std::collections::BTreeSet<String> =
        ids(&fixture.receiver.requests()).into_iter().collect();
    assert_eq!(unique.len(), 150);
    assert_eq!(
        fixture.receiver.requests().len(),
        150,
        "nothing delivered twice"
    );
    assert_eq!(
        outcomes(&fixture.rows()).get("delivered"),
        Some(&150),
        "archive flushed on SIGTERM"
    );
}

#[test]
fn archive_rows_are_exact() {
    let fixture = Fixture::new(HashMap::from([(
        "/broken".to_string(),
        Behaviour::Status(503),
    )]));
    let config = fixture.write_config(&[
        ("ep_ok", "acme", "/ok", r#"["charge.*"]"#),
        ("ep_broken", "acme", "/broken", r#"["charge.refunded"]"#),
    ]);
    let lines = vec![
        event("acme", "evt_1", "charge.succeeded", "{}"),
        event("acme", "evt_2", "charge.refunded", "{}"),
        event("acme", "evt_3", "customer.created", "{}"),
        "not json".to_string(),
    ];
    assert!(fixture.publish(&lines, true).status.success());
    fixture.run_until_idle(&config);

    let mut rows: Vec<RowSummary> = fixture
        .rows()
        .into_iter()
        .map(|r| {
            (
                r.event_id,
                r.endpoint_id,
                r.outcome,
                r.attempt,
                r.http_status,
            )
        })
        .collect();
    rows.sort();
    let expected = vec![
        (None, None, "invalid".to_string(), 0, None),
        (
            Some("evt_1".into()),
            Some("ep_ok".into()),
            "delivered".to_string(),
            1,
            Some(200),
        ),
        (
            Some("evt_2".into()),
            Some("ep_broken".into()),
            "dead_lettered".to_string(),
            1,
            Some(503),
        ),
        (
            Some("evt_2".into()),
            Some("ep_ok".into()),
            "delivered".to_string(),
            1,
            Some(200),
        ),
        (Some("evt_3".into()), None, "unrouted".to_string(), 0, None),
    ];
    assert_eq!(rows, expected);

    let files = parquet_files(&fixture.archive_dir());
    assert!(!files.is_empty());
    for file in &files {
        let name = file
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        assert!(
            name.ends_with(".parquet") && !name.starts_with('.'),
            "{name}"
        );
        let parent = file
            .parent()
            .and_then(|p| p.file_name())
            .and_then(|n| n.to_str());
        assert!(
            parent.is_some_and(|p| p.starts_with("date=")),
            "{}",
            file.display()
        );
    }
    check_with_python_readers(&fixture.archive_dir(), 5);
}

#[test]
fn retry_until_delivered() {
    let fixture = Fixture::new(HashMap::from([(
        "/flaky".to_string(),
        Behaviour::FailFirst {
            failures: 2,
            status: 500,
        },
    )]));
    // Steps over a second apart, so that each attempt has its own `webhook-timestamp` second.
    let config = fixture.write_config_with(
        &[("ep_flaky", "acme", "/flaky", r#"["*"]"#)],
        "[retry]\nschedule_ms = [1100, 1100, 1100]\njitter_percent = 0\n",
        "",
    );
    let lines = vec![event("acme", "evt_retry", "charge.failed", r#"{"n":1}"#)];
    assert!(fixture.publish(&lines, false).status.success());
    fixture.run_until_idle(&config);

    let requests = fixture.receiver.requests_to("/flaky");
    assert_eq!(requests.len(), 3, "two failures, then the delivery");
    let statuses: Vec<u16> = requests.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [500, 500, 200]);
    for request in &requests {
        assert_eq!(request.header("webhook-id"), Some("evt_retry"));
        assert_eq!(request.body, br#"{"n":1}"#, "a retry sends the same bytes");
    }
    let timestamps: std::collections::BTreeSet<&str> = requests
        .iter()
        .filter_map(|r| r.header("webhook-timestamp"))
        .collect();
    assert_eq!(
        timestamps.len(),
        3,
        "each attempt is signed at its own time"
    );

    let mut rows = fixture.rows();
    rows.sort_by_key(|r| r.attempt);
    let summary: Vec<(u32, &str)> = rows
        .iter()
        .map(|r| (r.attempt, r.outcome.as_str()))
        .collect();
    assert_eq!(summary, [(1, "failed"), (2, "failed"), (3, "delivered")]);
    for pair in rows.windows(2) {
        let next = pair[0]
            .next_attempt_at_ms
            .expect("a failed row names its next attempt");
        assert_eq!(
            pair[1].due_at_ms, next,
            "the retry is due when the row said"
        );
        let started = pair[1].started_at_ms.expect("started");
        assert!(
            started >= next,
            "attempt {} started before it was due",
            pair[1].attempt
        );
    }
    assert_eq!(rows[2].next_attempt_at_ms, None);
}

#[test]
fn retries_exhausted_dead_letter() {
    let fixture = Fixture::new(HashMap::from([(
        "/down".to_string(),
        Behaviour::Status(503),
    )]));
    let config = fixture.write_config_with(
        &[("ep_down", "acme", "/down", r#"["*"]"#)],
        "[retry]\nschedule_ms = [50, 50]\njitter_percent = 0\n",
        "",
    );
    let lines = vec![event("acme", "evt_down", "charge.failed", "{}")];
    assert!(fixture.publish(&lines, false).status.success());
    fixture.run_until_idle(&config);

    assert_eq!(fixture.receiver.requests_to("/down").len(), 3);
    let mut rows = fixture.rows();
    rows.sort_by_key(|r| r.attempt);
    let summary: Vec<(u32, &str)> = rows
        .iter()
        .map(|r| (r.attempt, r.outcome.as_str()))
        .collect();
    assert_eq!(
        summary,
        [(1, "failed"), (2, "failed"), (3, "dead_lettered")]
    );
    let message = rows[2].error_message.as_deref().unwrap_or_default();
    assert!(message.contains("gave up after 3 attempts"), "{message}");
}

#[test]
fn stop_leaves_retry_pending_for_restart() {
    let fixture = Fixture::new(HashMap::from([(
        "/flaky".to_string(),
        Behaviour::FailFirst {
            failures: 1,
            status: 500,
        },
    )]));
    let config = fixture.write_config_with(
        &[("ep_flaky", "acme", "/flaky", r#"["*"]"#)],
        "[retry]\nschedule_ms = [1500]\njitter_percent = 0\n",
        "",
    );
    let lines = vec![event("acme", "evt_pending", "charge.failed", r#"{"n":1}"#)];
    assert!(fixture.publish(&lines, false).status.success());

    let mut child = fixture.spawn_run(&config);
    let attempted = wait_for(Duration::from_secs(20), || {
        !fixture.receiver.requests().is_empty()
    });
    let stopped_at = Instant::now();
    let log = terminate(&mut child);
    assert!(attempted, "the first attempt never arrived");
    assert!(
        stopped_at.elapsed() < Duration::from_secs(10),
        "the stop waited for the retry: {log}"
    );
    assert_eq!(
        fixture.receiver.requests().len(),
        1,
        "the retry is not due before the stop"
    );

    // The next run resumes the pending retry at its due time instead of starting over.
    fixture.run_until_idle(&config);
    let requests = fixture.receiver.requests_to("/flaky");
    let statuses: Vec<u16> = requests.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [500, 200]);
    assert_eq!(
        requests[1].body, br#"{"n":1}"#,
        "the payload is read back from the log"
    );
    let gap = requests[1].received_at_ms - requests[0].received_at_ms;
    assert!(
        gap >= 1_400,
        "the retry came {gap} ms after the failure, before it was due"
    );

    let mut rows = fixture.rows();
    rows.sort_by_key(|r| r.attempt);
    let summary: Vec<(u32, &str)> = rows
        .iter()
        .map(|r| (r.attempt, r.outcome.as_str()))
        .collect();
    assert_eq!(summary, [(1, "failed"), (2, "delivered")]);
}

#[test]
fn restart_does_not_deliver_again() {
    let fixture = Fixture::new(HashMap::new());
    let config = fixture.write_config(&[("ep_a", "acme", "/a", r#"["*"]"#)]);
    let lines: Vec<String> = (0..40)
        .map(|n| event("acme", &format!("evt_{n:03}"), "t.a", "{}"))
        .chain(std::iter::once("not json".to_string()))
        .collect();
    assert!(fixture.publish(&lines, true).status.success());
    fixture.run_until_idle(&config);
    assert_eq!(fixture.receiver.requests().len(), 40);

    let repeat: Vec<String> = vec![event("acme", "evt_000", "t.a", r#"{"again":true}"#)];
    assert!(fixture.publish(&repeat, false).status.success());
    fixture.run_until_idle(&config);
    assert_eq!(
        fixture.receiver.requests().len(),
        40,
        "a restart re-delivers nothing"
    );
    let outcomes = outcomes(&fixture.rows());
    assert_eq!(outcomes.get("delivered"), Some(&40));
    assert_eq!(
        outcomes.get("invalid"),
        Some(&1),
        "the invalid record is archived once"
    );
}

/// An endpoint that responds 410 Gone is disabled: its other deliveries are parked across
/// restarts, `endpoints list` shows the reason, and after `endpoints enable` the next run delivers
/// every parked one exactly once.
#[test]
fn gone_endpoint_parks_until_enabled() {
    let fixture = Fixture::new(HashMap::from([(
        "/gone".to_string(),
        Behaviour::Status(410),
    )]));
    let endpoints = |gone_path| {
        [
            ("ep_gone", "acme", gone_path, r#"["*"]"#),
            ("ep_ok", "acme", "/ok", r#"["*"]"#),
        ]
    };
    let config = fixture.write_config_with(
        &endpoints("/gone"),
        "[retry]\nschedule_ms = [100]\n",
        "max_in_flight = 1",
    );
    let lines: Vec<String> = (0..6)
        .map(|n| event("acme", &format!("evt_{n:03}"), "t.a", "{}"))
        .collect();
    assert!(fixture.publish(&lines, false).status.success());

    let output = fixture.run_until_idle(&config);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("5 deliveries parked"), "{stdout}");
    let to = |path: &str| {
        fixture
            .receiver
            .requests()
            .into_iter()
            .filter(|request| request.path == path)
            .collect::<Vec<_>>()
    };
    assert_eq!(to("/gone").len(), 1, "one 410, then nothing");
    assert_eq!(to("/ok").len(), 6, "the other endpoint is unaffected");

    let list = hookflow()
        .args(["endpoints", "list", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(fixture.data_dir())
        .output()
        .expect("run hookflow endpoints list");
    assert!(list.status.success(), "{}", stderr(&list));
    let listing = String::from_utf8_lossy(&list.stdout);
    let gone_line = listing
        .lines()
        .find(|line| line.starts_with("ep_gone"))
        .unwrap_or_default();
    assert!(gone_line.contains("410 Gone"), "{listing}");
    assert!(gone_line.contains(" 5 "), "5 parked: {listing}");
    let ok_line = listing
        .lines()
        .find(|line| line.starts_with("ep_ok"))
        .unwrap_or_default();
    assert!(ok_line.contains("enabled"), "{listing}");

    // A restart keeps the endpoint disabled and its deliveries parked.
    fixture.run_until_idle(&config);
    assert_eq!(to("/gone").len(), 1);

    // The receiver moved: point the endpoint at its new URL and enable it.
    let config = fixture.write_config_with(
        &endpoints("/back"),
        "[retry]\nschedule_ms = [100]\n",
        "max_in_flight = 1",
    );
    let enable = || {
        hookflow()
            .args(["endpoints", "enable", "--data-dir"])
            .arg(fixture.data_dir())
            .arg("ep_gone")
            .output()
            .expect("run hookflow endpoints enable")
    };
    let mut running = fixture.spawn_run(&config);
    let lock_path = fixture.data_dir().join("hookflow.lock");
    let held = wait_for(Duration::from_secs(10), || {
        std::fs::File::open(&lock_path).is_ok_and(|file| file.try_lock().is_err())
    });
    assert!(
        held,
        "the running pipeline never took the data directory's lock"
    );
    let refused = enable();
    let log = terminate(&mut running);
    assert!(!refused.status.success(), "enabling while running: {log}");
    assert!(stderr(&refused).contains("in use"), "{}", stderr(&refused));

    let enabled = enable();
    assert!(enabled.status.success(), "{}", stderr(&enabled));
    assert!(
        String::from_utf8_lossy(&enabled.stdout).contains("5 parked"),
        "{}",
        String::from_utf8_lossy(&enabled.stdout)
    );
    let again = enable();
    assert!(!again.status.success());
    assert!(
        stderr(&again).contains("is not disabled"),
        "{}",
        stderr(&again)
    );

    // The state store keeps the endpoint's old URL over the changed configuration file, so
    // the new URL is applied on purpose.
    let applied = hookflow()
        .args(["endpoints", "apply", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(fixture.data_dir())
        .arg(&config)
        .output()
        .expect("run hookflow endpoints apply");
    assert!(applied.status.success(), "{}", stderr(&applied));
    let applied = String::from_utf8_lossy(&applied.stdout);
    assert!(applied.contains("endpoint `ep_gone` updated"), "{applied}");

    fixture.run_until_idle(&config);
    let mut resumed = ids(&to("/back"));
    resumed.dedup();
    assert_eq!(
        resumed,
        ["evt_001", "evt_002", "evt_003", "evt_004", "evt_005"],
        "every parked delivery, once"
    );
    assert_eq!(to("/back").len(), 5);
    let rows = fixture.rows();
    let delivered_to_gone = rows
        .iter()
        .filter(|row| row.endpoint_id.as_deref() == Some("ep_gone") && row.outcome == "delivered")
        .count();
    assert_eq!(delivered_to_gone, 5);
    let gone_rows: Vec<_> = rows
        .iter()
        .filter(|row| row.error_kind.as_deref() == Some("gone"))
        .collect();
    assert_eq!(gone_rows.len(), 1);
    assert_eq!(gone_rows[0].outcome, "dead_lettered");
}

#[test]
fn retention_truncates_settled_records_only() {
    let fixture = Fixture::new(HashMap::from([(
        "/down".to_string(),
        Behaviour::Status(500),
    )]));
    let tables = "[local_log]\npartitions = 1\nretention_secs = 0\n\
                  [retry]\nschedule_ms = [600000]\n";
    let config = fixture.write_config_with(
        &[
            ("ep_ok", "acme", "/ok", r#"["ok.*"]"#),
            ("ep_down", "acme", "/down", r#"["down.*"]"#),
        ],
        tables,
        "",
    );
    let lines = [
        event("acme", "evt_1", "ok.a", "{}"),
        event("acme", "evt_2", "down.a", r#"{"keep":"me"}"#),
        event("acme", "evt_3", "ok.a", "{}"),
    ];
    let mut publish = hookflow();
    let file = fixture.dir.path().join("events.ndjson");
    std::fs::write(&file, lines.join("\n")).expect("write events");
    let output = publish
        .args(["publish", "--partitions", "1", "--data-dir"])
        .arg(fixture.data_dir())
        .arg(&file)
        .output()
        .expect("publish");
    assert!(output.status.success(), "{}", stderr(&output));

    // First run: evt_2 fails and stays pending for ten minutes; the run is stopped.
    let mut child = fixture.spawn_run(&config);
    assert!(wait_for(Duration::from_secs(20), || fixture
        .receiver
        .requests()
        .len()
        >= 3));
    std::thread::sleep(Duration::from_millis(300));
    let _ = terminate(&mut child);

    // Second run: maintenance at start deletes what is settled and older than the retention
    // (zero here), but keeps evt_2's record, which the pending retry still needs.
    let mut child = fixture.spawn_run(&config);
    std::thread::sleep(Duration::from_millis(800));
    let _ = terminate(&mut child);

    let mut log = hookflow_connectors::LocalLog::open(
        &fixture.data_dir(),
        &hookflow_connectors::LocalLogOptions { partitions: 1 },
    )
    .expect("open log");
    let left: Vec<u64> = hookflow_connectors::Source::read(&mut log, 0, 0, 100)
        .expect("read log")
        .iter()
        .map(|record| record.offset)
        .collect();
    assert_eq!(
        left,
        [1, 2],
        "evt_1 is truncated; evt_2 is pending and evt_3 is above it"
    );
    assert_eq!(
        fixture.receiver.requests().len(),
        3,
        "nothing was delivered twice"
    );
}

#[test]
fn payload_gone_is_dead_lettered() {
    let fixture = Fixture::new(HashMap::from([(
        "/flaky".to_string(),
        Behaviour::FailFirst {
            failures: 1,
            status: 500,
        },
    )]));
    let config = fixture.write_config_with(
        &[("ep_flaky", "acme", "/flaky", r#"["*"]"#)],
        "[local_log]\npartitions = 1\n[retry]\nschedule_ms = [1000]\njitter_percent = 0\n",
        "",
    );
    let file = fixture.dir.path().join("events.ndjson");
    std::fs::write(&file, event("acme", "evt_gone", "a.b", "{}")).expect("write events");
    let output = hookflow()
        .args(["publish", "--partitions", "1", "--data-dir"])
        .arg(fixture.data_dir())
        .arg(&file)
        .output()
        .expect("publish");
    assert!(output.status.success());

    let mut child = fixture.spawn_run(&config);
    assert!(wait_for(Duration::from_secs(20), || !fixture
        .receiver
        .requests()
        .is_empty()));
    let _ = terminate(&mut child);

    // The record disappears before its retry is due, as a stream's own retention would do.
    let mut log = hookflow_connectors::LocalLog::open(
        &fixture.data_dir(),
        &hookflow_connectors::LocalLogOptions { partitions: 1 },
    )
    .expect("open log");
    assert_eq!(log.truncate(0, 1, u64::MAX).expect("truncate"), 1);
    drop(log);

    fixture.run_until_idle(&config);
    assert_eq!(
        fixture.receiver.requests().len(),
        1,
        "the retry is never sent"
    );
    let mut rows = fixture.rows();
    rows.sort_by_key(|r| r.finished_at_ms);
    let last = rows.last().expect("rows");
    assert_eq!(last.outcome, "dead_lettered");
    assert_eq!(last.error_kind.as_deref(), Some("payload_expired"));
}

#[test]
fn archive_fault_keeps_rows_staged() {
    let fixture = Fixture::new(HashMap::new());
    let config = fixture.write_config(&[("ep_a", "acme", "/a", r#"["*"]"#)]);
    let lines: Vec<String> = (0..5)
        .map(|n| event("acme", &format!("evt_{n}"), "a.b", "{}"))
        .collect();
    assert!(fixture.publish(&lines, false).status.success());

    // A file stands where today's `date=` directory must be created.
    let format = time::macros::format_description!("[year]-[month]-[day]");
    let today = time::OffsetDateTime::now_utc()
        .date()
        .format(&format)
        .expect("date");
    let blocker = fixture.archive_dir().join(format!("date={today}"));
    std::fs::create_dir_all(fixture.archive_dir()).expect("archive dir");
    std::fs::write(&blocker, "not a directory").expect("blocking file");

    let output = hookflow()
        .args(["run", "--until-idle", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(fixture.data_dir())
        .output()
        .expect("run hookflow");
    assert!(
        !output.status.success(),
        "the archive could not be completed"
    );
    let log = stderr(&output);
    assert!(
        log.contains(&format!("date={today}")),
        "the error names the path: {log}"
    );
    assert_eq!(fixture.receiver.requests().len(), 5);

    // Once the fault is gone, the next run writes the staged rows and delivers nothing again.
    std::fs::remove_file(&blocker).expect("remove blocking file");
    fixture.run_until_idle(&config);
    assert_eq!(
        fixture.receiver.requests().len(),
        5,
        "nothing delivered twice"
    );
    assert_eq!(
        outcomes(&fixture.rows()),
        BTreeMap::from([("delivered".to_string(), 5)])
    );
}

#[test]
fn state_store_fault_fails_fast() {
    let fixture = Fixture::new(HashMap::new());
    let config = fixture.write_config(&[("ep_a", "acme", "/a", r#"["*"]"#)]);
    assert!(fixture
        .publish(&[event("acme", "evt_1", "a.b", "{}")], false)
        .status
        .success());
    std::fs::write(fixture.data_dir().join("state"), "not a directory").expect("blocking file");

    let output = hookflow()
        .args(["run", "--until-idle", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(fixture.data_dir())
        .output()
        .expect("run hookflow");
    assert!(!output.status.success());
    let log = stderr(&output);
    assert!(log.contains("state store"), "{log}");
    assert!(
        log.contains(&fixture.data_dir().join("state").display().to_string()),
        "{log}"
    );
    assert!(
        fixture.receiver.requests().is_empty(),
        "nothing is sent without a state store"
    );
}

#[test]
fn second_run_on_data_dir_is_refused() {
    let fixture = Fixture::new(HashMap::new());
    let config = fixture.write_config(&[("ep_a", "acme", "/a", r#"["*"]"#)]);
    let mut first = fixture.spawn_run(&config);
    std::thread::sleep(Duration::from_millis(500));

    let output = hookflow()
        .args(["run", "--until-idle", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(fixture.data_dir())
        .output()
        .expect("run hookflow");
    let _ = terminate(&mut first);
    assert!(
        !output.status.success(),
        "a second run on one data directory must not start"
    );
    let message = stderr(&output);
    assert!(
        message.contains("is in use by another `hookflow run`"),
        "{message}"
    );
}

#[test]
fn expired_event_is_not_attempted() {
    let fixture = Fixture::new(HashMap::from([(
        "/down".to_string(),
        Behaviour::Status(500),
    )]));
    let config = fixture.write_config_with(
        &[("ep_down", "acme", "/down", r#"["*"]"#)],
        "[retry]\nschedule_ms = [1500]\njitter_percent = 0\nmax_event_age_secs = 1\n",
        "",
    );
    let lines = vec![event("acme", "evt_old", "charge.failed", "{}")];
    assert!(fixture.publish(&lines, false).status.success());
    fixture.run_until_idle(&config);

    assert_eq!(
        fixture.receiver.requests_to("/down").len(),
        1,
        "the retry is never sent"
    );
    let mut rows = fixture.rows();
    rows.sort_by_key(|r| r.finished_at_ms);
    let outcomes: Vec<&str> = rows.iter().map(|r| r.outcome.as_str()).collect();
    assert_eq!(outcomes, ["failed", "expired"]);
    assert_eq!(rows[1].error_kind.as_deref(), Some("expired"));
}

#[test]
fn publish_rejects_bad_lines_and_writes_nothing() {
    let fixture = Fixture::new(HashMap::new());
    let lines = vec![
        event("acme", "evt_1", "t.a", "{}"),
        "{broken".to_string(),
        event("acme", "evt_3", "t.a", "{}"),
        r#"{"id":"evt_4","tenant":"acme","type":"t.a","created_at":"noon","payload":{}}"#
            .to_string(),
    ];
    let output = fixture.publish(&lines, false);
    assert!(!output.status.success());
    let message = stderr(&output);
    assert!(message.contains("line 2: invalid JSON"), "{message}");
    assert!(
        message.contains("line 4: invalid field `created_at`"),
        "{message}"
    );
    assert!(message.contains("nothing was published"), "{message}");

    let config = fixture.write_config(&[("ep_a", "acme", "/a", r#"["*"]"#)]);
    fixture.run_until_idle(&config);
    assert!(
        fixture.receiver.requests().is_empty(),
        "the valid lines were not written either"
    );
}

#[test]
fn config_error_names_file_and_field() {
    let fixture = Fixture::new(HashMap::new());
    let config = fixture.write_config(&[("ep_a", "acme", "/a", r#"["*"]"#)]);
    let text = std::fs::read_to_string(&config)
        .expect("config")
        .replace(SECRET, "sk_live_123");
    std::fs::write(&config, text).expect("write config");

    let output = hookflow()
        .args(["run", "--until-idle", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(fixture.data_dir())
        .output()
        .expect("run hookflow");
    assert!(!output.status.success());
    let message = stderr(&output);
    assert!(message.contains(&config.display().to_string()), "{message}");
    assert!(message.contains("endpoints[0].secrets[0]"), "{message}");
    assert!(message.contains("whsec_"), "{message}");
}

#[test]
fn bad_argument_prints_usage() {
    let output = hookflow()
        .args(["run", "--workers", "zero"])
        .output()
        .expect("run hookflow");
    assert_eq!(output.status.code(), Some(2));
    let message = stderr(&output);
    assert!(message.contains("Usage:"), "{message}");
    assert!(message.contains("--workers"), "{message}");
}

#[test]
fn publish_follows_the_configured_source() {
    let dir = tempfile::tempdir().expect("dir");
    let events = dir.path().join("events.ndjson");
    std::fs::write(
        &events,
        r#"{"id":"e1","tenant":"acme","type":"a.b","created_at":"2026-12-05T00:00:00Z","payload":{}}"#,
    )
    .expect("events");

    // A config naming a Fluvio topic at a port where nothing listens: publish must try that
    // topic, not write a local log in the working directory.
    let config = dir.path().join("fluvio.toml");
    std::fs::write(
        &config,
        "[source]\nkind = \"fluvio\"\n[source.fluvio]\nendpoint = \"127.0.0.1:9\"\ntopic = \"events\"\ntimeout_ms = 2000\n",
    )
    .expect("config");
    let output = hookflow()
        .current_dir(dir.path())
        .arg("publish")
        .arg("--config")
        .arg(&config)
        .arg(&events)
        .output()
        .expect("run hookflow");
    assert!(!output.status.success());
    let message = stderr(&output);
    assert!(message.contains("127.0.0.1:9"), "{message}");
    assert!(!dir.path().join("log").exists());

    // Without a config or --data-dir there is nowhere to publish: a usage error.
    let output = hookflow()
        .current_dir(dir.path())
        .arg("publish")
        .arg(&events)
        .output()
        .expect("run hookflow");
    assert_eq!(output.status.code(), Some(2));
    let message = stderr(&output);
    assert!(message.contains("--data-dir"), "{message}");
    assert!(message.contains("Usage:"), "{message}");
    assert!(!dir.path().join("log").exists());
}

#[test]
fn publish_needs_no_run_secrets() {
    let dir = tempfile::tempdir().expect("dir");
    let events = dir.path().join("events.ndjson");
    std::fs::write(&events, event("acme", "e1", "a.b", "{}")).expect("events");

    // The token and the endpoint secret live in variables that only `hookflow run`'s
    // environment sets.
    let config = dir.path().join("hookflow.toml");
    std::fs::write(
        &config,
        "[http]\nadmin_token_env = \"HOOKFLOW_TEST_UNSET_ADMIN\"\n\
         [[endpoints]]\nid = \"ep\"\ntenant = \"acme\"\nurl = \"http://127.0.0.1:9/\"\n\
         event_types = [\"*\"]\nsecret_env = \"HOOKFLOW_TEST_UNSET_SECRET\"\n",
    )
    .expect("config");
    let data_dir = dir.path().join("data");
    let output = hookflow()
        .env_remove("HOOKFLOW_TEST_UNSET_ADMIN")
        .env_remove("HOOKFLOW_TEST_UNSET_SECRET")
        .arg("publish")
        .arg("--config")
        .arg(&config)
        .arg("--data-dir")
        .arg(&data_dir)
        .arg(&events)
        .output()
        .expect("run hookflow publish");
    assert!(output.status.success(), "{}", stderr(&output));

    let output = hookflow()
        .env_remove("HOOKFLOW_TEST_UNSET_ADMIN")
        .env_remove("HOOKFLOW_TEST_UNSET_SECRET")
        .args(["run", "--until-idle", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(&data_dir)
        .output()
        .expect("run hookflow run");
    assert!(!output.status.success(), "run starts without its secrets");
    let message = stderr(&output);
    assert!(message.contains("HOOKFLOW_TEST_UNSET_"), "{message}");
}

#[test]
fn endpoints_commands_need_no_tokens() {
    let dir = tempfile::tempdir().expect("dir");
    let endpoint = format!(
        "[[endpoints]]\nid = \"ep\"\ntenant = \"acme\"\nurl = \"http://127.0.0.1:9/\"\n\
         event_types = [\"*\"]\nsecret = \"{SECRET}\"\n"
    );
    let config = dir.path().join("hookflow.toml");
    std::fs::write(
        &config,
        format!(
            "[delivery]\nallowed_private_cidrs = [\"127.0.0.1/32\"]\n\
             [http]\nadmin_token_env = \"HOOKFLOW_TEST_UNSET_ADMIN\"\n{endpoint}"
        ),
    )
    .expect("config");
    let applied = dir.path().join("endpoints.toml");
    std::fs::write(&applied, endpoint.replace("/\"", "/b\"")).expect("endpoints file");
    let data_dir = dir.path().join("data");

    for (command, file) in [("apply", Some(&applied)), ("list", None)] {
        let mut invocation = hookflow();
        invocation
            .env_remove("HOOKFLOW_TEST_UNSET_ADMIN")
            .args(["endpoints", command, "--config"])
            .arg(&config)
            .arg("--data-dir")
            .arg(&data_dir);
        if let Some(file) = file {
            invocation.arg(file);
        }
        let output = invocation.output().expect("run hookflow endpoints");
        assert!(output.status.success(), "{command}: {}", stderr(&output));
    }
}

/// Sends SIGTERM, waits for a successful exit, and returns what the child wrote to stderr.
fn terminate(child: &mut Child) -> String {
    let status = process::terminate(child);
    let mut text = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut pipe, &mut text);
    }
    assert!(
        status.success(),
        "hookflow run exited with {status} after SIGTERM: {text}"
    );
    text
}

fn parquet_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).expect("read archive dir") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                pending.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files
}

/// Opens the archive with pyarrow and DuckDB. CI sets HOOKFLOW_REQUIRE_PYTHON_READERS=1 after
/// installing both; elsewhere the check runs when python3 has them.
fn check_with_python_readers(archive: &Path, expected_rows: usize) {
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
        eprintln!("skipping the pyarrow/DuckDB check: python3 lacks pyarrow or duckdb");
        return;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/check_archive.py");
    let output = Command::new("python3")
        .arg(script)
        .arg(archive)
        .output()
        .expect("run python3");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "python readers failed: {}{}",
        text,
        stderr(&output)
    );
    assert!(
        text.starts_with(&format!("rows={expected_rows} ")),
        "{text}"
    );
}
