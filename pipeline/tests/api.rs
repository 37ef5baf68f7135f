//! End-to-end tests of the HTTP API: `hookflow run` runs as a child process with `[http]` on
//! an ephemeral loopback port, events posted to it are delivered to a real receiver on
//! 127.0.0.1, then inspected (state store and Parquet archive) and resent.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hookflow::receiver::{Behaviour, Receiver};
use serde_json::{json, Value};

const S1: &str = "whsec_d2ViaG9vay10ZXN0LXNlY3JldC0wMTIzNDU2Nzg5YWI=";
const ADMIN: &str = "admin-token-for-tests-0123";
const PRODUCER: &str = "producer-token-for-tests-0123";

/// A running `hookflow run` with its receiver, killed when dropped.
struct Running {
    _dir: tempfile::TempDir,
    receiver: Receiver,
    child: Child,
    address: String,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Running {
    /// Starts a pipeline with endpoints `ok` (200) and `fail` (500, no retries) of tenant
    /// `acme`, and `[http]` lines `http`.
    fn start(http: &str) -> Running {
        Running::start_with(http, 1)
    }

    /// Starts like [`Running::start`], completing archive files after `archive_age_secs`.
    fn start_with(http: &str, archive_age_secs: u64) -> Running {
        let dir = tempfile::tempdir().expect("temporary directory");
        let receiver = Receiver::start(HashMap::from([(
            "/fail".to_string(),
            Behaviour::Status(500),
        )]))
        .expect("receiver on 127.0.0.1");
        let mut config = format!(
            "[delivery]\nallowed_private_cidrs = [\"127.0.0.1/32\"]\n\
             [retry]\nschedule_ms = []\n\
             [archive]\nmax_file_age_secs = {archive_age_secs}\n\
             [health]\nbreaker_min_requests = 1000\n\
             [http]\nlisten = \"127.0.0.1:0\"\n{http}\n"
        );
        for (id, path) in [("ok", "/ok"), ("fail", "/fail")] {
            config.push_str(&format!(
                "\n[[endpoints]]\nid = \"{id}\"\ntenant = \"acme\"\nurl = \"{}\"\n\
                 event_types = [\"invoice.*\"]\nsecret = \"{S1}\"\ntimeout_ms = 5000\n",
                receiver.url(path)
            ));
        }
        let config_path = dir.path().join("hookflow.toml");
        std::fs::write(&config_path, config).expect("write config");
        let data = dir.path().join("data");
        let child = Command::new(env!("CARGO_BIN_EXE_hookflow"))
            .env("RUST_LOG", "warn")
            .args(["run", "--config"])
            .arg(&config_path)
            .arg("--data-dir")
            .arg(&data)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start hookflow run");
        let address = wait_for_file(&data.join("http.addr"));
        Running {
            _dir: dir,
            receiver,
            child,
            address,
        }
    }

    fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> (u16, Value) {
        call(
            &self.address,
            method,
            path,
            token,
            body.map(|b| ("application/json", b)),
        )
    }

    fn deliveries_to(&self, path: &str, event_id: &str) -> usize {
        self.receiver
            .requests_to(path)
            .iter()
            .filter(|request| {
                request
                    .header("webhook-id")
                    .is_some_and(|id| id.contains(event_id))
            })
            .count()
    }
}

fn wait_for_file(path: &Path) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            if text.ends_with('\n') {
                return text.trim().to_string();
            }
        }
        assert!(
            Instant::now() < deadline,
            "{} did not appear",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sends one HTTP/1.1 request on a fresh connection and returns the status and the JSON body.
/// A body that is not JSON is returned as a JSON string.
fn call(
    address: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<(&str, &str)>,
) -> (u16, Value) {
    let mut stream = TcpStream::connect(address).expect("connect to hookflow");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("read timeout");
    let mut request =
        format!("{method} {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n");
    if let Some(token) = token {
        request.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    let (content_type, text) = body.unwrap_or(("", ""));
    if !content_type.is_empty() {
        request.push_str(&format!("Content-Type: {content_type}\r\n"));
    }
    request.push_str(&format!("Content-Length: {}\r\n\r\n{text}", text.len()));
    stream.write_all(request.as_bytes()).expect("send request");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).expect("read response");
    let response = String::from_utf8_lossy(&response).to_string();
    let (head, body) = response
        .split_once("\r\n\r\n")
        .expect("a complete response");
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .expect("a status line");
    let body = decode_body(head, body);
    let value = serde_json::from_str(&body).unwrap_or(Value::String(body));
    (status, value)
}

/// Undoes chunked transfer encoding, which hyper uses for bodies of unknown length.
fn decode_body(head: &str, body: &str) -> String {
    if !head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return body.to_string();
    }
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        out.push_str(&after[..size]);
        rest = &after[size + 2..];
    }
    out
}

fn event(id: &str, event_type: &str) -> String {
    json!({
        "id": id,
        "tenant": "acme",
        "type": event_type,
        "created_at": "2026-01-02T03:04:05Z",
        "payload": { "amount": 42 },
    })
    .to_string()
}

fn eventually<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn tokens() -> String {
    format!("admin_token = \"{ADMIN}\"\nproducer_token = \"{PRODUCER}\"\n")
}

#[test]
fn posted_event_is_delivered_inspected_and_resent_once() {
    let run = Running::start(&tokens());

    let (status, first) = run.call(
        "POST",
        "/v1/events",
        Some(PRODUCER),
        Some(&event("evt_1", "invoice.paid")),
    );
    assert_eq!(status, 202, "{first}");
    assert_eq!(first["id"], "evt_1");
    assert_eq!(first["tenant"], "acme");
    let (status, again) = run.call(
        "POST",
        "/v1/events",
        Some(PRODUCER),
        Some(&event("evt_1", "invoice.paid")),
    );
    assert_eq!(status, 200, "a repeat returns the original acceptance");
    assert_eq!(again, first);

    eventually("evt_1 delivered to ok and dead-lettered at fail", || {
        (run.deliveries_to("/ok", "evt_1") == 1 && run.deliveries_to("/fail", "evt_1") == 1)
            .then_some(())
    });

    // Attempts reach the archive within `archive.max_file_age_secs`.
    let view = eventually("evt_1's attempts in the archive", || {
        let (status, view) = run.call("GET", "/v1/events/acme/evt_1", Some(ADMIN), None);
        assert_eq!(status, 200, "{view}");
        (view["attempts"].as_array()?.len() == 2 && view["deliveries"].as_array()?.len() == 2)
            .then_some(view)
    });
    let statuses: HashMap<String, String> = view["deliveries"]
        .as_array()
        .expect("deliveries")
        .iter()
        .map(|d| {
            (
                d["endpoint_id"].as_str().unwrap_or("").to_string(),
                d["status"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    assert_eq!(statuses["ok"], "delivered", "{view}");
    assert_eq!(statuses["fail"], "dead_lettered", "{view}");
    assert_eq!(view["scope"]["complete"], true);
    assert!(view["first_seen"]["offset"].is_u64(), "{view}");

    let (status, failures) = run.call(
        "GET",
        "/v1/endpoints/fail/failures?since=1h&limit=10",
        Some(ADMIN),
        None,
    );
    assert_eq!(status, 200, "{failures}");
    let rows = failures["failures"].as_array().expect("failures");
    assert_eq!(rows.len(), 1, "{failures}");
    assert_eq!(rows[0]["event_id"], "evt_1");
    assert_eq!(rows[0]["http_status"], 500);
    let (_, none) = run.call("GET", "/v1/endpoints/ok/failures", Some(ADMIN), None);
    assert_eq!(none["failures"], json!([]), "{none}");

    // Resend to one endpoint: one more delivery there, none elsewhere. A resend plans from
    // the archive, so it finds nothing until the attempt's Parquet file is complete, and a
    // 404 queues nothing.
    let resend = eventually("the delivery archived and resent", || {
        let (status, resend) = run.call(
            "POST",
            "/v1/events/acme/evt_1/resend",
            Some(ADMIN),
            Some(r#"{"endpoint_id": "ok"}"#),
        );
        if status == 404 {
            assert_eq!(resend["code"], "nothing_to_resend", "{resend}");
            return None;
        }
        assert_eq!(status, 202, "{resend}");
        Some(resend)
    });
    assert_eq!(resend["generation"], 1, "{resend}");
    assert_eq!(resend["events"], 1);
    assert_eq!(resend["endpoints"], json!({ "ok": 1 }));
    eventually("the resend delivered", || {
        (run.deliveries_to("/ok", "evt_1") == 2).then_some(())
    });

    // Resend every failed delivery of `fail`: generation 2, one more attempt there.
    let resend = eventually("the failed delivery archived and resent", || {
        let (status, resend) = run.call(
            "POST",
            "/v1/endpoints/fail/resend-failed?since=1h",
            Some(ADMIN),
            None,
        );
        if status == 200 {
            assert_eq!(resend["generation"], Value::Null, "{resend}");
            return None;
        }
        assert_eq!(status, 202, "{resend}");
        Some(resend)
    });
    assert_eq!(resend["generation"], 2, "{resend}");
    assert_eq!(resend["endpoints"], json!({ "fail": 1 }));
    eventually("the failed delivery resent", || {
        (run.deliveries_to("/fail", "evt_1") == 2).then_some(())
    });

    // The journal lets each generation through once: nothing more arrives.
    let view = eventually("the resends archived", || {
        let (_, view) = run.call("GET", "/v1/events/acme/evt_1", Some(ADMIN), None);
        (view["deliveries"].as_array()?.len() == 4).then_some(view)
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(run.deliveries_to("/ok", "evt_1"), 2, "{view}");
    assert_eq!(run.deliveries_to("/fail", "evt_1"), 2, "{view}");

    // Unknown events and endpoints.
    let (status, body) = run.call("GET", "/v1/events/acme/evt_unknown", Some(ADMIN), None);
    assert_eq!(
        (status, body["code"].as_str()),
        (404, Some("event_not_found")),
        "{body}"
    );
    let (status, body) = run.call(
        "POST",
        "/v1/endpoints/nope/resend-failed",
        Some(ADMIN),
        None,
    );
    assert_eq!(
        (status, body["code"].as_str()),
        (404, Some("endpoint_not_found")),
        "{body}"
    );
    let (status, body) = run.call(
        "POST",
        "/v1/events/acme/evt_unknown/resend",
        Some(ADMIN),
        None,
    );
    assert_eq!(
        (status, body["code"].as_str()),
        (404, Some("nothing_to_resend")),
        "{body}"
    );
}

#[test]
fn concurrent_identical_posts_append_once() {
    let run = Running::start(&tokens());
    let body = event("evt_race", "invoice.created");
    let answers: Vec<(u16, Value)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|_| scope.spawn(|| run.call("POST", "/v1/events", Some(PRODUCER), Some(&body))))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("poster"))
            .collect()
    });
    let accepted = answers.iter().filter(|(status, _)| *status == 202).count();
    let repeats = answers.iter().filter(|(status, _)| *status == 200).count();
    assert_eq!((accepted, repeats), (1, 7), "{answers:?}");
    assert!(
        answers.iter().all(|(_, body)| *body == answers[0].1),
        "{answers:?}"
    );
    eventually("evt_race delivered", || {
        (run.deliveries_to("/ok", "evt_race") == 1).then_some(())
    });
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(run.deliveries_to("/ok", "evt_race"), 1);
}

/// (response, expected status, expected code, expected field).
type Case<'a> = ((u16, Value), u16, &'a str, Option<&'a str>);

#[test]
fn bad_input_and_tokens_get_json_errors() {
    let run = Running::start(&tokens());
    let post = |token: Option<&str>, content_type: &str, body: &str| {
        call(
            &run.address,
            "POST",
            "/v1/events",
            token,
            Some((content_type, body)),
        )
    };
    let good = event("evt_bad", "invoice.paid");
    let cases: Vec<Case<'_>> = vec![
        (
            post(None, "application/json", &good),
            401,
            "unauthorized",
            None,
        ),
        (
            post(Some("wrong-token-0123456789"), "application/json", &good),
            403,
            "forbidden",
            None,
        ),
        (
            post(Some(ADMIN), "application/json", &good),
            403,
            "forbidden",
            None,
        ),
        (
            post(Some(PRODUCER), "text/plain", &good),
            415,
            "unsupported_media_type",
            None,
        ),
        (
            post(Some(PRODUCER), "application/json", "{not json"),
            400,
            "invalid_json",
            None,
        ),
        (
            post(
                Some(PRODUCER),
                "application/json",
                r#"{"id":"x","tenant":"acme","type":"t","created_at":"2026-01-01T00:00:00Z"}"#,
            ),
            400,
            "invalid_field",
            Some("payload"),
        ),
        (
            post(
                Some(PRODUCER),
                "application/json",
                r#"{"id":"x","tenant":"acme","type":"t","created_at":"yesterday","payload":1}"#,
            ),
            400,
            "invalid_field",
            Some("created_at"),
        ),
        (
            post(
                Some(PRODUCER),
                "application/json",
                r#"{"id":"x","tenant":"acme","type":"t","created_at":"2026-01-01T00:00:00Z","payload":1,"replay":{"id":"r","generation":1,"endpoints":["ok"]}}"#,
            ),
            400,
            "invalid_field",
            Some("replay"),
        ),
        (
            post(
                Some(PRODUCER),
                "application/json",
                &json!({"id": "big", "tenant": "acme", "type": "t", "created_at": "2026-01-01T00:00:00Z", "payload": "x".repeat(300_000)}).to_string(),
            ),
            413,
            "payload_too_large",
            Some("payload"),
        ),
        (
            run.call("GET", "/v1/events/acme/evt_1", None, None),
            401,
            "unauthorized",
            None,
        ),
        (
            run.call("GET", "/v1/events/acme/evt_1", Some(PRODUCER), None),
            403,
            "forbidden",
            None,
        ),
        (
            run.call(
                "GET",
                "/v1/endpoints/ok/failures?limit=0",
                Some(ADMIN),
                None,
            ),
            400,
            "invalid_field",
            Some("limit"),
        ),
        (
            run.call(
                "GET",
                "/v1/endpoints/ok/failures?limit=many",
                Some(ADMIN),
                None,
            ),
            400,
            "invalid_query",
            Some("limit"),
        ),
        (
            run.call(
                "GET",
                "/v1/endpoints/ok/failures?since=someday",
                Some(ADMIN),
                None,
            ),
            400,
            "invalid_field",
            Some("since"),
        ),
        (
            run.call(
                "GET",
                "/v1/endpoints/ok/failures?color=red",
                Some(ADMIN),
                None,
            ),
            400,
            "invalid_query",
            Some("color"),
        ),
        (
            run.call(
                "POST",
                "/v1/events/acme/evt_1/resend",
                Some(ADMIN),
                Some(r#"{"endpoint": "ok"}"#),
            ),
            400,
            "invalid_field",
            Some("endpoint"),
        ),
        (
            run.call(
                "POST",
                "/v1/events/acme/evt_1/resend",
                Some(ADMIN),
                Some(r#"{"endpoint_id": "nope"}"#),
            ),
            404,
            "endpoint_not_found",
            Some("endpoint_id"),
        ),
        (
            run.call("GET", "/v1/nothing-here", Some(ADMIN), None),
            404,
            "not_found",
            None,
        ),
        (
            run.call("DELETE", "/v1/events", Some(PRODUCER), None),
            405,
            "method_not_allowed",
            None,
        ),
    ];
    for (index, ((status, body), want_status, want_code, want_field)) in
        cases.into_iter().enumerate()
    {
        assert_eq!(status, want_status, "case {index}: {body}");
        assert_eq!(body["code"], want_code, "case {index}: {body}");
        assert!(
            body["message"].as_str().is_some_and(|m| !m.is_empty()),
            "case {index}: {body}"
        );
        assert_eq!(body["field"].as_str(), want_field, "case {index}: {body}");
    }
    // No rejected event was appended, so nothing reaches the receiver.
    std::thread::sleep(Duration::from_millis(500));
    assert!(run.receiver.requests().is_empty());
}

#[test]
fn tokenless_run_serves_only_operations() {
    let run = Running::start("");
    let (status, body) = run.call("GET", "/health/live", None, None);
    assert_eq!((status, body["status"].as_str()), (200, Some("live")));
    let (status, document) = run.call("GET", "/openapi.json", None, None);
    assert_eq!(status, 200);
    assert!(
        document["paths"]["/v1/events"]["post"].is_object(),
        "{document}"
    );
    for (method, path) in [
        ("POST", "/v1/events"),
        ("GET", "/v1/events/acme/e"),
        ("GET", "/v1/endpoints/ok/failures"),
    ] {
        let (status, body) = run.call(method, path, Some(ADMIN), Some("{}"));
        assert_eq!(
            (status, body["code"].as_str()),
            (404, Some("not_found")),
            "{method} {path}"
        );
    }
}

#[test]
fn listen_address_in_use_fails_run() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a port");
    let address = taken.local_addr().expect("address");
    let dir = tempfile::tempdir().expect("temporary directory");
    let config: PathBuf = dir.path().join("hookflow.toml");
    std::fs::write(&config, format!("[http]\nlisten = \"{address}\"\n")).expect("write config");
    let output = Command::new(env!("CARGO_BIN_EXE_hookflow"))
        .args(["run", "--until-idle", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .output()
        .expect("run hookflow");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("http.listen"), "{stderr}");
}

/// Scrapes `/metrics` and returns `hookflow_endpoint_disabled{endpoint="<id>"}`, if served.
fn endpoint_disabled_gauge(run: &Running, id: &str) -> Option<f64> {
    let (status, body) = run.call("GET", "/metrics", None, None);
    assert_eq!(status, 200);
    let text = body.as_str().expect("a text body");
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|line| Ok(line.to_string())))
        .expect("a valid Prometheus text exposition");
    scrape
        .samples
        .iter()
        .find(|sample| {
            sample.metric == "hookflow_endpoint_disabled"
                && sample.labels.get("endpoint") == Some(id)
        })
        .and_then(|sample| match sample.value {
            prometheus_parse::Value::Gauge(value) => Some(value),
            _ => None,
        })
}

#[test]
fn endpoint_created_over_api_receives_events() {
    let run = Running::start(&tokens());
    let url = run.receiver.url("/created");
    let (status, created) = run.call(
        "POST",
        "/v1/endpoints",
        Some(ADMIN),
        Some(
            &json!({ "id": "created", "tenant": "acme", "url": url, "event_types": ["order.*"] })
                .to_string(),
        ),
    );
    assert_eq!(status, 201, "{created}");
    assert!(created["secret"]
        .as_str()
        .is_some_and(|s| s.starts_with("whsec_")));

    // The change is absorbed when create returns, so the next event is routed to it.
    let (status, _) = run.call(
        "POST",
        "/v1/events",
        Some(PRODUCER),
        Some(&event("evt_order", "order.placed")),
    );
    assert_eq!(status, 202);
    eventually("evt_order delivered to the new endpoint", || {
        (run.deliveries_to("/created", "evt_order") == 1).then_some(())
    });
    let request = run
        .receiver
        .requests_to("/created")
        .pop()
        .expect("one request");
    assert!(request
        .header("webhook-signature")
        .is_some_and(|s| s.starts_with("v1,")));

    // The stored endpoints include the configured ones, seeded at start.
    let (status, list) = run.call("GET", "/v1/endpoints", Some(ADMIN), None);
    assert_eq!(status, 200);
    let ids: Vec<&str> = list["endpoints"]
        .as_array()
        .expect("endpoints")
        .iter()
        .filter_map(|e| e["id"].as_str())
        .collect();
    assert_eq!(ids, ["created", "fail", "ok"], "{list}");
    assert!(!list.to_string().contains("whsec_"), "{list}");

    // Disabled: later events are not delivered to it.
    let (status, updated) = run.call(
        "PATCH",
        "/v1/endpoints/created",
        Some(ADMIN),
        Some(r#"{"enabled": false}"#),
    );
    assert_eq!(status, 200, "{updated}");
    assert_eq!(endpoint_disabled_gauge(&run, "created"), Some(1.0));
    let (status, _) = run.call(
        "POST",
        "/v1/events",
        Some(PRODUCER),
        Some(&event("evt_order_2", "order.placed")),
    );
    assert_eq!(status, 202);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(run.deliveries_to("/created", "evt_order_2"), 0);

    // Deleted: gone from the directory.
    let (status, _) = run.call("DELETE", "/v1/endpoints/created", Some(ADMIN), None);
    assert_eq!(status, 204);
    assert_eq!(endpoint_disabled_gauge(&run, "created"), None);
    let (status, body) = run.call("GET", "/v1/endpoints/created", Some(ADMIN), None);
    assert_eq!(
        (status, body["code"].as_str()),
        (404, Some("endpoint_not_found"))
    );
}

#[test]
fn staged_attempts_are_inspected() {
    // Archive files complete only after an hour, so the attempts are read from staging.
    let run = Running::start_with(&tokens(), 3600);
    let (status, _) = run.call(
        "POST",
        "/v1/events",
        Some(PRODUCER),
        Some(&event("evt_staged", "invoice.sent")),
    );
    assert_eq!(status, 202);
    eventually("evt_staged delivered and dead-lettered", || {
        (run.deliveries_to("/ok", "evt_staged") == 1
            && run.deliveries_to("/fail", "evt_staged") == 1)
            .then_some(())
    });
    let view = eventually("evt_staged's attempts", || {
        let (_, view) = run.call("GET", "/v1/events/acme/evt_staged", Some(ADMIN), None);
        (view["attempts"].as_array()?.len() == 2).then_some(view)
    });
    let outcomes: Vec<&str> = view["attempts"]
        .as_array()
        .expect("attempts")
        .iter()
        .filter_map(|a| a["outcome"].as_str())
        .collect();
    assert!(
        outcomes.contains(&"delivered") && outcomes.contains(&"dead_lettered"),
        "{view}"
    );
    let (status, failures) = run.call("GET", "/v1/endpoints/fail/failures", Some(ADMIN), None);
    assert_eq!(status, 200);
    assert_eq!(
        failures["failures"].as_array().map(Vec::len),
        Some(1),
        "{failures}"
    );
    let archive_files = std::fs::read_dir(run._dir.path().join("data/archive"))
        .map(|entries| entries.count())
        .unwrap_or(0);
    assert_eq!(archive_files, 0, "no archive file is complete yet");
}

#[test]
fn sigterm_stops_server_and_run() {
    let mut run = Running::start(&tokens());
    let (status, _) = run.call("GET", "/health/live", None, None);
    assert_eq!(status, 200);
    let pid = run.child.id().to_string();
    let killed = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill -TERM");
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = run.child.try_wait().expect("wait for hookflow") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "hookflow run did not stop after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
    assert!(
        TcpStream::connect(&run.address).is_err(),
        "the server still accepts connections"
    );
}

#[test]
fn gone_endpoint_shows_disabled_until_enabled() {
    let run = Running::start(&tokens());
    run.receiver.set_behaviour("/gone", Behaviour::Status(410));
    let url = run.receiver.url("/gone");
    let (status, created) = run.call(
        "POST",
        "/v1/endpoints",
        Some(ADMIN),
        Some(
            &json!({ "id": "gone", "tenant": "acme", "url": url, "event_types": ["order.*"] })
                .to_string(),
        ),
    );
    assert_eq!(status, 201, "{created}");
    assert!(created["endpoint"]["disabled"].is_null(), "{created}");

    // A 410 disables the endpoint at run time; the API shows when and why.
    let (status, _) = run.call(
        "POST",
        "/v1/events",
        Some(PRODUCER),
        Some(&event("evt_gone_1", "order.placed")),
    );
    assert_eq!(status, 202);
    let disabled = eventually("the endpoint shown as disabled", || {
        let (_, endpoint) = run.call("GET", "/v1/endpoints/gone", Some(ADMIN), None);
        (!endpoint["disabled"].is_null()).then_some(endpoint)
    });
    assert!(
        disabled["disabled"]["reason"]
            .as_str()
            .is_some_and(|reason| reason.contains("410")),
        "{disabled}"
    );
    assert!(disabled["disabled"]["at"].is_string(), "{disabled}");
    let (_, list) = run.call("GET", "/v1/endpoints", Some(ADMIN), None);
    let listed = list["endpoints"]
        .as_array()
        .expect("endpoints")
        .iter()
        .find(|e| e["id"] == "gone")
        .cloned()
        .expect("gone listed");
    assert!(!listed["disabled"].is_null(), "{listed}");

    // The delivery that got the 410 is dead-lettered; the next one is parked.
    let (status, _) = run.call(
        "POST",
        "/v1/events",
        Some(PRODUCER),
        Some(&event("evt_gone_2", "order.placed")),
    );
    assert_eq!(status, 202);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(run.receiver.requests_to("/gone").len(), 1);

    // The receiver is back; enabling ends the disabling and the parked delivery goes out.
    run.receiver.set_behaviour("/gone", Behaviour::Status(200));
    let (status, updated) = run.call(
        "PATCH",
        "/v1/endpoints/gone",
        Some(ADMIN),
        Some(r#"{"enabled": true}"#),
    );
    assert_eq!(status, 200, "{updated}");
    eventually("the parked delivery sent after enabling", || {
        (run.deliveries_to("/gone", "evt_gone_2") == 1).then_some(())
    });
    assert_eq!(run.receiver.requests_to("/gone").len(), 2);
    let (_, endpoint) = run.call("GET", "/v1/endpoints/gone", Some(ADMIN), None);
    assert!(endpoint["disabled"].is_null(), "{endpoint}");
}
