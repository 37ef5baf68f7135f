//! Operational alerts: the `[alerts]` configuration, the signals the deliver operator's
//! output gives the alert operators, the pipeline-lag check, and the operational events that
//! every transition becomes.
//!
//! In: the deliver operator's [`Attempted`] records (split here into what the durable sink
//! takes, the retries, and the [`EndpointSignal`]s), the alerts computed by
//! [`hookflow_operators::alerts`], and, for the lag check, the state store's overdue pending
//! deliveries. Out: for each transition a log line, a count in [`AlertCounters`], and an
//! event appended to the source under the operator tenant. Failing, breaker opened and
//! lagging log at WARN, disabled at ERROR, recovered at INFO. The pipeline then reads,
//! routes and delivers the event like any other.
//!
//! ```text
//! event type               when
//! endpoint.failing         failure ratio over the window at or above failing_percent
//! endpoint.recovered       a failing endpoint's ratio below recovered_percent
//! endpoint.breaker_opened  circuit breaker opened (at most once per endpoint per window)
//! endpoint.disabled        endpoint disabled (410 Gone, failing too long)
//! pipeline.lagging         the oldest overdue pending delivery is older than the threshold
//! pipeline.recovered       no overdue delivery older than the threshold any more
//! ```
//!
//! An event's id is derived from what it reports: its type, the endpoint (or the process for
//! the pipeline) and the start of the window-long bucket holding the transition (the
//! disabling time for `endpoint.disabled`). Dedup drops a repeat of that id, so a restart
//! that sees the same transition again in the same bucket does not publish it twice.
//! Endpoints of the operator tenant are never alerted on, so an operator endpoint that fails
//! cannot feed alerts about itself.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hookflow_connectors::{DisabledEndpoint, StateStore};
use hookflow_operators::alerts::{AlertKind, AlertPolicy, EndpointAlert, EndpointSignal};
use hookflow_operators::clock::Clock;
use hookflow_operators::deliver::Attempted;
use hookflow_schemas::{fnv1a, AttemptRow, Delivery, ErrorKind, Millis, Outcome};
use serde::Deserialize;
use serde_json::json;
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::builder_rc::OperatorBuilder;
use timely::dataflow::operators::generic::{Operator, OutputBuilder};
use timely::dataflow::Stream;

use crate::durable::Durable;
use crate::publish::{Appender, PublishTarget};

/// The maximum length of an event id the source accepts, in bytes.
const MAX_EVENT_ID_BYTES: usize = 255;

/// The maximum number of operational events waiting to be appended. Past it the oldest are
/// dropped and counted, so a source that stays down does not grow memory without bound.
const MAX_UNPUBLISHED: usize = 10_000;

/// The first and longest wait before appending again after a failure, in ms.
const APPEND_RETRY_MS: (u64, u64) = (500, 30_000);

/// `[alerts]`: operational events about endpoints and the pipeline.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    /// Compute alerts and publish them as events. Default false.
    pub enabled: bool,
    /// The tenant the operational events are published under; its endpoints receive them
    /// and are never alerted on. Required when enabled.
    pub operator_tenant: String,
    /// Length of the sliding window of the failure ratio, in seconds. Default 300.
    pub window_secs: u64,
    /// Attempts the window must hold before an endpoint can be failing. Default 10.
    pub min_attempts: u64,
    /// Percentage of failed attempts at or above which an endpoint is failing, 1 to 100.
    /// Default 50.
    pub failing_percent: u8,
    /// Percentage of failed attempts below which a failing endpoint has recovered, 1 to
    /// `failing_percent`. Default 10.
    pub recovered_percent: u8,
    /// The pipeline is lagging when a pending delivery has been overdue for longer than
    /// this, in seconds. Default 300.
    pub lag_threshold_secs: u64,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        let policy = AlertPolicy::default();
        AlertsConfig {
            enabled: false,
            operator_tenant: String::new(),
            window_secs: policy.window_ms / 1000,
            min_attempts: policy.min_attempts,
            failing_percent: policy.failing_percent,
            recovered_percent: policy.recovered_percent,
            lag_threshold_secs: 300,
        }
    }
}

impl AlertsConfig {
    /// Returns the thresholds and window of the failure ratio.
    pub fn policy(&self) -> AlertPolicy {
        AlertPolicy {
            window_ms: self.window_secs.saturating_mul(1000),
            min_attempts: self.min_attempts,
            failing_percent: self.failing_percent,
            recovered_percent: self.recovered_percent,
        }
    }

    /// Checks every field, returning the first bad one (as a TOML path) and its problem.
    ///
    /// # Errors
    ///
    /// See above; nothing is checked when alerts are disabled.
    pub fn validate(&self) -> Result<(), (String, String)> {
        if !self.enabled {
            return Ok(());
        }
        let tenant = &self.operator_tenant;
        if tenant.is_empty() {
            return Err((
                "alerts.operator_tenant".into(),
                "must name the tenant operational events are published under, such as \"ops\""
                    .into(),
            ));
        }
        if tenant.len() > MAX_EVENT_ID_BYTES || tenant.chars().any(char::is_control) {
            return Err((
                "alerts.operator_tenant".into(),
                "must be at most 255 bytes without control characters".into(),
            ));
        }
        let at_least_one = [
            ("alerts.window_secs", self.window_secs),
            ("alerts.min_attempts", self.min_attempts),
            ("alerts.lag_threshold_secs", self.lag_threshold_secs),
        ];
        for (field, value) in at_least_one {
            if value == 0 {
                return Err((field.into(), "must be at least 1".into()));
            }
        }
        if !(1..=100).contains(&self.failing_percent) {
            return Err((
                "alerts.failing_percent".into(),
                "must be between 1 and 100".into(),
            ));
        }
        if self.recovered_percent == 0 || self.recovered_percent > self.failing_percent {
            return Err((
                "alerts.recovered_percent".into(),
                format!(
                    "must be between 1 and alerts.failing_percent ({})",
                    self.failing_percent
                ),
            ));
        }
        Ok(())
    }
}

/// Counts of the alerts raised and published, over every worker of the process. Gauges are
/// marked as such; everything else only grows.
#[derive(Debug, Default)]
pub struct AlertCounters {
    /// Endpoints that became failing.
    pub endpoints_failing: AtomicU64,
    /// Failing endpoints that recovered.
    pub endpoints_recovered: AtomicU64,
    /// Breaker openings alerted on (at most one per endpoint per window).
    pub breakers_opened: AtomicU64,
    /// Endpoints disabled.
    pub endpoints_disabled: AtomicU64,
    /// Gauge: endpoints failing now, as this process's alerts judge them.
    pub failing_now: AtomicI64,
    /// `pipeline.lagging` events raised.
    pub pipeline_lagging: AtomicU64,
    /// `pipeline.recovered` events raised.
    pub pipeline_recovered: AtomicU64,
    /// Gauge: how long the oldest overdue pending delivery has been due, in ms, at the last
    /// check (0 when none is overdue).
    pub oldest_overdue_ms: AtomicU64,
    /// Operational events appended to the source.
    pub events_published: AtomicU64,
    /// Appends that failed (each is retried).
    pub publish_failures: AtomicU64,
    /// Operational events dropped because too many waited for the source.
    pub events_dropped: AtomicU64,
}

impl AlertCounters {
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// An operational event, as appended to the source.
#[derive(Debug, Clone, PartialEq)]
pub struct OperationalEvent {
    /// The event id, derived from what the event reports.
    pub id: String,
    /// The operator tenant.
    pub tenant: String,
    /// `endpoint.failing`, `pipeline.lagging`, ...
    pub event_type: String,
    /// When the transition happened, in ms.
    pub at_ms: Millis,
    /// The payload.
    pub payload: serde_json::Value,
}

impl OperationalEvent {
    /// Builds the event of an endpoint alert.
    pub fn from_alert(alert: &EndpointAlert, operator_tenant: &str) -> OperationalEvent {
        let event_type = alert.kind.event_type();
        let moment = match alert.kind {
            AlertKind::Disabled => alert.at_ms,
            _ => alert.bucket_start_ms(),
        };
        let payload = json!({
            "endpoint_id": alert.endpoint_id,
            "tenant": alert.tenant,
            "attempts": alert.attempts,
            "failures": alert.failures,
            "failure_percent": (alert.failure_percent() * 10.0).round() / 10.0,
            "window_secs": alert.window_ms / 1000,
            "at": rfc3339(alert.at_ms),
            "since": rfc3339(alert.since_ms),
            "reason": alert.reason,
        });
        OperationalEvent {
            id: event_id(event_type, &alert.endpoint_id, moment),
            tenant: operator_tenant.to_string(),
            event_type: event_type.to_string(),
            at_ms: alert.at_ms,
            payload,
        }
    }

    /// Returns the NDJSON line of the event, in the format producers publish.
    pub fn to_line(&self) -> Vec<u8> {
        let line = json!({
            "id": self.id,
            "tenant": self.tenant,
            "type": self.event_type,
            "created_at": rfc3339(self.at_ms),
            "payload": self.payload,
        });
        line.to_string().into_bytes()
    }
}

/// Returns `<type>:<subject>:<moment>`, with the subject replaced by its hash when the id
/// would be longer than the source accepts.
fn event_id(event_type: &str, subject: &str, moment: Millis) -> String {
    let id = format!("{event_type}:{subject}:{moment}");
    if id.len() <= MAX_EVENT_ID_BYTES {
        return id;
    }
    format!("{event_type}:{:016x}:{moment}", fnv1a(subject.as_bytes()))
}

/// Formats ms since the Unix epoch as RFC 3339 UTC.
fn rfc3339(ms: Millis) -> String {
    let nanos = i128::from(ms) * 1_000_000;
    time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()
        .and_then(|moment| {
            moment
                .format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| "1970-01-01T00:00:00Z".to_string())
}

/// The destination of operational events: the source the pipeline reads.
pub trait EventAppender {
    /// Appends `records`, each (partition key, NDJSON line), all or none.
    ///
    /// # Errors
    ///
    /// A description of the failure; nothing was appended.
    fn append(&mut self, records: &[(&[u8], &[u8])], now_ms: Millis) -> Result<(), String>;
}

impl EventAppender for Appender {
    fn append(&mut self, records: &[(&[u8], &[u8])], now_ms: Millis) -> Result<(), String> {
        Appender::append(self, records, now_ms)
            .map(|_| ())
            .map_err(|error| format!("{error:#}"))
    }
}

/// Opens an appender on the configured source; each worker that publishes opens its own.
pub fn source_appender(
    target: PublishTarget,
) -> impl FnMut() -> Result<Box<dyn EventAppender>, String> {
    move || {
        Appender::open(&target)
            .map(|appender| Box::new(appender) as Box<dyn EventAppender>)
            .map_err(|error| format!("{error:#}"))
    }
}

/// Appends operational events to the source, keyed by their tenant like any event. This is
/// the one place events leave for the source, so another source plugs in here.
///
/// # Errors
///
/// The appender's error; none of `events` was appended.
pub fn publish_events(
    appender: &mut dyn EventAppender,
    events: &[OperationalEvent],
    now_ms: Millis,
) -> Result<(), String> {
    let lines: Vec<Vec<u8>> = events.iter().map(OperationalEvent::to_line).collect();
    let records: Vec<(&[u8], &[u8])> = events
        .iter()
        .zip(&lines)
        .map(|(event, line)| (event.tenant.as_bytes(), line.as_slice()))
        .collect();
    appender.append(&records, now_ms)
}

/// Appends `events` through `appender`, opening it first if needed. An appender that failed
/// is dropped, so the next call opens a fresh one.
fn append_opening(
    appender: &mut Option<Box<dyn EventAppender>>,
    open: &mut dyn FnMut() -> Result<Box<dyn EventAppender>, String>,
    events: &[OperationalEvent],
    now_ms: Millis,
) -> Result<(), String> {
    let target = match appender {
        Some(target) => target,
        None => appender.insert(open()?),
    };
    let result = publish_events(target.as_mut(), events, now_ms);
    if result.is_err() {
        *appender = None;
    }
    result
}

/// Logs an endpoint alert at its level and counts it.
fn report_alert(alert: &EndpointAlert, counters: &AlertCounters) {
    let percent = alert.failure_percent();
    match alert.kind {
        AlertKind::Failing => {
            AlertCounters::bump(&counters.endpoints_failing);
            counters.failing_now.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                endpoint_id = %alert.endpoint_id,
                tenant = %alert.tenant,
                attempts = alert.attempts,
                failures = alert.failures,
                failure_percent = percent,
                window_secs = alert.window_ms / 1000,
                "Endpoint is failing."
            );
        }
        AlertKind::Recovered => {
            AlertCounters::bump(&counters.endpoints_recovered);
            counters.failing_now.fetch_sub(1, Ordering::Relaxed);
            tracing::info!(
                endpoint_id = %alert.endpoint_id,
                tenant = %alert.tenant,
                attempts = alert.attempts,
                failures = alert.failures,
                failure_percent = percent,
                failing_for_secs = alert.at_ms.saturating_sub(alert.since_ms) / 1000,
                "Endpoint recovered."
            );
        }
        AlertKind::BreakerOpened => {
            AlertCounters::bump(&counters.breakers_opened);
            tracing::warn!(
                endpoint_id = %alert.endpoint_id,
                tenant = %alert.tenant,
                attempts = alert.attempts,
                failures = alert.failures,
                reason = alert.reason.as_deref().unwrap_or_default(),
                "Endpoint's circuit breaker opened."
            );
        }
        AlertKind::Disabled => {
            AlertCounters::bump(&counters.endpoints_disabled);
            tracing::error!(
                endpoint_id = %alert.endpoint_id,
                tenant = %alert.tenant,
                reason = alert.reason.as_deref().unwrap_or_default(),
                "Endpoint disabled; its deliveries stay parked until an operator enables it."
            );
        }
    }
}

/// Opens an appender on the source, or returns why it cannot.
pub type OpenAppender = Box<dyn FnMut() -> Result<Box<dyn EventAppender>, String>>;

/// The settings that turn deliver records into alert signals.
#[derive(Clone)]
pub struct SignalFilter {
    /// The operator tenant, whose endpoints are never alerted on.
    pub operator_tenant: String,
}

impl SignalFilter {
    /// Returns the signal a deliver record gives, if any: HTTP attempts (a 429 counts as
    /// neither failure nor success, as for the breaker), breaker openings and disablings of
    /// endpoints outside the operator tenant.
    pub fn signal(&self, record: &Attempted) -> Option<EndpointSignal> {
        let signal = match record {
            Attempted::Row(row) => attempt_signal(row)?,
            Attempted::BreakerOpened(opened) => EndpointSignal::BreakerOpened {
                tenant: opened.tenant.clone()?,
                endpoint_id: opened.endpoint_id.clone(),
                at_ms: opened.at_ms,
                until_ms: opened.until_ms,
                failures: opened.failures,
                attempts: opened.attempts,
            },
            Attempted::EndpointDisabled(disabled) => EndpointSignal::Disabled {
                tenant: disabled.tenant.clone()?,
                endpoint_id: disabled.endpoint_id.clone(),
                at_ms: disabled.at_ms,
                reason: disabled.reason.clone(),
            },
            Attempted::Retry(_) | Attempted::Pending(_) => return None,
        };
        let tenant = match &signal {
            EndpointSignal::Attempt { tenant, .. }
            | EndpointSignal::BreakerOpened { tenant, .. }
            | EndpointSignal::Disabled { tenant, .. } => tenant,
        };
        (*tenant != self.operator_tenant).then_some(signal)
    }
}

/// Returns the signal of an attempt row, if it records an HTTP request.
fn attempt_signal(row: &AttemptRow) -> Option<EndpointSignal> {
    if row.attempt == 0 || row.started_at_ms.is_none() {
        return None;
    }
    if row.error_kind.as_deref() == Some(ErrorKind::Throttled.as_str()) {
        return None;
    }
    Some(EndpointSignal::Attempt {
        endpoint_id: row.endpoint_id.clone()?,
        tenant: row.tenant.clone()?,
        failed: row.outcome != Outcome::Delivered.as_str(),
        finished_at_ms: row.finished_at_ms,
    })
}

/// The three streams the deliver operator's output splits into.
pub type SplitAttempted<'scope> = (
    Stream<'scope, u64, Vec<Durable>>,
    Stream<'scope, u64, Vec<Delivery>>,
    Stream<'scope, u64, Vec<EndpointSignal>>,
);

/// Splits the deliver operator's records into what the durable sink writes, the retries for
/// the feedback edge, and, when `filter` is given, the alert signals. A signal is taken by
/// reference from the record, so no row is copied.
pub fn split_attempted<'scope>(
    attempted: Stream<'scope, u64, Vec<Attempted>>,
    filter: Option<SignalFilter>,
) -> SplitAttempted<'scope> {
    let mut builder = OperatorBuilder::new("SplitAttempted".to_owned(), attempted.scope());
    let mut input = builder.new_input(attempted, Pipeline);
    let (durable_output, durable) = builder.new_output();
    let (retry_output, retries) = builder.new_output();
    let (signal_output, signals) = builder.new_output();
    let mut durable_output =
        OutputBuilder::<_, CapacityContainerBuilder<Vec<Durable>>>::from(durable_output);
    let mut retry_output =
        OutputBuilder::<_, CapacityContainerBuilder<Vec<Delivery>>>::from(retry_output);
    let mut signal_output =
        OutputBuilder::<_, CapacityContainerBuilder<Vec<EndpointSignal>>>::from(signal_output);

    builder.build(move |_capabilities| {
        move |_frontiers| {
            let mut durable_handle = durable_output.activate();
            let mut retry_handle = retry_output.activate();
            let mut signal_handle = signal_output.activate();
            input.for_each_stamp(|capability, containers| {
                let mut durable = durable_handle.session(&capability);
                let mut retries = retry_handle.session(&capability);
                let mut signals = signal_handle.session(&capability);
                for record in containers.flat_map(|container| container.drain(..)) {
                    if let Some(signal) = filter.as_ref().and_then(|filter| filter.signal(&record))
                    {
                        signals.give(signal);
                    }
                    match record {
                        Attempted::Row(row) => durable.give(Durable::Row(row)),
                        Attempted::Pending(pending) => durable.give(Durable::Pending(pending)),
                        Attempted::EndpointDisabled(disabled) => {
                            durable.give(Durable::EndpointDisabled(DisabledEndpoint {
                                endpoint_id: disabled.endpoint_id,
                                disabled_at_ms: disabled.at_ms,
                                reason: disabled.reason,
                            }))
                        }
                        Attempted::BreakerOpened(_) => {}
                        Attempted::Retry(delivery) => retries.give(delivery),
                    }
                }
            });
        }
    });
    (durable, retries, signals)
}

/// Logs, counts and publishes each alert on the worker that raised it. An append that fails
/// is retried with backoff, and the alerts wait in memory meanwhile (at most
/// [`MAX_UNPUBLISHED`]). The returned stream carries nothing and need not be consumed.
pub fn publish_alerts<'scope>(
    alerts: Stream<'scope, u64, Vec<EndpointAlert>>,
    mut open_appender: impl FnMut() -> Result<Box<dyn EventAppender>, String> + 'static,
    operator_tenant: String,
    counters: Arc<AlertCounters>,
    clock: Arc<dyn Clock>,
) -> Stream<'scope, u64, Vec<()>> {
    let scope = alerts.scope();
    alerts.unary_frontier::<CapacityContainerBuilder<Vec<()>>, _, _, _>(
        Pipeline,
        "PublishAlerts",
        move |_capability, info| {
            let activator = scope.activator_for(info.address);
            // Events not yet appended, oldest first.
            let mut unpublished: VecDeque<OperationalEvent> = VecDeque::new();
            let mut appender: Option<Box<dyn EventAppender>> = None;
            let mut retry_ms = APPEND_RETRY_MS.0;
            let mut retry_at: Millis = 0;

            move |(input, _frontier), _output| {
                input.for_each_stamp(|_capability, containers| {
                    for alert in containers.flat_map(|container| container.drain(..)) {
                        report_alert(&alert, &counters);
                        unpublished
                            .push_back(OperationalEvent::from_alert(&alert, &operator_tenant));
                    }
                });
                while unpublished.len() > MAX_UNPUBLISHED {
                    unpublished.pop_front();
                    AlertCounters::bump(&counters.events_dropped);
                }

                let now = clock.now_ms();
                if unpublished.is_empty() || now < retry_at {
                    return;
                }
                let events: Vec<OperationalEvent> = unpublished.iter().cloned().collect();
                match append_opening(&mut appender, &mut open_appender, &events, now) {
                    Ok(()) => {
                        counters
                            .events_published
                            .fetch_add(unpublished.len() as u64, Ordering::Relaxed);
                        unpublished.clear();
                        retry_ms = APPEND_RETRY_MS.0;
                    }
                    Err(error) => {
                        AlertCounters::bump(&counters.publish_failures);
                        tracing::error!(
                            %error,
                            waiting = unpublished.len(),
                            retry_in_ms = retry_ms,
                            "Appending operational events to the source failed; retrying."
                        );
                        retry_at = now.saturating_add(retry_ms);
                        activator.activate_after(Duration::from_millis(retry_ms));
                        retry_ms = (retry_ms * 2).min(APPEND_RETRY_MS.1);
                    }
                }
            }
        },
    )
}

/// The pipeline-lag check of one process: run by the first worker of each process over its
/// own state store.
pub struct LagMonitor {
    threshold_ms: u64,
    check_every_ms: u64,
    next_check_ms: Millis,
    process_index: usize,
    operator_tenant: String,
    /// When the current lag began to exceed the threshold, while it does.
    lagging_since_ms: Option<Millis>,
    /// The start of the threshold-long bucket of the last `pipeline.lagging` event.
    last_alert_bucket: Option<Millis>,
    counters: Arc<AlertCounters>,
    appender: Option<Box<dyn EventAppender>>,
    open_appender: OpenAppender,
    /// Events whose append failed, appended before any newer one.
    unpublished: Vec<OperationalEvent>,
}

impl LagMonitor {
    /// Creates the check, first due at `now_ms` plus one check interval.
    pub fn new(
        config: &AlertsConfig,
        process_index: usize,
        counters: Arc<AlertCounters>,
        open_appender: OpenAppender,
        now_ms: Millis,
    ) -> LagMonitor {
        let threshold_ms = config.lag_threshold_secs.saturating_mul(1000).max(1);
        // Four checks per threshold, so a lag is seen at most a quarter threshold late.
        let check_every_ms = (threshold_ms / 4).clamp(250, 30_000);
        LagMonitor {
            threshold_ms,
            check_every_ms,
            next_check_ms: now_ms.saturating_add(check_every_ms),
            process_index,
            operator_tenant: config.operator_tenant.clone(),
            lagging_since_ms: None,
            last_alert_bucket: None,
            counters,
            appender: None,
            open_appender,
            unpublished: Vec::new(),
        }
    }

    /// Checks the store's overdue deliveries when a check is due, and publishes the events
    /// that the result calls for.
    pub fn tick(&mut self, store: &StateStore, now_ms: Millis) {
        if now_ms < self.next_check_ms {
            return;
        }
        self.next_check_ms = now_ms.saturating_add(self.check_every_ms);
        let (earliest_due, overdue) = match store.overdue(now_ms) {
            Ok(found) => found,
            Err(error) => {
                tracing::error!(error = %format!("{error:#}"), "Reading overdue deliveries for the lag check failed; retrying at the next check.");
                return;
            }
        };
        let lag_ms = earliest_due.map_or(0, |due| now_ms.saturating_sub(due));
        self.counters
            .oldest_overdue_ms
            .store(lag_ms, Ordering::Relaxed);
        if let Some(event) = self.assess(lag_ms, overdue, now_ms) {
            self.unpublished.push(event);
        }
        self.flush(now_ms);
    }

    /// Returns the event a lag of `lag_ms` over `overdue` deliveries calls for, updating the
    /// state: a `pipeline.lagging` at most once per threshold-long bucket while the lag
    /// lasts, and a `pipeline.recovered` when it ends.
    fn assess(&mut self, lag_ms: u64, overdue: u64, now_ms: Millis) -> Option<OperationalEvent> {
        let subject = format!("process-{}", self.process_index);
        if lag_ms <= self.threshold_ms {
            let since = self.lagging_since_ms.take()?;
            self.last_alert_bucket = None;
            AlertCounters::bump(&self.counters.pipeline_recovered);
            tracing::info!(
                process = self.process_index,
                lagged_for_secs = now_ms.saturating_sub(since) / 1000,
                "Pipeline caught up: no delivery overdue longer than the threshold."
            );
            return Some(OperationalEvent {
                id: event_id("pipeline.recovered", &subject, since),
                tenant: self.operator_tenant.clone(),
                event_type: "pipeline.recovered".to_string(),
                at_ms: now_ms,
                payload: json!({
                    "process": self.process_index,
                    "since": rfc3339(since),
                    "at": rfc3339(now_ms),
                    "lag_threshold_secs": self.threshold_ms / 1000,
                }),
            });
        }

        let since = *self
            .lagging_since_ms
            .get_or_insert(now_ms.saturating_sub(lag_ms.saturating_sub(self.threshold_ms)));
        let bucket = now_ms - now_ms % self.threshold_ms;
        if self.last_alert_bucket == Some(bucket) {
            return None;
        }
        self.last_alert_bucket = Some(bucket);
        AlertCounters::bump(&self.counters.pipeline_lagging);
        tracing::warn!(
            process = self.process_index,
            lag_secs = lag_ms / 1000,
            overdue_deliveries = overdue,
            lag_threshold_secs = self.threshold_ms / 1000,
            "Pipeline is lagging: a pending delivery is overdue longer than the threshold."
        );
        Some(OperationalEvent {
            id: event_id("pipeline.lagging", &subject, bucket),
            tenant: self.operator_tenant.clone(),
            event_type: "pipeline.lagging".to_string(),
            at_ms: now_ms,
            payload: json!({
                "process": self.process_index,
                "lag_secs": lag_ms / 1000,
                "overdue_deliveries": overdue,
                "oldest_due": rfc3339(now_ms.saturating_sub(lag_ms)),
                "since": rfc3339(since),
                "at": rfc3339(now_ms),
                "lag_threshold_secs": self.threshold_ms / 1000,
            }),
        })
    }

    /// Appends the events waiting, keeping them for the next check when that fails.
    fn flush(&mut self, now_ms: Millis) {
        if self.unpublished.is_empty() {
            return;
        }
        let result = append_opening(
            &mut self.appender,
            self.open_appender.as_mut(),
            &self.unpublished,
            now_ms,
        );
        match result {
            Ok(()) => {
                self.counters
                    .events_published
                    .fetch_add(self.unpublished.len() as u64, Ordering::Relaxed);
                self.unpublished.clear();
            }
            Err(error) => {
                AlertCounters::bump(&self.counters.publish_failures);
                tracing::error!(%error, waiting = self.unpublished.len(), "Appending a pipeline event to the source failed; retrying at the next check.");
                if self.unpublished.len() > MAX_UNPUBLISHED {
                    let excess = self.unpublished.len() - MAX_UNPUBLISHED;
                    self.unpublished.drain(..excess);
                    self.counters
                        .events_dropped
                        .fetch_add(excess as u64, Ordering::Relaxed);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::rc::Rc;

    use super::*;

    fn config() -> AlertsConfig {
        AlertsConfig {
            enabled: true,
            operator_tenant: "ops".into(),
            ..AlertsConfig::default()
        }
    }

    #[test]
    fn config_fields_are_checked() {
        assert_eq!(config().validate(), Ok(()));
        assert_eq!(
            AlertsConfig::default().validate(),
            Ok(()),
            "disabled needs nothing"
        );
        let cases: [(AlertsConfig, &str); 6] = [
            (
                AlertsConfig {
                    operator_tenant: String::new(),
                    ..config()
                },
                "alerts.operator_tenant",
            ),
            (
                AlertsConfig {
                    window_secs: 0,
                    ..config()
                },
                "alerts.window_secs",
            ),
            (
                AlertsConfig {
                    min_attempts: 0,
                    ..config()
                },
                "alerts.min_attempts",
            ),
            (
                AlertsConfig {
                    failing_percent: 101,
                    ..config()
                },
                "alerts.failing_percent",
            ),
            (
                AlertsConfig {
                    failing_percent: 40,
                    recovered_percent: 41,
                    ..config()
                },
                "alerts.recovered_percent",
            ),
            (
                AlertsConfig {
                    lag_threshold_secs: 0,
                    ..config()
                },
                "alerts.lag_threshold_secs",
            ),
        ];
        for (bad, field) in cases {
            let error = bad.validate().expect_err(field);
            assert_eq!(error.0, field, "{}", error.1);
        }
    }

    #[test]
    fn event_line_decodes_as_an_event() {
        let alert = EndpointAlert {
            kind: AlertKind::Failing,
            endpoint_id: "ep_1".into(),
            tenant: "acme".into(),
            at_ms: 1_764_000_123_456,
            attempts: 12,
            failures: 9,
            window_ms: 60_000,
            since_ms: 1_764_000_123_456,
            reason: None,
        };
        let event = OperationalEvent::from_alert(&alert, "ops");
        assert_eq!(event.id, "endpoint.failing:ep_1:1764000120000");
        let decoded =
            hookflow_schemas::decode_event(&event.to_line(), 1 << 20).expect("valid event");
        assert_eq!(decoded.tenant, "ops");
        assert_eq!(decoded.event_type, "endpoint.failing");
        assert_eq!(decoded.id, event.id);
        let payload: serde_json::Value = serde_json::from_slice(&decoded.payload).expect("JSON");
        assert_eq!(payload["endpoint_id"], "ep_1");
        assert_eq!(payload["tenant"], "acme");
        assert_eq!(payload["failure_percent"], 75.0);
        assert_eq!(payload["window_secs"], 60);
        assert_eq!(payload["since"], "2025-11-24T16:02:03.456Z");
    }

    #[test]
    fn long_endpoint_id_is_hashed_in_event_id() {
        let long = "e".repeat(300);
        let id = event_id("endpoint.failing", &long, 7);
        assert!(id.len() <= MAX_EVENT_ID_BYTES, "{id}");
        assert!(id.starts_with("endpoint.failing:"), "{id}");
        assert!(id.ends_with(":7"), "{id}");
    }

    /// Records what is appended, and fails while `failing` is set.
    #[derive(Default)]
    struct Recorder {
        lines: Rc<RefCell<Vec<String>>>,
        failing: Rc<RefCell<bool>>,
    }

    impl EventAppender for Recorder {
        fn append(&mut self, records: &[(&[u8], &[u8])], _now_ms: Millis) -> Result<(), String> {
            if *self.failing.borrow() {
                return Err("source down".into());
            }
            for (_, line) in records {
                self.lines
                    .borrow_mut()
                    .push(String::from_utf8_lossy(line).into_owned());
            }
            Ok(())
        }
    }

    #[test]
    fn lag_alerts_once_per_threshold_then_recovers() {
        let lines = Rc::new(RefCell::new(Vec::new()));
        let failing = Rc::new(RefCell::new(false));
        let (shared_lines, shared_failing) = (lines.clone(), failing.clone());
        let counters = Arc::new(AlertCounters::default());
        let mut monitor = LagMonitor::new(
            &AlertsConfig {
                lag_threshold_secs: 10,
                ..config()
            },
            0,
            counters.clone(),
            Box::new(move || {
                Ok(Box::new(Recorder {
                    lines: shared_lines.clone(),
                    failing: shared_failing.clone(),
                }) as Box<dyn EventAppender>)
            }),
            0,
        );
        let types = |lines: &Rc<RefCell<Vec<String>>>| -> Vec<String> {
            lines
                .borrow()
                .iter()
                .map(|line| {
                    let value: serde_json::Value = serde_json::from_str(line).expect("JSON");
                    value["type"].as_str().unwrap_or_default().to_string()
                })
                .collect()
        };

        assert!(
            monitor.assess(10_000, 1, 100_000).is_none(),
            "at the threshold is not lagging"
        );
        let first = monitor.assess(10_001, 1, 100_000).expect("lagging");
        assert_eq!(first.event_type, "pipeline.lagging");
        assert!(
            monitor.assess(15_000, 2, 105_000).is_none(),
            "same threshold bucket"
        );
        let second = monitor.assess(25_000, 2, 110_000).expect("next bucket");
        assert_ne!(first.id, second.id);
        let recovered = monitor.assess(0, 0, 111_000).expect("recovered");
        assert_eq!(recovered.event_type, "pipeline.recovered");
        assert!(monitor.assess(0, 0, 112_000).is_none(), "recovered once");
        assert_eq!(counters.pipeline_lagging.load(Ordering::Relaxed), 2);
        assert_eq!(counters.pipeline_recovered.load(Ordering::Relaxed), 1);

        // A failed append keeps the event for the next check.
        *failing.borrow_mut() = true;
        monitor.unpublished.push(first);
        monitor.flush(120_000);
        assert!(types(&lines).is_empty());
        assert_eq!(counters.publish_failures.load(Ordering::Relaxed), 1);
        *failing.borrow_mut() = false;
        monitor.unpublished.push(recovered);
        monitor.flush(121_000);
        assert_eq!(types(&lines), ["pipeline.lagging", "pipeline.recovered"]);
        assert_eq!(counters.events_published.load(Ordering::Relaxed), 2);
    }
}
