//! Selection: which archived deliveries or events a replay covers, and the plan that sends
//! them.
//!
//! In: a [`Selection`] (filters and mode), the archive, the config's endpoints and the
//! source holding the original records. Out: a [`Plan`], one [`PlanItem`] per event with the
//! endpoints it goes to, and a [`PlanSummary`] that the dry run prints.
//!
//! # Contract
//!
//! * The state of a delivery (tenant, event id, endpoint) is its latest generation's final
//!   row: `delivered`, `dead_lettered` or `expired`. A generation with only `failed` rows is
//!   still retrying and is never selected, so a replay does not race the pipeline's own
//!   retries.
//! * Time bounds apply to the original event's `ingested_at` (when the log appended it).
//! * Redeliver mode (no target): each selected delivery goes back to its own endpoint, which
//!   must still be configured and subscribed to the event's type.
//! * Backfill mode (`to_endpoint`): every selected event of the target's tenant and types goes
//!   to the target, except those whose latest delivery to it is delivered or still retrying.
//! * Every planned event's original record is read back from the source, and its payload's
//!   SHA-256 checked against the archive's `body_sha256` where the archive has one; an event
//!   whose record is gone or differs is skipped and counted, never re-serialized.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use arrow::array::RecordBatch;
use hookflow_connectors::Source;
use hookflow_schemas::{decode_event, EventTypePattern, Millis, Outcome};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::ToolConfig;
use crate::scan::{scan_archive, text, value, Columns, RowGroupBounds, ScanOptions, ScanStats};
use crate::timespec::utc_date;
use crate::{ReplayError, Result};

/// The final state a delivery must be in to be selected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum OutcomeFilter {
    /// Delivered (2xx) in its latest generation.
    Delivered,
    /// Dead-lettered in its latest generation.
    DeadLettered,
    /// Expired (older than the maximum event age) in its latest generation.
    Expired,
    /// Not delivered in the end: dead-lettered or expired.
    Failed,
    /// No endpoint subscribed to the event (backfill mode only).
    Unrouted,
}

impl OutcomeFilter {
    /// Returns whether a delivery whose latest generation ended with `outcome` matches.
    fn matches(self, outcome: &str) -> bool {
        let dead = Outcome::DeadLettered.as_str();
        let expired = Outcome::Expired.as_str();
        match self {
            OutcomeFilter::Delivered => outcome == Outcome::Delivered.as_str(),
            OutcomeFilter::DeadLettered => outcome == dead,
            OutcomeFilter::Expired => outcome == expired,
            OutcomeFilter::Failed => outcome == dead || outcome == expired,
            OutcomeFilter::Unrouted => false,
        }
    }
}

/// The filters and mode of a replay. Every filter set must hold (they combine with AND).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Selection {
    /// Events appended to the log at or after this time (ms).
    pub since_ms: Option<Millis>,
    /// Events appended to the log at or before this time (ms).
    pub until_ms: Option<Millis>,
    /// Events of this tenant.
    pub tenant: Option<String>,
    /// Deliveries to this endpoint (in backfill mode: events that had a delivery to it).
    pub endpoint: Option<String>,
    /// Events whose type matches this pattern (`*`, `prefix.*` or exact).
    pub event_type: Option<String>,
    /// Deliveries in this final state (in backfill mode: events with such a delivery).
    pub outcome: Option<OutcomeFilter>,
    /// Only these event ids.
    pub event_ids: Option<BTreeSet<String>>,
    /// Backfill mode: send every selected event to this endpoint instead.
    pub to_endpoint: Option<String>,
}

/// One event to republish and the endpoints it goes to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanItem {
    /// The event's tenant.
    pub tenant: String,
    /// The event's id.
    pub event_id: String,
    /// The event's type.
    pub event_type: String,
    /// The partition of the original record.
    pub partition: u32,
    /// The offset of the original record.
    pub offset: u64,
    /// When the log appended the original record (ms).
    pub ingested_at_ms: Option<Millis>,
    /// The endpoints to deliver to.
    pub endpoints: Vec<String>,
    /// The payload's SHA-256 as archived, when an attempt recorded it.
    pub body_sha256: Option<String>,
}

/// Per-endpoint figures of a plan.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointPlan {
    /// Deliveries to the endpoint.
    pub deliveries: u64,
    /// The first few event ids.
    pub samples: Vec<String>,
}

/// Counts of what a plan leaves out, by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Skipped {
    /// Deliveries whose latest generation is still retrying.
    pub still_retrying: u64,
    /// Backfill: events the target has already received.
    pub already_delivered: u64,
    /// Deliveries to an endpoint no longer configured, or no longer subscribed to the type.
    pub not_subscribed: u64,
    /// Events whose original record is no longer in the log (past its retention).
    pub payload_gone: u64,
    /// Events whose record in the log does not match the archive (other id or body hash).
    pub payload_changed: u64,
}

/// The counts a plan covers: the dry run's output.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanSummary {
    /// Events to republish.
    pub events: u64,
    /// Deliveries those events make.
    pub deliveries: u64,
    /// Deliveries by endpoint id.
    pub endpoints: BTreeMap<String, EndpointPlan>,
    /// The counts left out.
    pub skipped: Skipped,
    /// The highest generation found in the rows read.
    pub max_generation_seen: u32,
    /// The archive scan's counts.
    pub scan: ScanStats,
}

/// The events a replay sends, in the order their originals were appended.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// One entry per event.
    pub items: Vec<PlanItem>,
    /// Counts for the dry run.
    pub summary: PlanSummary,
}

/// How many event ids each endpoint's summary lists.
const SAMPLES_PER_ENDPOINT: usize = 3;

/// The columns selection reads.
const COLUMNS: &[&str] = &[
    "event_id",
    "tenant",
    "endpoint_id",
    "event_type",
    "generation",
    "partition",
    "offset",
    "ingested_at",
    "finished_at",
    "outcome",
    "body_sha256",
];

/// An original event as its generation-0 rows describe it.
#[derive(Debug, Clone)]
struct EventInfo {
    event_type: String,
    partition: u32,
    offset: u64,
    ingested_at_ms: Option<Millis>,
    unrouted: bool,
}

/// A delivery's latest generation and, once it has one, its final outcome there.
#[derive(Debug, Clone, Default)]
struct DeliveryState {
    generation: u32,
    final_outcome: Option<(Millis, String)>,
}

impl DeliveryState {
    fn observe(&mut self, generation: u32, outcome: &str, finished_at_ms: Millis) {
        if generation < self.generation {
            return;
        }
        if generation > self.generation {
            *self = DeliveryState {
                generation,
                final_outcome: None,
            };
        }
        let terminal = outcome != Outcome::Failed.as_str();
        let later = self
            .final_outcome
            .as_ref()
            .is_none_or(|(at, _)| finished_at_ms >= *at);
        if terminal && later {
            self.final_outcome = Some((finished_at_ms, outcome.to_string()));
        }
    }

    fn outcome(&self) -> Option<&str> {
        self.final_outcome
            .as_ref()
            .map(|(_, outcome)| outcome.as_str())
    }
}

/// (tenant, event id).
type EventKey = (String, String);

/// The events, delivery states and body hashes the scan collects.
#[derive(Default)]
struct Collected {
    events: HashMap<EventKey, EventInfo>,
    deliveries: HashMap<EventKey, BTreeMap<String, DeliveryState>>,
    hashes: HashMap<EventKey, String>,
    max_generation: u32,
}

/// Builds the plan of `selection`: scans the archive under `archive_dir` and checks every
/// planned event's record in `source`.
///
/// # Errors
///
/// Fails if the selection is inconsistent (a backfill target that is not configured, another
/// tenant than the target's, `unrouted` without a target, a bad pattern), or the archive or
/// the source cannot be read.
pub fn build_plan(
    selection: &Selection,
    config: &ToolConfig,
    archive_dir: &Path,
    source: &mut dyn Source,
) -> Result<Plan> {
    let pattern = selection
        .event_type
        .as_deref()
        .map(EventTypePattern::parse)
        .transpose()
        .map_err(|e| ReplayError::Invalid(format!("invalid --event-type: {e}")))?;
    let target = match &selection.to_endpoint {
        None => None,
        Some(id) => Some(config.endpoint(id).ok_or_else(|| {
            ReplayError::Invalid(format!(
                "backfill target endpoint `{id}` is not in the config file; add it there (and \
                 to the running pipeline) first"
            ))
        })?),
    };
    let tenant = match (&selection.tenant, target) {
        (Some(tenant), Some(target)) if *tenant != target.tenant => {
            return Err(ReplayError::Invalid(format!(
                "--tenant {tenant} differs from the tenant of endpoint {} ({}); an endpoint \
                 receives only its own tenant's events",
                target.id, target.tenant
            )))
        }
        (Some(tenant), _) => Some(tenant.clone()),
        (None, Some(target)) => Some(target.tenant.clone()),
        (None, None) => None,
    };
    if target.is_none() && selection.outcome == Some(OutcomeFilter::Unrouted) {
        return Err(ReplayError::Invalid(
            "--outcome unrouted needs --to-endpoint: unrouted events have no endpoint to go \
             back to"
                .into(),
        ));
    }
    if target.is_none() && selection.outcome.is_none() {
        return Err(ReplayError::Invalid(
            "choose what to redeliver with --outcome (failed, dead-lettered, expired, \
             delivered), or backfill an endpoint with --to-endpoint"
                .into(),
        ));
    }

    let filter = RowFilter {
        selection,
        tenant: tenant.as_deref(),
        pattern: pattern.as_ref(),
        // In backfill mode the target's rows and unrouted rows matter, not only the filter's.
        endpoint: if target.is_none() {
            selection.endpoint.as_deref()
        } else {
            None
        },
    };
    let options = ScanOptions {
        columns: COLUMNS,
        // A row finishes after its event was appended, so nothing selected or needed for the
        // state of a selected delivery is in a directory before the first day.
        first_date: selection.since_ms.map(utc_date),
        last_date: None,
    };
    let mut collected = Collected::default();
    let scan = scan_archive(
        archive_dir,
        &options,
        &|bounds| filter.keep_row_group(bounds),
        &mut |batch, path| filter.collect(batch, path, &mut collected),
    )?;

    let mut plan = match target {
        Some(target) => plan_backfill(selection, target, &collected),
        None => plan_redeliver(selection, config, &collected),
    };
    plan.summary.scan = scan;
    plan.summary.max_generation_seen = collected.max_generation;
    check_payloads(&mut plan, source)?;
    plan.items.sort_by(|a, b| {
        (a.ingested_at_ms, a.partition, a.offset).cmp(&(b.ingested_at_ms, b.partition, b.offset))
    });
    summarize(&mut plan);
    Ok(plan)
}

/// The exact row filters, and the row-group predicate derived from them.
struct RowFilter<'a> {
    selection: &'a Selection,
    tenant: Option<&'a str>,
    pattern: Option<&'a EventTypePattern>,
    endpoint: Option<&'a str>,
}

impl RowFilter<'_> {
    fn keep_row_group(&self, bounds: &RowGroupBounds<'_>) -> bool {
        let tenant = self.tenant.is_none_or(|t| bounds.may_contain("tenant", t));
        let endpoint = self
            .endpoint
            .is_none_or(|e| bounds.may_contain("endpoint_id", e));
        let ids = match (&self.selection.event_ids, bounds.bytes_range("event_id")) {
            (Some(ids), Some((min, max))) => ids
                .iter()
                .any(|id| min <= id.as_bytes() && id.as_bytes() <= max),
            _ => true,
        };
        let in_time = bounds.int_range("ingested_at").is_none_or(|(min, max)| {
            let since = self.selection.since_ms.and_then(|s| i64::try_from(s).ok());
            let until = self.selection.until_ms.and_then(|u| i64::try_from(u).ok());
            since.is_none_or(|s| max >= s) && until.is_none_or(|u| min <= u)
        });
        // Replay rows (generation > 0) carry the replay's own append time, and are needed for
        // the state of selected deliveries whatever their time.
        let has_replays = bounds
            .int_range("generation")
            .is_none_or(|(_, max)| max > 0);
        tenant && endpoint && ids && (in_time || has_replays)
    }

    fn collect(&self, batch: &RecordBatch, path: &Path, into: &mut Collected) -> Result<()> {
        let columns = Columns::new(batch, path);
        let event_ids = columns.strings("event_id")?;
        let tenants = columns.strings("tenant")?;
        let endpoints = columns.strings("endpoint_id")?;
        let types = columns.strings("event_type")?;
        let generations = columns.u32s("generation")?;
        let partitions = columns.u32s("partition")?;
        let offsets = columns.u64s("offset")?;
        let ingested = columns.times("ingested_at")?;
        let finished = columns.times("finished_at")?;
        let outcomes = columns.strings("outcome")?;
        let hashes = columns.strings("body_sha256")?;

        for row in 0..batch.num_rows() {
            let (Some(event_id), Some(tenant)) = (text(event_ids, row), text(tenants, row)) else {
                continue;
            };
            let outcome = text(outcomes, row).unwrap_or_default();
            // An invalid record never became an event, so there is nothing to replay.
            if outcome == Outcome::Invalid.as_str() {
                continue;
            }
            if self.tenant.is_some_and(|t| t != tenant)
                || self
                    .selection
                    .event_ids
                    .as_ref()
                    .is_some_and(|ids| !ids.contains(event_id))
            {
                continue;
            }
            let key = (tenant.to_string(), event_id.to_string());
            let generation = value(generations, row).unwrap_or(0);
            into.max_generation = into.max_generation.max(generation);
            if let Some(hash) = text(hashes, row) {
                into.hashes
                    .entry(key.clone())
                    .or_insert_with(|| hash.to_string());
            }
            let finished_at_ms = value(finished, row).and_then(|t| u64::try_from(t).ok());
            if let Some(endpoint) = text(endpoints, row) {
                into.deliveries
                    .entry(key.clone())
                    .or_default()
                    .entry(endpoint.to_string())
                    .or_default()
                    .observe(generation, outcome, finished_at_ms.unwrap_or(0));
            }
            if generation != 0 {
                continue;
            }

            let ingested_at_ms = value(ingested, row).and_then(|t| u64::try_from(t).ok());
            let in_time = match ingested_at_ms {
                Some(at) => {
                    self.selection.since_ms.is_none_or(|s| at >= s)
                        && self.selection.until_ms.is_none_or(|u| at <= u)
                }
                None => self.selection.since_ms.is_none() && self.selection.until_ms.is_none(),
            };
            let event_type = text(types, row).unwrap_or_default();
            let type_matches = self.pattern.is_none_or(|p| p.matches(event_type));
            if !in_time || !type_matches {
                continue;
            }
            let (Some(partition), Some(offset)) = (value(partitions, row), value(offsets, row))
            else {
                continue;
            };
            let info = into.events.entry(key).or_insert_with(|| EventInfo {
                event_type: event_type.to_string(),
                partition,
                offset,
                ingested_at_ms,
                unrouted: false,
            });
            if outcome == Outcome::Unrouted.as_str() {
                info.unrouted = true;
            }
        }
        Ok(())
    }
}

fn plan_redeliver(selection: &Selection, config: &ToolConfig, collected: &Collected) -> Plan {
    let mut plan = Plan::default();
    let Some(outcome) = selection.outcome else {
        return plan;
    };
    for (key, info) in &collected.events {
        let Some(deliveries) = collected.deliveries.get(key) else {
            continue;
        };
        let mut endpoints = Vec::new();
        for (endpoint_id, state) in deliveries {
            if selection
                .endpoint
                .as_deref()
                .is_some_and(|e| e != endpoint_id)
            {
                continue;
            }
            match state.outcome() {
                None => {
                    if outcome != OutcomeFilter::Delivered {
                        plan.summary.skipped.still_retrying += 1;
                    }
                    continue;
                }
                Some(final_outcome) if !outcome.matches(final_outcome) => continue,
                Some(_) => {}
            }
            let subscribed = config.endpoint(endpoint_id).is_some_and(|endpoint| {
                endpoint.tenant == key.0 && endpoint.subscribes_to(&info.event_type)
            });
            if subscribed {
                endpoints.push(endpoint_id.clone());
            } else {
                plan.summary.skipped.not_subscribed += 1;
            }
        }
        if !endpoints.is_empty() {
            plan.items.push(item(key, info, endpoints, collected));
        }
    }
    plan
}

fn plan_backfill(
    selection: &Selection,
    target: &crate::config::EndpointView,
    collected: &Collected,
) -> Plan {
    let mut plan = Plan::default();
    let no_deliveries = BTreeMap::new();
    for (key, info) in &collected.events {
        if key.0 != target.tenant || !target.subscribes_to(&info.event_type) {
            continue;
        }
        let deliveries = collected.deliveries.get(key).unwrap_or(&no_deliveries);
        if let Some(endpoint) = &selection.endpoint {
            if !deliveries.contains_key(endpoint) {
                continue;
            }
        }
        let outcome_matches = match selection.outcome {
            None => true,
            Some(OutcomeFilter::Unrouted) => info.unrouted,
            Some(outcome) => deliveries
                .iter()
                .filter(|(id, _)| selection.endpoint.as_ref().is_none_or(|e| e == *id))
                .any(|(_, state)| state.outcome().is_some_and(|o| outcome.matches(o))),
        };
        if !outcome_matches {
            continue;
        }
        match deliveries.get(&target.id) {
            Some(state) if state.outcome() == Some(Outcome::Delivered.as_str()) => {
                plan.summary.skipped.already_delivered += 1;
                continue;
            }
            Some(state) if state.outcome().is_none() => {
                plan.summary.skipped.still_retrying += 1;
                continue;
            }
            _ => {}
        }
        plan.items
            .push(item(key, info, vec![target.id.clone()], collected));
    }
    plan
}

fn item(
    key: &EventKey,
    info: &EventInfo,
    endpoints: Vec<String>,
    collected: &Collected,
) -> PlanItem {
    PlanItem {
        tenant: key.0.clone(),
        event_id: key.1.clone(),
        event_type: info.event_type.clone(),
        partition: info.partition,
        offset: info.offset,
        ingested_at_ms: info.ingested_at_ms,
        endpoints,
        body_sha256: collected.hashes.get(key).cloned(),
    }
}

/// The reason an event's original record cannot be replayed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PayloadProblem {
    /// The log no longer has a record at the position.
    Gone,
    /// The record there is another event, or its payload hashes differently.
    Changed(String),
}

/// Reads the original record of `item` from `source` and returns its exact bytes, after
/// checking that it is the archived event with the archived body hash.
///
/// # Errors
///
/// Fails if the source cannot be read; a missing or different record is a
/// [`PayloadProblem`].
pub fn original_record(
    item: &PlanItem,
    source: &mut dyn Source,
) -> Result<std::result::Result<hookflow_schemas::Event, PayloadProblem>> {
    let records = source.read(item.partition, item.offset, 1)?;
    let Some(record) = records.into_iter().find(|r| r.offset == item.offset) else {
        return Ok(Err(PayloadProblem::Gone));
    };
    let event = match decode_event(&record.value, usize::MAX) {
        Ok(event) => event,
        Err(error) => return Ok(Err(PayloadProblem::Changed(error.to_string()))),
    };
    if event.tenant != item.tenant || event.id != item.event_id || event.replay.is_some() {
        return Ok(Err(PayloadProblem::Changed(format!(
            "the record at partition {} offset {} is event {}/{}, not {}/{}",
            item.partition, item.offset, event.tenant, event.id, item.tenant, item.event_id
        ))));
    }
    if let Some(expected) = &item.body_sha256 {
        let actual = sha256_hex(&event.payload);
        if actual != *expected {
            return Ok(Err(PayloadProblem::Changed(format!(
                "the payload of {}/{} hashes to {actual}, the archive recorded {expected}",
                item.tenant, item.event_id
            ))));
        }
    }
    Ok(Ok(event))
}

/// Returns the lowercase hex SHA-256 of `bytes`, as the archive's `body_sha256` spells it.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

fn check_payloads(plan: &mut Plan, source: &mut dyn Source) -> Result<()> {
    let mut kept = Vec::with_capacity(plan.items.len());
    for item in plan.items.drain(..) {
        match original_record(&item, source)? {
            Ok(_) => kept.push(item),
            Err(PayloadProblem::Gone) => plan.summary.skipped.payload_gone += 1,
            Err(PayloadProblem::Changed(reason)) => {
                tracing::warn!(tenant = %item.tenant, event_id = %item.event_id, %reason, "Skipping an event whose log record does not match the archive.");
                plan.summary.skipped.payload_changed += 1;
            }
        }
    }
    plan.items = kept;
    Ok(())
}

fn summarize(plan: &mut Plan) {
    let summary = &mut plan.summary;
    summary.events = plan.items.len() as u64;
    summary.deliveries = 0;
    summary.endpoints.clear();
    for item in &plan.items {
        for endpoint in &item.endpoints {
            summary.deliveries += 1;
            let entry = summary.endpoints.entry(endpoint.clone()).or_default();
            entry.deliveries += 1;
            if entry.samples.len() < SAMPLES_PER_ENDPOINT {
                entry.samples.push(item.event_id.clone());
            }
        }
    }
}

impl PlanSummary {
    /// Formats the summary for a terminal: totals, then one line per endpoint with samples,
    /// then what was skipped.
    pub fn render(&self) -> String {
        let mut out = format!(
            "{} event(s), {} delivery(s)\n",
            self.events, self.deliveries
        );
        for (endpoint, plan) in &self.endpoints {
            out.push_str(&format!(
                "  {endpoint:<24} {:>8} deliveries   e.g. {}\n",
                plan.deliveries,
                plan.samples.join(", ")
            ));
        }
        let skipped = &self.skipped;
        let reasons = [
            ("still retrying", skipped.still_retrying),
            ("already delivered to the target", skipped.already_delivered),
            (
                "endpoint no longer configured or subscribed",
                skipped.not_subscribed,
            ),
            (
                "payload gone from the log (past its retention)",
                skipped.payload_gone,
            ),
            (
                "log record differs from the archive",
                skipped.payload_changed,
            ),
        ];
        for (reason, count) in reasons.iter().filter(|(_, count)| *count > 0) {
            out.push_str(&format!("  skipped: {count} {reason}\n"));
        }
        let scan = &self.scan;
        out.push_str(&format!(
            "  archive: read {} of {} row group(s) in {} of {} file(s), {} row(s), {} of {} bytes\n",
            scan.row_groups_read,
            scan.row_groups,
            scan.files - scan.files_skipped_by_date,
            scan.files,
            scan.rows_read,
            scan.bytes_read,
            scan.bytes_total
        ));
        out
    }
}
