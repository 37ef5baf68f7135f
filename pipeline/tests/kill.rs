//! The kill test: `hookflow run` is killed with SIGKILL at random moments while events are
//! published, restarted each time, and finally run until idle. Nothing may be lost, and the
//! duplicates a crash can cause must stay within the bound the in-flight and unsynced-result
//! limits set.
//!
//! Environment overrides for longer runs: `HOOKFLOW_KILL_SEED`, `HOOKFLOW_KILL_EVENTS`
//! (default 20000), `HOOKFLOW_KILL_COUNT` (default 10) and `HOOKFLOW_KILL_SETTLE_SECS`, the
//! time the final run may take (default 300 s plus 20 ms per event).

mod fleet;

use std::collections::{BTreeMap, HashMap};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hookflow::publish::{publish_reader, PublishOptions};
use hookflow::receiver::{Behaviour, Receiver};
use hookflow_connectors::read_attempts;
use hookflow_operators::clock::{Clock, WallClock};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use fleet::{endpoints, matches, SECRET, TENANTS};

/// Requests in flight per worker, and results allowed to wait for their durable write.
const MAX_IN_FLIGHT: usize = 16;
const MAX_UNSYNCED: usize = 16;
const TYPES: [&str; 4] = [
    "charge.succeeded",
    "charge.refunded",
    "invoice.paid",
    "customer.created",
];

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn kill_and_restart_loses_nothing() {
    let seed = env_or("HOOKFLOW_KILL_SEED", u64::from(std::process::id()) * 7919);
    let events = env_or("HOOKFLOW_KILL_EVENTS", 20_000) as usize;
    let kills = env_or("HOOKFLOW_KILL_COUNT", 10) as usize;
    eprintln!("kill test: seed {seed}, {events} events, {kills} kills");
    let mut rng = StdRng::seed_from_u64(seed);

    // Every endpoint fails each delivery 0 to 2 times (503), fewer than the three retries.
    // Half the attempts fail, which would keep the circuit breakers opening and the run
    // crawling. The breaker has its own tests, so this one keeps it closed.
    let behaviours: HashMap<String, Behaviour> = endpoints()
        .into_iter()
        .map(|(_, _, path, _)| {
            (
                path,
                Behaviour::Seeded {
                    seed,
                    max_failures: 2,
                    status: 503,
                },
            )
        })
        .collect();
    let receiver = Receiver::start(behaviours).expect("receiver on 127.0.0.1");
    let dir = tempfile::tempdir().expect("temporary directory");
    let data_dir = dir.path().join("data");

    let mut config = format!(
        "[pipeline]\npoll_interval_ms = 2\ncheckpoint_interval_ms = 20\nmax_unsynced_results = {MAX_UNSYNCED}\n\
         [delivery]\nmax_in_flight = {MAX_IN_FLIGHT}\nallowed_private_cidrs = [\"127.0.0.1/32\"]\n\
         [retry]\nschedule_ms = [100, 200, 400]\njitter_percent = 20\n\
         [health]\nbreaker_min_requests = 1000000\n"
    );
    for (id, tenant, path, pattern) in endpoints() {
        config.push_str(&format!(
            "\n[[endpoints]]\nid = \"{id}\"\ntenant = \"{tenant}\"\nurl = \"{}\"\n\
             event_types = [\"{pattern}\"]\nsecret = \"{SECRET}\"\ntimeout_ms = 5000\nmax_in_flight = 4\n",
            receiver.url(&path)
        ));
    }
    let config_path = dir.path().join("hookflow.toml");
    std::fs::write(&config_path, config).expect("write config");

    // Events, with about 3% repeats of an earlier (tenant, id) carrying a different payload:
    // a repeat that slipped through dedup would show as a second, different body.
    let mut lines = Vec::with_capacity(events);
    let mut firsts: BTreeMap<(String, String), (String, Vec<u8>)> = BTreeMap::new();
    for n in 0..events {
        if n > 10 && rng.random_bool(0.03) {
            let ((tenant, id), (event_type, _)) = firsts
                .iter()
                .nth(rng.random_range(0..firsts.len()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .expect("an earlier event");
            lines.push(format!(
                r#"{{"id":"{id}","tenant":"{tenant}","type":"{event_type}","created_at":"2026-12-04T10:00:00Z","payload":{{"repeat":{n}}}}}"#
            ));
            continue;
        }
        let tenant = TENANTS[rng.random_range(0..TENANTS.len())];
        let event_type = TYPES[rng.random_range(0..TYPES.len())];
        let id = format!("evt_{n:06}");
        let payload = format!(r#"{{"n":{n},"amount":{}}}"#, rng.random_range(1..100_000));
        lines.push(format!(
            r#"{{"id":"{id}","tenant":"{tenant}","type":"{event_type}","created_at":"2026-12-04T10:00:00Z","payload":{payload}}}"#
        ));
        firsts.insert(
            (tenant.to_string(), id),
            (event_type.to_string(), payload.into_bytes()),
        );
    }

    // Publish in chunks from a thread while the pipeline is killed and restarted.
    let publisher = {
        let data_dir = data_dir.clone();
        let chunks: Vec<String> = lines.chunks(500).map(|chunk| chunk.join("\n")).collect();
        std::thread::spawn(move || {
            let options = PublishOptions {
                target: hookflow::publish::PublishTarget::Local {
                    data_dir,
                    partitions: 4,
                },
                raw: false,
                max_payload_bytes: 1 << 20,
            };
            for chunk in chunks {
                publish_reader(chunk.as_bytes(), "kill test", &options, WallClock.now_ms())
                    .expect("publish");
                std::thread::sleep(Duration::from_millis(40));
            }
        })
    };

    let run = |until_idle: bool| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_hookflow"));
        command
            .arg("run")
            .arg("--config")
            .arg(&config_path)
            .arg("--data-dir")
            .arg(&data_dir);
        if until_idle {
            command.arg("--until-idle");
        }
        command
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        command.spawn().expect("start hookflow run")
    };
    for _ in 0..kills {
        let mut child = run(false);
        std::thread::sleep(Duration::from_millis(rng.random_range(300..1_500)));
        child.kill().expect("SIGKILL hookflow");
        child.wait().expect("reap hookflow");
    }
    publisher.join().expect("publisher thread");

    // A debug build on two shared cores settles a few hundred events a second; allow for that.
    let settle = Duration::from_secs(env_or(
        "HOOKFLOW_KILL_SETTLE_SECS",
        300 + events as u64 / 50,
    ));
    let started = Instant::now();
    let mut last = run(true);
    loop {
        if let Some(status) = last.try_wait().expect("wait for hookflow") {
            assert!(status.success(), "the final run failed: {status}");
            break;
        }
        if started.elapsed() > settle {
            let _ = last.kill();
            panic!("the final run did not settle within {} s", settle.as_secs());
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    // What the receiver saw, by (endpoint path, webhook-id).
    let requests = receiver.requests();
    let mut delivered: HashMap<(String, String), Vec<&hookflow::receiver::ReceivedRequest>> =
        HashMap::new();
    for request in &requests {
        if request.status == 200 {
            let id = request.header("webhook-id").unwrap_or_default().to_string();
            delivered
                .entry((request.path.clone(), id))
                .or_default()
                .push(request);
        }
    }

    let verifier = standardwebhooks::Webhook::new(SECRET).expect("secret");
    let path_of: HashMap<String, String> = endpoints()
        .into_iter()
        .map(|(id, _, path, _)| (id, path))
        .collect();
    let mut lost = Vec::new();
    let mut duplicates = 0usize;
    let mut pairs = 0usize;
    for ((tenant, id), (event_type, payload)) in &firsts {
        for (_, endpoint_tenant, path, pattern) in endpoints() {
            if endpoint_tenant != tenant || !matches(pattern, event_type) {
                continue;
            }
            pairs += 1;
            let Some(received) = delivered.get(&(path.clone(), id.clone())) else {
                lost.push(format!("{tenant}/{id} -> {path}"));
                continue;
            };
            duplicates += received.len() - 1;
            for request in received {
                assert_eq!(
                    &request.body, payload,
                    "{tenant}/{id} -> {path}: a body differs from the first occurrence"
                );
                // `verify` also checks the timestamp against the real clock, which a long run
                // outlasts, so the expected signature is computed with the request's own time.
                let timestamp: i64 = request
                    .header("webhook-timestamp")
                    .and_then(|t| t.parse().ok())
                    .expect("a webhook-timestamp header");
                let expected = verifier.sign(id, timestamp, &request.body).expect("sign");
                let signatures = request.header("webhook-signature").unwrap_or_default();
                assert!(
                    signatures.split(' ').any(|signature| signature == expected),
                    "{tenant}/{id} -> {path}: bad signature"
                );
            }
        }
    }
    let bound = kills * (MAX_IN_FLIGHT + MAX_UNSYNCED);
    println!("lost: {}, duplicates: {duplicates}, kills: {kills}, bound: {bound} ({pairs} deliveries, seed {seed})", lost.len());
    assert!(
        lost.is_empty(),
        "{} deliveries lost, first: {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    assert!(
        duplicates <= bound,
        "{duplicates} duplicates exceed the bound {bound}"
    );

    // The archive: a delivered row for every pair, each matching a received request.
    let rows = read_attempts(&data_dir.join("archive")).expect("archive reads back");
    let mut rows_per_pair: HashMap<(String, String), usize> = HashMap::new();
    for row in rows.iter().filter(|row| row.outcome == "delivered") {
        let (Some(endpoint_id), Some(event_id)) = (&row.endpoint_id, &row.event_id) else {
            panic!("a delivered row without endpoint or event: {row:?}");
        };
        let path = path_of.get(endpoint_id).expect("known endpoint").clone();
        assert!(
            delivered.contains_key(&(path.clone(), event_id.clone())),
            "delivered row {endpoint_id}/{event_id} matches no received request"
        );
        *rows_per_pair.entry((path, event_id.clone())).or_default() += 1;
    }
    let mut without_row = 0usize;
    for (pair, received) in &delivered {
        let rows = rows_per_pair.get(pair).copied().unwrap_or(0);
        assert!(rows >= 1, "{pair:?} was delivered but has no delivered row");
        assert!(
            rows <= received.len(),
            "{pair:?} has {rows} delivered rows for {} requests: rows doubled",
            received.len()
        );
        without_row += received.len().saturating_sub(rows);
    }
    println!(
        "archive: {} rows, {} delivered requests without a row (bound {bound})",
        rows.len(),
        without_row
    );
    assert!(
        without_row <= bound,
        "{without_row} delivered requests have no row"
    );
}
