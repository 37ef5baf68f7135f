//! Whole-pipeline tests run in process.

use std::collections::{BTreeMap, HashMap};

use hookflow::demo::{run_demo, DemoOptions};
use hookflow::receiver::{Behaviour, Receiver};
use hookflow_connectors::read_attempts;
use hookflow_tests::{config_text, event_line, publish_lines, run_until_idle};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// (event id, tenant, endpoint id, outcome, attempt): what must not depend on the worker count.
type Projection = Vec<(Option<String>, Option<String>, Option<String>, String, u32)>;

fn project(dir: &std::path::Path) -> Projection {
    let mut rows: Projection = read_attempts(dir)
        .expect("archive reads back")
        .into_iter()
        .map(|r| (r.event_id, r.tenant, r.endpoint_id, r.outcome, r.attempt))
        .collect();
    rows.sort();
    rows
}

/// Random events over 6 tenants with repeats, malformed lines and unsubscribed types.
fn random_events(seed: u64, count: usize) -> Vec<String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let types = [
        "charge.succeeded",
        "charge.refunded",
        "invoice.paid",
        "user.created",
    ];
    let mut lines = Vec::new();
    for n in 0..count {
        let tenant = format!("t{}", rng.random_range(0..6));
        let id = format!("evt_{}", rng.random_range(0..count * 3 / 4));
        let event_type = types[rng.random_range(0..types.len())];
        if rng.random_bool(0.02) {
            lines.push(format!(r#"{{"id":"{id}","tenant":"{tenant}""#));
        } else {
            lines.push(event_line(
                &tenant,
                &id,
                event_type,
                &format!(r#"{{"n":{n}}}"#),
            ));
        }
    }
    lines
}

#[test]
fn worker_counts_agree() {
    let receiver = Receiver::start(HashMap::from([(
        "/t2/fail".to_string(),
        Behaviour::Status(500),
    )]))
    .expect("receiver");
    let endpoints = [
        ("e0", "t0", receiver.url("/t0/all"), r#"["*"]"#),
        ("e1", "t1", receiver.url("/t1/charges"), r#"["charge.*"]"#),
        (
            "e2",
            "t1",
            receiver.url("/t1/invoices"),
            r#"["invoice.paid"]"#,
        ),
        ("e3", "t2", receiver.url("/t2/fail"), r#"["*"]"#),
        ("e4", "t3", receiver.url("/t3/all"), r#"["*"]"#),
        ("e5", "t4", receiver.url("/t4/users"), r#"["user.*"]"#),
    ];
    // The circuit breaker decides by wall-clock windows, which differ between runs. It stays
    // closed here so that the two archives can be compared attempt for attempt.
    let config = config_text(
        &endpoints,
        "[retry]\nschedule_ms = [30, 60]\njitter_percent = 20\n\
         [health]\nbreaker_min_requests = 1000000\n",
    );
    let lines = random_events(11, 600);

    let mut projections = BTreeMap::new();
    for workers in [1, 3] {
        let dir = tempfile::tempdir().expect("temporary directory");
        publish_lines(dir.path(), &lines, true).expect("publish");
        let report = run_until_idle(dir.path(), &config, workers).expect("pipeline run");
        projections.insert(workers, (project(&report.archive_dir), report.duplicates));
    }

    let (single, single_duplicates) = &projections[&1];
    let (multi, multi_duplicates) = &projections[&3];
    assert!(
        single.len() > 300,
        "the input must exercise the pipeline: {} rows",
        single.len()
    );
    assert_eq!(
        single_duplicates, multi_duplicates,
        "dedup decisions differ"
    );
    assert_eq!(single, multi, "archives differ between 1 and 3 workers");
}

#[test]
fn every_record_is_accounted_for() {
    let receiver = Receiver::start(HashMap::new()).expect("receiver");
    let endpoints = [
        ("e0", "t0", receiver.url("/a"), r#"["*"]"#),
        ("e1", "t0", receiver.url("/b"), r#"["charge.*"]"#),
        ("e2", "t1", receiver.url("/c"), r#"["*"]"#),
    ];
    let dir = tempfile::tempdir().expect("temporary directory");
    let lines = random_events(5, 400);
    let published = publish_lines(dir.path(), &lines, true).expect("publish");
    let report = run_until_idle(dir.path(), &config_text(&endpoints, ""), 2).expect("pipeline run");

    // Each record ends as: invalid, a duplicate, unrouted, or one row per matching endpoint.
    let rows = read_attempts(&report.archive_dir).expect("archive");
    let mut per_record: BTreeMap<(u32, u64), usize> = BTreeMap::new();
    for row in &rows {
        *per_record.entry((row.partition, row.offset)).or_default() += 1;
    }
    let accounted = per_record.len() as u64 + report.duplicates;
    assert_eq!(
        accounted, published as u64,
        "records lost or double-counted"
    );
    let delivered = rows.iter().filter(|r| r.outcome == "delivered").count();
    assert_eq!(
        delivered,
        receiver.requests().len(),
        "archive and receiver disagree"
    );
}

#[test]
fn demo_leaves_archive() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let summary = run_demo(&DemoOptions {
        dir: dir.path().join("demo"),
        events: 300,
        seed: 3,
    })
    .expect("demo runs");
    assert!(summary.contains("delivered"), "{summary}");
    let rows = read_attempts(&dir.path().join("demo/archive")).expect("demo archive");
    assert!(rows.iter().any(|r| r.outcome == "delivered"));
    assert!(rows.iter().any(|r| r.outcome == "dead_lettered"));
    assert!(rows.iter().any(|r| r.outcome == "unrouted"));
    assert!(dir.path().join("demo/hookflow.toml").is_file());
}

#[test]
fn rate_limit_holds_and_spares_others() {
    const LIMIT: usize = 5;
    const WINDOW_MS: u64 = 200;
    let receiver = Receiver::start(HashMap::new()).expect("receiver");
    let endpoints = [
        ("limited", "t0", receiver.url("/limited"), r#"["*"]"#),
        ("free", "t1", receiver.url("/free"), r#"["*"]"#),
    ];
    let mut config = config_text(&endpoints, "");
    config = config.replace(
        "id = \"limited\"",
        &format!(
            "id = \"limited\"\nrate_limit = {{ max_requests = {LIMIT}, window_ms = {WINDOW_MS} }}"
        ),
    );
    let dir = tempfile::tempdir().expect("temporary directory");
    let mut lines = Vec::new();
    for n in 0..40 {
        lines.push(event_line("t0", &format!("evt_{n}"), "a.b", "{}"));
        lines.push(event_line("t1", &format!("evt_{n}"), "a.b", "{}"));
    }
    publish_lines(dir.path(), &lines, false).expect("publish");
    run_until_idle(dir.path(), &config, 1).expect("pipeline run");

    let limited: Vec<u64> = receiver
        .requests_to("/limited")
        .iter()
        .map(|r| r.received_at_ms)
        .collect();
    let free: Vec<u64> = receiver
        .requests_to("/free")
        .iter()
        .map(|r| r.received_at_ms)
        .collect();
    assert_eq!(limited.len(), 40, "every limited delivery arrives");
    assert_eq!(free.len(), 40, "every unlimited delivery arrives");

    // The limiter counts when a request starts; the receiver sees it a few ms later, so a
    // request started at the end of a window can land in the next one at the receiver. The
    // margin is one request per window, and any two adjacent windows hold at most 2 * LIMIT.
    let mut per_window: BTreeMap<u64, usize> = BTreeMap::new();
    for at in &limited {
        *per_window.entry(at / WINDOW_MS).or_default() += 1;
    }
    assert!(
        per_window.values().all(|n| *n <= LIMIT + 1),
        "{per_window:?}"
    );
    let counts: Vec<usize> = per_window.values().copied().collect();
    assert!(
        counts
            .windows(2)
            .all(|pair| pair[0] + pair[1] <= 2 * LIMIT + 1),
        "{per_window:?}"
    );
    let spread = limited.iter().max().unwrap_or(&0) - limited.iter().min().unwrap_or(&0);
    assert!(
        spread >= (40 / LIMIT as u64 - 2) * WINDOW_MS,
        "the limit was not applied: {spread} ms"
    );

    let free_done = free.iter().max().copied().unwrap_or(0);
    let limited_start = limited.iter().min().copied().unwrap_or(0);
    assert!(
        free_done < limited_start + 2 * WINDOW_MS,
        "the unlimited endpoint waited behind the limited one"
    );
}

#[test]
fn archive_rolls_files_by_size() {
    let receiver = Receiver::start(HashMap::new()).expect("receiver");
    let endpoints = [("e0", "t0", receiver.url("/a"), r#"["*"]"#)];
    let config = config_text(&endpoints, "[archive]\nmax_file_bytes = 2000\n");
    let dir = tempfile::tempdir().expect("temporary directory");
    let lines: Vec<String> = (0..60)
        .map(|n| event_line("t0", &format!("evt_{n}"), "a.b", "{}"))
        .collect();
    publish_lines(dir.path(), &lines, false).expect("publish");
    let report = run_until_idle(dir.path(), &config, 1).expect("pipeline run");

    let files = hookflow_connectors::list_archive_files(&report.archive_dir).expect("list archive");
    assert!(
        files.len() >= 3,
        "60 rows of about 200 bytes in 2000-byte files: {} files",
        files.len()
    );
    let rows = read_attempts(&report.archive_dir).expect("archive");
    assert_eq!(rows.len(), 60, "every row is in exactly one file");
}
