//! One benchmark scenario, run in a process of its own (`hookflow-bench scenario`) so that its
//! peak memory and CPU time are the pipeline's alone. It publishes to the local log, runs the
//! whole pipeline against the receiver, measures, and checks that every delivery is accounted
//! for.
//!
//! The parent passes a [`ScenarioSpec`] as JSON and reads a [`ScenarioResult`] back as JSON
//! from standard output.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hookflow::config::Config;
use hookflow::dataflow::{run, RunOptions, RunReport};
use hookflow_connectors::{read_attempts, LocalLog, LocalLogOptions};
use hookflow_operators::clock::{Clock, WallClock};
use hookflow_operators::stop::StopSignal;
use serde::{Deserialize, Serialize};

use crate::check::{check, Expected, Tally};
use crate::control::ReceiverControl;
use crate::measure::{
    current_rss_bytes, now_micros, peak_rss_bytes, percentiles, process_cpu, thread_cpu,
    Percentiles,
};
use crate::receiver::{Arrival, Mode};
use crate::workload::{config_text, draw_events, event_line, ConfigSettings, Topology};

/// Events appended to the local log per transaction.
const PUBLISH_CHUNK: usize = 5_000;

/// Tenants, endpoints per tenant and event types of the fan-out scenarios.
pub const FAN_OUT_SHAPE: (usize, usize, usize) = (200, 5, 5);

/// Percentages of failing and hanging endpoints in scenario (c).
pub const UNHEALTHY_PERCENT: (usize, usize) = (10, 1);

/// Events published and delivered before the steady scenario's timed part, so that its
/// latency does not include the pipeline's start.
const WARM_UP_EVENTS: u64 = 20;

/// Events published at once in the pending-retries scenario, which waits for their first
/// attempts before it publishes more. Deliveries waiting for an in-flight place are parked
/// and the source reads on, so a larger backlog would be read into memory. Memory that the
/// allocator keeps after that backlog is sent would then count as memory of the retries.
const PENDING_WAVE: usize = 5_000;

/// The retry delay of the pending-retries scenario: long enough that no retry comes due
/// during the run.
const PENDING_RETRY_DELAY_MS: u64 = 3_600_000;

/// A benchmark scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    /// (a) one endpoint.
    Single,
    /// (b) 1,000 endpoints over 200 tenants, each event to 1 to 3 of them.
    FanOut,
    /// (c) without its failing and hanging endpoints: the baseline of (c).
    HealthyOnly,
    /// (c) 10 % of the endpoints respond with 503 and 1 % hold the request.
    Unhealthy,
    /// (d) one endpoint, events published at a steady rate while the pipeline runs.
    Steady,
    /// (e) one endpoint that responds with 503, with the only retry an hour away.
    PendingRetries,
}

impl Kind {
    /// Returns the short name in the table.
    pub fn short_name(self) -> &'static str {
        match self {
            Kind::Single => "a",
            Kind::FanOut => "b",
            Kind::HealthyOnly => "c0",
            Kind::Unhealthy => "c",
            Kind::Steady => "d",
            Kind::PendingRetries => "e",
        }
    }

    /// Returns a description of the scenario in a few words.
    pub fn description(self) -> &'static str {
        match self {
            Kind::Single => "1 endpoint",
            Kind::FanOut => "1000 endpoints, 200 tenants, fan-out 1-3",
            Kind::HealthyOnly => "(c) without its unhealthy endpoints",
            Kind::Unhealthy => "(b) with 10 % failing, 1 % hanging",
            Kind::Steady => "1 endpoint, steady at half of (a)",
            Kind::PendingRetries => "1 endpoint down, retries pending",
        }
    }
}

/// The scenario the parent process requests from a scenario process.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScenarioSpec {
    /// The scenario.
    pub kind: Kind,
    /// `http://127.0.0.1:PORT` of the receiver.
    pub receiver_url: String,
    /// A directory for the scenario's config, log and archive; emptied first.
    pub dir: PathBuf,
    /// Events to publish; for [`Kind::PendingRetries`], the pending retries to hold.
    pub events: usize,
    /// Requests in flight per timely worker, and per endpoint in the one-endpoint scenarios.
    pub concurrency: usize,
    /// Timely worker threads.
    pub workers: usize,
    /// Seed of the topology and the events.
    pub seed: u64,
    /// Events per second published by [`Kind::Steady`].
    pub steady_rate: f64,
    /// How long [`Kind::Steady`] publishes, in seconds.
    pub steady_secs: f64,
    /// Endpoint timeout of scenario (c) and its baseline, in ms.
    pub unhealthy_timeout_ms: u64,
    /// Maximum wait for deliveries to arrive once publishing is done ([`Kind::Steady`]) or for
    /// the first attempts to fail ([`Kind::PendingRetries`]), in seconds.
    pub wait_secs: u64,
}

/// The memory figures of [`Kind::PendingRetries`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PendingMemory {
    /// Retries held when the run stopped, counted from the archive.
    pub held: usize,
    /// Resident memory before the pipeline started, in bytes.
    pub rss_before_run_bytes: u64,
    /// Largest resident memory sampled while the retries were held, in bytes.
    pub rss_holding_bytes: u64,
}

impl PendingMemory {
    /// Resident memory per held retry above the level before the run, in bytes.
    pub fn bytes_per_retry(&self) -> f64 {
        self.rss_holding_bytes
            .saturating_sub(self.rss_before_run_bytes) as f64
            / self.held.max(1) as f64
    }
}

/// The measurements of a scenario.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScenarioResult {
    /// The scenario.
    pub kind: Kind,
    /// Events published.
    pub events: usize,
    /// (event, endpoint) deliveries the events make.
    pub deliveries: usize,
    /// Deliveries to healthy endpoints that got a 200 response: the measured set.
    pub delivered: usize,
    /// Wall time of `hookflow::dataflow::run`, in seconds.
    pub run_seconds: f64,
    /// Delivered per second: `delivered` over the time from the run's start (for the steady
    /// scenario, from the first timed publish) to the last 200 of the measured set.
    pub per_second: f64,
    /// Events per second published ([`Kind::Steady`] only).
    pub published_per_second: Option<f64>,
    /// Publish to arrival at the receiver, over the measured set.
    pub latency: Option<Percentiles>,
    /// Largest resident memory of the scenario process, in bytes.
    pub peak_rss_bytes: u64,
    /// CPU time of the pipeline during the run, in seconds (publishing excluded).
    pub cpu_seconds: f64,
    /// Bytes of the archive files the run completed.
    pub archive_bytes: u64,
    /// Rows in the archive.
    pub archive_rows: usize,
    /// Requests the receiver recorded.
    pub receiver_requests: u64,
    /// CPU time the receiver used during the scenario, in seconds.
    pub receiver_cpu_seconds: f64,
    /// Memory figures of [`Kind::PendingRetries`].
    pub pending: Option<PendingMemory>,
    /// Circuit breakers the run opened, counting reopenings after a failed probe.
    #[serde(default)]
    pub breakers_opened: u64,
    /// The archive and receiver checked against the expected deliveries.
    pub tally: Tally,
}

impl ScenarioResult {
    /// CPU seconds per 1,000 deliveries (per 1,000 first attempts for pending retries).
    pub fn cpu_seconds_per_1000(&self) -> f64 {
        self.cpu_seconds * 1000.0 / self.deliveries.max(1) as f64
    }

    /// Archive bytes per delivery.
    pub fn archive_bytes_per_delivery(&self) -> f64 {
        self.archive_bytes as f64 / self.deliveries.max(1) as f64
    }
}

/// The endpoints, the events and the configuration of one scenario.
struct Plan {
    kind: Kind,
    topology: Topology,
    /// (tenant, event type) of each event, by event number.
    events: Vec<(usize, usize)>,
    config: Config,
    data_dir: PathBuf,
    expected: Expected,
}

/// Runs the scenario `spec` describes.
///
/// # Errors
///
/// Fails if the directory, the log, the receiver or the pipeline fails. Deliveries that are
/// not accounted for are reported in the result's tally, not as an error.
pub fn run_scenario(spec: &ScenarioSpec) -> anyhow::Result<ScenarioResult> {
    let control = ReceiverControl::new(&spec.receiver_url)?;
    control.reset()?;
    let receiver_cpu_before = control.stats()?.cpu_seconds;
    let plan = prepare(spec)?;

    let mut result = match spec.kind {
        Kind::Steady => run_steady(spec, &plan, &control)?,
        Kind::PendingRetries => run_pending(spec, &plan, &control)?,
        Kind::HealthyOnly | Kind::Unhealthy => run_until_healthy_delivered(spec, &plan, &control)?,
        Kind::Single | Kind::FanOut => run_until_idle(&plan, &control)?,
    };

    let stats = control.stats()?;
    result.receiver_requests = stats.requests;
    result.receiver_cpu_seconds = stats.cpu_seconds - receiver_cpu_before;
    Ok(result)
}

/// Builds the plan of `spec` and writes its configuration into the scenario directory.
fn prepare(spec: &ScenarioSpec) -> anyhow::Result<Plan> {
    if spec.dir.exists() {
        std::fs::remove_dir_all(&spec.dir)
            .with_context(|| format!("cannot empty {}", spec.dir.display()))?;
    }
    std::fs::create_dir_all(&spec.dir)
        .with_context(|| format!("cannot create {}", spec.dir.display()))?;

    let (tenants, per_tenant, types) = FAN_OUT_SHAPE;
    let (failing, hanging) = UNHEALTHY_PERCENT;
    let unhealthy = || {
        Topology::fan_out(tenants, per_tenant, types, spec.seed)
            .with_unhealthy(failing, hanging, spec.seed)
    };
    let mut settings = ConfigSettings {
        receiver_url: spec.receiver_url.clone(),
        workers: spec.workers,
        max_in_flight_total: spec.concurrency,
        endpoint_max_in_flight: Some(spec.concurrency),
        endpoint_timeout_ms: None,
        // Nothing should fail in the healthy scenarios; a transient failure is retried soon.
        retry_schedule_ms: vec![1_000, 5_000],
        breaker_min_requests: None,
    };
    let topology = match spec.kind {
        Kind::Single | Kind::Steady => Topology::single(Mode::Ok),
        Kind::FanOut => {
            settings.endpoint_max_in_flight = None;
            Topology::fan_out(tenants, per_tenant, types, spec.seed)
        }
        Kind::HealthyOnly | Kind::Unhealthy => {
            settings.endpoint_max_in_flight = None;
            settings.endpoint_timeout_ms = Some(spec.unhealthy_timeout_ms);
            settings.retry_schedule_ms = vec![100, 200];
            if spec.kind == Kind::Unhealthy {
                unhealthy()
            } else {
                unhealthy().healthy_only()
            }
        }
        Kind::PendingRetries => {
            settings.retry_schedule_ms = vec![PENDING_RETRY_DELAY_MS];
            // This scenario measures the memory of retries waiting for their time. With the
            // default breaker, the endpoint's queue would be held after its first 10 failures,
            // and no further retry would be scheduled, so the breaker must not open.
            settings.breaker_min_requests = Some(u32::MAX);
            Topology::single(Mode::Fail)
        }
    };
    let event_count = match spec.kind {
        Kind::Steady => {
            WARM_UP_EVENTS as usize + (spec.steady_rate * spec.steady_secs).round() as usize
        }
        _ => spec.events,
    };
    let events = draw_events(&topology, event_count, spec.seed);

    let archive_dir = spec.dir.join("archive");
    let text = config_text(&topology, &settings, &archive_dir);
    let config_path = spec.dir.join("hookflow.toml");
    std::fs::write(&config_path, &text)
        .with_context(|| format!("cannot write {}", config_path.display()))?;
    let config = Config::parse(&text, &config_path)?;
    let expected = expected_deliveries(&topology, &events, spec.kind);
    Ok(Plan {
        kind: spec.kind,
        topology,
        events,
        config,
        data_dir: spec.dir.join("data"),
        expected,
    })
}

/// Lists the deliveries that `events` make in `topology`.
fn expected_deliveries(topology: &Topology, events: &[(usize, usize)], kind: Kind) -> Expected {
    let routes = topology.routes();
    let mut expected = Expected {
        waiting_for_retry: kind == Kind::PendingRetries,
        unhealthy_may_be_pending: matches!(kind, Kind::HealthyOnly | Kind::Unhealthy),
        ..Expected::default()
    };
    for (number, key) in events.iter().enumerate() {
        let Some(targets) = routes.get(key) else {
            expected.unrouted_events += 1;
            continue;
        };
        for position in targets {
            let endpoint = &topology.endpoints[*position];
            expected
                .deliveries
                .push((number as u64, endpoint.number, endpoint.mode));
        }
    }
    expected
}

/// Appends events to the local log and remembers when each became visible.
struct Publisher {
    log: LocalLog,
    /// Microseconds since the epoch at which each event's append returned, by event number.
    published_us: Vec<u64>,
}

impl Publisher {
    fn open(plan: &Plan) -> anyhow::Result<Publisher> {
        let options = LocalLogOptions {
            partitions: plan.config.local_log.partitions,
        };
        let log = LocalLog::open(&plan.data_dir, &options)
            .with_context(|| format!("cannot open the local log in {}", plan.data_dir.display()))?;
        Ok(Publisher {
            log,
            published_us: Vec::with_capacity(plan.events.len()),
        })
    }

    /// Publishes the next `count` events of the plan, in chunks.
    fn publish(&mut self, plan: &Plan, count: usize) -> anyhow::Result<()> {
        let first = self.published_us.len();
        let last = (first + count).min(plan.events.len());
        let mut start = first;
        while start < last {
            let end = (start + PUBLISH_CHUNK).min(last);
            let lines: Vec<(String, String)> = (start..end)
                .map(|number| {
                    let (tenant, event_type) = plan.events[number];
                    let tenant = &plan.topology.tenants[tenant];
                    let line = event_line(
                        number as u64,
                        tenant,
                        &plan.topology.event_types[event_type],
                    );
                    (tenant.clone(), line)
                })
                .collect();
            let records: Vec<(&[u8], &[u8])> = lines
                .iter()
                .map(|(tenant, line)| (tenant.as_bytes(), line.as_bytes()))
                .collect();
            self.log
                .append(&records, WallClock.now_ms())
                .context("cannot append events to the local log")?;
            let published = now_micros();
            self.published_us.resize(end, published);
            start = end;
        }
        Ok(())
    }
}

/// Counters read around a run.
struct Meter {
    cpu: Duration,
    started: Instant,
    started_us: u64,
}

impl Meter {
    fn start() -> anyhow::Result<Meter> {
        Ok(Meter {
            cpu: process_cpu()?,
            started: Instant::now(),
            started_us: now_micros(),
        })
    }
}

/// Stops the pipeline when dropped, so that an early return does not leave it running.
struct StopOnDrop(Arc<StopSignal>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.stop();
    }
}

fn run_options(plan: &Plan, until_idle: bool, stop: Arc<StopSignal>) -> RunOptions {
    RunOptions {
        config: plan.config.clone(),
        data_dir: plan.data_dir.clone(),
        until_idle,
        clock: Arc::new(WallClock),
        stop,
        cluster: hookflow::cluster::Cluster::default(),
    }
}

/// Scenarios (a) to (c): publish everything, then run until every event is final.
fn run_until_idle(plan: &Plan, control: &ReceiverControl) -> anyhow::Result<ScenarioResult> {
    let mut publisher = Publisher::open(plan)?;
    publisher.publish(plan, plan.events.len())?;

    let meter = Meter::start()?;
    let report = run(run_options(plan, true, Arc::new(StopSignal::new())))?;
    let run_seconds = meter.started.elapsed().as_secs_f64();
    let cpu = process_cpu()?.saturating_sub(meter.cpu);
    let peak_rss_bytes = peak_rss_bytes()?;

    let arrivals = control.arrivals()?;
    summarize(Summary {
        plan,
        report: &report,
        arrivals: &arrivals,
        published_us: &publisher.published_us,
        timed_from_us: meter.started_us,
        first_timed_event: 0,
        run_seconds,
        cpu,
        peak_rss_bytes,
    })
}

/// Scenarios (c0) and (c): publish everything, run until every delivery to a healthy endpoint
/// got its 200, then stop. The failing and hanging endpoints open their circuit breakers with
/// the default health rules, and an open breaker holds its endpoint's queue for 30 s, then
/// for twice as long after each failed probe: waiting for those deliveries to be final would
/// measure the cooldowns, not the pipeline. They stay durably pending when the run stops.
fn run_until_healthy_delivered(
    spec: &ScenarioSpec,
    plan: &Plan,
    control: &ReceiverControl,
) -> anyhow::Result<ScenarioResult> {
    let healthy = plan
        .expected
        .deliveries
        .iter()
        .filter(|(_, _, mode)| *mode == Mode::Ok)
        .count() as u64;
    let mut publisher = Publisher::open(plan)?;
    publisher.publish(plan, plan.events.len())?;

    let stop = Arc::new(StopSignal::new());
    let _stop_on_return = StopOnDrop(stop.clone());
    let meter = Meter::start()?;
    let main_thread_cpu = thread_cpu()?;
    let pipeline = {
        let options = run_options(plan, false, stop.clone());
        std::thread::Builder::new()
            .name("pipeline".into())
            .spawn(move || run(options))
            .context("cannot start the pipeline thread")?
    };
    let waited = wait_for(control, 200, healthy, spec.wait_secs, &pipeline);
    stop.stop();
    let report = join_pipeline(pipeline)?;
    waited?;
    let run_seconds = meter.started.elapsed().as_secs_f64();
    let waiting_cpu = thread_cpu()?.saturating_sub(main_thread_cpu);
    let cpu = process_cpu()?
        .saturating_sub(meter.cpu)
        .saturating_sub(waiting_cpu);
    let peak_rss_bytes = peak_rss_bytes()?;

    let arrivals = control.arrivals()?;
    summarize(Summary {
        plan,
        report: &report,
        arrivals: &arrivals,
        published_us: &publisher.published_us,
        timed_from_us: meter.started_us,
        first_timed_event: 0,
        run_seconds,
        cpu,
        peak_rss_bytes,
    })
}

/// Scenario (d): publish at a steady rate while the pipeline runs, then stop it once every
/// event is delivered.
fn run_steady(
    spec: &ScenarioSpec,
    plan: &Plan,
    control: &ReceiverControl,
) -> anyhow::Result<ScenarioResult> {
    let mut publisher = Publisher::open(plan)?;
    let stop = Arc::new(StopSignal::new());
    let _stop_on_return = StopOnDrop(stop.clone());
    let meter = Meter::start()?;
    let main_thread_cpu = thread_cpu()?;
    let pipeline = {
        let options = run_options(plan, false, stop.clone());
        std::thread::Builder::new()
            .name("pipeline".into())
            .spawn(move || run(options))
            .context("cannot start the pipeline thread")?
    };

    let warm_up = WARM_UP_EVENTS as usize;
    publisher.publish(plan, warm_up)?;
    wait_for(control, 200, warm_up as u64, spec.wait_secs, &pipeline)?;

    let timed = plan.events.len() - warm_up;
    let timed_from_us = now_micros();
    let publishing = Instant::now();
    let mut published = 0usize;
    while published < timed && !pipeline.is_finished() {
        let due = ((spec.steady_rate * publishing.elapsed().as_secs_f64()) as usize).min(timed);
        if due > published {
            publisher.publish(plan, due - published)?;
            published = due;
        } else {
            std::thread::sleep(Duration::from_micros(500));
        }
    }
    let published_per_second = published as f64 / publishing.elapsed().as_secs_f64();
    let waited = wait_for(
        control,
        200,
        plan.events.len() as u64,
        spec.wait_secs,
        &pipeline,
    );

    stop.stop();
    let report = join_pipeline(pipeline)?;
    waited?;
    let run_seconds = meter.started.elapsed().as_secs_f64();
    let publisher_cpu = thread_cpu()?.saturating_sub(main_thread_cpu);
    let cpu = process_cpu()?
        .saturating_sub(meter.cpu)
        .saturating_sub(publisher_cpu);
    let peak_rss_bytes = peak_rss_bytes()?;

    let arrivals = control.arrivals()?;
    let mut result = summarize(Summary {
        plan,
        report: &report,
        arrivals: &arrivals,
        published_us: &publisher.published_us,
        timed_from_us,
        first_timed_event: WARM_UP_EVENTS,
        run_seconds,
        cpu,
        peak_rss_bytes,
    })?;
    result.published_per_second = Some(published_per_second);
    Ok(result)
}

/// Scenario (e): every first attempt fails and its retry is an hour away. Events are
/// published in waves of [`PENDING_WAVE`] while the pipeline runs. Once the receiver has seen
/// every first attempt, samples the memory, then stops.
fn run_pending(
    spec: &ScenarioSpec,
    plan: &Plan,
    control: &ReceiverControl,
) -> anyhow::Result<ScenarioResult> {
    let mut publisher = Publisher::open(plan)?;
    let rss_before_run_bytes = current_rss_bytes()?;

    let stop = Arc::new(StopSignal::new());
    let _stop_on_return = StopOnDrop(stop.clone());
    let meter = Meter::start()?;
    let main_thread_cpu = thread_cpu()?;
    let pipeline = {
        let options = run_options(plan, false, stop.clone());
        std::thread::Builder::new()
            .name("pipeline".into())
            .spawn(move || run(options))
            .context("cannot start the pipeline thread")?
    };
    let mut waited = Ok(());
    while waited.is_ok() && publisher.published_us.len() < plan.events.len() {
        publisher.publish(plan, PENDING_WAVE)?;
        let published = publisher.published_us.len() as u64;
        waited = wait_for(control, 503, published, spec.wait_secs, &pipeline);
    }

    // The last responses are still on their way back to the pipeline when the receiver has
    // counted them, so the samples span a second after that.
    let mut rss_holding_bytes = 0;
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(100));
        rss_holding_bytes = rss_holding_bytes.max(current_rss_bytes()?);
    }
    stop.stop();
    let report = join_pipeline(pipeline)?;
    waited?;
    let run_seconds = meter.started.elapsed().as_secs_f64();
    let waiting_cpu = thread_cpu()?.saturating_sub(main_thread_cpu);
    let cpu = process_cpu()?
        .saturating_sub(meter.cpu)
        .saturating_sub(waiting_cpu);
    let peak_rss_bytes = peak_rss_bytes()?;

    let arrivals = control.arrivals()?;
    let mut result = summarize(Summary {
        plan,
        report: &report,
        arrivals: &arrivals,
        published_us: &publisher.published_us,
        timed_from_us: meter.started_us,
        first_timed_event: 0,
        run_seconds,
        cpu,
        peak_rss_bytes,
    })?;
    let held = result.tally.outcomes.get("failed").copied().unwrap_or(0);
    result.pending = Some(PendingMemory {
        held,
        rss_before_run_bytes,
        rss_holding_bytes,
    });
    // No request of this scenario succeeds, so its rate is that of the failed attempts.
    let last_us = arrivals.iter().map(|a| a.received_us).max().unwrap_or(0);
    result.per_second = rate(arrivals.len(), meter.started_us, last_us);
    Ok(result)
}

/// Waits until the receiver has sent at least `count` responses with `status`, at most
/// `wait_secs`, or until the pipeline thread ends.
fn wait_for(
    control: &ReceiverControl,
    status: u16,
    count: u64,
    wait_secs: u64,
    pipeline: &std::thread::JoinHandle<anyhow::Result<RunReport>>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(wait_secs);
    loop {
        let seen = control.stats()?.count(status);
        if seen >= count {
            return Ok(());
        }
        if pipeline.is_finished() {
            bail!("the pipeline stopped after {seen} of {count} responses with status {status}");
        }
        if Instant::now() >= deadline {
            bail!(
                "timed out after {wait_secs} s with {seen} of {count} responses with status \
                 {status}; raise --timeout-secs if the machine is slow"
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn join_pipeline(
    pipeline: std::thread::JoinHandle<anyhow::Result<RunReport>>,
) -> anyhow::Result<RunReport> {
    match pipeline.join() {
        Ok(report) => report,
        Err(_) => bail!("the pipeline thread panicked"),
    }
}

/// Everything [`summarize`] turns into a result.
struct Summary<'a> {
    plan: &'a Plan,
    report: &'a RunReport,
    arrivals: &'a [Arrival],
    published_us: &'a [u64],
    /// Start of the timed part, µs since the epoch.
    timed_from_us: u64,
    /// Events before this number are warm-up, outside the measured set.
    first_timed_event: u64,
    run_seconds: f64,
    cpu: Duration,
    peak_rss_bytes: u64,
}

fn summarize(summary: Summary<'_>) -> anyhow::Result<ScenarioResult> {
    let plan = summary.plan;
    let healthy: HashMap<u32, bool> = plan
        .topology
        .endpoints
        .iter()
        .map(|endpoint| (endpoint.number, endpoint.mode == Mode::Ok))
        .collect();

    let mut latencies_us = Vec::new();
    let mut last_us = 0;
    for arrival in summary.arrivals {
        let measured = arrival.status == 200
            && arrival.event >= summary.first_timed_event
            && healthy.get(&arrival.endpoint).copied().unwrap_or(false);
        let Some(published_us) = summary.published_us.get(arrival.event as usize) else {
            continue;
        };
        if measured {
            latencies_us.push(arrival.received_us.saturating_sub(*published_us));
            last_us = last_us.max(arrival.received_us);
        }
    }
    let delivered = latencies_us.len();

    let rows = read_attempts(&summary.report.archive_dir).with_context(|| {
        format!(
            "cannot read the archive back from {}",
            summary.report.archive_dir.display()
        )
    })?;
    let tally = check(&plan.expected, &rows, summary.arrivals);
    let archive_bytes = archive_size(&summary.report.files)?;

    Ok(ScenarioResult {
        kind: plan.kind,
        events: plan.events.len(),
        deliveries: plan.expected.deliveries.len(),
        delivered,
        run_seconds: summary.run_seconds,
        per_second: rate(delivered, summary.timed_from_us, last_us),
        published_per_second: None,
        latency: percentiles(&mut latencies_us),
        peak_rss_bytes: summary.peak_rss_bytes,
        cpu_seconds: summary.cpu.as_secs_f64(),
        archive_bytes,
        archive_rows: rows.len(),
        receiver_requests: 0,
        receiver_cpu_seconds: 0.0,
        pending: None,
        breakers_opened: summary
            .report
            .counters
            .breakers_opened
            .load(std::sync::atomic::Ordering::Relaxed),
        tally,
    })
}

/// `count` per second between two times in µs since the epoch; 0 without an interval.
fn rate(count: usize, from_us: u64, to_us: u64) -> f64 {
    if to_us <= from_us {
        return 0.0;
    }
    count as f64 / ((to_us - from_us) as f64 / 1e6)
}

fn archive_size(files: &[PathBuf]) -> anyhow::Result<u64> {
    files.iter().try_fold(0u64, |total, file: &PathBuf| {
        let size = file_size(file)?;
        Ok(total + size)
    })
}

fn file_size(path: &Path) -> anyhow::Result<u64> {
    Ok(std::fs::metadata(path)
        .with_context(|| format!("cannot read the size of {}", path.display()))?
        .len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_needs_an_interval() {
        assert_eq!(rate(10, 5, 5), 0.0);
        assert_eq!(rate(10, 6, 5), 0.0);
        assert_eq!(rate(500, 1_000_000, 1_500_000), 1000.0);
    }

    #[test]
    fn fan_out_expectation_counts_every_target() {
        let (tenants, per_tenant, types) = FAN_OUT_SHAPE;
        let topology = Topology::fan_out(tenants, per_tenant, types, 5);
        let events = draw_events(&topology, 1000, 5);
        let expected = expected_deliveries(&topology, &events, Kind::FanOut);
        assert_eq!(expected.unrouted_events, 0);
        assert!(expected.deliveries.len() >= 1000);
        assert!(expected.deliveries.len() <= 3000);
        assert!(!expected.waiting_for_retry);
    }

    #[test]
    fn healthy_baseline_loses_only_unhealthy_deliveries() {
        let (tenants, per_tenant, types) = FAN_OUT_SHAPE;
        let (failing, hanging) = UNHEALTHY_PERCENT;
        let unhealthy =
            Topology::fan_out(tenants, per_tenant, types, 5).with_unhealthy(failing, hanging, 5);
        let events = draw_events(&unhealthy, 2000, 5);
        let with = expected_deliveries(&unhealthy, &events, Kind::Unhealthy);
        let without = expected_deliveries(&unhealthy.healthy_only(), &events, Kind::HealthyOnly);
        let healthy_with: Vec<_> = with
            .deliveries
            .iter()
            .filter(|(_, _, mode)| *mode == Mode::Ok)
            .collect();
        assert_eq!(healthy_with.len(), without.deliveries.len());
        assert!(with.deliveries.len() > without.deliveries.len());
    }
}
