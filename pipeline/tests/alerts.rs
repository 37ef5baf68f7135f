//! End-to-end test of operational alerts: `hookflow run` as a child process delivers to
//! customer endpoints on a loopback receiver, and the alerts it raises come back to the
//! operator's endpoint on the same receiver as signed webhooks, through the normal path.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use hookflow::receiver::{Behaviour, ReceivedRequest, Receiver};

mod support;
use support::process::{self, wait_for};

const CUSTOMER_SECRET: &str = "whsec_RTPHghziaKPNKV/Y78ALF6hfDn11pL7egmdm4fV+DaE=";
const OPERATOR_SECRET: &str = "whsec_mjOP7/3gtxkwXFj1XjnnpUxQm2lQ9k2B95Uj5ocmvGY=";

fn hookflow() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_hookflow"));
    command.env("RUST_LOG", "info");
    command
}

fn event(tenant: &str, id: &str) -> String {
    format!(
        r#"{{"id":"{id}","tenant":"{tenant}","type":"order.created","created_at":"2026-12-04T10:00:00Z","payload":{{"n":1}}}}"#
    )
}

fn publish(data_dir: &Path, dir: &Path, name: &str, lines: &[String]) {
    let file = dir.join(name);
    std::fs::write(&file, lines.join("\n")).expect("write events");
    let output = hookflow()
        .arg("publish")
        .arg("--data-dir")
        .arg(data_dir)
        .arg(&file)
        .output()
        .expect("run hookflow publish");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn endpoint(
    id: &str,
    tenant: &str,
    url: &str,
    patterns: &str,
    secret: &str,
    extra: &str,
) -> String {
    format!(
        "\n[[endpoints]]\nid = \"{id}\"\ntenant = \"{tenant}\"\nurl = \"{url}\"\n\
         event_types = {patterns}\nsecret = \"{secret}\"\n{extra}\n"
    )
}

/// Sends SIGTERM, waits for a successful exit, and returns the child's log from `log_path`.
fn terminate(child: &mut Child, log_path: &Path) -> String {
    let status = process::terminate(child);
    let text = std::fs::read_to_string(log_path).unwrap_or_default();
    assert!(
        status.success(),
        "hookflow run exited with {status}: {text}"
    );
    text
}

/// An operational event as the operator's endpoint received it.
struct Received {
    event_type: String,
    payload: serde_json::Value,
}

/// Verifies the signature of each request to the operator endpoint with the independent
/// `standardwebhooks` implementation and returns the events, in arrival order. The event
/// type is read back from the webhook id, which starts with it.
fn operator_events(requests: &[ReceivedRequest]) -> Vec<Received> {
    let verifier = standardwebhooks::Webhook::new(OPERATOR_SECRET).expect("secret");
    requests
        .iter()
        .map(|request| {
            let mut headers = axum::http::HeaderMap::new();
            for (name, value) in &request.headers {
                headers.insert(
                    axum::http::HeaderName::from_bytes(name.as_bytes()).expect("header name"),
                    value.parse().expect("header value"),
                );
            }
            verifier
                .verify(&request.body, &headers)
                .expect("operator webhook verifies with standardwebhooks");
            let id = request.header("webhook-id").unwrap_or_default();
            let event_type = id.split(':').next().unwrap_or_default().to_string();
            let payload = serde_json::from_slice(&request.body).expect("payload is JSON");
            Received {
                event_type,
                payload,
            }
        })
        .collect()
}

/// A customer endpoint that responds 500 becomes failing and has its breaker opened. Once
/// the receiver responds 200 again, it recovers. An endpoint that responds 410 is disabled,
/// and an endpoint that never responds makes the pipeline lag. Every transition reaches the
/// operator's endpoint as a signed webhook of the operator tenant.
#[test]
fn alerts_reach_operator_endpoint() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let data_dir = dir.path().join("data");
    let receiver = Receiver::start(HashMap::from([
        ("/customer".to_string(), Behaviour::Status(500)),
        ("/gone".to_string(), Behaviour::Status(410)),
    ]))
    .expect("receiver on 127.0.0.1");
    // The kernel's backlog accepts connections, but nothing ever responds: requests time out.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("silent listener");
    let silent_url = format!("http://{}/slow", silent.local_addr().expect("address"));

    let mut config = String::from(
        "[delivery]\nallowed_private_cidrs = [\"127.0.0.1/32\"]\n\
         [retry]\nschedule_ms = [200, 200, 200, 200]\npenalty_floor_ms = 200\n\
         [health]\nbreaker_window_ms = 1000\nbreaker_min_requests = 4\n\
         breaker_failure_percent = 50\nbreaker_cooldown_ms = 300\nbreaker_max_cooldown_ms = 600\n\
         [alerts]\nenabled = true\noperator_tenant = \"ops\"\nwindow_secs = 2\nmin_attempts = 4\n\
         failing_percent = 50\nrecovered_percent = 20\nlag_threshold_secs = 1\n",
    );
    config.push_str(&endpoint(
        "customer",
        "acme",
        &receiver.url("/customer"),
        r#"["*"]"#,
        CUSTOMER_SECRET,
        "",
    ));
    config.push_str(&endpoint(
        "gone",
        "globex",
        &receiver.url("/gone"),
        r#"["*"]"#,
        CUSTOMER_SECRET,
        "",
    ));
    config.push_str(&endpoint(
        "slow",
        "initech",
        &silent_url,
        r#"["*"]"#,
        CUSTOMER_SECRET,
        "timeout_ms = 3000\nmax_in_flight = 1",
    ));
    config.push_str(&endpoint(
        "operator",
        "ops",
        &receiver.url("/ops"),
        r#"["endpoint.*", "pipeline.*"]"#,
        OPERATOR_SECRET,
        "",
    ));
    let config_path: PathBuf = dir.path().join("hookflow.toml");
    std::fs::write(&config_path, config).expect("write config");

    let mut lines: Vec<String> = (0..4).map(|n| event("acme", &format!("a{n}"))).collect();
    lines.push(event("globex", "g0"));
    lines.extend((0..3).map(|n| event("initech", &format!("i{n}"))));
    publish(&data_dir, dir.path(), "first.ndjson", &lines);

    // The log goes to a file: a pipe read only at the end could fill and block the child.
    let log_path = dir.path().join("hookflow.log");
    let log_file = std::fs::File::create(&log_path).expect("log file");
    let mut running = hookflow()
        .args(["run", "--config"])
        .arg(&config_path)
        .arg("--data-dir")
        .arg(&data_dir)
        .stderr(log_file)
        .spawn()
        .expect("start hookflow run");
    let received = |event_type: &str| {
        operator_events(&receiver.requests_to("/ops"))
            .into_iter()
            .filter(|event| event.event_type == event_type)
            .collect::<Vec<_>>()
    };

    let failing = wait_for(Duration::from_secs(30), || {
        !received("endpoint.failing").is_empty()
            && !received("endpoint.disabled").is_empty()
            && !received("endpoint.breaker_opened").is_empty()
            && !received("pipeline.lagging").is_empty()
    });
    if !failing {
        let log = terminate(&mut running, &log_path);
        panic!(
            "missing alerts; received {:?}; log: {log}",
            operator_events(&receiver.requests_to("/ops"))
                .iter()
                .map(|event| event.event_type.clone())
                .collect::<Vec<_>>()
        );
    }

    // The customer's receiver recovers; new events succeed and the failures leave the window.
    receiver.set_behaviour("/customer", Behaviour::Status(200));
    let more: Vec<String> = (4..8).map(|n| event("acme", &format!("a{n}"))).collect();
    publish(&data_dir, dir.path(), "second.ndjson", &more);
    let recovered = wait_for(Duration::from_secs(30), || {
        received("endpoint.recovered")
            .iter()
            .any(|event| event.payload["endpoint_id"] == "customer")
    });
    let log = terminate(&mut running, &log_path);
    assert!(
        recovered,
        "no endpoint.recovered for the customer; log: {log}"
    );

    let failing = received("endpoint.failing");
    let customer_failing = failing
        .iter()
        .find(|event| event.payload["endpoint_id"] == "customer")
        .expect("endpoint.failing for the customer");
    assert_eq!(customer_failing.payload["tenant"], "acme");
    assert_eq!(customer_failing.payload["window_secs"], 2);
    let attempts = customer_failing.payload["attempts"].as_u64().unwrap_or(0);
    let failures = customer_failing.payload["failures"].as_u64().unwrap_or(0);
    assert!(attempts >= 4, "{}", customer_failing.payload);
    assert!(failures * 2 >= attempts, "{}", customer_failing.payload);
    assert!(
        failing.iter().all(|event| event.payload["tenant"] != "ops"),
        "the operator tenant is never alerted on"
    );

    let disabled = received("endpoint.disabled");
    assert_eq!(disabled.len(), 1, "one disabling, one event");
    assert_eq!(disabled[0].payload["endpoint_id"], "gone");
    assert_eq!(disabled[0].payload["tenant"], "globex");
    assert!(
        disabled[0].payload["reason"]
            .as_str()
            .is_some_and(|reason| reason.contains("410")),
        "{}",
        disabled[0].payload
    );

    let breaker = received("endpoint.breaker_opened");
    assert!(breaker
        .iter()
        .any(|event| event.payload["endpoint_id"] == "customer"));

    let lagging = received("pipeline.lagging");
    assert!(
        lagging[0].payload["lag_secs"].as_u64().is_some(),
        "{}",
        lagging[0].payload
    );
    assert!(lagging[0].payload["overdue_deliveries"].as_u64() >= Some(1));

    let recovered = received("endpoint.recovered");
    let customer_recovered = recovered
        .iter()
        .find(|event| event.payload["endpoint_id"] == "customer")
        .expect("endpoint.recovered for the customer");
    let attempts = customer_recovered.payload["attempts"].as_u64().unwrap_or(0);
    let failures = customer_recovered.payload["failures"]
        .as_u64()
        .unwrap_or(u64::MAX);
    assert!(attempts >= 1, "{}", customer_recovered.payload);
    assert!(
        failures * 100 < attempts * 20,
        "below 20 %: {}",
        customer_recovered.payload
    );
    assert_eq!(
        customer_recovered.payload["since"], customer_failing.payload["since"],
        "recovered names when failing began"
    );

    // Each event was delivered once: dedup and the journal treat it like any other.
    let requests = receiver.requests_to("/ops");
    let mut ids: Vec<&str> = requests
        .iter()
        .filter_map(|request| request.header("webhook-id"))
        .collect();
    let total = ids.len();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(
        ids.len(),
        total,
        "an operational event delivered twice: {ids:?}"
    );

    assert!(log.contains("Endpoint is failing."), "WARN logged: {log}");
    assert!(log.contains("Endpoint recovered."), "INFO logged: {log}");
    assert!(
        log.lines().any(|line| line.contains("ERROR")
            && line.contains("Endpoint disabled; its deliveries stay parked")),
        "ERROR logged: {log}"
    );
    assert!(log.contains("Pipeline is lagging"), "WARN logged: {log}");
    drop(silent);
}
