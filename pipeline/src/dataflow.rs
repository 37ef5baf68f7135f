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
//! ```
//!
//! One tokio runtime per process carries the HTTP requests of every worker. Each worker owns
//! its partitions of the source and writes its own archive files (prefix `w<index>`). The
//! subscriptions input advances with the clock on every worker at every step, so events are
//! routed as soon as their time passes.

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
use hookflow_connectors::Source;
use hookflow_connectors::{ArchiveOptions, ArchiveWriter, LocalLog, LocalLogOptions};
use hookflow_operators::clock::Clock;
use hookflow_operators::dedup::{Dedup, DedupConfig};
use hookflow_operators::deliver::{
    AddressPolicy, Attempted, ClientConfig, Deliver, DeliverContext, DeliveryClient, PayloadSource,
};
use hookflow_operators::route::{Route, Subscription};
use hookflow_schemas::{decode_event, AttemptRow, Delivery, Endpoint, IngestedEvent, SourceRecord};
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::probe::Handle as ProbeHandle;
use timely::dataflow::operators::{Concat, ConnectLoop, Feedback, OkErr, Probe};
use timely::dataflow::Stream;

use crate::config::Config;
use crate::source::{read_source, SourceControl, SourceOptions};

/// What `run` needs besides the configuration.
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
}

/// What a finished run reports.
#[derive(Debug, Clone, Default)]
pub struct RunReport {
    /// Events dropped as repeats of a (tenant, id) already seen.
    pub duplicates: u64,
    /// Attempt rows written to the archive.
    pub rows_archived: u64,
    /// Archive files completed by this run.
    pub files: Vec<PathBuf>,
    /// The archive directory.
    pub archive_dir: PathBuf,
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
    let config = &options.config;
    let archive_dir = archive_dir(config, &options.data_dir);
    let endpoints: Arc<HashMap<String, Endpoint>> = Arc::new(
        config
            .endpoints()
            .into_iter()
            .map(|e| (e.id.clone(), e))
            .collect(),
    );

    // Open the log once here so that a bad data directory fails before any thread starts.
    let log_options = LocalLogOptions {
        partitions: config.local_log.partitions,
    };
    let log = LocalLog::open(&options.data_dir, &log_options).with_context(|| {
        format!(
            "cannot open the local log in {}",
            options.data_dir.display()
        )
    })?;
    tracing::info!(partitions = log.partitions(), data_dir = %options.data_dir.display(), "Local log opened.");
    drop(log);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("hookflow-http")
        .enable_all()
        .build()
        .context("cannot start the HTTP runtime")?;
    let allowed = config
        .allowed_networks()
        .map_err(|(field, problem)| anyhow::anyhow!("{field}: {problem}"))?;
    let client = DeliveryClient::new(ClientConfig {
        address_policy: AddressPolicy::new(allowed),
        max_response_bytes: config.delivery.max_response_bytes,
        ..ClientConfig::default()
    })
    .context("cannot build the HTTP client")?;

    let duplicates = Arc::new(AtomicU64::new(0));
    let shared = Arc::new(WorkerShared {
        config: config.clone(),
        data_dir: options.data_dir.clone(),
        archive_dir: archive_dir.clone(),
        until_idle: options.until_idle,
        clock: options.clock.clone(),
        stop: options.stop.clone(),
        endpoints,
        runtime: runtime.handle().clone(),
        client,
        duplicates: duplicates.clone(),
        requests_in_flight: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
        run_id: options.clock.now_ms(),
    });

    let timely_config = timely::Config::process(config.pipeline.workers);
    let guards = timely::execute(timely_config, move |worker| run_worker(worker, &shared))
        .map_err(|e| anyhow::anyhow!("cannot start the timely workers: {e}"))?;

    let mut report = RunReport {
        archive_dir,
        ..RunReport::default()
    };
    let mut failures = Vec::new();
    for (index, result) in guards.join().into_iter().enumerate() {
        match result {
            Ok(Ok(worker)) => {
                report.rows_archived += worker.rows_archived;
                report.files.extend(worker.files);
            }
            Ok(Err(error)) => failures.push(format!("worker {index}: {error:#}")),
            Err(panic) => failures.push(format!("worker {index} panicked: {panic}")),
        }
    }
    runtime.shutdown_timeout(Duration::from_secs(1));
    report.duplicates = duplicates.load(Ordering::Relaxed);
    report.files.sort();
    if !failures.is_empty() {
        anyhow::bail!("the pipeline failed: {}", failures.join("; "));
    }
    Ok(report)
}

/// Everything a worker needs, shared by all workers of the process.
struct WorkerShared {
    config: Config,
    data_dir: PathBuf,
    archive_dir: PathBuf,
    until_idle: bool,
    clock: Arc<dyn Clock>,
    stop: Arc<StopSignal>,
    endpoints: Arc<HashMap<String, Endpoint>>,
    runtime: tokio::runtime::Handle,
    client: DeliveryClient,
    duplicates: Arc<AtomicU64>,
    requests_in_flight: Arc<std::sync::atomic::AtomicUsize>,
    run_id: u64,
}

/// What one worker archived.
struct WorkerReport {
    rows_archived: u64,
    files: Vec<PathBuf>,
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
    let clock = shared.clock.clone();

    let log_options = LocalLogOptions {
        partitions: config.local_log.partitions,
    };
    let open_log = || {
        LocalLog::open(&shared.data_dir, &log_options)
            .with_context(|| format!("cannot open the local log in {}", shared.data_dir.display()))
    };
    let log = open_log()?;
    let retry_log = open_log()?;
    let writer = ArchiveWriter::new(
        ArchiveOptions {
            max_rows_per_file: config.archive.max_rows_per_file,
            max_file_bytes: config.archive.max_file_bytes,
            max_file_age_ms: config.archive.max_file_age_secs.saturating_mul(1000),
            ..ArchiveOptions::new(shared.archive_dir.clone(), format!("w{index}"))
        },
        shared.run_id,
    )
    .with_context(|| {
        format!(
            "cannot open the archive in {}",
            shared.archive_dir.display()
        )
    })?;
    let writer = Rc::new(RefCell::new(writer));
    let archive_failed: Rc<RefCell<Option<String>>> = Rc::new(RefCell::new(None));

    let probe = ProbeHandle::new();
    let control = SourceControl {
        stop: shared.stop.clone(),
        ..SourceControl::default()
    };
    let source_options = SourceOptions {
        poll_interval: Duration::from_millis(config.pipeline.poll_interval_ms),
        batch_records: 1024,
        max_read_ahead: config.pipeline.max_read_ahead,
        until_idle: shared.until_idle,
    };

    let mut subscriptions = worker.dataflow::<u64, _, _>(|scope| {
        let (input, subscriptions) = scope.new_collection::<(String, Subscription), isize>();
        let subscriptions = subscriptions.arrange_by_key();

        let records = read_source(
            scope,
            Box::new(log),
            clock.clone(),
            source_options,
            probe.clone(),
            control.clone(),
        );
        let (events, invalid) =
            decode(records, config.pipeline.max_payload_bytes, clock.clone()).ok_err(|r| r);
        let events: Stream<'_, u64, Vec<IngestedEvent>> = events;

        let dedup = DedupConfig {
            retention_ms: config.pipeline.dedup_window_secs.saturating_mul(1000),
        };
        let (deliveries, unrouted) = events
            .dedup(dedup, shared.duplicates.clone())
            .route(subscriptions)
            .ok_err(|routed| routed);
        let unrouted = unrouted_rows(unrouted, clock.clone());

        // Retries come round a feedback edge, stamped with their next attempt time, and
        // re-enter before the deliver operator's rate limit, never through dedup or route.
        let (retry_handle, retries) = scope.feedback::<Vec<Delivery>>(1);
        let payloads = LogPayloads {
            log: retry_log,
            max_payload_bytes: config.pipeline.max_payload_bytes,
        };
        let context = DeliverContext {
            runtime: shared.runtime.clone(),
            client: shared.client.clone(),
            endpoints: shared.endpoints.clone(),
            clock: clock.clone(),
            max_in_flight_total: config.delivery.max_in_flight,
            retry: config.retry.policy(),
            requests_in_flight: shared.requests_in_flight.clone(),
            stop: shared.stop.clone(),
        };
        let (attempts, retries) = deliveries
            .concat(retries)
            .deliver(context, Box::new(payloads))
            .ok_err(|attempted| match attempted {
                Attempted::Row(row) => Ok(row),
                Attempted::Retry(delivery) => Err(delivery),
            });
        retries.connect_loop(retry_handle);

        let rows = attempts.concat(invalid).concat(unrouted);
        archive_sink(
            rows,
            writer.clone(),
            archive_failed.clone(),
            shared.stop.clone(),
            clock.clone(),
        )
        .probe_with(&probe);

        input
    });

    if index == 0 {
        for endpoint in shared.endpoints.values() {
            subscriptions.insert((
                endpoint.tenant.clone(),
                Subscription {
                    endpoint_id: endpoint.id.clone(),
                    event_types: endpoint.event_types.clone(),
                },
            ));
        }
    }

    let mut subscriptions = Some(subscriptions);
    let park = Duration::from_millis(config.pipeline.poll_interval_ms);
    loop {
        if let Some(input) = subscriptions.as_mut() {
            // One ms ahead of now, so that events read at `now` can be routed at once.
            let next = clock.now_ms().saturating_add(1).max(*input.time());
            input.advance_to(next);
            input.flush();
            if control.finished.get() {
                subscriptions = None;
            }
        }
        if !worker.step_or_park(Some(park)) {
            break;
        }
    }

    let files = writer.borrow_mut().close().with_context(|| {
        format!(
            "cannot complete the archive files in {}",
            shared.archive_dir.display()
        )
    })?;
    if let Some(error) = archive_failed.borrow_mut().take() {
        anyhow::bail!("archive write failed: {error}");
    }
    if control.failed.get() {
        anyhow::bail!("reading the local log failed (see the log above)");
    }
    let rows_archived = writer.borrow().rows_written();
    Ok(WorkerReport {
        rows_archived,
        files,
    })
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

/// Appends rows to this worker's archive writer and completes files as they age. Its output
/// carries no data: a probe on it tells which times are archived.
fn archive_sink<'scope>(
    rows: Stream<'scope, u64, Vec<AttemptRow>>,
    writer: Rc<RefCell<ArchiveWriter>>,
    failed: Rc<RefCell<Option<String>>>,
    stop: Arc<StopSignal>,
    clock: Arc<dyn Clock>,
) -> Stream<'scope, u64, Vec<()>> {
    let scope = rows.scope();
    rows.unary_frontier::<CapacityContainerBuilder<Vec<()>>, _, _, _>(
        Pipeline,
        "Archive",
        move |_capability, info| {
            let activator = scope.activator_for(info.address);
            move |(input, _frontier), _output| {
                let now = clock.now_ms();
                let mut writer = writer.borrow_mut();
                input.for_each_stamp(|_capability, containers| {
                    for rows in containers {
                        if let Err(error) = writer.append(rows, now) {
                            tracing::error!(%error, rows = rows.len(), "Archive write failed; stopping.");
                            failed.borrow_mut().get_or_insert(error.to_string());
                            stop.stop();
                        }
                    }
                });
                match writer.roll_due(now) {
                    Ok(files) => {
                        for file in files {
                            tracing::debug!(file = %file.display(), "Archive file completed.");
                        }
                    }
                    Err(error) => {
                        tracing::error!(%error, "Completing an archive file failed; stopping.");
                        failed.borrow_mut().get_or_insert(error.to_string());
                        stop.stop();
                    }
                }
                // Wake up now and then so that an idle pipeline still completes aged files.
                activator.activate_after(Duration::from_secs(1));
            }
        },
    )
}

/// Reads retries' payloads back from the local log.
struct LogPayloads {
    log: LocalLog,
    max_payload_bytes: usize,
}

impl PayloadSource for LogPayloads {
    fn fetch(&mut self, positions: &[(u32, u64)]) -> Vec<Result<Vec<u8>, String>> {
        positions
            .iter()
            .map(|&(partition, offset)| {
                let records = self.log.read(partition, offset, 1).map_err(|e| format!("{e:#}"))?;
                let record = records
                    .into_iter()
                    .find(|record| record.offset == offset)
                    .ok_or_else(|| format!("partition {partition} has no record at offset {offset}"))?;
                decode_event(&record.value, self.max_payload_bytes)
                    .map(|event| event.payload)
                    .map_err(|e| format!("the record at partition {partition} offset {offset} no longer decodes: {e}"))
            })
            .collect()
    }
}
