//! Assembles the hookflow dataflow and runs it on timely workers.
//!
//! ```text
//! source ─► decode ──invalid──────────────────────────────┐
//!             │                                           │
//!             ▼                                           ▼
//!           dedup ─► route ──unrouted──────────────────► archive sink ─► probe
//!                      │ (subscriptions, arranged)        ▲
//!                      ▼                                  │
//!                   deliver (exchange by endpoint) ───────┘
//!                      │ with [alerts] on
//!                      ▼
//!                   alerts (windowed failure ratio) ─► appended to the source
//! ```
//!
//! One tokio runtime per process carries the HTTP requests of every worker. Each worker owns
//! its partitions of the source and writes its own archive files (prefix `w<index>`). The
//! subscriptions input advances with the clock on every worker at every step, so events are
//! routed as soon as their time passes.
//!
//! The endpoint directory lives in the state store of process 0 (the one serving the
//! management API). At start, process 0 inserts the configured endpoints whose id the store
//! lacks, then worker 0 feeds every stored endpoint into the subscriptions collection and into
//! the endpoint-updates stream, broadcast to the deliver operator of every worker. While running,
//! worker 0 drains the [`EndpointRegistry`]'s changes at the top of each loop turn and feeds them
//! the same way, at the current time of both inputs. It reports a change absorbed once a probe
//! on the arranged subscriptions and on the broadcast updates has passed that time.
//!
//! The alert branch is not behind the probe: it never holds back the checkpoint.

use hookflow_operators::stop::StopSignal;
use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use differential_dataflow::input::Input as _;
use hookflow_connectors::DisabledEndpoint;
use hookflow_connectors::{
    ArchiveOptions, ArchiveWriter, ConnectorError, FluvioSource, LocalLog, LocalLogOptions, Source,
    SourceStatus, StateStore,
};
use hookflow_operators::alerts::EndpointAlerts;
use hookflow_operators::clock::Clock;
use hookflow_operators::dedup::{Dedup, DedupConfig};
use hookflow_operators::deliver::{
    AddressPolicy, ClientConfig, Deliver, DeliverContext, DeliverCounters, DeliveryClient,
    EndpointUpdate, LiveDirectory, ParkedDeliveries, PayloadSource,
};
use hookflow_operators::route::{Route, Subscription};
use hookflow_schemas::{
    decode_event, AttemptRow, Delivery, Endpoint, FirstSeen, IngestedEvent, PendingDelivery,
    SourceRecord,
};
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::probe::Handle as ProbeHandle;
use timely::dataflow::operators::vec::Broadcast;
use timely::dataflow::operators::vec::Map;
use timely::dataflow::operators::{Concat, ConnectLoop, Feedback, OkErr, Probe};
use timely::dataflow::Stream;

use crate::alerts::{
    publish_alerts, source_appender, split_attempted, AlertCounters, LagMonitor, SignalFilter,
};
use crate::cluster::{agree, decide, Cluster, Readiness};
use crate::config::Config;
use crate::durable::{
    maintain, persist, restore_pending, skip_decided_rows, skip_settled_deliveries, ArchivePolicy,
    Archiver, Durable, ResumeBounds,
};
use crate::metrics::Metrics;
use crate::registry::{ChangeFeed, EndpointChange, EndpointRegistry, PendingChange};
use crate::source::{read_source, SourceControl, SourceOptions, SourceProgress};

/// The inputs of `run` besides the configuration.
#[derive(Clone)]
pub struct RunOptions {
    /// The validated configuration.
    pub config: Config,
    /// Where the local log and, by default, the archive live.
    pub data_dir: PathBuf,
    /// Stop once every published event is terminal.
    pub until_idle: bool,
    /// The only source of "now".
    pub clock: Arc<dyn Clock>,
    /// Set to stop the pipeline gracefully (signal handlers set it).
    pub stop: Arc<StopSignal>,
    /// The cluster this process belongs to; the default is a single process.
    pub cluster: Cluster,
}

/// The report of a finished run.
#[derive(Debug, Clone, Default)]
pub struct RunReport {
    /// Events dropped as repeats of a (tenant, id) already seen.
    pub duplicates: u64,
    /// Attempt rows written to the archive.
    pub rows_archived: u64,
    /// Archive files completed by this run.
    pub files: Vec<PathBuf>,
    /// Attempt rows this run wrote, by outcome.
    pub outcomes: std::collections::BTreeMap<String, u64>,
    /// The archive directory.
    pub archive_dir: PathBuf,
    /// This process's index in the cluster (0 for a single process): the label its logs and
    /// metrics carry.
    pub process_index: usize,
    /// Deliveries parked at the end of the run, their endpoints disabled.
    pub parked: u64,
    /// Endpoints disabled at the end of the run, at run time or earlier.
    pub disabled_endpoints: Vec<DisabledEndpoint>,
    /// The deliver operator's decisions about endpoints (breakers, pauses, disabling).
    pub counters: Arc<DeliverCounters>,
    /// The run's metrics as they stood at its end.
    pub metrics: Arc<Metrics>,
    /// The alerts raised and the operational events published.
    pub alerts: Arc<AlertCounters>,
}

/// The archive directory: the configured one, under the data directory when relative.
pub fn archive_dir(config: &Config, data_dir: &Path) -> PathBuf {
    if config.archive.dir.is_absolute() {
        config.archive.dir.clone()
    } else {
        data_dir.join(&config.archive.dir)
    }
}

/// Runs the pipeline until it is stopped or, with `until_idle`, until every event read is
/// terminal.
///
/// # Errors
///
/// Fails if the log or the archive cannot be opened or written, or the HTTP client cannot be
/// built; what was archived before the failure stays archived.
pub fn run(options: RunOptions) -> anyhow::Result<RunReport> {
    run_with_registry(options, |_| {})
}

/// Runs the pipeline like [`run`], and hands `on_registry` the endpoint registry once the
/// directory is loaded, before the workers start. Only the process that serves the management
/// API (process 0) has a registry; the others never call `on_registry`.
///
/// # Errors
///
/// As [`run`].
pub fn run_with_registry(
    options: RunOptions,
    on_registry: impl FnOnce(EndpointRegistry),
) -> anyhow::Result<RunReport> {
    let config = &options.config;
    let archive_dir = archive_dir(config, &options.data_dir);

    let cluster = options.cluster.clone();
    let workers = config.pipeline.workers;

    // One run of each process per data directory: a second one would deliver everything again
    // and write over the first one's archive files. The lock is released when the process
    // exits, however.
    let _lock = lock_file(&options.data_dir, &cluster.lock_path(&options.data_dir))?;

    // Check the data directory before any worker starts. A single process stops here. A
    // cluster process first sends the reason to its peers, so that the whole cluster stops.
    // The source's readers and the health checks share its status; the Fluvio source sets it
    // itself, already while it connects.
    let source_status = SourceStatus::new();
    let prepared = prepare_data_dir(config, &options.data_dir, &cluster, &source_status);
    let mut disabled = Vec::new();
    let mut endpoints = Vec::new();
    let readiness = match prepared {
        Ok(Prepared {
            partitions,
            log_id,
            disabled: disabled_here,
            endpoints: stored,
        }) => {
            disabled = disabled_here;
            endpoints = stored;
            Readiness {
                process_index: cluster.process_index(),
                partitions,
                log_id,
                problem: None,
            }
        }
        Err(error) if !cluster.is_multi_process() => return Err(error),
        Err(error) => {
            tracing::error!(error = %format!("{error:#}"), process = cluster.process_index(), "This process cannot start; sending the reason to the other processes.");
            Readiness {
                process_index: cluster.process_index(),
                partitions: 0,
                log_id: 0,
                problem: Some(format!("{error:#}")),
            }
        }
    };
    // Endpoints disabled by an earlier run (410 Gone, failing too long) stay disabled until
    // an operator enables them; their parked deliveries wait in the state store of the process
    // that owns the endpoint, the only process that delivers to it.
    for entry in &disabled {
        tracing::warn!(
            endpoint_id = %entry.endpoint_id,
            reason = %entry.reason,
            disabled_at_ms = entry.disabled_at_ms,
            "Endpoint is disabled; its deliveries stay parked until it is enabled (`hookflow endpoints enable`, or an endpoint change with `enabled = true`)."
        );
    }
    let disabled: std::collections::HashSet<String> = disabled
        .into_iter()
        .map(|entry| entry.endpoint_id)
        .collect();
    let mut http_registry = None;
    let feed = if cluster.serves_management_api() && readiness.problem.is_none() {
        let state_dir = cluster.state_dir(&options.data_dir);
        let (registry, feed) = EndpointRegistry::open(&state_dir).with_context(|| {
            format!(
                "cannot open the endpoint registry in {}",
                state_dir.display()
            )
        })?;
        http_registry = Some(registry.clone());
        on_registry(registry);
        Some(feed)
    } else {
        None
    };
    let mut metrics = Metrics::new(
        config.metrics.max_endpoint_series,
        workers,
        config.metrics.ready_stall_secs.saturating_mul(1000),
    );
    metrics.source = source_status;
    let metrics = Arc::new(metrics);
    metrics.set_partitions(readiness.partitions);
    // The stored endpoints get the first series, in the store's order.
    for endpoint in &endpoints {
        metrics.endpoints.stats(&endpoint.id);
        if !endpoint.enabled {
            DeliverCounters::set_member(&metrics.deliver.disabled_endpoints, &endpoint.id, true);
        }
    }
    for endpoint_id in &disabled {
        DeliverCounters::set_member(&metrics.deliver.disabled_endpoints, endpoint_id, true);
    }
    let counters = metrics.deliver.clone();
    warn_without_operator_endpoint(config, &endpoints);
    let alert_counters = metrics.alerts.clone();

    if cluster.is_multi_process() {
        tracing::info!(
            process = cluster.process_index(),
            processes = cluster.processes(),
            workers_per_process = workers,
            "Connecting to the other processes of the cluster."
        );
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("hookflow-http")
        .enable_all()
        .build()
        .context("cannot start the HTTP runtime")?;
    let allowed = config
        .allowed_networks()
        .map_err(|(field, problem)| anyhow::anyhow!("{field}: {problem}"))?;
    let proxy = config
        .delivery
        .proxy_url()
        .map_err(|problem| anyhow::anyhow!("delivery.proxy: {problem}"))?;
    let client = DeliveryClient::new(ClientConfig {
        address_policy: AddressPolicy::new(allowed),
        max_response_bytes: config.delivery.max_response_bytes,
        proxy,
        https_only: config.delivery.https_only,
        ca_bundle_pem: config.delivery.ca_bundle_pem.clone(),
        ..ClientConfig::default()
    })
    .context("cannot build the HTTP client")?;

    // The server starts before the workers so that a bad `http.listen` fails the run at once.
    // The archive directory exists before it too: readiness checks that it is writable, and
    // the workers would create it only when they open their writers.
    std::fs::create_dir_all(&archive_dir).with_context(|| {
        format!(
            "cannot create the archive directory {}",
            archive_dir.display()
        )
    })?;
    let http_state = crate::http::HttpState::new(
        Arc::new(config.clone()),
        options.data_dir.clone(),
        cluster.clone(),
        options.clock.clone(),
        options.stop.clone(),
    )?;
    let http_state = crate::http::HttpState {
        monitor: crate::monitor::Monitor::new(metrics.clone(), archive_dir.clone()),
        counters: metrics.api.clone(),
        registry: http_registry,
        ..http_state
    };
    crate::http::start(http_state, runtime.handle())?;

    let duplicates = metrics.events_deduplicated.clone();
    let shared = Arc::new(WorkerShared {
        config: config.clone(),
        data_dir: options.data_dir.clone(),
        archive_dir: archive_dir.clone(),
        until_idle: options.until_idle,
        clock: options.clock.clone(),
        stop: options.stop.clone(),
        endpoints,
        disabled,
        feed: std::sync::Mutex::new(feed),
        runtime: runtime.handle().clone(),
        client,
        duplicates: duplicates.clone(),
        requests_in_flight: metrics.requests_in_flight.clone(),
        run_id: options.clock.now_ms(),
        cluster: cluster.clone(),
        readiness,
        counters: counters.clone(),
        metrics: metrics.clone(),
        alert_counters: alert_counters.clone(),
    });

    let timely_config = cluster.timely_config(workers);
    let guards = timely::execute(timely_config, move |worker| run_worker(worker, &shared))
        .map_err(|e| anyhow::anyhow!("cannot start the timely workers: {e}"))?;

    let mut report = RunReport {
        archive_dir,
        process_index: cluster.process_index(),
        ..RunReport::default()
    };
    let mut failures: Vec<String> = Vec::new();
    let first_worker = cluster.first_worker(workers);
    for (local, result) in guards.join().into_iter().enumerate() {
        let index = first_worker + local;
        match result {
            Ok(Ok(worker)) => {
                report.rows_archived += worker.rows_archived;
                report.files.extend(worker.files);
                for (outcome, count) in worker.outcomes {
                    *report.outcomes.entry(outcome).or_default() += count;
                }
            }
            Ok(Err(error)) => {
                // Every worker of a cluster that cannot start reports the same reason.
                let message = format!("{error:#}");
                if !failures.iter().any(|failure| failure.ends_with(&message)) {
                    failures.push(format!("worker {index}: {message}"));
                }
            }
            Err(panic) => failures.push(format!("worker {index} panicked: {panic}")),
        }
    }
    runtime.shutdown_timeout(Duration::from_secs(1));
    report.duplicates = duplicates.load(Ordering::Relaxed);
    report.files.sort();
    report.counters = counters;
    report.metrics = metrics;
    report.alerts = alert_counters;
    if !failures.is_empty() {
        anyhow::bail!("the pipeline failed: {}", failures.join("; "));
    }
    let state_dir = cluster.state_dir(&options.data_dir);
    let store = StateStore::open_dir(&state_dir)
        .with_context(|| format!("cannot open the state store in {}", state_dir.display()))?;
    report.parked = store.parked_count()?;
    report.disabled_endpoints = store.disabled_endpoints()?;
    Ok(report)
}

/// The state of the data directory that [`prepare_data_dir`] found.
struct Prepared {
    partitions: u32,
    log_id: i64,
    /// The endpoints this process's store records as disabled at run time.
    disabled: Vec<DisabledEndpoint>,
    /// The endpoint directory, after seeding; empty on processes other than 0.
    endpoints: Vec<Endpoint>,
}

/// Checks that the data directory fits this process and its cluster: the state layout, the
/// source, and the worker and process counts its state store records. On the process that
/// serves the management API, also inserts the configured endpoints whose id the store lacks
/// and reads the directory.
///
/// The source's id lets the processes of a cluster check that they read the same source: the
/// local log's own id, or for Fluvio a hash of the SC address and the topic.
fn prepare_data_dir(
    config: &Config,
    data_dir: &Path,
    cluster: &Cluster,
    status: &Arc<SourceStatus>,
) -> anyhow::Result<Prepared> {
    cluster.check_layout(data_dir)?;

    let (partitions, log_id) = if let Some(fluvio) = config.fluvio() {
        let source = FluvioSource::connect(fluvio.options(), status.clone())
            .with_context(|| format!("cannot open the Fluvio topic {:?}", fluvio.topic))?;
        let id = hookflow_schemas::fnv1a(
            format!("fluvio {} {}", fluvio.endpoint, fluvio.topic).as_bytes(),
        ) as i64;
        (source.partitions(), id)
    } else {
        let log_options = LocalLogOptions {
            partitions: config.local_log.partitions,
        };
        let log = LocalLog::open(data_dir, &log_options)
            .with_context(|| format!("cannot open the local log in {}", data_dir.display()))?;
        tracing::info!(partitions = log.partitions(), log_id = log.log_id(), data_dir = %data_dir.display(), "Local log opened.");
        (log.partitions(), log.log_id())
    };

    let state_dir = cluster.state_dir(data_dir);
    let mut store = StateStore::open_dir(&state_dir)
        .with_context(|| format!("cannot open the state store in {}", state_dir.display()))?;
    store.ensure_counts(
        config.pipeline.workers,
        cluster.processes(),
        cluster.process_index(),
    )?;
    let mut endpoints = Vec::new();
    if cluster.serves_management_api() {
        // The store is the truth: a configured endpoint only fills a missing id, so a change
        // made while running survives a restart with an older configuration file.
        let configured = config.endpoints();
        let seeded = store.seed_endpoints(&configured, wall_clock_ms())?;
        endpoints = store.endpoints()?;
        tracing::info!(
            endpoints = endpoints.len(),
            seeded_from_config = seeded.len(),
            "Endpoint directory loaded from the state store."
        );
        for stored in &endpoints {
            let differs = configured
                .iter()
                .any(|endpoint| endpoint.id == stored.id && endpoint != stored);
            if differs {
                tracing::info!(
                    endpoint_id = %stored.id,
                    "The configuration file's endpoint differs from the stored one; the stored one is used (`hookflow endpoints apply FILE` replaces it)."
                );
            }
        }
    }
    Ok(Prepared {
        partitions,
        log_id,
        disabled: store.disabled_endpoints()?,
        endpoints,
    })
}

/// Returns the wall clock's time in ms since the Unix epoch, for the directory's
/// `updated_at_ms`.
fn wall_clock_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Takes the exclusive lock on `<data_dir>/hookflow.lock`, the lock of a single process,
/// creating the directory if needed. The lock is held until the returned file is dropped.
///
/// # Errors
///
/// Fails, saying so, when another process holds the lock, or when the file cannot be made.
pub fn lock_data_dir(data_dir: &Path) -> anyhow::Result<std::fs::File> {
    lock_file(data_dir, &data_dir.join("hookflow.lock"))
}

/// Takes the exclusive lock on `path`, creating the data directory if needed.
fn lock_file(data_dir: &Path, path: &Path) -> anyhow::Result<std::fs::File> {
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("cannot create the data directory {}", data_dir.display()))?;
    let path = path.to_path_buf();
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open the lock file {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
            "data directory {} is in use by another `hookflow run` or `hookflow endpoints` (it holds {}); stop that one first",
            data_dir.display(),
            path.display()
        ),
        Err(std::fs::TryLockError::Error(error)) => {
            Err(error).with_context(|| format!("cannot lock {}", path.display()))
        }
    }
}

/// Everything a worker needs, shared by all workers of the process.
struct WorkerShared {
    config: Config,
    data_dir: PathBuf,
    archive_dir: PathBuf,
    until_idle: bool,
    clock: Arc<dyn Clock>,
    stop: Arc<StopSignal>,
    /// The endpoint directory at start; only worker 0 of process 0 feeds it in.
    endpoints: Vec<Endpoint>,
    /// Endpoints this process's store records as disabled at run time.
    disabled: std::collections::HashSet<String>,
    /// The registry's changes, taken by worker 0 of process 0.
    feed: std::sync::Mutex<Option<ChangeFeed>>,
    runtime: tokio::runtime::Handle,
    client: DeliveryClient,
    duplicates: Arc<AtomicU64>,
    requests_in_flight: Arc<std::sync::atomic::AtomicUsize>,
    run_id: u64,
    cluster: Cluster,
    /// The state of this process's part of the data directory, shared with the other processes.
    readiness: Readiness,
    counters: Arc<DeliverCounters>,
    metrics: Arc<Metrics>,
    alert_counters: Arc<AlertCounters>,
}

/// The rows and files one worker archived.
struct WorkerReport {
    rows_archived: u64,
    files: Vec<PathBuf>,
    outcomes: std::collections::BTreeMap<String, u64>,
}

// `ok_err` splits streams by `Result`; the `Err` side is data, not an error, so its size
// does not matter.
#[allow(clippy::result_large_err)]
fn run_worker(
    worker: &mut timely::worker::Worker,
    shared: &WorkerShared,
) -> anyhow::Result<WorkerReport> {
    let index = worker.index();
    let config = &shared.config;
    let cluster = &shared.cluster;
    let workers = config.pipeline.workers;
    // The first worker of each process restores its process's pending deliveries and prunes
    // its process's state store.
    let first_of_process = index == cluster.first_worker(workers);
    let _span = cluster
        .is_multi_process()
        .then(|| tracing::info_span!("worker", process = cluster.process_index(), index).entered());

    if cluster.is_multi_process() {
        let all = agree(worker, workers, shared.readiness.clone());
        if let Err(reasons) = decide(&all) {
            anyhow::bail!("the cluster cannot start: {reasons}");
        }
        if first_of_process {
            tracing::info!(
                processes = all.len(),
                "Every process of the cluster is ready."
            );
        }
    }

    let clock = shared.clock.clone();
    let started_ms = clock.now_ms();

    let log_options = LocalLogOptions {
        partitions: config.local_log.partitions,
    };
    let open_log = || {
        LocalLog::open(&shared.data_dir, &log_options)
            .with_context(|| format!("cannot open the local log in {}", shared.data_dir.display()))
    };
    // One source to read, one to read retries' payloads back from.
    let open_source = || -> anyhow::Result<Box<dyn Source>> {
        let status = shared.metrics.source.clone();
        match config.fluvio() {
            Some(fluvio) => Ok(Box::new(
                FluvioSource::connect(fluvio.options(), status)
                    .with_context(|| format!("cannot open the Fluvio topic {:?}", fluvio.topic))?,
            )),
            None => Ok(Box::new(open_log()?)),
        }
    };
    let mut log = open_source()?;
    let retry_log = open_source()?;

    // What earlier runs left: the checkpoint to resume reading from, the log end below which
    // re-read records must be checked against the journal, pending deliveries and first
    // occurrences.
    let state_dir = cluster.state_dir(&shared.data_dir);
    let store = StateStore::open_dir(&state_dir)
        .with_context(|| format!("cannot open the state store in {}", state_dir.display()))?;
    let checkpoint = store.checkpoint()?;
    let mut resume_bounds = ResumeBounds::new();
    // With nothing journaled, pending or decided, no re-read record can have been handled, so
    // the per-delivery lookups are skipped. The bounds cover every partition, not only this
    // worker's: deliveries and unrouted events are checked on the worker that owns their
    // endpoint or tenant, which may read them from any partition.
    if store.has_settled_work()? {
        for partition in 0..log.partitions() {
            resume_bounds.insert(partition, log.end_offset(partition)?);
        }
    }
    let dedup_window_ms = config.pipeline.dedup_window_secs.saturating_mul(1000);
    let restored_first_seen = store.first_seen_since(started_ms.saturating_sub(dedup_window_ms))?;
    // A parked delivery stays in the store while its endpoint is disabled. The deliver
    // operator resumes it when the directory loads or enables its endpoint.
    // TODO: a parked delivery whose endpoint the directory no longer has stays parked; the
    // first worker of each process could dead-letter those once the loads are absorbed.
    let restored_pending = if first_of_process {
        store
            .pending()?
            .into_iter()
            .filter(|entry| !entry.is_parked())
            .collect()
    } else {
        Vec::new()
    };
    let store = Rc::new(RefCell::new(store));

    let prefix = format!("w{index}");
    let writer = ArchiveWriter::new(
        ArchiveOptions {
            max_rows_per_file: config.archive.max_rows_per_file,
            max_file_bytes: config.archive.max_file_bytes,
            max_file_age_ms: config.archive.max_file_age_secs.saturating_mul(1000),
            ..ArchiveOptions::new(shared.archive_dir.clone(), prefix.clone())
        },
        shared.run_id,
    )
    .with_context(|| {
        format!(
            "cannot open the archive in {}",
            shared.archive_dir.display()
        )
    })?;
    let policy = ArchivePolicy {
        prefix,
        max_rows_per_file: config.archive.max_rows_per_file,
        max_file_age_ms: config.archive.max_file_age_secs.saturating_mul(1000),
        max_file_bytes: config.archive.max_file_bytes,
    };
    let archiver = Archiver::new(
        store.clone(),
        writer,
        &shared.archive_dir,
        policy,
        shared.metrics.clone(),
    )
    .with_context(|| {
        format!(
            "cannot recover the archive in {}",
            shared.archive_dir.display()
        )
    })?;
    let archiver = Rc::new(RefCell::new(archiver));

    let probe = ProbeHandle::new();
    let control = SourceControl {
        stop: shared.stop.clone(),
        progress: Rc::new(RefCell::new(SourceProgress::new(shared.metrics.clone()))),
        ..SourceControl::default()
    };
    let source_options = SourceOptions {
        poll_interval: Duration::from_millis(config.pipeline.poll_interval_ms),
        batch_records: 1024,
        max_read_ahead: config.pipeline.max_read_ahead,
        until_idle: shared.until_idle,
        checkpoint_interval: Duration::from_millis(config.pipeline.checkpoint_interval_ms),
    };
    let unsynced_results = Arc::new(std::sync::atomic::AtomicUsize::new(0));

    let absorbed = ProbeHandle::new();
    let (mut subscriptions, updates_input) = worker.dataflow::<u64, _, _>(|scope| {
        let (input, subscriptions) = scope.new_collection::<(String, Subscription), isize>();
        let subscriptions = subscriptions.arrange_by_key();
        subscriptions.stream.clone().probe_with(&absorbed);
        let (updates_input, updates) =
            timely::dataflow::operators::core::Input::new_input::<Vec<EndpointUpdate>>(&scope);
        let updates = updates.broadcast();
        let updates = updates.probe_with(&absorbed);

        let records = read_source(
            scope,
            log,
            checkpoint.clone(),
            store.clone(),
            clock.clone(),
            source_options,
            probe.clone(),
            control.clone(),
        );
        let (events, invalid) =
            decode(records, config.pipeline.max_payload_bytes, clock.clone()).ok_err(|r| r);
        let events: Stream<'_, u64, Vec<IngestedEvent>> = events;

        let dedup = DedupConfig {
            retention_ms: dedup_window_ms,
            restored: restored_first_seen,
        };
        let events = events.dedup(dedup, shared.duplicates.clone());
        let first_seen = events.clone().map(|event| {
            Durable::FirstSeen(FirstSeen {
                // Dedup restores its index from these, so they carry its key.
                event_id: event.event.dedup_id(),
                tenant: event.event.tenant,
                partition: event.partition,
                offset: event.offset,
                first_seen_ms: event.read_at_ms,
            })
        });
        let (deliveries, unrouted) = events.route(subscriptions).ok_err(|routed| routed);
        let deliveries = skip_settled_deliveries(deliveries, store.clone(), resume_bounds.clone());
        let unrouted = unrouted_rows(unrouted, clock.clone());
        let decided = skip_decided_rows(invalid.concat(unrouted), store.clone(), resume_bounds);

        // Retries come round a feedback edge, stamped with their next attempt time, and
        // re-enter before the deliver operator's rate limit, never through dedup or route.
        let (retry_handle, retries) = scope.feedback::<Vec<Delivery>>(1);
        let restored = restore_pending(scope, restored_pending, started_ms);
        let payloads = LogPayloads {
            log: retry_log,
            max_payload_bytes: config.pipeline.max_payload_bytes,
            stop: shared.stop.clone(),
        };
        let directory = LiveDirectory {
            updates,
            disabled: shared.disabled.clone(),
            parked: Box::new(StoreParked {
                store: store.clone(),
            }),
        };
        let context = DeliverContext {
            runtime: shared.runtime.clone(),
            client: shared.client.clone(),
            // The directory arrives on the updates input.
            endpoints: Arc::new(HashMap::new()),
            clock: clock.clone(),
            max_in_flight_total: config.delivery.max_in_flight,
            retry: config.retry.policy(),
            requests_in_flight: shared.requests_in_flight.clone(),
            stop: shared.stop.clone(),
            unsynced_results: unsynced_results.clone(),
            max_unsynced_results: config.pipeline.max_unsynced_results,
            health: config.health.policy(),
            counters: shared.counters.clone(),
        };
        let attempted = deliveries.concat(restored).concat(retries).deliver_live(
            directory,
            context,
            Box::new(payloads),
        );
        let (durable, retries, signals) = split_attempted(attempted, signal_filter(shared));
        retries.connect_loop(retry_handle);
        if config.alerts.enabled {
            let alerts = signals.endpoint_alerts(config.alerts.policy(), clock.clone());
            publish_alerts(
                alerts,
                source_appender(config.publish_target(&shared.data_dir)),
                config.alerts.operator_tenant.clone(),
                shared.alert_counters.clone(),
                clock.clone(),
            );
        }

        let durable = durable.concat(decided.map(Durable::Row)).concat(first_seen);
        persist(
            durable,
            archiver.clone(),
            clock.clone(),
            unsynced_results.clone(),
            shared.metrics.clone(),
        )
        .probe_with(&probe);

        (input, updates_input)
    });

    // Endpoint changes enter the dataflow once, through the process that serves the
    // management API.
    let mut updates_input = Some(updates_input);
    let mut directory = if cluster.serves_management_api() && first_of_process {
        let feed = shared
            .feed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        let mut directory = DirectoryFeed {
            subscribed: HashMap::new(),
            feed,
            absorbing: Vec::new(),
        };
        if let Some(updates) = updates_input.as_mut() {
            for endpoint in &shared.endpoints {
                directory.load(&mut subscriptions, updates, endpoint.clone());
            }
        }
        Some(directory)
    } else {
        None
    };

    // The first worker of each process prunes its process's store; worker 0 also truncates the
    // local log, which needs every process's checkpoint and pending deliveries. A Fluvio
    // topic's retention is the cluster's.
    let mut maintenance_log = if index == 0 && config.fluvio().is_none() {
        Some(open_log()?)
    } else {
        None
    };
    let other_stores = if index == 0 {
        cluster.other_state_dirs(&shared.data_dir)
    } else {
        Vec::new()
    };
    let maintenance_every_ms = config
        .pipeline
        .maintenance_interval_secs
        .saturating_mul(1000)
        .max(1);
    let mut next_maintenance_ms = started_ms;
    let pending_refresh_ms = config.metrics.pending_refresh_secs.saturating_mul(1000);
    let mut next_pending_count_ms = started_ms;
    let progress_gauge = shared
        .metrics
        .worker(index.saturating_sub(cluster.first_worker(workers)));
    let mut lag_monitor = (first_of_process && config.alerts.enabled).then(|| {
        LagMonitor::new(
            &config.alerts,
            cluster.process_index(),
            shared.alert_counters.clone(),
            Box::new(source_appender(config.publish_target(&shared.data_dir))),
            started_ms,
        )
    });

    let mut subscriptions = Some(subscriptions);
    let park = Duration::from_millis(config.pipeline.poll_interval_ms);
    let grace_ms = config.pipeline.shutdown_grace_secs.saturating_mul(1000);
    let mut stopped_at: Option<u64> = None;
    let mut abandoned = false;
    loop {
        if let (Some(input), Some(updates), Some(directory)) = (
            subscriptions.as_mut(),
            updates_input.as_mut(),
            directory.as_mut(),
        ) {
            directory.drain(input, updates);
        }
        if let (Some(input), Some(updates)) = (subscriptions.as_mut(), updates_input.as_mut()) {
            // One ms ahead of now, so that events read at `now` can be routed at once. Both
            // inputs stand at the same time, at which the next endpoint changes are fed in.
            let next = clock.now_ms().saturating_add(1).max(*input.time());
            input.advance_to(next);
            input.flush();
            updates.advance_to(next);
            updates.flush();
            if control.finished.get() {
                subscriptions = None;
                updates_input = None;
            }
        }
        if let Some(directory) = directory.as_mut() {
            directory.acknowledge(&absorbed, subscriptions.is_some());
        }
        if let Some(gauge) = progress_gauge {
            let frontier = probe.with_frontier(|frontier| frontier.first().copied());
            gauge.observe(
                frontier,
                control.progress.borrow().outstanding(),
                clock.now_ms(),
            );
        }
        if first_of_process {
            let now = clock.now_ms();
            if now >= next_pending_count_ms {
                next_pending_count_ms = now.saturating_add(pending_refresh_ms);
                count_pending(&store.borrow(), &shared.metrics);
            }
            if now >= next_maintenance_ms {
                next_maintenance_ms = now.saturating_add(maintenance_every_ms);
                run_maintenance(
                    maintenance_log.as_mut(),
                    &mut store.borrow_mut(),
                    &other_stores,
                    config,
                    now,
                );
            }
            if let Some(monitor) = lag_monitor.as_mut() {
                monitor.tick(&store.borrow(), now);
            }
        }
        if shared.stop.is_stopped() {
            let since = *stopped_at.get_or_insert_with(|| clock.now_ms());
            if clock.now_ms().saturating_sub(since) > grace_ms {
                // Requests still in flight are abandoned: their records stay below the
                // checkpoint and are delivered again by the next run.
                tracing::warn!(
                    grace_secs = config.pipeline.shutdown_grace_secs,
                    "Shutdown grace period over; abandoning requests in flight."
                );
                abandoned = true;
                break;
            }
        }
        if !worker.step_or_park(Some(park)) {
            break;
        }
    }

    if let Err(error) =
        control
            .progress
            .borrow_mut()
            .write_checkpoint(&mut store.borrow_mut(), &probe, !abandoned)
    {
        tracing::error!(error = %format!("{error:#}"), "Writing the final checkpoint failed; the next run re-reads from the last one.");
    }
    let mut archiver = archiver.borrow_mut();
    archiver.flush(clock.now_ms(), true).with_context(|| {
        format!(
            "cannot complete the archive files in {}",
            shared.archive_dir.display()
        )
    })?;
    if control.failed.get() {
        anyhow::bail!("reading the source failed (see the log above)");
    }
    Ok(WorkerReport {
        rows_archived: archiver.writer.rows_written(),
        files: std::mem::take(&mut archiver.files),
        outcomes: std::mem::take(&mut archiver.outcomes),
    })
}

/// Returns what turns the deliver operator's records into alert signals, when alerts are on.
fn signal_filter(shared: &WorkerShared) -> Option<SignalFilter> {
    let alerts = &shared.config.alerts;
    if !alerts.enabled {
        return None;
    }
    Some(SignalFilter {
        operator_tenant: alerts.operator_tenant.clone(),
    })
}

/// Warns when alerts are on but no endpoint of the operator tenant would receive them: the
/// events are then recorded as unrouted.
fn warn_without_operator_endpoint(config: &Config, endpoints: &[Endpoint]) {
    let alerts = &config.alerts;
    if !alerts.enabled {
        return;
    }
    let receiving = endpoints
        .iter()
        .any(|endpoint| endpoint.tenant == alerts.operator_tenant && endpoint.enabled);
    if !receiving {
        tracing::warn!(
            operator_tenant = %alerts.operator_tenant,
            "Alerts are enabled but no enabled endpoint of the operator tenant receives them; they are archived as unrouted."
        );
    }
}

/// Runs one maintenance pass and logs its result; a failure is logged and retried at the next
/// pass. `log` is given to the one worker that truncates it, with the state directories of the
/// other processes, whose checkpoints and pending deliveries bound the truncation too.
fn run_maintenance(
    log: Option<&mut LocalLog>,
    store: &mut StateStore,
    other_stores: &[PathBuf],
    config: &Config,
    now_ms: u64,
) {
    let retention_ms = config.local_log.retention_secs.saturating_mul(1000);
    let dedup_window_ms = config.pipeline.dedup_window_secs.saturating_mul(1000);
    // A re-read record can only be one above the checkpoint, at most the maximum event age
    // old; the journal keeps a dedup window beyond that too.
    let keep_state_ms = dedup_window_ms.max(config.retry.max_event_age_secs.saturating_mul(1000));
    match maintain(
        log,
        store,
        other_stores,
        retention_ms,
        keep_state_ms,
        dedup_window_ms,
        now_ms,
    ) {
        Ok(done) => tracing::info!(
            truncated_records = done.truncated,
            truncation_skipped = done.truncation_skipped.as_deref().unwrap_or("no"),
            log_bytes = done.log_bytes,
            state_bytes = done.state_bytes,
            pending_deliveries = done.pending,
            "Maintenance done."
        ),
        Err(error) => tracing::error!(
            error = %format!("{error:#}"),
            "Log retention or state pruning failed; retrying at the next pass."
        ),
    }
}

/// Counts the pending and parked deliveries of this process's state store into `metrics`;
/// a failure is logged and the gauges keep their last values.
fn count_pending(store: &StateStore, metrics: &Metrics) {
    match store.pending_counts() {
        Ok((pending, parked)) => {
            metrics
                .retries_pending
                .store(pending.saturating_sub(parked), Ordering::Relaxed);
            metrics.deliveries_parked.store(parked, Ordering::Relaxed);
        }
        Err(error) => tracing::warn!(
            error = %format!("{error:#}"),
            "Counting pending deliveries for the metrics failed; retrying at the next count."
        ),
    }
}

/// Decodes records into events, or into invalid-record rows at the record's time.
fn decode<'scope>(
    records: Stream<'scope, u64, Vec<SourceRecord>>,
    max_payload_bytes: usize,
    clock: Arc<dyn Clock>,
) -> Stream<'scope, u64, Vec<Result<IngestedEvent, AttemptRow>>> {
    records.unary(Pipeline, "Decode", move |_capability, _info| {
        // Invalid records logged so far; past the first few only every thousandth is logged.
        let mut invalid_seen = 0u64;
        move |input, output| {
            input.for_each_stamp(|capability, containers| {
                let time = capability.least().copied().unwrap_or_default();
                let mut session = output.session(&capability);
                for record in containers.flat_map(|c| c.drain(..)) {
                    match decode_event(&record.value, max_payload_bytes) {
                        Ok(event) => session.give(Ok(IngestedEvent {
                            partition: record.partition,
                            offset: record.offset,
                            appended_at_ms: record.appended_at_ms,
                            read_at_ms: time,
                            event,
                        })),
                        Err(error) => {
                            invalid_seen += 1;
                            if invalid_seen <= 5 || invalid_seen.is_multiple_of(1000) {
                                tracing::warn!(
                                    partition = record.partition,
                                    offset = record.offset,
                                    %error,
                                    invalid_so_far = invalid_seen,
                                    logged = if invalid_seen < 5 { "each" } else { "every 1000th from now on" },
                                    "Invalid record dead-lettered."
                                );
                            }
                            session.give(Err(AttemptRow::invalid(
                                &record,
                                &error,
                                time,
                                clock.now_ms(),
                            )));
                        }
                    }
                }
            });
        }
    })
}

/// Turns unrouted events into rows at the event's time.
fn unrouted_rows<'scope>(
    events: Stream<'scope, u64, Vec<IngestedEvent>>,
    clock: Arc<dyn Clock>,
) -> Stream<'scope, u64, Vec<AttemptRow>> {
    events.unary(Pipeline, "Unrouted", move |_capability, _info| {
        move |input, output| {
            input.for_each_stamp(|capability, containers| {
                let time = capability.least().copied().unwrap_or_default();
                let mut session = output.session(&capability);
                for event in containers.flat_map(|c| c.drain(..)) {
                    session.give(AttemptRow::unrouted(&event, time, clock.now_ms()));
                }
            });
        }
    })
}

/// The input of endpoint updates for the deliver operators.
type UpdatesInput = timely::dataflow::InputHandle<
    u64,
    timely::container::CapacityContainerBuilder<Vec<EndpointUpdate>>,
>;

/// The input of the subscriptions collection.
type SubscriptionsInput =
    differential_dataflow::input::InputSession<u64, (String, Subscription), isize>;

/// Worker 0's side of the endpoint directory: the subscriptions it fed in, by endpoint id, so
/// that a change retracts the old one, and the changes fed in but not yet absorbed.
struct DirectoryFeed {
    subscribed: HashMap<String, (String, Subscription)>,
    feed: Option<ChangeFeed>,
    /// Changes fed in, each with its time and where to report it absorbed.
    absorbing: Vec<(u64, tokio::sync::oneshot::Sender<u64>)>,
}

impl DirectoryFeed {
    /// Feeds in an endpoint of the directory at start.
    fn load(
        &mut self,
        subscriptions: &mut SubscriptionsInput,
        updates: &mut UpdatesInput,
        endpoint: Endpoint,
    ) {
        self.subscribe(subscriptions, &endpoint);
        updates.send(EndpointUpdate::Load(endpoint));
    }

    /// Feeds in the registry's waiting changes at the inputs' current time.
    fn drain(&mut self, subscriptions: &mut SubscriptionsInput, updates: &mut UpdatesInput) {
        let Some(feed) = self.feed.as_ref() else {
            return;
        };
        let mut received = Vec::new();
        while let Ok(pending) = feed.try_recv() {
            received.push(pending);
        }
        for PendingChange { change, fed } in received {
            let time = *updates.time();
            match change {
                EndpointChange::Upsert(endpoint) => {
                    self.subscribe(subscriptions, &endpoint);
                    updates.send(EndpointUpdate::Apply(endpoint));
                }
                EndpointChange::Delete { id } => {
                    if let Some(old) = self.subscribed.remove(&id) {
                        subscriptions.remove(old);
                    }
                    updates.send(EndpointUpdate::Delete(id));
                }
            }
            self.absorbing.push((time, fed));
        }
    }

    /// Makes `endpoint`'s subscription the one in the collection, retracting the one it had.
    fn subscribe(&mut self, subscriptions: &mut SubscriptionsInput, endpoint: &Endpoint) {
        let entry = (
            endpoint.tenant.clone(),
            Subscription {
                endpoint_id: endpoint.id.clone(),
                event_types: endpoint.event_types.clone(),
            },
        );
        match self.subscribed.insert(endpoint.id.clone(), entry.clone()) {
            Some(old) if old == entry => {}
            Some(old) => {
                subscriptions.remove(old);
                subscriptions.insert(entry);
            }
            None => subscriptions.insert(entry),
        }
    }

    /// Reports the changes whose time the probe has passed as absorbed. Once the inputs are
    /// closed (`open` false), changes still arriving can no longer be fed in, so the feed is
    /// dropped and each caller's `apply` returns that the pipeline stopped.
    fn acknowledge(&mut self, absorbed: &ProbeHandle<u64>, open: bool) {
        let mut index = 0;
        while index < self.absorbing.len() {
            if absorbed.less_equal(&self.absorbing[index].0) {
                index += 1;
                continue;
            }
            let (time, fed) = self.absorbing.swap_remove(index);
            // The caller may have stopped waiting; the change is in effect either way.
            let _ = fed.send(time);
        }
        if !open {
            self.feed = None;
        }
    }
}

/// Reads parked deliveries back from this process's state store for the deliver operator.
struct StoreParked {
    store: Rc<RefCell<StateStore>>,
}

impl ParkedDeliveries for StoreParked {
    fn parked(&mut self, endpoint_id: &str) -> Result<Vec<PendingDelivery>, String> {
        self.store
            .borrow()
            .parked_of(endpoint_id)
            .map_err(|error| format!("{error:#}"))
    }

    fn clear_disabled(&mut self, endpoint_id: &str) -> Result<(), String> {
        self.store
            .borrow_mut()
            .enable_endpoint(endpoint_id)
            .map(|_| ())
            .map_err(|error| format!("{error:#}"))
    }
}

/// Reads retries' payloads back from the source.
struct LogPayloads {
    log: Box<dyn Source>,
    max_payload_bytes: usize,
    stop: Arc<StopSignal>,
}

/// How long a payload fetch waits for an unreachable source before the retries it was for are
/// dead-lettered.
const PAYLOAD_FETCH_PATIENCE: Duration = Duration::from_secs(120);

impl PayloadSource for LogPayloads {
    fn fetch(&mut self, positions: &[(u32, u64)]) -> Vec<Result<Vec<u8>, String>> {
        // An unreachable Fluvio cluster is waited for: the deliver operator dead-letters a
        // retry whose payload cannot be had, and an outage must not do that.
        // TODO: this blocks the worker meanwhile; letting the deliver operator hold the retries
        // and ask again later would keep the worker stepping.
        let started = std::time::Instant::now();
        let mut wait = Duration::from_millis(200);
        let mut records = self.log.fetch(positions);
        while records
            .iter()
            .any(|record| matches!(record, Err(ConnectorError::Fluvio { .. })))
            && started.elapsed() < PAYLOAD_FETCH_PATIENCE
            && !self.stop.is_stopped()
        {
            tracing::warn!(
                retry_in_ms = wait.as_millis() as u64,
                "The source is unreachable; waiting to read retries' payloads back."
            );
            std::thread::sleep(wait);
            wait = (wait * 2).min(Duration::from_secs(5));
            records = self.log.fetch(positions);
        }
        records
            .into_iter()
            .zip(positions)
            .map(|(record, &(partition, offset))| {
                let record = record.map_err(|e| format!("{e:#}"))?;
                decode_event(&record.value, self.max_payload_bytes)
                    .map(|event| event.payload)
                    .map_err(|e| format!("the record at partition {partition} offset {offset} no longer decodes: {e}"))
            })
            .collect()
    }
}
