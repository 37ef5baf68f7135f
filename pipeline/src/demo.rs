//! `hookflow demo`: the whole pipeline on this machine, with a receiver on 127.0.0.1.
//!
//! It writes a config for five endpoints of three tenants (one of them always failing),
//! publishes a few thousand generated events with some duplicates and some malformed lines,
//! runs the pipeline until idle, and summarises the archive it leaves in place.

use hookflow_operators::stop::StopSignal;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use hookflow_connectors::read_attempts;
use hookflow_operators::clock::{Clock, WallClock};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::config::Config;
use crate::dataflow::{run, RunOptions, RunReport};
use crate::publish::{publish_reader, PublishOptions};
use crate::receiver::{Behaviour, Receiver};

/// Settings of a demo run.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Where the config, the log and the archive go; a previous demo's are replaced.
    pub dir: PathBuf,
    /// Events to generate (before duplicates and malformed lines are added).
    pub events: usize,
    /// Seed of the event generator.
    pub seed: u64,
}

const SECRET: &str = "whsec_RTPHghziaKPNKV/Y78ALF6hfDn11pL7egmdm4fV+DaE=";
const TENANTS: [&str; 4] = ["acme", "globex", "initech", "umbrella"];
const TYPES: [&str; 5] = [
    "charge.succeeded",
    "charge.refunded",
    "invoice.paid",
    "customer.created",
    "order.shipped",
];

/// Runs the demo and returns the summary text it printed.
///
/// # Errors
///
/// Fails if the directory cannot be prepared, the receiver cannot start, or the pipeline fails.
pub fn run_demo(options: &DemoOptions) -> anyhow::Result<String> {
    prepare_dir(&options.dir)?;
    let receiver = Receiver::start(HashMap::from([
        ("/initech/broken".to_string(), Behaviour::Status(500)),
        (
            "/globex/orders".to_string(),
            Behaviour::FailFirst {
                failures: 2,
                status: 503,
            },
        ),
    ]))
    .context("cannot start the demo receiver on 127.0.0.1")?;

    let dir = std::fs::canonicalize(&options.dir)
        .with_context(|| format!("cannot resolve {}", options.dir.display()))?;
    let config_text = demo_config(&receiver, &dir.join("archive"));
    let config_path = dir.join("hookflow.toml");
    std::fs::write(&config_path, &config_text)
        .with_context(|| format!("cannot write {}", config_path.display()))?;
    let config = Config::load(&config_path)?;
    let data_dir = dir.join("data");

    let clock: Arc<dyn Clock> = Arc::new(WallClock);
    let events = generate_events(options.events, options.seed);
    let published = publish_reader(
        events.as_bytes(),
        "generated events",
        &PublishOptions {
            target: crate::publish::PublishTarget::Local {
                data_dir: data_dir.clone(),
                partitions: config.local_log.partitions,
            },
            raw: true,
            max_payload_bytes: config.pipeline.max_payload_bytes,
        },
        clock.now_ms(),
    )?;

    let started = std::time::Instant::now();
    let report = run(RunOptions {
        config,
        data_dir,
        until_idle: true,
        clock,
        stop: Arc::new(StopSignal::new()),
        cluster: crate::cluster::Cluster::default(),
    })?;
    let elapsed = started.elapsed();

    summarize(
        &report,
        published.appended,
        receiver.requests().len(),
        elapsed,
        &config_path,
    )
}

fn prepare_dir(dir: &Path) -> anyhow::Result<()> {
    for child in ["data", "archive", "hookflow.toml"] {
        let path = dir.join(child);
        if path.is_dir() {
            std::fs::remove_dir_all(&path)
                .with_context(|| format!("cannot remove the previous demo's {}", path.display()))?;
        } else if path.exists() {
            std::fs::remove_file(&path)
                .with_context(|| format!("cannot remove the previous demo's {}", path.display()))?;
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))
}

fn demo_config(receiver: &Receiver, archive_dir: &Path) -> String {
    // (id, tenant, path, patterns, extra settings). The receiver answers ep_globex_orders
    // 503 twice per event before accepting it, and ep_initech_broken always 500.
    let endpoints = [
        (
            "ep_acme_billing",
            "acme",
            "/acme/billing",
            r#"["charge.*", "invoice.paid"]"#,
            "",
        ),
        (
            "ep_acme_audit",
            "acme",
            "/acme/audit",
            r#"["*"]"#,
            "rate_limit = { max_requests = 50, window_ms = 100 }\n",
        ),
        (
            "ep_globex_orders",
            "globex",
            "/globex/orders",
            r#"["order.*", "charge.*"]"#,
            "",
        ),
        ("ep_initech_all", "initech", "/initech/all", r#"["*"]"#, ""),
        (
            "ep_initech_broken",
            "initech",
            "/initech/broken",
            r#"["invoice.paid"]"#,
            "",
        ),
    ];
    let mut text = String::from(
        "# Written by `hookflow demo`; the receiver's port changes every run.\n\
         [delivery]\nallowed_private_cidrs = [\"127.0.0.1/32\"]\n\n\
         # A short schedule so that the demo ends in seconds: three attempts in all.\n\
         [retry]\nschedule_ms = [200, 400]\njitter_percent = 10\n\n\
         # The circuit breaker stays closed: it would hold ep_initech_broken's deliveries for\n\
         # one probe per cooldown instead of spending their three attempts, which is right for\n\
         # an endpoint that is down but keeps a demo waiting.\n\
         [health]\nbreaker_min_requests = 1000000\n\n\
         [archive]\n",
    );
    let _ = writeln!(text, "dir = {:?}", archive_dir.display().to_string());
    for (id, tenant, path, types, extra) in endpoints {
        let _ = write!(
            text,
            "\n[[endpoints]]\nid = \"{id}\"\ntenant = \"{tenant}\"\nurl = \"{}\"\n\
             event_types = {types}\nsecret = \"{SECRET}\"\ntimeout_ms = 5000\n{extra}",
            receiver.url(path)
        );
    }
    text
}

/// NDJSON events: `count` valid ones over four tenants (umbrella has no endpoint, so its
/// events are unrouted), plus about 3% repeats of earlier ids and 1% malformed lines.
fn generate_events(count: usize, seed: u64) -> String {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut lines = Vec::with_capacity(count + count / 20);
    let mut valid: Vec<String> = Vec::new();
    for n in 0..count {
        let tenant = TENANTS[rng.random_range(0..TENANTS.len())];
        let event_type = TYPES[rng.random_range(0..TYPES.len())];
        let amount: u32 = rng.random_range(100..100_000);
        let line = format!(
            r#"{{"id":"evt_{n:06}","tenant":"{tenant}","type":"{event_type}","created_at":"2026-12-04T10:00:00Z","payload":{{"object":"{event_type}","amount":{amount},"note":"demo event nº{n}"}}}}"#
        );
        lines.push(line.clone());
        valid.push(line);
        if rng.random_bool(0.03) {
            lines.push(valid[rng.random_range(0..valid.len())].clone());
        }
        if rng.random_bool(0.01) {
            lines.push(format!(r#"{{"id":"bad_{n}","tenant":"{tenant}","type":"#));
        }
    }
    lines.join("\n")
}

fn summarize(
    report: &RunReport,
    published: usize,
    received: usize,
    elapsed: std::time::Duration,
    config_path: &Path,
) -> anyhow::Result<String> {
    let rows = read_attempts(&report.archive_dir).with_context(|| {
        format!(
            "cannot read back the archive in {}",
            report.archive_dir.display()
        )
    })?;
    let mut outcomes: BTreeMap<&str, usize> = BTreeMap::new();
    for row in &rows {
        *outcomes.entry(row.outcome.as_str()).or_default() += 1;
    }
    let mut latencies: Vec<u64> = rows
        .iter()
        .filter(|r| r.outcome == "delivered")
        .filter_map(|r| Some(r.finished_at_ms.saturating_sub(r.ingested_at_ms?)))
        .collect();
    latencies.sort_unstable();
    let percentile = |p: f64| -> u64 {
        if latencies.is_empty() {
            return 0;
        }
        let rank = ((p / 100.0) * (latencies.len() - 1) as f64).round() as usize;
        latencies[rank.min(latencies.len() - 1)]
    };
    let count = |outcome: &str| outcomes.get(outcome).copied().unwrap_or(0);
    let recovered = rows
        .iter()
        .filter(|r| r.outcome == "delivered" && r.attempt > 1)
        .count();
    let mut audit_windows: BTreeMap<u64, usize> = BTreeMap::new();
    for row in rows
        .iter()
        .filter(|r| r.endpoint_id.as_deref() == Some("ep_acme_audit"))
    {
        if let Some(started) = row.started_at_ms {
            *audit_windows.entry(started / 100).or_default() += 1;
        }
    }
    let audit_busiest = audit_windows.values().max().copied().unwrap_or(0);

    let mut text = String::new();
    let _ = writeln!(
        text,
        "hookflow demo: {published} records published, run took {:.2} s",
        elapsed.as_secs_f64()
    );
    let _ = writeln!(
        text,
        "  delivered        {:>6}  (receiver got {received} requests)",
        count("delivered")
    );
    let _ = writeln!(text, "  deduplicated     {:>6}", report.duplicates);
    let _ = writeln!(
        text,
        "  retried          {:>6}  failed attempts retried; {recovered} deliveries succeeded on a later attempt",
        count("failed")
    );
    let _ = writeln!(
        text,
        "  dead-lettered    {:>6}  (receiver answered 500 to all 3 attempts)",
        count("dead_lettered")
    );
    let _ = writeln!(
        text,
        "  invalid          {:>6}  (malformed records, dead-lettered with a reason)",
        count("invalid")
    );
    let _ = writeln!(
        text,
        "  unrouted         {:>6}  (no endpoint subscribes)",
        count("unrouted")
    );
    let _ = writeln!(
        text,
        "  latency, published -> delivered (all published before the run): p50 {} ms, p99 {} ms, max {} ms",
        percentile(50.0),
        percentile(99.0),
        latencies.last().copied().unwrap_or(0)
    );
    let _ = writeln!(
        text,
        "  rate limit: ep_acme_audit started at most {audit_busiest} requests in any 100 ms window (limit 50), over {} windows",
        audit_windows.len()
    );
    let _ = writeln!(text, "  config:  {}", config_path.display());
    let _ = writeln!(
        text,
        "  archive: {} ({} file(s), {} rows)",
        report.archive_dir.display(),
        report.files.len(),
        rows.len()
    );
    Ok(text)
}
