//! Monitoring: `/metrics` scraped over HTTP after a real run and parsed with a Prometheus
//! text-format parser, the health routes, and the operator files in `deploy/` checked
//! against a real scrape.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::Path;

use hookflow::dataflow::RunReport;
use hookflow::monitor::{routes, Monitor};
use hookflow::receiver::{Behaviour, Receiver};
use hookflow_tests::{config_text, event_line, publish_lines, run_until_idle};

#[path = "../../pipeline/tests/support/exposition.rs"]
mod exposition;
#[path = "../../pipeline/tests/support/http.rs"]
mod http;

/// Serves the monitoring routes of `monitor` on 127.0.0.1 on a thread of its own; the server
/// ends with the test process.
fn serve(monitor: Monitor) -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0");
    let address = listener.local_addr().expect("the bound address");
    listener
        .set_nonblocking(true)
        .expect("a non-blocking listener");
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("a tokio listener");
            let router: axum::Router = routes(monitor);
            axum::serve(listener, router).await.expect("serving");
        });
    });
    address
}

/// Every series name a query could use against this scrape: the described families
/// (`_total` included for counters) and a histogram's `_bucket`, `_sum` and `_count`.
fn series_names(scrape: &prometheus_parse::Scrape) -> BTreeSet<String> {
    let mut names: BTreeSet<String> = scrape.docs.keys().cloned().collect();
    for sample in &scrape.samples {
        names.insert(sample.metric.clone());
        if matches!(sample.value, prometheus_parse::Value::Histogram(_)) {
            for suffix in ["_bucket", "_sum", "_count"] {
                names.insert(format!("{}{suffix}", sample.metric));
            }
        }
    }
    names
}

/// The `hookflow_*` metric names a PromQL expression uses.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(start) = rest.find("hookflow_") {
        let tail = &rest[start..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

/// The result of [`run_mixed`]: the report, the receiver and what was published.
struct MixedRun {
    report: RunReport,
    receiver: Receiver,
    _dir: tempfile::TempDir,
    published: usize,
}

const DELIVERED: usize = 12;
const REJECTED: usize = 5;

/// Runs the pipeline until idle over: `DELIVERED` events for an endpoint that answers 200,
/// `REJECTED` for one that answers 400 (dead-lettered without retries), one repeat of an
/// event, one event nobody subscribes to and one line that is not an event.
fn run_mixed() -> MixedRun {
    let behaviours = HashMap::from([
        ("/ok".to_string(), Behaviour::Status(200)),
        ("/rejects".to_string(), Behaviour::Status(400)),
    ]);
    let receiver = Receiver::start(behaviours).expect("receiver on 127.0.0.1");
    let endpoints = [
        ("ep_ok", "acme", receiver.url("/ok"), r#"["order.*"]"#),
        (
            "ep_rejects",
            "acme",
            receiver.url("/rejects"),
            r#"["invoice.*"]"#,
        ),
    ];
    let mut lines = Vec::new();
    for i in 0..DELIVERED {
        lines.push(event_line("acme", &format!("o{i}"), "order.created", "{}"));
    }
    for i in 0..REJECTED {
        lines.push(event_line("acme", &format!("i{i}"), "invoice.paid", "{}"));
    }
    lines.push(event_line("acme", "o0", "order.created", "{}"));
    lines.push(event_line("acme", "u0", "user.created", "{}"));
    lines.push("this is not JSON".to_string());

    let dir = tempfile::tempdir().expect("temporary directory");
    let published = publish_lines(dir.path(), &lines, true).expect("publish");
    let config = config_text(&endpoints, "[retry]\nclient_error_retries = 0\n");
    let report = run_until_idle(dir.path(), &config, 2).expect("pipeline run");
    MixedRun {
        report,
        receiver,
        _dir: dir,
        published,
    }
}

#[test]
fn metrics_match_what_was_delivered() {
    let run = run_mixed();
    let monitor = Monitor::new(run.report.metrics.clone(), run.report.archive_dir.clone());
    let address = serve(monitor);

    let response = http::get(address, "/metrics");
    assert_eq!(response.status, 200);
    assert_eq!(
        response.headers.get("content-type").map(String::as_str),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let scrape = exposition::parse(&response.body);

    let published = run.published as f64;
    assert_eq!(
        exposition::value(&scrape, "hookflow_events_ingested_total", &[]),
        Some(published)
    );
    assert_eq!(
        exposition::value(&scrape, "hookflow_events_deduplicated_total", &[]),
        Some(1.0)
    );
    assert_eq!(
        exposition::value(&scrape, "hookflow_events_invalid_total", &[]),
        Some(1.0)
    );
    assert_eq!(
        exposition::value(&scrape, "hookflow_events_unrouted_total", &[]),
        Some(1.0)
    );

    let ok = [("endpoint", "ep_ok")];
    let rejects = [("endpoint", "ep_rejects")];
    let received_ok = run.receiver.requests_to("/ok").len() as f64;
    assert_eq!(received_ok, DELIVERED as f64);
    assert_eq!(
        exposition::value(&scrape, "hookflow_deliveries_delivered_total", &ok),
        Some(received_ok)
    );
    assert_eq!(
        exposition::value(&scrape, "hookflow_delivery_attempts_total", &ok),
        Some(received_ok)
    );
    assert_eq!(
        exposition::value(&scrape, "hookflow_deliveries_delivered_total", &rejects),
        Some(0.0)
    );
    assert_eq!(
        exposition::value(&scrape, "hookflow_delivery_attempts_total", &rejects),
        Some(REJECTED as f64)
    );
    assert_eq!(
        exposition::value(&scrape, "hookflow_deliveries_dead_lettered_total", &rejects),
        Some(REJECTED as f64)
    );
    assert_eq!(
        exposition::value(
            &scrape,
            "hookflow_delivery_failures_total",
            &[("endpoint", "ep_rejects"), ("error_kind", "client_error")]
        ),
        Some(REJECTED as f64)
    );
    assert_eq!(
        exposition::value(
            &scrape,
            "hookflow_deliveries_delivered_total",
            &[("endpoint", "other")]
        ),
        Some(0.0)
    );

    let attempts = (DELIVERED + REJECTED) as f64;
    assert_eq!(
        exposition::value(&scrape, "hookflow_delivery_latency_seconds", &[]),
        Some(attempts)
    );
    assert_eq!(
        exposition::value(&scrape, "hookflow_delivery_latency_seconds_count", &[]),
        Some(attempts)
    );
    assert_eq!(
        exposition::value(&scrape, "hookflow_end_to_end_latency_seconds_count", &[]),
        Some(DELIVERED as f64)
    );

    // Every record ends as one archived row: delivered, dead-lettered, invalid or unrouted.
    let rows = (DELIVERED + REJECTED + 2) as f64;
    assert_eq!(
        exposition::value(&scrape, "hookflow_archive_rows_written_total", &[]),
        Some(rows)
    );
    assert_eq!(
        exposition::value(&scrape, "hookflow_archive_files_written_total", &[]),
        Some(run.report.files.len() as f64)
    );
    assert_eq!(
        exposition::sum(&scrape, "hookflow_source_settled_offset", &[]),
        published
    );
    assert_eq!(
        exposition::sum(&scrape, "hookflow_source_end_offset", &[]),
        published
    );
    assert_eq!(
        exposition::sum(&scrape, "hookflow_source_lag_offsets", &[]),
        0.0
    );
    assert_eq!(
        exposition::value(&scrape, "hookflow_source_up", &[]),
        Some(1.0)
    );
    assert_eq!(
        exposition::value(&scrape, "hookflow_requests_in_flight", &[]),
        Some(0.0)
    );
    assert_eq!(exposition::value(&scrape, "hookflow_ready", &[]), Some(1.0));
}

#[test]
fn health_routes_answer() {
    let run = run_mixed();
    let archive_dir = run.report.archive_dir.clone();
    let address = serve(Monitor::new(
        run.report.metrics.clone(),
        archive_dir.clone(),
    ));

    let live = http::get(address, "/health/live");
    assert_eq!(live.status, 200);
    let live: serde_json::Value = serde_json::from_str(&live.body).expect("JSON body");
    assert_eq!(live["status"], "live");

    let ready = http::get(address, "/health/ready");
    assert_eq!(ready.status, 200, "{}", ready.body);
    let body: serde_json::Value = serde_json::from_str(&ready.body).expect("JSON body");
    assert_eq!(body["status"], "ready");
    let names: Vec<&str> = body["checks"]
        .as_array()
        .expect("a checks array")
        .iter()
        .filter_map(|check| check["name"].as_str())
        .collect();
    assert_eq!(names, ["source", "archive", "dataflow"]);
    let leftovers = std::fs::read_dir(&archive_dir)
        .expect("the archive directory")
        .filter_map(Result::ok)
        .filter(|entry| {
            entry
                .file_name()
                .to_string_lossy()
                .starts_with(".hookflow-ready")
        })
        .count();
    assert_eq!(leftovers, 0, "the readiness probe file was left behind");
}

#[test]
fn ready_fails_when_archive_unwritable() {
    let run = run_mixed();
    let archive_dir = run.report.archive_dir.clone();
    let address = serve(Monitor::new(
        run.report.metrics.clone(),
        archive_dir.clone(),
    ));

    // A file where the archive directory was: nothing can be created in it. (Permission bits
    // would not stop a test running as root.)
    std::fs::remove_dir_all(&archive_dir).expect("removing the archive directory");
    std::fs::write(&archive_dir, b"not a directory").expect("a file in its place");

    let ready = http::get(address, "/health/ready");
    assert_eq!(ready.status, 503, "{}", ready.body);
    let body: serde_json::Value = serde_json::from_str(&ready.body).expect("JSON body");
    assert_eq!(body["status"], "not_ready");
    assert_eq!(body["failing"], "archive");
    let archive = body["checks"]
        .as_array()
        .expect("a checks array")
        .iter()
        .find(|check| check["name"] == "archive")
        .expect("an archive check")
        .clone();
    assert_eq!(archive["ok"], false);
    assert!(
        archive["detail"]
            .as_str()
            .is_some_and(|detail| detail.contains(&*archive_dir.to_string_lossy())),
        "the detail names the path: {archive}"
    );

    let scrape = exposition::parse(&http::get(address, "/metrics").body);
    assert_eq!(exposition::value(&scrape, "hookflow_ready", &[]), Some(0.0));
}

/// The workspace's `deploy/` directory.
fn deploy_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

#[derive(serde::Deserialize)]
struct RuleFile {
    groups: Vec<RuleGroup>,
}

#[derive(serde::Deserialize)]
struct RuleGroup {
    name: String,
    rules: Vec<Rule>,
}

#[derive(serde::Deserialize)]
struct Rule {
    alert: String,
    expr: String,
    #[serde(default, rename = "for")]
    for_duration: Option<String>,
    labels: HashMap<String, String>,
    annotations: HashMap<String, String>,
}

/// Collects every `expr` string of a Grafana dashboard, at any depth.
fn dashboard_exprs(value: &serde_json::Value, exprs: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(fields) => {
            for (key, field) in fields {
                match (key.as_str(), field) {
                    ("expr", serde_json::Value::String(expr)) => exprs.push(expr.clone()),
                    _ => dashboard_exprs(field, exprs),
                }
            }
        }
        serde_json::Value::Array(items) => {
            for item in items {
                dashboard_exprs(item, exprs);
            }
        }
        _ => {}
    }
}

#[test]
fn deploy_files_use_scraped_metrics() {
    let run = run_mixed();
    let address = serve(Monitor::new(
        run.report.metrics.clone(),
        run.report.archive_dir.clone(),
    ));
    let scraped = series_names(&exposition::parse(&http::get(address, "/metrics").body));

    let text = std::fs::read_to_string(deploy_dir().join("prometheus/alerts.yml"))
        .expect("deploy/prometheus/alerts.yml");
    let rules: RuleFile = serde_yaml::from_str(&text).expect("alerts.yml parses as a rule file");
    let mut alerts = BTreeSet::new();
    for group in &rules.groups {
        assert!(!group.name.is_empty());
        for rule in &group.rules {
            alerts.insert(rule.alert.clone());
            assert!(
                rule.labels.contains_key("severity"),
                "{} has no severity",
                rule.alert
            );
            assert!(
                rule.annotations.contains_key("summary"),
                "{} has no summary",
                rule.alert
            );
            if let Some(duration) = &rule.for_duration {
                assert!(
                    duration.ends_with('m') || duration.ends_with('s'),
                    "{}: `for` is not a duration: {duration}",
                    rule.alert
                );
            }
            let used = metric_names(&rule.expr);
            assert!(!used.is_empty(), "{} uses no hookflow metric", rule.alert);
            for name in used {
                assert!(
                    scraped.contains(&name),
                    "{} uses {name}, which /metrics does not serve",
                    rule.alert
                );
            }
        }
    }
    for required in [
        "HookflowEndpointFailing",
        "HookflowBreakerOpen",
        "HookflowEndpointDisabled",
        "HookflowPipelineLagging",
        "HookflowSourceDown",
        "HookflowNotReady",
    ] {
        assert!(alerts.contains(required), "alerts.yml has no {required}");
    }

    let text = std::fs::read_to_string(deploy_dir().join("grafana/hookflow.json"))
        .expect("deploy/grafana/hookflow.json");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    assert!(dashboard["panels"]
        .as_array()
        .is_some_and(|panels| !panels.is_empty()));
    let mut exprs = Vec::new();
    dashboard_exprs(&dashboard, &mut exprs);
    let mut on_dashboard = BTreeSet::new();
    for expr in &exprs {
        for name in metric_names(expr) {
            assert!(
                scraped.contains(&name),
                "the dashboard uses {name}, which /metrics does not serve"
            );
            on_dashboard.insert(name);
        }
    }
    // Every family /metrics serves is on the dashboard.
    let families: BTreeSet<&String> = scraped
        .iter()
        .filter(|name| !name.ends_with("_sum") && !name.ends_with("_count"))
        .filter(|name| !scraped.contains(&format!("{name}_bucket")))
        .collect();
    for family in families {
        assert!(
            on_dashboard.contains(family),
            "the dashboard does not show {family}"
        );
    }
}

#[test]
fn alert_rules_pass_promtool() {
    let dir = deploy_dir().join("prometheus");
    let checks: [&[&str]; 2] = [
        &["check", "rules", "alerts.yml"],
        &["test", "rules", "alerts_test.yml"],
    ];
    for args in checks {
        let output = match std::process::Command::new("promtool")
            .args(args)
            .current_dir(&dir)
            .output()
        {
            Ok(output) => output,
            Err(error) if std::env::var_os("HOOKFLOW_REQUIRE_PROMTOOL").is_none() => {
                eprintln!("promtool not run ({error}); Debian's `prometheus` package installs it");
                return;
            }
            Err(error) => {
                panic!("promtool is required (HOOKFLOW_REQUIRE_PROMTOOL) but cannot run: {error}")
            }
        };
        assert!(
            output.status.success(),
            "promtool {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
