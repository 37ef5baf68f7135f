//! The process's Prometheus metrics: plain atomics that the pipeline bumps as it works, read
//! and encoded in the Prometheus text format (version 0.0.4) only when `/metrics` is scraped.
//!
//! In: the source operator's reads and end offsets, and the dedup operator's repeat count.
//! The durable sink adds the attempt rows it has written, one pass over each committed batch,
//! and the archiver its completed files. The deliver operator keeps [`DeliverCounters`], the
//! worker loop reports its probe frontier, and the first worker counts the state store's
//! pending deliveries now and then. Out: the text that [`Metrics::encode`] writes through a
//! `prometheus-client` [`Collector`].
//!
//! State: counters and gauges as atomics, so that the hot path takes no lock. Per-endpoint
//! series live in an [`EndpointTable`] that gives the first `max_endpoint_series` endpoint ids
//! their own series and counts every later one under `endpoint="other"`. The durable sink
//! keeps an [`EndpointCache`] of the table's entries, so it locks the table only the first
//! time it sees an endpoint. No metric is labelled by URL or event id.
//!
//! ```text
//! name                                          type       labels
//! hookflow_events_ingested_total                counter    -
//! hookflow_events_deduplicated_total            counter    -
//! hookflow_events_invalid_total                 counter    -
//! hookflow_events_unrouted_total                counter    -
//! hookflow_delivery_attempts_total              counter    endpoint
//! hookflow_deliveries_delivered_total           counter    endpoint
//! hookflow_delivery_failures_total              counter    endpoint, error_kind
//! hookflow_deliveries_dead_lettered_total       counter    endpoint
//! hookflow_deliveries_expired_total             counter    endpoint
//! hookflow_delivery_latency_seconds             histogram  -
//! hookflow_end_to_end_latency_seconds           histogram  -
//! hookflow_retries_pending                      gauge      -
//! hookflow_parked_deliveries                    gauge      -
//! hookflow_requests_in_flight                   gauge      -
//! hookflow_source_up                            gauge      -
//! hookflow_source_end_offset                    gauge      partition
//! hookflow_source_settled_offset                gauge      partition
//! hookflow_source_lag_offsets                   gauge      partition
//! hookflow_archive_rows_written_total           counter    -
//! hookflow_archive_files_written_total          counter    -
//! hookflow_endpoint_breaker_open                gauge      endpoint
//! hookflow_endpoint_disabled                    gauge      endpoint
//! hookflow_breakers_opened_total                counter    -
//! hookflow_breakers_closed_total                counter    -
//! hookflow_endpoints_disabled_total             counter    -
//! hookflow_deliveries_parked_total              counter    -
//! hookflow_throttled_responses_total            counter    -
//! hookflow_retry_after_invalid_total            counter    -
//! hookflow_retry_after_capped_total             counter    -
//! hookflow_endpoint_series_overflow_total       counter    -
//! hookflow_dataflow_stalled_workers             gauge      -
//! hookflow_ready                                gauge      -
//! hookflow_alerts_*_total, hookflow_operational_events_*_total  counters  -
//! hookflow_endpoints_failing                    gauge      -
//! hookflow_oldest_overdue_delivery_seconds      gauge      -
//! hookflow_ingest_{accepted,repeated,rejected}_total, hookflow_resent_events_total,
//! hookflow_endpoint_changes_total               counters   -
//! ```

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use hookflow_connectors::SourceStatus;
use hookflow_operators::deliver::DeliverCounters;
use hookflow_schemas::{AttemptRow, ErrorKind, Outcome};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

/// The `Content-Type` of what [`Metrics::encode`] writes: the Prometheus text format 0.0.4.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// The default number of endpoints that get series of their own.
pub const DEFAULT_MAX_ENDPOINT_SERIES: usize = 1000;

/// The label value under which endpoints past the series limit are counted.
pub const OTHER_ENDPOINT: &str = "other";

/// Upper bounds of the attempt latency buckets, in ms.
const DELIVERY_LATENCY_BOUNDS_MS: &[u64] = &[
    5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 30_000,
];

/// Upper bounds of the ingest-to-delivered latency buckets, in ms: from 10 ms to a day,
/// because a delivery that waits for retries can take hours.
const END_TO_END_BOUNDS_MS: &[u64] = &[
    10, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 30_000, 60_000, 300_000, 1_800_000,
    3_600_000, 21_600_000, 86_400_000,
];

/// A histogram of millisecond values kept in atomics, so observing takes no lock.
#[derive(Debug)]
pub struct LatencyHistogram {
    bounds_ms: &'static [u64],
    /// Observations per bucket, not cumulative; the last one is above every bound.
    buckets: Vec<AtomicU64>,
    sum_ms: AtomicU64,
}

impl LatencyHistogram {
    fn new(bounds_ms: &'static [u64]) -> Self {
        LatencyHistogram {
            bounds_ms,
            buckets: (0..=bounds_ms.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_ms: AtomicU64::new(0),
        }
    }

    /// Records one observation of `ms` milliseconds.
    pub fn observe_ms(&self, ms: u64) {
        let index = self.bounds_ms.partition_point(|bound| *bound < ms);
        self.buckets[index].fetch_add(1, Ordering::Relaxed);
        self.sum_ms.fetch_add(ms, Ordering::Relaxed);
    }

    /// Returns the observation count, the sum in seconds and each bucket's own count (not
    /// cumulative, as `prometheus-client` adds them up when encoding) with its upper bound in
    /// seconds, the last one `+Inf`.
    pub fn snapshot(&self) -> (u64, f64, Vec<(f64, u64)>) {
        let mut count = 0u64;
        let mut buckets = Vec::with_capacity(self.buckets.len());
        for (index, bucket) in self.buckets.iter().enumerate() {
            let observed = bucket.load(Ordering::Relaxed);
            count += observed;
            let bound = self
                .bounds_ms
                .get(index)
                .map_or(f64::INFINITY, |ms| *ms as f64 / 1000.0);
            buckets.push((bound, observed));
        }
        let sum = self.sum_ms.load(Ordering::Relaxed) as f64 / 1000.0;
        // The count is the buckets' total, so the two always agree in one scrape.
        (count, sum, buckets)
    }
}

/// Counts of one endpoint's attempts and outcomes (or of every endpoint past the series limit).
#[derive(Debug, Default)]
pub struct EndpointStats {
    /// Attempts that sent a request.
    pub attempts: AtomicU64,
    /// Deliveries the endpoint accepted (2xx).
    pub delivered: AtomicU64,
    /// Deliveries given up: permanent failure or retries exhausted.
    pub dead_lettered: AtomicU64,
    /// Deliveries that outlived the maximum event age.
    pub expired: AtomicU64,
    /// Failed attempts and decisions, by [`ErrorKind`] in [`ErrorKind::ALL`] order.
    pub failures: [AtomicU64; ErrorKind::ALL.len()],
}

/// The endpoints that have series of their own, and the shared series of the rest.
#[derive(Debug)]
pub struct EndpointTable {
    max_series: usize,
    own: Mutex<HashMap<String, Arc<EndpointStats>>>,
    other: Arc<EndpointStats>,
    /// Lookups of an endpoint id that got no series of its own.
    overflowed: AtomicU64,
}

impl EndpointTable {
    fn new(max_series: usize) -> Self {
        EndpointTable {
            max_series,
            own: Mutex::new(HashMap::new()),
            other: Arc::new(EndpointStats::default()),
            overflowed: AtomicU64::new(0),
        }
    }

    /// Returns the stats of `endpoint_id`, giving it series of its own while fewer than the
    /// limit have them, and the shared `other` stats after that.
    pub fn stats(&self, endpoint_id: &str) -> Arc<EndpointStats> {
        let mut own = self.own.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(stats) = own.get(endpoint_id) {
            return stats.clone();
        }
        if own.len() < self.max_series && endpoint_id != OTHER_ENDPOINT {
            let stats = Arc::new(EndpointStats::default());
            own.insert(endpoint_id.to_string(), stats.clone());
            return stats;
        }
        self.overflowed.fetch_add(1, Ordering::Relaxed);
        self.other.clone()
    }

    /// Returns the label value of `endpoint_id` without giving it a series.
    fn label<'a>(
        &self,
        own: &HashMap<String, Arc<EndpointStats>>,
        endpoint_id: &'a str,
    ) -> &'a str {
        if own.contains_key(endpoint_id) {
            endpoint_id
        } else {
            OTHER_ENDPOINT
        }
    }
}

/// A worker's copy of the endpoint table entries it has used, so that recording a row takes
/// no lock once the endpoint has been seen.
pub type EndpointCache = HashMap<String, Arc<EndpointStats>>;

/// One partition's offsets as the source and the checkpoint know them.
#[derive(Debug, Default)]
pub struct PartitionOffsets {
    /// The log end: the offset the next appended record will get, as last queried.
    pub end: AtomicU64,
    /// The settled offset: every record below it is delivered, dead-lettered or durably
    /// pending, and a restart reads from it.
    pub settled: AtomicU64,
}

/// A worker's dataflow progress as its loop last saw it, for the readiness check.
#[derive(Debug)]
pub struct WorkerProgress {
    /// The probe frontier; `u64::MAX` when empty (the dataflow has completed).
    frontier: AtomicU64,
    /// When the frontier last moved, in ms.
    moved_at_ms: AtomicU64,
    /// Records read and not yet settled.
    outstanding: AtomicUsize,
}

impl WorkerProgress {
    fn new() -> Self {
        WorkerProgress {
            frontier: AtomicU64::new(0),
            moved_at_ms: AtomicU64::new(0),
            outstanding: AtomicUsize::new(0),
        }
    }

    /// Records the probe frontier (`None` when empty) and the outstanding record count.
    pub fn observe(&self, frontier: Option<u64>, outstanding: usize, now_ms: u64) {
        let frontier = frontier.unwrap_or(u64::MAX);
        if self.frontier.swap(frontier, Ordering::Relaxed) != frontier
            || self.moved_at_ms.load(Ordering::Relaxed) == 0
        {
            self.moved_at_ms.store(now_ms.max(1), Ordering::Relaxed);
        }
        self.outstanding.store(outstanding, Ordering::Relaxed);
    }

    /// Returns whether this worker has records outstanding and a frontier that has not moved
    /// for more than `stall_ms`.
    fn is_stalled(&self, now_ms: u64, stall_ms: u64) -> bool {
        let moved_at = self.moved_at_ms.load(Ordering::Relaxed);
        self.outstanding.load(Ordering::Relaxed) > 0
            && moved_at > 0
            && now_ms.saturating_sub(moved_at) > stall_ms
    }
}

/// Every metric of one hookflow process. Shared as `Arc<Metrics>` by the workers, the worker
/// loop and the HTTP server.
#[derive(Debug)]
pub struct Metrics {
    /// Records read from the source, valid or not. A record read again after a restart
    /// counts again.
    pub events_ingested: AtomicU64,
    /// Events dropped as repeats of a (tenant, id) already seen; the dedup operator's count.
    pub events_deduplicated: Arc<AtomicU64>,
    /// Records that could not be decoded into an event, dead-lettered.
    pub events_invalid: AtomicU64,
    /// Events no endpoint subscribes to.
    pub events_unrouted: AtomicU64,
    /// Per-endpoint attempt and outcome counts.
    pub endpoints: EndpointTable,
    /// Time from a request's start to its response or error.
    pub delivery_latency: LatencyHistogram,
    /// Time from an event's append to the source to its delivery, retries included.
    pub end_to_end_latency: LatencyHistogram,
    /// Requests started and not yet turned into rows; the deliver operator's count.
    pub requests_in_flight: Arc<AtomicUsize>,
    /// Deliveries waiting for a later attempt (a retry or a rate-limit slot), as of the last
    /// count of the state store.
    pub retries_pending: AtomicU64,
    /// Deliveries parked because their endpoint is disabled, as of the last count.
    pub deliveries_parked: AtomicU64,
    /// Per-partition offsets, set once the partition count is known.
    partitions: OnceLock<Vec<PartitionOffsets>>,
    /// Attempt rows written to Parquet files.
    pub archive_rows_written: AtomicU64,
    /// Parquet files completed.
    pub archive_files_written: AtomicU64,
    /// The deliver operator's decisions about endpoints.
    pub deliver: Arc<DeliverCounters>,
    /// Whether the source can be read.
    pub source: Arc<SourceStatus>,
    /// Each worker's progress, by local worker index.
    workers: Vec<WorkerProgress>,
    /// How long a worker's frontier may stand still while it has records outstanding, in ms.
    stall_ms: u64,
    /// 1 when the last readiness check passed, 0 when it failed; set by each check.
    pub ready: AtomicU64,
    /// The alerts raised and the operational events published.
    pub alerts: Arc<crate::alerts::AlertCounters>,
    /// Counts of the HTTP API's work: ingest, resends, endpoint changes.
    pub api: Arc<crate::http::ApiCounters>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new(DEFAULT_MAX_ENDPOINT_SERIES, 1, 60_000)
    }
}

impl Metrics {
    /// Creates the metrics of a process with `workers` local workers, giving the first
    /// `max_endpoint_series` endpoints series of their own, and counting a worker as stalled
    /// when its frontier does not advance for more than `stall_ms` with records outstanding.
    pub fn new(max_endpoint_series: usize, workers: usize, stall_ms: u64) -> Self {
        Metrics {
            events_ingested: AtomicU64::new(0),
            events_deduplicated: Arc::new(AtomicU64::new(0)),
            events_invalid: AtomicU64::new(0),
            events_unrouted: AtomicU64::new(0),
            endpoints: EndpointTable::new(max_endpoint_series),
            delivery_latency: LatencyHistogram::new(DELIVERY_LATENCY_BOUNDS_MS),
            end_to_end_latency: LatencyHistogram::new(END_TO_END_BOUNDS_MS),
            requests_in_flight: Arc::new(AtomicUsize::new(0)),
            retries_pending: AtomicU64::new(0),
            deliveries_parked: AtomicU64::new(0),
            partitions: OnceLock::new(),
            archive_rows_written: AtomicU64::new(0),
            archive_files_written: AtomicU64::new(0),
            deliver: Arc::new(DeliverCounters::default()),
            source: Arc::new(SourceStatus::default()),
            workers: (0..workers.max(1)).map(|_| WorkerProgress::new()).collect(),
            stall_ms,
            ready: AtomicU64::new(1),
            alerts: Arc::default(),
            api: Arc::default(),
        }
    }

    /// Sets the partition count; later calls are ignored, because it cannot change while
    /// the source is open.
    pub fn set_partitions(&self, partitions: u32) {
        let _ = self.partitions.set(
            (0..partitions)
                .map(|_| PartitionOffsets::default())
                .collect(),
        );
    }

    /// Returns the offsets of `partition`, once the partition count is set.
    pub fn partition(&self, partition: u32) -> Option<&PartitionOffsets> {
        self.partitions.get()?.get(partition as usize)
    }

    /// Returns the progress of local worker `index`.
    pub fn worker(&self, index: usize) -> Option<&WorkerProgress> {
        self.workers.get(index)
    }

    /// Returns the number of workers whose frontier has stood still for longer than the
    /// stall limit while they had records outstanding.
    pub fn stalled_workers(&self, now_ms: u64) -> usize {
        self.workers
            .iter()
            .filter(|worker| worker.is_stalled(now_ms, self.stall_ms))
            .count()
    }

    /// Counts the outcomes of attempt rows the durable sink has written.
    pub fn record_rows(&self, rows: &[AttemptRow], cache: &mut EndpointCache) {
        for row in rows {
            self.record_row(row, cache);
        }
    }

    fn record_row(&self, row: &AttemptRow, cache: &mut EndpointCache) {
        let outcome = row.outcome.as_str();
        if outcome == Outcome::Invalid.as_str() {
            self.events_invalid.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if outcome == Outcome::Unrouted.as_str() {
            self.events_unrouted.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let Some(endpoint_id) = row.endpoint_id.as_deref() else {
            return;
        };
        let stats = match cache.get(endpoint_id) {
            Some(stats) => stats,
            None => cache
                .entry(endpoint_id.to_string())
                .or_insert_with(|| self.endpoints.stats(endpoint_id)),
        };

        if row.started_at_ms.is_some() {
            stats.attempts.fetch_add(1, Ordering::Relaxed);
            if let Some(latency_ms) = row.latency_ms {
                self.delivery_latency.observe_ms(latency_ms);
            }
        }
        if outcome == Outcome::Delivered.as_str() {
            stats.delivered.fetch_add(1, Ordering::Relaxed);
            if let Some(ingested_at_ms) = row.ingested_at_ms {
                self.end_to_end_latency
                    .observe_ms(row.finished_at_ms.saturating_sub(ingested_at_ms));
            }
            return;
        }
        if let Some(index) = row
            .error_kind
            .as_deref()
            .and_then(|name| ErrorKind::ALL.iter().position(|kind| kind.as_str() == name))
        {
            stats.failures[index].fetch_add(1, Ordering::Relaxed);
        }
        if outcome == Outcome::DeadLettered.as_str() {
            stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
        } else if outcome == Outcome::Expired.as_str() {
            stats.expired.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Writes every metric in the Prometheus text format 0.0.4.
    ///
    /// # Errors
    ///
    /// Fails only if `writer` fails.
    pub fn encode(self: &Arc<Self>, writer: &mut impl fmt::Write) -> fmt::Result {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(MetricsCollector {
            metrics: self.clone(),
            now_ms: wall_clock_ms(),
        }));
        prometheus_client::encoding::prometheus_text::encode(writer, &registry)
    }
}

/// The wall clock in ms, for the stall check of a scrape.
fn wall_clock_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as u64)
}

/// Encodes [`Metrics`] at scrape time.
#[derive(Debug)]
struct MetricsCollector {
    metrics: Arc<Metrics>,
    now_ms: u64,
}

/// Encodes one unlabelled counter; `name` has no `_total`, which the encoder appends.
fn counter(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> fmt::Result {
    let metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    ConstCounter::new(value).encode(metric)
}

/// Encodes one unlabelled gauge.
fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: i64) -> fmt::Result {
    let metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    ConstGauge::new(value).encode(metric)
}

/// Encodes one histogram without labels.
fn histogram(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    histogram: &LatencyHistogram,
) -> fmt::Result {
    let (count, sum, buckets) = histogram.snapshot();
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
    metric.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
}

/// Encodes a counter family with one series per label set.
fn counter_family<'a>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: impl Iterator<Item = (Vec<(&'static str, &'a str)>, u64)>,
) -> fmt::Result {
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in series {
        ConstCounter::new(value).encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

/// Encodes a gauge family with one series per label set.
fn gauge_family(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: impl Iterator<Item = (Vec<(&'static str, String)>, i64)>,
) -> fmt::Result {
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in series {
        ConstGauge::new(value).encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

fn load(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

fn as_gauge(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

impl Collector for MetricsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let m = &self.metrics;
        self.encode_events(&mut encoder)?;
        self.encode_endpoints(&mut encoder)?;

        histogram(
            &mut encoder,
            "hookflow_delivery_latency_seconds",
            "Time from a request's start to its response or error.",
            &m.delivery_latency,
        )?;
        histogram(
            &mut encoder,
            "hookflow_end_to_end_latency_seconds",
            "Time from an event's append to the source to its delivery, retries included.",
            &m.end_to_end_latency,
        )?;
        gauge(
            &mut encoder,
            "hookflow_retries_pending",
            "Deliveries waiting in the state store for a later attempt (retry or rate-limit slot), as of the last count.",
            as_gauge(load(&m.retries_pending)),
        )?;
        gauge(
            &mut encoder,
            "hookflow_parked_deliveries",
            "Deliveries parked because their endpoint is disabled, as of the last count.",
            as_gauge(load(&m.deliveries_parked)),
        )?;
        gauge(
            &mut encoder,
            "hookflow_requests_in_flight",
            "HTTP requests started and not yet finished.",
            as_gauge(m.requests_in_flight.load(Ordering::Relaxed) as u64),
        )?;

        self.encode_source(&mut encoder)?;

        counter(
            &mut encoder,
            "hookflow_archive_rows_written",
            "Attempt rows written to Parquet files.",
            load(&m.archive_rows_written),
        )?;
        counter(
            &mut encoder,
            "hookflow_archive_files_written",
            "Parquet files of the attempt archive completed.",
            load(&m.archive_files_written),
        )?;

        self.encode_breakers(&mut encoder)?;
        gauge(
            &mut encoder,
            "hookflow_dataflow_stalled_workers",
            "Workers whose dataflow frontier has not moved within the stall limit while records are outstanding.",
            as_gauge(m.stalled_workers(self.now_ms) as u64),
        )?;
        self.encode_alerts_and_api(&mut encoder)?;
        gauge(
            &mut encoder,
            "hookflow_ready",
            "1 when the readiness checks of /health/ready passed at the last check (every scrape runs them), 0 when one failed.",
            as_gauge(load(&m.ready)),
        )
    }
}

/// Picks one counter out of an endpoint's stats.
type StatsField = fn(&EndpointStats) -> &AtomicU64;

impl MetricsCollector {
    fn encode_alerts_and_api(&self, encoder: &mut DescriptorEncoder) -> fmt::Result {
        let alerts = &self.metrics.alerts;
        let api = &self.metrics.api;
        let totals = [
            (
                "hookflow_alerts_endpoints_failing",
                "endpoint.failing alerts raised.",
                &alerts.endpoints_failing,
            ),
            (
                "hookflow_alerts_endpoints_recovered",
                "endpoint.recovered alerts raised.",
                &alerts.endpoints_recovered,
            ),
            (
                "hookflow_alerts_breakers_opened",
                "Breaker openings alerted on (at most one per endpoint per window).",
                &alerts.breakers_opened,
            ),
            (
                "hookflow_alerts_endpoints_disabled",
                "endpoint.disabled alerts raised.",
                &alerts.endpoints_disabled,
            ),
            (
                "hookflow_alerts_pipeline_lagging",
                "pipeline.lagging alerts raised.",
                &alerts.pipeline_lagging,
            ),
            (
                "hookflow_alerts_pipeline_recovered",
                "pipeline.recovered alerts raised.",
                &alerts.pipeline_recovered,
            ),
            (
                "hookflow_operational_events_published",
                "Operational events appended to the source.",
                &alerts.events_published,
            ),
            (
                "hookflow_operational_event_publish_failures",
                "Appends of operational events that failed (each is retried).",
                &alerts.publish_failures,
            ),
            (
                "hookflow_operational_events_dropped",
                "Operational events dropped because too many waited for the source.",
                &alerts.events_dropped,
            ),
            (
                "hookflow_ingest_accepted",
                "Events accepted by POST /v1/events and appended to the source.",
                &api.ingest_accepted,
            ),
            (
                "hookflow_ingest_repeated",
                "Posts of a (tenant, id) accepted before, answered with the original acceptance.",
                &api.ingest_repeated,
            ),
            (
                "hookflow_ingest_rejected",
                "Posts to /v1/events rejected as invalid, nothing appended.",
                &api.ingest_rejected,
            ),
            (
                "hookflow_resent_events",
                "Events appended by resends, each a delivery generation of its own.",
                &api.resent_events,
            ),
            (
                "hookflow_endpoint_changes",
                "Endpoint creations, updates and deletions absorbed by the dataflow.",
                &api.endpoint_changes,
            ),
        ];
        for (name, help, value) in totals {
            counter(encoder, name, help, load(value))?;
        }
        gauge(
            encoder,
            "hookflow_endpoints_failing",
            "Endpoints whose failure ratio is above alerts.failing_percent now, as this process judges them.",
            alerts.failing_now.load(Ordering::Relaxed),
        )?;
        let metric = encoder.encode_descriptor(
            "hookflow_oldest_overdue_delivery_seconds",
            "How long the oldest overdue pending delivery has been due at the last check; 0 when none is.",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(load(&alerts.oldest_overdue_ms) as f64 / 1000.0).encode(metric)
    }

    fn encode_events(&self, encoder: &mut DescriptorEncoder) -> fmt::Result {
        let m = &self.metrics;
        counter(
            encoder,
            "hookflow_events_ingested",
            "Records read from the source, valid or not.",
            load(&m.events_ingested),
        )?;
        counter(
            encoder,
            "hookflow_events_deduplicated",
            "Events dropped as repeats of a (tenant, id) already seen.",
            load(&m.events_deduplicated),
        )?;
        counter(
            encoder,
            "hookflow_events_invalid",
            "Records that could not be decoded into an event, dead-lettered.",
            load(&m.events_invalid),
        )?;
        counter(
            encoder,
            "hookflow_events_unrouted",
            "Events no endpoint subscribes to.",
            load(&m.events_unrouted),
        )
    }

    fn encode_endpoints(&self, encoder: &mut DescriptorEncoder) -> fmt::Result {
        let table = &self.metrics.endpoints;
        let mut series: Vec<(String, Arc<EndpointStats>)> = table
            .own
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(id, stats)| (id.clone(), stats.clone()))
            .collect();
        series.sort_by(|a, b| a.0.cmp(&b.0));
        series.push((OTHER_ENDPOINT.to_string(), table.other.clone()));

        let simple: [(&str, &str, StatsField); 4] = [
            (
                "hookflow_delivery_attempts",
                "Delivery attempts that sent a request, by endpoint.",
                |stats| &stats.attempts,
            ),
            (
                "hookflow_deliveries_delivered",
                "Deliveries the endpoint accepted with a 2xx status, by endpoint.",
                |stats| &stats.delivered,
            ),
            (
                "hookflow_deliveries_dead_lettered",
                "Deliveries given up (permanent failure or retries exhausted), by endpoint.",
                |stats| &stats.dead_lettered,
            ),
            (
                "hookflow_deliveries_expired",
                "Deliveries that outlived the maximum event age, by endpoint.",
                |stats| &stats.expired,
            ),
        ];
        for (name, help, field) in simple {
            counter_family(
                encoder,
                name,
                help,
                series
                    .iter()
                    .map(|(id, stats)| (vec![("endpoint", id.as_str())], load(field(stats)))),
            )?;
        }

        // Only kinds that occurred get a series, so an endpoint costs no more than it fails.
        counter_family(
            encoder,
            "hookflow_delivery_failures",
            "Failed attempts and deliveries given up without a request, by endpoint and error kind.",
            series.iter().flat_map(|(id, stats)| {
                ErrorKind::ALL
                    .iter()
                    .zip(stats.failures.iter())
                    .filter(|(_, count)| load(count) > 0)
                    .map(move |(kind, count)| {
                        (
                            vec![("endpoint", id.as_str()), ("error_kind", kind.as_str())],
                            load(count),
                        )
                    })
            }),
        )?;
        counter(
            encoder,
            "hookflow_endpoint_series_overflow",
            "Rows counted under endpoint=\"other\" because metrics.max_endpoint_series endpoints already have series.",
            load(&table.overflowed),
        )
    }

    fn encode_source(&self, encoder: &mut DescriptorEncoder) -> fmt::Result {
        let m = &self.metrics;
        gauge(
            encoder,
            "hookflow_source_up",
            "1 when the last read of the source succeeded, 0 when it failed.",
            i64::from(m.source.is_up()),
        )?;
        let partitions: &[PartitionOffsets] = m.partitions.get().map_or(&[], Vec::as_slice);
        let label = |index: usize| vec![("partition", index.to_string())];
        gauge_family(
            encoder,
            "hookflow_source_end_offset",
            "The log end of each partition: the offset the next appended record will get.",
            partitions
                .iter()
                .enumerate()
                .map(|(index, offsets)| (label(index), as_gauge(load(&offsets.end)))),
        )?;
        gauge_family(
            encoder,
            "hookflow_source_settled_offset",
            "The settled offset of each partition: every record below it is delivered, dead-lettered or durably pending.",
            partitions
                .iter()
                .enumerate()
                .map(|(index, offsets)| (label(index), as_gauge(load(&offsets.settled)))),
        )?;
        gauge_family(
            encoder,
            "hookflow_source_lag_offsets",
            "Records of each partition not yet settled: the log end minus the settled offset.",
            partitions.iter().enumerate().map(|(index, offsets)| {
                let lag = load(&offsets.end).saturating_sub(load(&offsets.settled));
                (label(index), as_gauge(lag))
            }),
        )
    }

    fn encode_breakers(&self, encoder: &mut DescriptorEncoder) -> fmt::Result {
        let deliver = &self.metrics.deliver;
        let totals = [
            (
                "hookflow_breakers_opened",
                "Circuit breakers opened, counting a reopening after a failed probe.",
                &deliver.breakers_opened,
            ),
            (
                "hookflow_breakers_closed",
                "Circuit breakers closed by a successful probe.",
                &deliver.breakers_closed,
            ),
            (
                "hookflow_endpoints_disabled",
                "Endpoints disabled at run time (410 Gone, or failing too long).",
                &deliver.endpoints_disabled,
            ),
            (
                "hookflow_deliveries_parked",
                "Deliveries parked because their endpoint is disabled.",
                &deliver.deliveries_parked,
            ),
            (
                "hookflow_throttled_responses",
                "429 Too Many Requests responses.",
                &deliver.throttled,
            ),
            (
                "hookflow_retry_after_invalid",
                "Retry-After values that were not valid and counted as absent.",
                &deliver.retry_after_invalid,
            ),
            (
                "hookflow_retry_after_capped",
                "Valid Retry-After values above the maximum pause, capped.",
                &deliver.retry_after_capped,
            ),
        ];
        for (name, help, value) in totals {
            counter(encoder, name, help, load(value))?;
        }

        let own = self
            .metrics
            .endpoints
            .own
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let per_endpoint = |set: &Mutex<std::collections::BTreeSet<String>>| {
            let ids = set.lock().unwrap_or_else(PoisonError::into_inner);
            let mut counts: std::collections::BTreeMap<String, i64> =
                std::collections::BTreeMap::new();
            for id in ids.iter() {
                *counts
                    .entry(self.metrics.endpoints.label(&own, id).to_string())
                    .or_default() += 1;
            }
            counts
        };
        let open = per_endpoint(&deliver.open_breakers);
        let disabled = per_endpoint(&deliver.disabled_endpoints);
        gauge_family(
            encoder,
            "hookflow_endpoint_breaker_open",
            "1 while the endpoint's circuit breaker is open or half-open; for endpoint=\"other\", how many of those endpoints.",
            open.into_iter()
                .map(|(id, count)| (vec![("endpoint", id)], count)),
        )?;
        gauge_family(
            encoder,
            "hookflow_endpoint_disabled",
            "1 while the endpoint is disabled; for endpoint=\"other\", how many of those endpoints.",
            disabled
                .into_iter()
                .map(|(id, count)| (vec![("endpoint", id)], count)),
        )
    }
}

// The integration tests' reader of a Prometheus exposition.
#[cfg(test)]
#[path = "../tests/support/exposition.rs"]
mod exposition;

#[cfg(test)]
mod tests {
    use super::exposition::value;
    use super::*;

    fn row(endpoint: &str, outcome: Outcome, error_kind: Option<ErrorKind>) -> AttemptRow {
        AttemptRow {
            endpoint_id: Some(endpoint.to_string()),
            outcome: outcome.as_str().to_string(),
            error_kind: error_kind.map(|kind| kind.as_str().to_string()),
            started_at_ms: Some(1_000),
            latency_ms: Some(20),
            ingested_at_ms: Some(500),
            finished_at_ms: 1_020,
            ..AttemptRow::default()
        }
    }

    fn scrape(metrics: &Arc<Metrics>) -> prometheus_parse::Scrape {
        let mut text = String::new();
        metrics.encode(&mut text).expect("encoding into a String");
        exposition::parse(&text)
    }

    #[test]
    fn endpoints_past_limit_share_other() {
        let metrics = Arc::new(Metrics::new(2, 1, 1_000));
        let mut cache = EndpointCache::new();
        let rows = [
            row("a", Outcome::Delivered, None),
            row("b", Outcome::Failed, Some(ErrorKind::Timeout)),
            row("c", Outcome::Delivered, None),
            row("d", Outcome::DeadLettered, Some(ErrorKind::ClientError)),
        ];
        metrics.record_rows(&rows, &mut cache);
        let scrape = scrape(&metrics);

        let delivered = "hookflow_deliveries_delivered_total";
        assert_eq!(value(&scrape, delivered, &[("endpoint", "a")]), Some(1.0));
        assert_eq!(
            value(&scrape, delivered, &[("endpoint", "other")]),
            Some(1.0)
        );
        assert_eq!(value(&scrape, delivered, &[("endpoint", "c")]), None);
        assert_eq!(
            value(
                &scrape,
                "hookflow_delivery_failures_total",
                &[("endpoint", "b"), ("error_kind", "timeout")]
            ),
            Some(1.0)
        );
        assert_eq!(
            value(
                &scrape,
                "hookflow_delivery_failures_total",
                &[("endpoint", "other"), ("error_kind", "client_error")]
            ),
            Some(1.0)
        );
        assert_eq!(
            value(
                &scrape,
                "hookflow_deliveries_dead_lettered_total",
                &[("endpoint", "other")]
            ),
            Some(1.0)
        );
        assert_eq!(
            value(
                &scrape,
                "hookflow_delivery_attempts_total",
                &[("endpoint", "b")]
            ),
            Some(1.0)
        );
        assert_eq!(
            value(&scrape, "hookflow_endpoint_series_overflow_total", &[]),
            Some(2.0)
        );
    }

    #[test]
    fn invalid_and_unrouted_rows_counted() {
        let metrics = Arc::new(Metrics::default());
        let mut cache = EndpointCache::new();
        let invalid = AttemptRow {
            outcome: Outcome::Invalid.as_str().to_string(),
            ..AttemptRow::default()
        };
        let unrouted = AttemptRow {
            outcome: Outcome::Unrouted.as_str().to_string(),
            ..AttemptRow::default()
        };
        metrics.record_rows(&[invalid, unrouted.clone(), unrouted], &mut cache);
        let scrape = scrape(&metrics);

        assert_eq!(
            value(&scrape, "hookflow_events_invalid_total", &[]),
            Some(1.0)
        );
        assert_eq!(
            value(&scrape, "hookflow_events_unrouted_total", &[]),
            Some(2.0)
        );
        assert!(cache.is_empty());
    }

    #[test]
    fn histogram_buckets_by_bound() {
        let histogram = LatencyHistogram::new(DELIVERY_LATENCY_BOUNDS_MS);
        for ms in [1, 5, 6, 40_000] {
            histogram.observe_ms(ms);
        }
        let (count, sum, buckets) = histogram.snapshot();

        assert_eq!(count, 4);
        assert!((sum - 40.012).abs() < 1e-9);
        assert_eq!(buckets[0], (0.005, 2));
        assert_eq!(buckets[1], (0.01, 1));
        assert_eq!(buckets.last().map(|b| b.1), Some(1));
        assert!(buckets.last().is_some_and(|b| b.0.is_infinite()));
    }

    #[test]
    fn histogram_scrape_is_cumulative() {
        let metrics = Arc::new(Metrics::default());
        for ms in [1, 5, 6, 40_000] {
            metrics.delivery_latency.observe_ms(ms);
        }
        let scrape = scrape(&metrics);
        let buckets = scrape
            .samples
            .iter()
            .find_map(|sample| match (&sample.metric[..], &sample.value) {
                (
                    "hookflow_delivery_latency_seconds",
                    prometheus_parse::Value::Histogram(buckets),
                ) => Some(buckets.clone()),
                _ => None,
            })
            .expect("a delivery latency histogram");

        assert_eq!(buckets[0].less_than, 0.005);
        assert_eq!(buckets[0].count, 2.0);
        assert_eq!(buckets[1].count, 3.0);
        assert_eq!(buckets.last().map(|b| b.count), Some(4.0));
        assert_eq!(
            value(&scrape, "hookflow_delivery_latency_seconds_count", &[]),
            Some(4.0)
        );
    }

    #[test]
    fn breaker_and_disabled_gauges() {
        let metrics = Arc::new(Metrics::new(1, 1, 1_000));
        metrics.endpoints.stats("a");
        DeliverCounters::set_member(&metrics.deliver.open_breakers, "a", true);
        DeliverCounters::set_member(&metrics.deliver.open_breakers, "x", true);
        DeliverCounters::set_member(&metrics.deliver.open_breakers, "y", true);
        DeliverCounters::set_member(&metrics.deliver.disabled_endpoints, "y", true);
        DeliverCounters::set_member(&metrics.deliver.open_breakers, "y", false);
        let scrape = scrape(&metrics);

        let open = "hookflow_endpoint_breaker_open";
        assert_eq!(value(&scrape, open, &[("endpoint", "a")]), Some(1.0));
        assert_eq!(value(&scrape, open, &[("endpoint", "other")]), Some(1.0));
        assert_eq!(
            value(
                &scrape,
                "hookflow_endpoint_disabled",
                &[("endpoint", "other")]
            ),
            Some(1.0)
        );
        assert_eq!(
            value(&scrape, "hookflow_endpoint_disabled", &[("endpoint", "a")]),
            None
        );
    }

    #[test]
    fn stalled_worker_needs_outstanding_records() {
        let metrics = Metrics::new(10, 2, 1_000);
        let (idle, busy) = (
            metrics.worker(0).expect("worker 0"),
            metrics.worker(1).expect("worker 1"),
        );
        idle.observe(Some(5), 0, 10_000);
        busy.observe(Some(5), 3, 10_000);

        assert_eq!(metrics.stalled_workers(10_500), 0);
        assert_eq!(metrics.stalled_workers(11_500), 1);
        busy.observe(Some(6), 3, 11_600);
        assert_eq!(metrics.stalled_workers(11_700), 0);
    }
}
