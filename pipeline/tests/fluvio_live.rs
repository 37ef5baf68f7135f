//! Live tests of the Fluvio source against a real cluster that the test starts on 127.0.0.1.
//!
//! They need a `fluvio-run` binary (Fluvio's installer provides one) named by `FLUVIO_RUN`, and
//! are ignored otherwise:
//!
//! ```text
//! FLUVIO_RUN=/path/to/fluvio-run cargo test -p hookflow --test fluvio_live -- --ignored --test-threads=1
//! ```
//!
//! Each test starts its own SC in local mode, registers a custom SPU through the admin API,
//! starts that SPU, creates its topics through the admin API, and kills both processes by
//! their ids when it ends. One test needs no cluster and always runs: an SC that does not
//! answer makes `hookflow run` fail at start, naming the address.

#[path = "../../connectors/tests/contract/mod.rs"]
mod contract;
mod fleet;

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fluvio::metadata::customspu::CustomSpuSpec;
use fluvio::metadata::spu::SpuSpec;
use fluvio::metadata::topic::TopicSpec;
use fluvio::{Fluvio, FluvioClusterConfig};
use fluvio_controlplane_metadata::spu::{Endpoint, IngressAddr, IngressPort};
use fluvio_future::task::run_block_on;
use hookflow::receiver::{Behaviour, Receiver};
use hookflow_connectors::{read_attempts, FluvioOptions, FluvioSource, Source, SourceStatus};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use fleet::{endpoints, matches, SECRET, TENANTS};

const IGNORED: &str = "set FLUVIO_RUN=/path/to/fluvio-run to run";
const SPU_ID: i32 = 5001;
/// Requests in flight per worker, and results allowed to wait for their durable write: what a
/// kill can make hookflow send twice.
const MAX_IN_FLIGHT: usize = 8;
const MAX_UNSYNCED: usize = 8;
const TYPES: [&str; 3] = ["charge.succeeded", "invoice.paid", "customer.created"];

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port on 127.0.0.1")
        .port()
}

/// Waits until `probe` returns `Some`, or panics naming `what` after `limit`.
fn wait_for<T>(what: &str, limit: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// An SC and one SPU started from `$FLUVIO_RUN`, killed by their ids on drop.
struct LiveCluster {
    dir: tempfile::TempDir,
    fluvio_run: PathBuf,
    sc: Child,
    spu: Option<Child>,
    sc_public: String,
    sc_private: String,
    spu_public: u16,
    spu_private: u16,
}

impl LiveCluster {
    fn start() -> Self {
        let fluvio_run = PathBuf::from(std::env::var_os("FLUVIO_RUN").expect(IGNORED));
        let dir = tempfile::tempdir().expect("temporary directory");
        let sc_public = format!("127.0.0.1:{}", free_port());
        let sc_private = format!("127.0.0.1:{}", free_port());
        let sc = Command::new(&fluvio_run)
            .arg("sc")
            .arg("--local")
            .arg(dir.path().join("metadata"))
            .args(["--bind-public", &sc_public, "--bind-private", &sc_private])
            .stdout(log_file(dir.path(), "sc.log"))
            .stderr(log_file(dir.path(), "sc.err"))
            .spawn()
            .expect("start the SC");
        let mut cluster = Self {
            dir,
            fluvio_run,
            sc,
            spu: None,
            sc_public,
            sc_private,
            spu_public: free_port(),
            spu_private: free_port(),
        };
        let client = cluster.client();
        let spec = CustomSpuSpec {
            id: SPU_ID,
            public_endpoint: IngressPort {
                port: cluster.spu_public,
                ingress: vec![IngressAddr {
                    hostname: None,
                    ip: Some("127.0.0.1".to_string()),
                }],
                ..IngressPort::default()
            },
            private_endpoint: Endpoint {
                port: cluster.spu_private,
                host: "127.0.0.1".to_string(),
                ..Endpoint::default()
            },
            rack: None,
            public_endpoint_local: None,
        };
        run_block_on(async {
            let admin = client.admin().await;
            admin.create(format!("spu-{SPU_ID}"), false, spec).await
        })
        .expect("register the custom SPU");
        cluster.start_spu();
        cluster
    }

    fn client(&self) -> Fluvio {
        let config = FluvioClusterConfig::new(self.sc_public.clone());
        wait_for("the SC to accept clients", Duration::from_secs(60), || {
            run_block_on(Fluvio::connect_with_config(&config)).ok()
        })
    }

    fn start_spu(&mut self) {
        let spu = Command::new(&self.fluvio_run)
            .arg("spu")
            .args(["-i", &SPU_ID.to_string()])
            .args(["-p", &format!("127.0.0.1:{}", self.spu_public)])
            .args(["-v", &format!("127.0.0.1:{}", self.spu_private)])
            .args(["--sc-addr", &self.sc_private])
            .arg("--log-base-dir")
            .arg(self.dir.path().join("spu"))
            .stdout(log_file(self.dir.path(), "spu.log"))
            .stderr(log_file(self.dir.path(), "spu.err"))
            .spawn()
            .expect("start the SPU");
        self.spu = Some(spu);
        let client = self.client();
        wait_for("the SPU to be online", Duration::from_secs(60), || {
            let spus = run_block_on(async {
                let admin = client.admin().await;
                admin.all::<SpuSpec>().await
            })
            .ok()?;
            spus.iter()
                .any(|spu| spu.spec.id == SPU_ID && spu.status.is_online())
                .then_some(())
        });
    }

    fn kill_spu(&mut self) {
        if let Some(mut spu) = self.spu.take() {
            spu.kill().expect("kill the SPU");
            spu.wait().expect("reap the SPU");
        }
    }

    fn options(&self, topic: &str) -> FluvioOptions {
        FluvioOptions::new(self.sc_public.clone(), topic)
    }

    /// Creates a topic and waits until every partition can be read.
    fn create_topic(&self, topic: &str, partitions: u32) {
        let client = self.client();
        run_block_on(async {
            let admin = client.admin().await;
            admin
                .create(
                    topic.to_string(),
                    false,
                    TopicSpec::new_computed(partitions, 1, None),
                )
                .await
        })
        .expect("create the topic");
        let options = self.options(topic);
        wait_for("the topic's partitions", Duration::from_secs(60), || {
            FluvioSource::connect(options.clone(), SourceStatus::new()).ok()
        });
    }
}

impl Drop for LiveCluster {
    fn drop(&mut self) {
        self.kill_spu();
        let _ = self.sc.kill();
        let _ = self.sc.wait();
    }
}

fn log_file(dir: &Path, name: &str) -> Stdio {
    std::fs::File::create(dir.join(name)).map_or_else(|_| Stdio::null(), Stdio::from)
}

/// The source contract against a topic of a real cluster, one topic per case.
struct FluvioLog {
    options: FluvioOptions,
    writer: FluvioSource,
}

impl FluvioLog {
    fn new(cluster: &LiveCluster, topic: &str) -> Self {
        cluster.create_topic(topic, 2);
        let options = cluster.options(topic);
        let writer = FluvioSource::connect(options.clone(), SourceStatus::new()).expect("connect");
        Self { options, writer }
    }
}

impl contract::ContractLog for FluvioLog {
    fn open(&mut self) -> Box<dyn Source> {
        Box::new(FluvioSource::connect(self.options.clone(), SourceStatus::new()).expect("connect"))
    }

    fn append(&mut self, records: &[(&[u8], &[u8])]) -> Vec<(u32, u64)> {
        self.writer.produce(records).expect("produce")
    }
}

/// One case of the source contract.
type ContractCase = fn(&mut dyn contract::ContractLog);

#[test]
#[ignore = "set FLUVIO_RUN=/path/to/fluvio-run to run"]
fn fluvio_source_meets_the_contract() {
    let cluster = LiveCluster::start();
    let cases: [(&str, ContractCase); 6] = [
        ("empty", contract::empty_log),
        ("offset", contract::read_from_offset),
        ("resume", contract::resume_from_checkpoint),
        ("fetch", contract::batched_fetch),
        ("large", contract::large_batch),
        ("malformed", contract::malformed_record),
    ];
    let only = std::env::var("HOOKFLOW_CONTRACT_CASE").ok();
    if std::env::var_os("HOOKFLOW_CONTRACT_TRACE").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(std::env::var("HOOKFLOW_CONTRACT_TRACE").unwrap_or_default())
            .with_writer(std::io::stderr)
            .try_init();
    }
    for (name, case) in cases {
        if only.as_deref().is_some_and(|only| only != name) {
            continue;
        }
        let started = Instant::now();
        case(&mut FluvioLog::new(&cluster, &format!("contract-{name}")));
        println!(
            "contract case {name}: passed in {} ms",
            started.elapsed().as_millis()
        );
    }
}

/// A hookflow data directory, config and receiver reading the topic `events`.
struct Pipeline {
    dir: tempfile::TempDir,
    receiver: Receiver,
    config_path: PathBuf,
    data_dir: PathBuf,
}

impl Pipeline {
    fn new(cluster: &LiveCluster) -> Self {
        let behaviours: HashMap<String, Behaviour> = endpoints()
            .into_iter()
            .map(|(_, _, path, _)| (path, Behaviour::Status(200)))
            .collect();
        let receiver = Receiver::start(behaviours).expect("receiver on 127.0.0.1");
        let dir = tempfile::tempdir().expect("temporary directory");
        let mut config = format!(
            "[source]\nkind = \"fluvio\"\n[source.fluvio]\nendpoint = \"{}\"\ntopic = \"events\"\nconsumer = \"hookflow-live\"\n\
             [pipeline]\npoll_interval_ms = 5\ncheckpoint_interval_ms = 20\nmax_unsynced_results = {MAX_UNSYNCED}\n\
             [delivery]\nmax_in_flight = {MAX_IN_FLIGHT}\nallowed_private_cidrs = [\"127.0.0.1/32\"]\n",
            cluster.sc_public
        );
        for (id, tenant, path, pattern) in endpoints() {
            config.push_str(&format!(
                "\n[[endpoints]]\nid = \"{id}\"\ntenant = \"{tenant}\"\nurl = \"{}\"\n\
                 event_types = [\"{pattern}\"]\nsecret = \"{SECRET}\"\n",
                receiver.url(&path)
            ));
        }
        let config_path = dir.path().join("hookflow.toml");
        std::fs::write(&config_path, config).expect("write config");
        let data_dir = dir.path().join("data");
        Self {
            dir,
            receiver,
            config_path,
            data_dir,
        }
    }

    fn run(&self, until_idle: bool, log: &str) -> Child {
        let mut command = Command::new(env!("CARGO_BIN_EXE_hookflow"));
        command
            .arg("run")
            .arg("--config")
            .arg(&self.config_path)
            .arg("--data-dir")
            .arg(&self.data_dir);
        if until_idle {
            command.arg("--until-idle");
        }
        command
            .env("RUST_LOG", "warn,hookflow_connectors=info")
            .stdout(Stdio::null())
            .stderr(log_file(self.dir.path(), log));
        command.spawn().expect("start hookflow run")
    }

    /// Publishes events as a user would, through `hookflow publish --source fluvio`.
    fn publish(&self, events: &[String]) {
        let file = self.dir.path().join("events.ndjson");
        std::fs::write(&file, events.join("\n")).expect("write events");
        let output = Command::new(env!("CARGO_BIN_EXE_hookflow"))
            .args(["publish", "--source", "fluvio", "--config"])
            .arg(&self.config_path)
            .arg(&file)
            .output()
            .expect("run hookflow publish");
        assert!(
            output.status.success(),
            "publish failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }

    /// (endpoint path, event id) pairs the events must reach.
    fn expected(events: &[(String, String, String)]) -> Vec<(String, String)> {
        let mut pairs = Vec::new();
        for (tenant, id, event_type) in events {
            for (_, endpoint_tenant, path, pattern) in endpoints() {
                if endpoint_tenant == tenant && matches(pattern, event_type) {
                    pairs.push((path, id.clone()));
                }
            }
        }
        pairs
    }

    /// Successful requests per (path, webhook-id).
    fn delivered(&self) -> HashMap<(String, String), usize> {
        let mut delivered = HashMap::new();
        for request in self.receiver.requests() {
            if request.status == 200 {
                let id = request.header("webhook-id").unwrap_or_default().to_string();
                *delivered.entry((request.path.clone(), id)).or_default() += 1;
            }
        }
        delivered
    }

    /// Checks that every pair was delivered and archived; returns the duplicates.
    fn check(&self, pairs: &[(String, String)]) -> usize {
        let delivered = self.delivered();
        let lost: Vec<_> = pairs
            .iter()
            .filter(|pair| !delivered.contains_key(pair))
            .collect();
        assert!(
            lost.is_empty(),
            "{} deliveries lost, first: {:?}",
            lost.len(),
            &lost[..lost.len().min(5)]
        );
        let duplicates: usize = delivered.values().map(|count| count - 1).sum();

        let path_of: HashMap<String, String> = endpoints()
            .into_iter()
            .map(|(id, _, path, _)| (id, path))
            .collect();
        let rows = read_attempts(&self.data_dir.join("archive")).expect("archive reads back");
        let mut rows_per_pair: HashMap<(String, String), usize> = HashMap::new();
        for row in rows.iter().filter(|row| row.outcome == "delivered") {
            let (Some(endpoint_id), Some(event_id)) = (&row.endpoint_id, &row.event_id) else {
                panic!("a delivered row without endpoint or event: {row:?}");
            };
            let path = path_of.get(endpoint_id).expect("known endpoint").clone();
            *rows_per_pair.entry((path, event_id.clone())).or_default() += 1;
        }
        for pair in pairs {
            let rows = rows_per_pair.get(pair).copied().unwrap_or(0);
            assert!(rows >= 1, "{pair:?} was delivered but has no delivered row");
            assert!(
                rows <= delivered[pair],
                "{pair:?}: {rows} rows for {} requests",
                delivered[pair]
            );
        }
        duplicates
    }
}

/// `count` events from `first` on, as NDJSON lines, and their (tenant, id, type).
fn events(
    first: usize,
    count: usize,
    rng: &mut StdRng,
) -> (Vec<String>, Vec<(String, String, String)>) {
    let mut lines = Vec::new();
    let mut keys = Vec::new();
    for n in first..first + count {
        let tenant = TENANTS[rng.random_range(0..TENANTS.len())];
        let event_type = TYPES[rng.random_range(0..TYPES.len())];
        let id = format!("evt_{n:06}");
        lines.push(format!(
            r#"{{"id":"{id}","tenant":"{tenant}","type":"{event_type}","created_at":"2026-12-04T10:00:00Z","payload":{{"n":{n}}}}}"#
        ));
        keys.push((tenant.to_string(), id, event_type.to_string()));
    }
    (lines, keys)
}

fn wait_exit(child: &mut Child, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("wait for hookflow") {
            assert!(status.success(), "hookflow run failed: {status}");
            return;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("hookflow run did not finish within {} s", limit.as_secs());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
#[ignore = "set FLUVIO_RUN=/path/to/fluvio-run to run"]
fn fluvio_events_are_delivered_and_archived() {
    let cluster = LiveCluster::start();
    cluster.create_topic("events", 3);
    let pipeline = Pipeline::new(&cluster);
    let mut rng = StdRng::seed_from_u64(6);
    let (lines, keys) = events(0, 400, &mut rng);
    pipeline.publish(&lines);

    let mut run = pipeline.run(true, "run.log");
    wait_exit(&mut run, Duration::from_secs(180));
    let pairs = Pipeline::expected(&keys);
    let duplicates = pipeline.check(&pairs);
    println!(
        "end to end: {} events, {} deliveries, duplicates {duplicates}",
        keys.len(),
        pairs.len()
    );
    assert_eq!(duplicates, 0);
}

#[test]
#[ignore = "set FLUVIO_RUN=/path/to/fluvio-run to run"]
fn killing_hookflow_loses_nothing() {
    let cluster = LiveCluster::start();
    cluster.create_topic("events", 3);
    let pipeline = Pipeline::new(&cluster);
    let seed = u64::from(std::process::id());
    let mut rng = StdRng::seed_from_u64(seed);
    let kills = 4;
    let mut all = Vec::new();
    for round in 0..kills {
        let (lines, keys) = events(round * 300, 300, &mut rng);
        pipeline.publish(&lines);
        all.extend(keys);
        let mut child = pipeline.run(false, &format!("run-{round}.log"));
        std::thread::sleep(Duration::from_millis(rng.random_range(1_500..4_000)));
        child.kill().expect("SIGKILL hookflow");
        child.wait().expect("reap hookflow");
    }
    let mut last = pipeline.run(true, "run-final.log");
    wait_exit(&mut last, Duration::from_secs(300));

    let pairs = Pipeline::expected(&all);
    let duplicates = pipeline.check(&pairs);
    let bound = kills * (MAX_IN_FLIGHT + MAX_UNSYNCED);
    println!(
        "kill and restart: {} events, {} deliveries, {kills} kills, lost 0, duplicates {duplicates} (bound {bound}), seed {seed}",
        all.len(),
        pairs.len()
    );
    assert!(
        duplicates <= bound,
        "{duplicates} duplicates exceed {bound}"
    );

    // The named consumer follows the checkpoint, so Fluvio's tools show hookflow's lag.
    let client = cluster.client();
    let offsets = run_block_on(client.consumer_offsets()).expect("consumer offsets");
    let ours: Vec<_> = offsets
        .iter()
        .filter(|o| o.consumer_id == "hookflow-live")
        .collect();
    println!(
        "Fluvio consumer offsets of hookflow-live: {:?}",
        ours.iter()
            .map(|o| (o.partition, o.offset))
            .collect::<Vec<_>>()
    );
    assert!(!ours.is_empty(), "no consumer offset was committed");
}

#[test]
#[ignore = "set FLUVIO_RUN=/path/to/fluvio-run to run"]
fn restarting_the_spu_loses_nothing() {
    let mut cluster = LiveCluster::start();
    cluster.create_topic("events", 2);
    let pipeline = Pipeline::new(&cluster);
    let mut rng = StdRng::seed_from_u64(11);
    let (before, mut keys) = events(0, 300, &mut rng);
    pipeline.publish(&before);

    let mut run = pipeline.run(false, "run.log");
    let first_pairs = Pipeline::expected(&keys);
    wait_for(
        "the first events to be delivered",
        Duration::from_secs(120),
        || {
            let delivered = pipeline.delivered();
            first_pairs
                .iter()
                .all(|pair| delivered.contains_key(pair))
                .then_some(())
        },
    );

    cluster.kill_spu();
    std::thread::sleep(Duration::from_secs(5));
    cluster.start_spu();
    let (after, more) = events(300, 300, &mut rng);
    wait_for(
        "the topic to take records again",
        Duration::from_secs(60),
        || FluvioSource::connect(cluster.options("events"), SourceStatus::new()).ok(),
    );
    pipeline.publish(&after);
    keys.extend(more);

    let pairs = Pipeline::expected(&keys);
    let waited = wait_for_pairs(&pipeline, &pairs, Duration::from_secs(180));
    // SIGTERM, so that hookflow completes its archive files before it exits.
    let stopped = Command::new("kill")
        .args(["-TERM", &run.id().to_string()])
        .status()
        .expect("send SIGTERM to hookflow");
    assert!(stopped.success());
    wait_exit(&mut run, Duration::from_secs(60));
    assert!(
        waited,
        "not every event was delivered after the SPU restarted"
    );
    let duplicates = pipeline.check(&pairs);
    let log = pipeline.log("run.log");
    let lost_logged = log.contains("Lost the connection to Fluvio");
    let reconnected = log.contains("Reconnected to Fluvio");
    println!(
        "SPU restart: {} events, {} deliveries, lost 0, duplicates {duplicates}, logged loss {lost_logged}, logged reconnect {reconnected}",
        keys.len(),
        pairs.len()
    );
    assert!(
        lost_logged && reconnected,
        "hookflow's log does not show the reconnection:\n{log}"
    );
    assert_eq!(duplicates, 0);
}

fn wait_for_pairs(pipeline: &Pipeline, pairs: &[(String, String)], limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        let delivered = pipeline.delivered();
        if pairs.iter().all(|pair| delivered.contains_key(pair)) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

#[test]
fn an_unreachable_sc_fails_the_start_naming_it() {
    let port = free_port();
    let dir = tempfile::tempdir().expect("temporary directory");
    let config = dir.path().join("hookflow.toml");
    std::fs::write(
        &config,
        format!("[source]\nkind = \"fluvio\"\n[source.fluvio]\nendpoint = \"127.0.0.1:{port}\"\ntopic = \"events\"\ntimeout_ms = 3000\n"),
    )
    .expect("write config");
    let output = Command::new(env!("CARGO_BIN_EXE_hookflow"))
        .arg("run")
        .arg("--config")
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .output()
        .expect("run hookflow");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "hookflow run started without an SC"
    );
    assert!(stderr.contains(&format!("127.0.0.1:{port}")), "{stderr}");
    assert!(stderr.contains("connect to the SC"), "{stderr}");
}
