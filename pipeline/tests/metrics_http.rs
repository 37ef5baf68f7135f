//! `/metrics` and `/health/*` of a real `hookflow run` child process: events are delivered
//! to a receiver on 127.0.0.1 while the test scrapes the server whose address the run writes
//! to `<data-dir>/http.addr`, and parses the scrape with the `prometheus-parse` parser.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hookflow::publish::{publish_reader, PublishOptions};
use hookflow::receiver::{Behaviour, Receiver};
use hookflow_operators::clock::{Clock, WallClock};

mod support;
use support::{exposition, http};

const SECRET: &str = "whsec_RTPHghziaKPNKV/Y78ALF6hfDn11pL7egmdm4fV+DaE=";

/// How long the test waits for the run to start and to deliver.
const PATIENCE: Duration = Duration::from_secs(60);

/// A `hookflow run` child process, killed when dropped.
struct Run {
    child: Child,
    address: SocketAddr,
}

impl Drop for Run {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `hookflow run` on `data_dir` with `config` (an HTTP server on 127.0.0.1, port 0)
/// and waits for the address it writes to `http.addr`.
fn start_run(dir: &Path, config: &str) -> Run {
    let config_path = dir.join("hookflow.toml");
    std::fs::write(&config_path, config).expect("writing the config");
    let data_dir = dir.join("data");
    let child = Command::new(env!("CARGO_BIN_EXE_hookflow"))
        .arg("run")
        .arg("--config")
        .arg(&config_path)
        .arg("--data-dir")
        .arg(&data_dir)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starting hookflow run");
    let mut run = Run {
        child,
        address: SocketAddr::from(([127, 0, 0, 1], 0)),
    };

    let started = Instant::now();
    let address_file = data_dir.join("http.addr");
    loop {
        if let Ok(text) = std::fs::read_to_string(&address_file) {
            if let Ok(address) = text.trim().parse() {
                run.address = address;
                return run;
            }
        }
        if let Ok(Some(status)) = run.child.try_wait() {
            panic!("hookflow run exited early: {status}");
        }
        assert!(
            started.elapsed() < PATIENCE,
            "no {} after {PATIENCE:?}",
            address_file.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Scrapes `/metrics` and parses it with `prometheus-parse`.
fn scrape(address: SocketAddr) -> prometheus_parse::Scrape {
    let response = http::get(address, "/metrics");
    assert_eq!(response.status, 200);
    assert_eq!(
        response.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    exposition::parse(&response.body)
}

/// Scrapes until `done` holds for a scrape, and returns that scrape.
fn scrape_until(
    address: SocketAddr,
    condition: &str,
    done: impl Fn(&prometheus_parse::Scrape) -> bool,
) -> prometheus_parse::Scrape {
    let started = Instant::now();
    loop {
        let scrape = scrape(address);
        if done(&scrape) {
            return scrape;
        }
        assert!(
            started.elapsed() < PATIENCE,
            "{condition}: not reached in {PATIENCE:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn config(receiver: &Receiver, archive_dir: &Path) -> String {
    format!(
        "[pipeline]\npoll_interval_ms = 5\ncheckpoint_interval_ms = 20\n\
         [archive]\ndir = \"{}\"\nmax_file_age_secs = 1\n\
         [delivery]\nallowed_private_cidrs = [\"127.0.0.1/32\"]\n\
         [retry]\nclient_error_retries = 0\n\
         [http]\nlisten = \"127.0.0.1:0\"\n\
         [metrics]\npending_refresh_secs = 1\n\
         [[endpoints]]\nid = \"ep_ok\"\ntenant = \"acme\"\nurl = \"{}\"\nevent_types = [\"order.*\"]\nsecret = \"{SECRET}\"\n\
         [[endpoints]]\nid = \"ep_rejects\"\ntenant = \"acme\"\nurl = \"{}\"\nevent_types = [\"invoice.*\"]\nsecret = \"{SECRET}\"\n",
        archive_dir.display(),
        receiver.url("/ok"),
        receiver.url("/rejects"),
    )
}

/// Appends NDJSON `lines` to the local log in `data_dir`.
fn publish(data_dir: &Path, lines: &[String]) -> usize {
    let options = PublishOptions {
        target: hookflow::publish::PublishTarget::Local {
            data_dir: data_dir.to_path_buf(),
            partitions: 4,
        },
        raw: true,
        max_payload_bytes: hookflow_schemas::DEFAULT_MAX_PAYLOAD_BYTES,
    };
    publish_reader(
        lines.join("\n").as_bytes(),
        "test events",
        &options,
        WallClock.now_ms(),
    )
    .expect("publishing")
    .appended
}

fn event(id: &str, event_type: &str) -> String {
    format!(
        r#"{{"id":"{id}","tenant":"acme","type":"{event_type}","created_at":"2026-12-04T10:00:00Z","payload":{{}}}}"#
    )
}

fn receiver() -> Receiver {
    Receiver::start(HashMap::from([
        ("/ok".to_string(), Behaviour::Status(200)),
        ("/rejects".to_string(), Behaviour::Status(400)),
    ]))
    .expect("receiver on 127.0.0.1")
}

#[test]
fn run_serves_metrics_of_deliveries() {
    let receiver = receiver();
    let dir = tempfile::tempdir().expect("temporary directory");
    let archive_dir = dir.path().join("archive");
    let run = start_run(dir.path(), &config(&receiver, &archive_dir));

    let mut lines: Vec<String> = (0..20)
        .map(|i| event(&format!("o{i}"), "order.created"))
        .collect();
    lines.extend((0..4).map(|i| event(&format!("i{i}"), "invoice.paid")));
    lines.push(event("o3", "order.created"));
    lines.push(event("u0", "user.created"));
    lines.push("{not json".to_string());
    let published = publish(&dir.path().join("data"), &lines) as f64;

    let ok = [("endpoint", "ep_ok")];
    let rejects = [("endpoint", "ep_rejects")];
    let scrape = scrape_until(run.address, "every record settled and archived", |scrape| {
        exposition::sum(scrape, "hookflow_source_settled_offset", &[]) == published
            && exposition::sum(scrape, "hookflow_archive_rows_written_total", &[]) == 26.0
    });

    assert_eq!(receiver.requests_to("/ok").len(), 20);
    assert_eq!(receiver.requests_to("/rejects").len(), 4);
    assert_eq!(
        exposition::sum(&scrape, "hookflow_events_ingested_total", &[]),
        published
    );
    assert_eq!(
        exposition::sum(&scrape, "hookflow_events_deduplicated_total", &[]),
        1.0
    );
    assert_eq!(
        exposition::sum(&scrape, "hookflow_events_invalid_total", &[]),
        1.0
    );
    assert_eq!(
        exposition::sum(&scrape, "hookflow_events_unrouted_total", &[]),
        1.0
    );
    assert_eq!(
        exposition::sum(&scrape, "hookflow_deliveries_delivered_total", &ok),
        20.0
    );
    assert_eq!(
        exposition::sum(&scrape, "hookflow_delivery_attempts_total", &ok),
        20.0
    );
    assert_eq!(
        exposition::sum(&scrape, "hookflow_delivery_attempts_total", &rejects),
        4.0
    );
    assert_eq!(
        exposition::sum(&scrape, "hookflow_deliveries_dead_lettered_total", &rejects),
        4.0
    );
    assert_eq!(
        exposition::sum(
            &scrape,
            "hookflow_delivery_failures_total",
            &[("endpoint", "ep_rejects"), ("error_kind", "client_error")]
        ),
        4.0
    );
    assert_eq!(
        exposition::sum(&scrape, "hookflow_delivery_latency_seconds", &[]),
        24.0
    );
    assert_eq!(
        exposition::sum(&scrape, "hookflow_end_to_end_latency_seconds", &[]),
        20.0
    );
    assert_eq!(
        exposition::sum(&scrape, "hookflow_source_end_offset", &[]),
        published
    );
    assert_eq!(
        exposition::sum(&scrape, "hookflow_source_lag_offsets", &[]),
        0.0
    );
    assert!(exposition::sum(&scrape, "hookflow_archive_files_written_total", &[]) >= 1.0);
    assert_eq!(exposition::sum(&scrape, "hookflow_source_up", &[]), 1.0);
    assert_eq!(
        exposition::sum(&scrape, "hookflow_requests_in_flight", &[]),
        0.0
    );
    assert_eq!(exposition::sum(&scrape, "hookflow_ready", &[]), 1.0);

    let http::Response { status, body, .. } = http::get(run.address, "/health/live");
    assert_eq!(status, 200);
    assert_eq!(body, r#"{"status":"live"}"#);
    let http::Response { status, body, .. } = http::get(run.address, "/health/ready");
    assert_eq!(status, 200, "{body}");
}

#[test]
fn run_not_ready_without_archive_dir() {
    let receiver = receiver();
    let dir = tempfile::tempdir().expect("temporary directory");
    let archive_dir = dir.path().join("archive");
    let run = start_run(dir.path(), &config(&receiver, &archive_dir));

    let http::Response { status, body, .. } = http::get(run.address, "/health/ready");
    assert_eq!(status, 200, "{body}");

    // A file where the archive directory was: nothing can be created in it. (Permission bits
    // would not stop a test running as root.)
    std::fs::remove_dir_all(&archive_dir).expect("removing the archive directory");
    std::fs::write(&archive_dir, b"not a directory").expect("a file in its place");

    let http::Response {
        status,
        headers,
        body,
    } = http::get(run.address, "/health/ready");
    assert_eq!(status, 503, "{body}");
    assert_eq!(
        headers.get("content-type").map(String::as_str),
        Some("application/json")
    );
    let body: serde_json::Value = serde_json::from_str(&body).expect("a JSON body");
    assert_eq!(body["status"], "not_ready");
    assert_eq!(body["failing"], "archive");
    assert_eq!(body["checks"][0]["name"], "source");
    assert_eq!(body["checks"][0]["ok"], true);
    assert_eq!(body["checks"][1]["name"], "archive");
    assert_eq!(body["checks"][1]["ok"], false);
    assert_eq!(body["checks"][2]["name"], "dataflow");
    assert_eq!(body["checks"][2]["ok"], true);

    let status = http::get(run.address, "/health/live").status;
    assert_eq!(status, 200);
    assert_eq!(
        exposition::sum(&scrape(run.address), "hookflow_ready", &[]),
        0.0
    );
}
