//! Multi-worker and multi-process runs of the `hookflow` binary on loopback.
//!
//! One test function runs every cluster scenario in sequence, so that no two scenarios race
//! for a port: each picks free ports at run time, just before it starts its processes.
//!
//! * Oracle: the same input run with 1 worker, 4 workers and 2 processes × 2 workers gives the
//!   same archive projected onto (event, endpoint, generation, attempt, outcome). That
//!   projection equals a plain model of the receiver's seeded failures and the retry schedule.
//! * Global rate limit: an endpoint's limit holds across 2 processes × 2 workers.
//! * Kill and resume: one process of 1 × 4 workers, or one of 2 × 2, is killed with SIGKILL
//!   while events are published; the other stops too, and a restart loses nothing and
//!   archives no final outcome twice.
//! * Counts: a data directory written by 2 processes × 2 workers rejects another process count
//!   or worker count, with a message from every process.

mod fleet;

use std::collections::{BTreeMap, HashMap};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use hookflow::publish::{publish_reader, PublishOptions};
use hookflow::receiver::{seeded_failures, Behaviour, ReceivedRequest, Receiver};
use hookflow_connectors::read_attempts;
use hookflow_operators::clock::{Clock, WallClock};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use fleet::{endpoints, matches, SECRET, TENANTS};

const TYPES: [&str; 3] = ["charge.succeeded", "invoice.paid", "customer.created"];
/// Failed attempts before the last: the retry schedule has this many steps.
const RETRIES: u32 = 2;
const SEED: u64 = 42;
/// Requests in flight per worker, and results allowed to wait for their durable write.
const MAX_IN_FLIGHT: usize = 16;
const MAX_UNSYNCED: usize = 16;

/// (event id, endpoint id, generation, attempt, outcome): what must not depend on the topology.
type Projection = Vec<(Option<String>, Option<String>, u32, u32, String)>;

/// Starts a receiver on which every endpoint fails each event 0 to `RETRIES + 1` times with
/// 503, so some deliveries succeed at once, some after retries, and some are dead-lettered.
fn seeded_receiver() -> Receiver {
    let behaviours: HashMap<String, Behaviour> = endpoints()
        .into_iter()
        .map(|(_, _, path, _)| {
            (
                path,
                Behaviour::Seeded {
                    seed: SEED,
                    max_failures: RETRIES + 1,
                    status: 503,
                },
            )
        })
        .collect();
    Receiver::start(behaviours).expect("receiver on 127.0.0.1")
}

/// Writes the config text: every endpoint of [`endpoints`] on `receiver`, `extra` added to each.
/// The seeded receiver fails about half of all attempts on purpose, which would keep every
/// endpoint's circuit breaker open; the breaker is tested on its own, so it is kept closed here.
fn config_text(receiver: &Receiver, checkpoint_ms: u64, extra: &str) -> String {
    let mut config = format!(
        "[pipeline]\npoll_interval_ms = 2\ncheckpoint_interval_ms = {checkpoint_ms}\n\
         max_unsynced_results = {MAX_UNSYNCED}\n\
         [delivery]\nmax_in_flight = {MAX_IN_FLIGHT}\nallowed_private_cidrs = [\"127.0.0.1/32\"]\n\
         [retry]\nschedule_ms = [40, 80]\njitter_percent = 20\n\
         [health]\nbreaker_min_requests = 1000000\n"
    );
    for (id, tenant, path, pattern) in endpoints() {
        config.push_str(&format!(
            "\n[[endpoints]]\nid = \"{id}\"\ntenant = \"{tenant}\"\nurl = \"{}\"\n\
             event_types = [\"{pattern}\"]\nsecret = \"{SECRET}\"\ntimeout_ms = 5000\n{extra}\n",
            receiver.url(&path)
        ));
    }
    config
}

/// A generated input: NDJSON lines, and the first occurrence of each (tenant, id) with its
/// type and payload.
struct Input {
    lines: Vec<String>,
    firsts: BTreeMap<(String, String), (String, Vec<u8>)>,
    invalid: usize,
    unrouted: usize,
}

/// Generates `count` lines over [`TENANTS`] and one tenant with no endpoint, with about 4 % repeats of
/// an earlier (tenant, id) under another payload and 2 % malformed lines.
fn generate(seed: u64, count: usize) -> Input {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut input = Input {
        lines: Vec::with_capacity(count),
        firsts: BTreeMap::new(),
        invalid: 0,
        unrouted: 0,
    };
    for n in 0..count {
        if n > 10 && rng.random_bool(0.04) {
            let ((tenant, id), (event_type, _)) = input
                .firsts
                .iter()
                .nth(rng.random_range(0..input.firsts.len()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .expect("an earlier event");
            input.lines.push(event_line(
                &tenant,
                &id,
                &event_type,
                &format!(r#"{{"repeat":{n}}}"#),
            ));
            continue;
        }
        if rng.random_bool(0.02) {
            input
                .lines
                .push(format!(r#"{{"id":"bad_{n}","tenant":"acme""#));
            input.invalid += 1;
            continue;
        }
        let id = format!("evt_{n:06}");
        let payload = format!(r#"{{"n":{n},"amount":{}}}"#, rng.random_range(1..100_000));
        if rng.random_bool(0.05) {
            input
                .lines
                .push(event_line("nobody", &id, TYPES[0], &payload));
            input.unrouted += 1;
            continue;
        }
        let tenant = TENANTS[rng.random_range(0..TENANTS.len())];
        let event_type = TYPES[rng.random_range(0..TYPES.len())];
        input
            .lines
            .push(event_line(tenant, &id, event_type, &payload));
        input.firsts.insert(
            (tenant.to_string(), id),
            (event_type.to_string(), payload.into_bytes()),
        );
    }
    input
}

fn event_line(tenant: &str, id: &str, event_type: &str, payload: &str) -> String {
    format!(
        r#"{{"id":"{id}","tenant":"{tenant}","type":"{event_type}","created_at":"2026-12-04T10:00:00Z","payload":{payload}}}"#
    )
}

fn publish(data_dir: &Path, lines: &[String]) {
    let options = PublishOptions {
        target: hookflow::publish::PublishTarget::Local {
            data_dir: data_dir.to_path_buf(),
            partitions: 4,
        },
        raw: true,
        max_payload_bytes: 1 << 20,
    };
    publish_reader(
        lines.join("\n").as_bytes(),
        "cluster test",
        &options,
        WallClock.now_ms(),
    )
    .expect("publish");
}

/// Computes the projected archive rows a correct run of `input` writes, from the receiver's
/// seeded failure counts and the retry schedule alone.
fn model(input: &Input) -> Projection {
    let mut rows = Projection::new();
    for ((tenant, id), (event_type, _)) in &input.firsts {
        for (endpoint_id, endpoint_tenant, path, pattern) in endpoints() {
            if endpoint_tenant != tenant || !matches(pattern, event_type) {
                continue;
            }
            let failures = seeded_failures(SEED, RETRIES + 1, &path, id);
            let attempts = failures.min(RETRIES);
            for attempt in 1..=attempts {
                rows.push((
                    Some(id.clone()),
                    Some(endpoint_id.clone()),
                    0,
                    attempt,
                    "failed".into(),
                ));
            }
            let last = if failures <= RETRIES {
                "delivered"
            } else {
                "dead_lettered"
            };
            rows.push((
                Some(id.clone()),
                Some(endpoint_id.clone()),
                0,
                attempts + 1,
                last.into(),
            ));
        }
    }
    rows.sort();
    rows
}

fn project(archive: &Path) -> Projection {
    let mut rows: Projection = read_attempts(archive)
        .expect("archive reads back")
        .into_iter()
        .map(|row| {
            (
                row.event_id,
                row.endpoint_id,
                row.generation,
                row.attempt,
                row.outcome,
            )
        })
        .collect();
    rows.sort();
    rows
}

/// Returns `count` loopback addresses whose ports were free a moment ago.
fn free_addresses(count: usize) -> Vec<String> {
    let listeners: Vec<TcpListener> = (0..count)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port"))
        .collect();
    listeners
        .iter()
        .map(|listener| listener.local_addr().expect("local address").to_string())
        .collect()
}

/// One topology: processes × workers per process.
#[derive(Debug, Clone, Copy)]
struct Topology {
    processes: usize,
    workers: usize,
}

/// Files for runs of one data directory.
struct Run {
    dir: PathBuf,
    config: PathBuf,
    hosts: PathBuf,
}

impl Run {
    fn new(root: &Path, name: &str, config: &str) -> Run {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).expect("create run directory");
        let config_path = dir.join("hookflow.toml");
        std::fs::write(&config_path, config).expect("write config");
        Run {
            hosts: dir.join("hosts"),
            config: config_path,
            dir,
        }
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Starts every process of `topology`; a cluster gets a fresh hosts file of free ports.
    fn spawn(&self, topology: Topology, until_idle: bool) -> Vec<Child> {
        let data_dirs = vec![self.data_dir(); topology.processes];
        self.spawn_on(topology, &data_dirs, until_idle)
    }

    /// Starts every process of `topology`, process I on `data_dirs[I]`.
    fn spawn_on(&self, topology: Topology, data_dirs: &[PathBuf], until_idle: bool) -> Vec<Child> {
        if topology.processes > 1 {
            std::fs::write(&self.hosts, free_addresses(topology.processes).join("\n"))
                .expect("write hosts file");
        }
        (0..topology.processes)
            .map(|index| {
                let mut command = Command::new(env!("CARGO_BIN_EXE_hookflow"));
                command
                    .arg("run")
                    .arg("--config")
                    .arg(&self.config)
                    .arg("--data-dir")
                    .arg(&data_dirs[index])
                    .arg("--workers")
                    .arg(topology.workers.to_string());
                if topology.processes > 1 {
                    command
                        .arg("--processes")
                        .arg(topology.processes.to_string())
                        .arg("--process-index")
                        .arg(index.to_string())
                        .arg("--hosts")
                        .arg(&self.hosts);
                }
                if until_idle {
                    command.arg("--until-idle");
                }
                // timely prints its connection attempts to standard output.
                command
                    .env("RUST_LOG", "warn,hookflow=info")
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped());
                command.spawn().expect("start hookflow run")
            })
            .collect()
    }

    /// Runs `topology` until idle and returns each process's output; fails the test if one
    /// fails or the run outlasts `limit`.
    fn until_idle(&self, topology: Topology, limit: Duration) -> Vec<Output> {
        let outputs = wait_all(self.spawn(topology, true), limit);
        for (index, output) in outputs.iter().enumerate() {
            assert!(
                output.status.success(),
                "{topology:?} process {index} failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        outputs
    }
}

/// Waits for every child, killing all of them if `limit` passes first.
fn wait_all(mut children: Vec<Child>, limit: Duration) -> Vec<Output> {
    let started = Instant::now();
    while children
        .iter_mut()
        .any(|child| child.try_wait().expect("wait for hookflow").is_none())
    {
        if started.elapsed() > limit {
            for child in &mut children {
                let _ = child.kill();
            }
            let outputs: Vec<Output> = children
                .into_iter()
                .map(|child| child.wait_with_output().expect("reap hookflow"))
                .collect();
            let text: Vec<String> = outputs
                .iter()
                .map(|output| String::from_utf8_lossy(&output.stderr).into_owned())
                .collect();
            panic!(
                "the run did not finish within {} s: {text:#?}",
                limit.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    children
        .into_iter()
        .map(|child| child.wait_with_output().expect("collect hookflow output"))
        .collect()
}

/// Sums `duplicates=N` over the processes' "Pipeline stopped." lines.
fn duplicates(outputs: &[Output]) -> u64 {
    outputs
        .iter()
        .map(|output| {
            let text = String::from_utf8_lossy(&output.stderr);
            let line = text
                .lines()
                .find(|line| line.contains("Pipeline stopped."))
                .unwrap_or_else(|| panic!("no summary line in: {text}"));
            let value = line
                .split_whitespace()
                .find_map(|field| field.strip_prefix("duplicates="))
                .expect("a duplicates field");
            value.parse::<u64>().expect("a count")
        })
        .sum()
}

#[test]
fn cluster_scenarios() {
    let root = tempfile::tempdir().expect("temporary directory");
    oracle_over_topologies(root.path());
    rate_limit_is_global(root.path());
    kill_and_resume(
        root.path(),
        Topology {
            processes: 1,
            workers: 4,
        },
    );
    kill_and_resume(
        root.path(),
        Topology {
            processes: 2,
            workers: 2,
        },
    );
    stop_every_process_with_sigterm(root.path());
    changed_counts_are_rejected(root.path());
}

fn oracle_over_topologies(root: &Path) {
    let input = generate(7, 500);
    let expected = model(&input);
    let repeats = input.lines.len() - input.firsts.len() - input.invalid - input.unrouted;
    assert!(expected.len() > 300, "the input must exercise the pipeline");
    assert!(
        expected.iter().any(|row| row.4 == "dead_lettered"),
        "no dead letter"
    );
    assert!(expected.iter().any(|row| row.4 == "failed"), "no retry");

    let topologies = [
        Topology {
            processes: 1,
            workers: 1,
        },
        Topology {
            processes: 1,
            workers: 4,
        },
        Topology {
            processes: 2,
            workers: 2,
        },
    ];
    let mut projections = Vec::new();
    for topology in topologies {
        // A fresh receiver per run, since it counts requests per event to fail the first ones.
        let receiver = seeded_receiver();
        let name = format!("oracle-{}x{}", topology.processes, topology.workers);
        let run = Run::new(root, &name, &config_text(&receiver, 100, ""));
        publish(&run.data_dir(), &input.lines);
        let started = Instant::now();
        let outputs = run.until_idle(topology, Duration::from_secs(120));
        eprintln!(
            "oracle: {topology:?} took {:.2} s",
            started.elapsed().as_secs_f64()
        );

        let projection = project(&run.data_dir().join("archive"));
        let with_endpoint: Projection = projection
            .iter()
            .filter(|row| row.1.is_some())
            .cloned()
            .collect();
        assert_eq!(
            with_endpoint, expected,
            "{topology:?}: archive differs from the model"
        );
        let count = |outcome: &str| projection.iter().filter(|row| row.4 == outcome).count();
        assert_eq!(
            count("invalid"),
            input.invalid,
            "{topology:?}: invalid rows"
        );
        assert_eq!(
            count("unrouted"),
            input.unrouted,
            "{topology:?}: unrouted rows"
        );
        assert_eq!(
            duplicates(&outputs),
            repeats as u64,
            "{topology:?}: dedup decisions"
        );
        if topology.processes > 1 {
            for (index, output) in outputs.iter().enumerate() {
                let text = String::from_utf8_lossy(&output.stderr);
                assert!(
                    text.contains(&format!("process={index}")),
                    "process {index} does not label its logs: {text}"
                );
            }
        }
        projections.push((topology, projection));
    }
    let (first, reference) = &projections[0];
    for (topology, projection) in &projections[1..] {
        assert_eq!(projection, reference, "{topology:?} differs from {first:?}");
    }
}

fn rate_limit_is_global(root: &Path) {
    const LIMIT: usize = 10;
    const WINDOW_MS: u64 = 100;
    let receiver = Receiver::start(HashMap::new()).expect("receiver on 127.0.0.1");
    let config = config_text(
        &receiver,
        100,
        &format!("rate_limit = {{ max_requests = {LIMIT}, window_ms = {WINDOW_MS} }}"),
    );
    let run = Run::new(root, "rate-limit", &config);
    // 200 events of one tenant: 200 deliveries to each of its two endpoints.
    let lines: Vec<String> = (0..200)
        .map(|n| event_line("acme", &format!("evt_{n}"), "charge.succeeded", "{}"))
        .collect();
    publish(&run.data_dir(), &lines);
    run.until_idle(
        Topology {
            processes: 2,
            workers: 2,
        },
        Duration::from_secs(120),
    );

    let rows = read_attempts(&run.data_dir().join("archive")).expect("archive reads back");
    for endpoint in ["ep_acme_all", "ep_acme_charges"] {
        let mut per_window: BTreeMap<u64, usize> = BTreeMap::new();
        for row in rows
            .iter()
            .filter(|row| row.endpoint_id.as_deref() == Some(endpoint))
        {
            assert_eq!(row.outcome, "delivered", "{endpoint}: {row:?}");
            let started = row.started_at_ms.expect("an attempt has a start time");
            *per_window.entry(started / WINDOW_MS).or_default() += 1;
        }
        let total: usize = per_window.values().sum();
        assert_eq!(total, 200, "{endpoint}: deliveries");

        // The attempt's own clock read (`started_at_ms`) must fall in a window with budget:
        // a request task that runs after its granted window has ended sends nothing and takes
        // a later slot. A limit kept per worker instead of per endpoint would let 4 workers
        // start 4 × LIMIT per window, and finish in a quarter of the windows.
        let busiest = per_window.values().copied().max().unwrap_or(0);
        let (first, last) = (
            *per_window.keys().next().expect("a window"),
            *per_window.keys().last().expect("a window"),
        );
        let windows = (last - first + 1) as usize;
        eprintln!(
            "rate limit: {endpoint}: 200 requests over {windows} windows of {WINDOW_MS} ms, at most {busiest} in one (limit {LIMIT})"
        );
        assert!(
            windows >= 200 / LIMIT,
            "{endpoint}: 200 requests in {windows} windows of {WINDOW_MS} ms, limit {LIMIT}"
        );
        assert!(
            busiest <= LIMIT,
            "{endpoint}: {busiest} requests started in one window of {WINDOW_MS} ms, limit {LIMIT}: {per_window:?}"
        );
    }
    let requests = receiver.requests();
    assert_eq!(requests.len(), 400, "requests received");
}

/// Kills the last process of `topology` while events are published, then restarts every
/// process and checks that nothing is lost and nothing final is archived twice.
fn kill_and_resume(root: &Path, topology: Topology) {
    let input = generate(11, 3000);
    let receiver = seeded_receiver();
    let name = format!("kill-{}x{}", topology.processes, topology.workers);
    let run = Run::new(root, &name, &config_text(&receiver, 20, ""));

    // Publish a first part, start the cluster, publish the rest while it runs.
    let (head, tail) = input.lines.split_at(input.lines.len() / 3);
    publish(&run.data_dir(), head);
    let mut children = run.spawn(topology, false);
    let publisher = {
        let data_dir = run.data_dir();
        let chunks: Vec<Vec<String>> = tail.chunks(250).map(<[String]>::to_vec).collect();
        std::thread::spawn(move || {
            for chunk in chunks {
                publish(&data_dir, &chunk);
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let wait_for_requests = Instant::now();
    while receiver.requests().len() < 200 && wait_for_requests.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        receiver.requests().len() >= 200,
        "the cluster delivered nothing in 60 s"
    );
    let mut killed = children.pop().expect("a process");
    killed.kill().expect("SIGKILL the last process");
    let killed_at = Instant::now();
    let _ = killed.wait();

    // The surviving processes lose their peer and stop by themselves.
    for (index, survivor) in wait_all(children, Duration::from_secs(30))
        .into_iter()
        .enumerate()
    {
        let text = String::from_utf8_lossy(&survivor.stderr);
        eprintln!(
            "kill: process {index} stopped {:.2} s after the last one was killed, status {}, first panic: {:?}",
            killed_at.elapsed().as_secs_f64(),
            survivor.status,
            text.lines()
                .skip_while(|line| !line.contains("panicked"))
                .take(2)
                .collect::<Vec<_>>()
        );
        assert!(
            !survivor.status.success(),
            "process {index} must fail when its peer dies"
        );
    }
    publisher.join().expect("publisher thread");
    let before_restart = receiver.requests().len();

    let outputs = run.until_idle(topology, Duration::from_secs(180));
    assert!(
        receiver.requests().len() > before_restart,
        "the restart delivered nothing"
    );
    drop(outputs);

    // Nothing lost: every (endpoint, first occurrence) was delivered or dead-lettered, and
    // the bodies are the first occurrence's.
    let mut delivered: HashMap<(String, String), Vec<&ReceivedRequest>> = HashMap::new();
    let requests = receiver.requests();
    for request in &requests {
        let id = request.header("webhook-id").unwrap_or_default().to_string();
        delivered
            .entry((request.path.clone(), id))
            .or_default()
            .push(request);
    }
    let rows = read_attempts(&run.data_dir().join("archive")).expect("archive reads back");
    let mut finals: HashMap<(String, String), Vec<String>> = HashMap::new();
    for row in rows.iter().filter(|row| row.outcome != "failed") {
        if let (Some(endpoint), Some(event)) = (&row.endpoint_id, &row.event_id) {
            finals
                .entry((endpoint.clone(), event.clone()))
                .or_default()
                .push(row.outcome.clone());
        }
    }
    let mut lost = Vec::new();
    let mut successes_beyond_one = 0usize;
    let mut pairs = 0usize;
    for ((tenant, id), (event_type, payload)) in &input.firsts {
        for (endpoint_id, endpoint_tenant, path, pattern) in endpoints() {
            if endpoint_tenant != tenant || !matches(pattern, event_type) {
                continue;
            }
            pairs += 1;
            let received = delivered
                .get(&(path.clone(), id.clone()))
                .cloned()
                .unwrap_or_default();
            for request in &received {
                assert_eq!(
                    &request.body, payload,
                    "{tenant}/{id} -> {path}: body differs"
                );
            }
            let successes = received
                .iter()
                .filter(|request| request.status == 200)
                .count();
            successes_beyond_one += successes.saturating_sub(1);
            let outcomes = finals.get(&(endpoint_id.clone(), id.clone()));
            let settled = outcomes.is_some_and(|outcomes| {
                outcomes
                    .iter()
                    .any(|o| o == "delivered" || o == "dead_lettered")
            });
            if !settled
                || (successes == 0 && seeded_failures(SEED, RETRIES + 1, &path, id) <= RETRIES)
            {
                lost.push(format!("{tenant}/{id} -> {path}"));
            }
            if let Some(outcomes) = outcomes {
                assert_eq!(
                    outcomes.len(),
                    1,
                    "{endpoint_id}/{id}: final rows doubled: {outcomes:?}"
                );
            }
        }
    }
    // A kill can resend what was in flight or waiting for its durable write, per worker.
    let bound = topology.processes * topology.workers * (MAX_IN_FLIGHT + MAX_UNSYNCED);
    eprintln!(
        "kill: {topology:?}: {pairs} deliveries, lost {}, delivered more than once {successes_beyond_one} (bound {bound})",
        lost.len()
    );
    assert!(
        lost.is_empty(),
        "{} deliveries lost, first: {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    assert!(
        successes_beyond_one <= bound,
        "{successes_beyond_one} duplicates exceed {bound}"
    );
}

fn stop_every_process_with_sigterm(root: &Path) {
    let receiver = Receiver::start(HashMap::new()).expect("receiver on 127.0.0.1");
    let run = Run::new(root, "sigterm", &config_text(&receiver, 100, ""));
    let lines: Vec<String> = (0..50)
        .map(|n| event_line(TENANTS[n % 4], &format!("evt_{n}"), "invoice.paid", "{}"))
        .collect();
    publish(&run.data_dir(), &lines);
    let children = run.spawn(
        Topology {
            processes: 2,
            workers: 2,
        },
        false,
    );
    let started = Instant::now();
    while receiver.requests().len() < 50 && started.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        receiver.requests().len(),
        50,
        "the cluster delivered every event"
    );

    for child in &children {
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("kill -TERM");
        assert!(status.success(), "kill -TERM failed");
    }
    let outputs = wait_all(children, Duration::from_secs(30));
    for (index, output) in outputs.iter().enumerate() {
        let text = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success(),
            "process {index} after SIGTERM: {text}"
        );
        assert!(
            text.contains("Pipeline stopped."),
            "process {index}: {text}"
        );
    }

    // The checkpoint covers everything: a restart sends nothing again.
    run.until_idle(
        Topology {
            processes: 2,
            workers: 2,
        },
        Duration::from_secs(60),
    );
    assert_eq!(
        receiver.requests().len(),
        50,
        "a restart after SIGTERM delivered again"
    );
}

fn changed_counts_are_rejected(root: &Path) {
    let receiver = Receiver::start(HashMap::new()).expect("receiver on 127.0.0.1");
    let run = Run::new(root, "counts", &config_text(&receiver, 100, ""));
    publish(
        &run.data_dir(),
        &[event_line("acme", "evt_1", "charge.succeeded", "{}")],
    );
    run.until_idle(
        Topology {
            processes: 2,
            workers: 2,
        },
        Duration::from_secs(60),
    );

    let single = wait_all(
        run.spawn(
            Topology {
                processes: 1,
                workers: 4,
            },
            true,
        ),
        Duration::from_secs(30),
    );
    let text = String::from_utf8_lossy(&single[0].stderr);
    assert!(
        !single[0].status.success(),
        "a single process must be rejected: {text}"
    );
    assert!(text.contains("was run as a cluster"), "{text}");

    let fewer = wait_all(
        run.spawn(
            Topology {
                processes: 2,
                workers: 1,
            },
            true,
        ),
        Duration::from_secs(30),
    );
    for (index, output) in fewer.iter().enumerate() {
        let text = String::from_utf8_lossy(&output.stderr);
        assert!(
            !output.status.success(),
            "process {index} must reject 1 worker: {text}"
        );
        assert!(
            text.contains("the cluster cannot start"),
            "process {index}: {text}"
        );
        assert!(
            text.contains("invalid workers 1"),
            "process {index}: {text}"
        );
    }

    // `hookflow endpoints` reads a single process's store, and must not create one here.
    let endpoints = Command::new(env!("CARGO_BIN_EXE_hookflow"))
        .args(["endpoints", "list", "--config"])
        .arg(&run.config)
        .arg("--data-dir")
        .arg(run.data_dir())
        .output()
        .expect("run hookflow endpoints list");
    let text = String::from_utf8_lossy(&endpoints.stderr);
    assert!(
        !endpoints.status.success(),
        "endpoints list on a cluster: {text}"
    );
    assert!(text.contains("was run as a cluster"), "{text}");
    assert!(
        !run.data_dir().join("state/state.sqlite").exists(),
        "endpoints list created a single-process store"
    );

    // Two machines would each have a data directory, and so a local log, of their own.
    let elsewhere = run.dir.join("elsewhere");
    publish(
        &elsewhere,
        &[event_line("acme", "evt_2", "charge.succeeded", "{}")],
    );
    let two_logs = wait_all(
        run.spawn_on(
            Topology {
                processes: 2,
                workers: 2,
            },
            &[run.data_dir(), elsewhere],
            true,
        ),
        Duration::from_secs(30),
    );
    for (index, output) in two_logs.iter().enumerate() {
        let text = String::from_utf8_lossy(&output.stderr);
        assert!(
            !output.status.success(),
            "process {index} must reject two logs: {text}"
        );
        assert!(
            text.contains("process 1 opened another local log than process 0"),
            "process {index}: {text}"
        );
    }

    // The one event goes to ep_acme_all and ep_acme_charges, in the first run only.
    assert_eq!(receiver.requests().len(), 2, "only the first run delivers");
}

#[test]
fn cluster_arguments_are_checked() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let config = dir.path().join("hookflow.toml");
    std::fs::write(&config, "").expect("write config");
    let hosts = dir.path().join("hosts");
    std::fs::write(&hosts, "127.0.0.1:1\n").expect("write hosts file");
    let run = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_hookflow"))
            .arg("run")
            .arg("--config")
            .arg(&config)
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(extra)
            .output()
            .expect("run hookflow run")
    };
    let cases: [(&[&str], i32, &str); 4] = [
        (&["--processes", "2"], 2, "--processes 2 needs --hosts FILE"),
        (
            &["--processes", "2", "--process-index", "2"],
            2,
            "--process-index 2 is not below --processes 2",
        ),
        (
            &["--hosts", "HOSTS"],
            2,
            "--hosts needs --processes greater than 1",
        ),
        (
            &["--processes", "2", "--hosts", "HOSTS"],
            1,
            "lists 1 address(es), but the cluster has 2 process(es)",
        ),
    ];
    for (args, code, message) in cases {
        let args: Vec<&str> = args
            .iter()
            .map(|arg| {
                if *arg == "HOSTS" {
                    hosts.to_str().expect("UTF-8 path")
                } else {
                    arg
                }
            })
            .collect();
        let output = run(&args);
        let text = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(code), "{args:?}: {text}");
        assert!(text.contains(message), "{args:?}: {text}");
        if code == 2 {
            assert!(text.contains("Usage:"), "{args:?}: {text}");
        }
    }
    assert!(
        !dir.path().join("data").exists(),
        "a rejected run must not create the data directory"
    );
}
