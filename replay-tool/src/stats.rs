//! Per-endpoint statistics over the attempt archive, for `hookflow stats`.
//!
//! In: the archive and a range of `finished_at` times (pushed down to `date=` directories
//! and row-group statistics), optionally one tenant or endpoint. Out: one [`EndpointStats`]
//! per endpoint, plus the rows decided without an endpoint.
//!
//! Definitions, which the README's DuckDB queries repeat:
//!
//! * an *attempt* is a row with `started_at` set (an HTTP request was made);
//! * a *delivery* is a row with a final outcome (`outcome <> 'failed'`) and an endpoint: one
//!   per (event, endpoint, generation), so each replay run counts again;
//! * the *success ratio* is delivered / deliveries;
//! * latency percentiles use the nearest-rank method over the attempts' `latency_ms`;
//! * a *failure* is a row with outcome `failed`, `dead_lettered` or `expired`;
//! * error kinds count every row with an `error_kind`.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use hookflow_schemas::{format_millis, Millis, Outcome};
use serde::Serialize;

use crate::scan::{scan_archive, text, value, Columns, ScanOptions, ScanStats};
use crate::timespec::utc_date;
use crate::Result;

/// The range and scope of a `hookflow stats` report.
#[derive(Debug, Clone, Default)]
pub struct StatsQuery {
    /// Rows finished at or after this time (ms).
    pub since_ms: Option<Millis>,
    /// Rows finished at or before this time (ms).
    pub until_ms: Option<Millis>,
    /// Only this tenant.
    pub tenant: Option<String>,
    /// Only this endpoint.
    pub endpoint: Option<String>,
}

/// The figures of one endpoint.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct EndpointStats {
    /// The endpoint's id.
    pub endpoint_id: String,
    /// Rows with a final outcome.
    pub deliveries: u64,
    /// Rows with outcome `delivered`.
    pub delivered: u64,
    /// delivered / deliveries, when there are deliveries.
    pub success_ratio: Option<f64>,
    /// HTTP requests made.
    pub attempts: u64,
    /// Median attempt latency in ms (nearest rank).
    pub latency_p50_ms: Option<u64>,
    /// 99th-percentile attempt latency in ms (nearest rank).
    pub latency_p99_ms: Option<u64>,
    /// Rows with outcome `failed`, `dead_lettered` or `expired`.
    pub failures: u64,
    /// The earliest failure's `finished_at` (ms).
    pub first_failure_ms: Option<Millis>,
    /// The latest failure's `finished_at` (ms).
    pub last_failure_ms: Option<Millis>,
    /// Rows per error kind, most frequent first (at most five).
    pub top_error_kinds: Vec<(String, u64)>,
}

/// The whole report.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct StatsReport {
    /// The range, as given (ms).
    pub since_ms: Option<Millis>,
    /// The range, as given (ms).
    pub until_ms: Option<Millis>,
    /// One entry per endpoint, by id.
    pub endpoints: Vec<EndpointStats>,
    /// Rows of events no endpoint subscribed to.
    pub unrouted: u64,
    /// Rows of records that did not decode.
    pub invalid: u64,
    /// The archive scan's counts.
    pub scan: ScanStats,
}

/// How many error kinds each endpoint lists.
const TOP_ERROR_KINDS: usize = 5;

const COLUMNS: &[&str] = &[
    "tenant",
    "endpoint_id",
    "outcome",
    "started_at",
    "finished_at",
    "latency_ms",
    "error_kind",
];

#[derive(Default)]
struct Accumulator {
    stats: EndpointStats,
    latencies: Vec<u64>,
    errors: HashMap<String, u64>,
}

/// Computes the report of `query` over the archive under `dir`.
///
/// # Errors
///
/// Fails if the archive cannot be read.
pub fn compute_stats(dir: &Path, query: &StatsQuery) -> Result<StatsReport> {
    let options = ScanOptions {
        columns: COLUMNS,
        first_date: query.since_ms.map(utc_date),
        last_date: query.until_ms.map(utc_date),
    };
    let since = query.since_ms.and_then(|s| i64::try_from(s).ok());
    let until = query.until_ms.and_then(|u| i64::try_from(u).ok());
    let keep = |bounds: &crate::scan::RowGroupBounds<'_>| {
        let in_time = bounds.int_range("finished_at").is_none_or(|(min, max)| {
            since.is_none_or(|s| max >= s) && until.is_none_or(|u| min <= u)
        });
        let tenant = query
            .tenant
            .as_deref()
            .is_none_or(|t| bounds.may_contain("tenant", t));
        let endpoint = query
            .endpoint
            .as_deref()
            .is_none_or(|e| bounds.may_contain("endpoint_id", e));
        in_time && tenant && endpoint
    };

    let mut per_endpoint: BTreeMap<String, Accumulator> = BTreeMap::new();
    let mut report = StatsReport {
        since_ms: query.since_ms,
        until_ms: query.until_ms,
        ..StatsReport::default()
    };
    let mut collect = |batch: &arrow::array::RecordBatch, path: &Path| -> Result<()> {
        let columns = Columns::new(batch, path);
        let tenants = columns.strings("tenant")?;
        let endpoints = columns.strings("endpoint_id")?;
        let outcomes = columns.strings("outcome")?;
        let started = columns.times("started_at")?;
        let finished = columns.times("finished_at")?;
        let latencies = columns.u64s("latency_ms")?;
        let errors = columns.strings("error_kind")?;
        for row in 0..batch.num_rows() {
            let finished_at = value(finished, row).unwrap_or(0);
            if since.is_some_and(|s| finished_at < s) || until.is_some_and(|u| finished_at > u) {
                continue;
            }
            if query
                .tenant
                .as_deref()
                .is_some_and(|t| text(tenants, row) != Some(t))
            {
                continue;
            }
            let endpoint = text(endpoints, row);
            if query.endpoint.is_some() && endpoint != query.endpoint.as_deref() {
                continue;
            }
            let outcome = text(outcomes, row).unwrap_or_default();
            let Some(endpoint) = endpoint else {
                if outcome == Outcome::Unrouted.as_str() {
                    report.unrouted += 1;
                } else if outcome == Outcome::Invalid.as_str() {
                    report.invalid += 1;
                }
                continue;
            };
            let entry = per_endpoint.entry(endpoint.to_string()).or_default();
            let stats = &mut entry.stats;
            if outcome != Outcome::Failed.as_str() {
                stats.deliveries += 1;
            }
            if outcome == Outcome::Delivered.as_str() {
                stats.delivered += 1;
            }
            if value(started, row).is_some() {
                stats.attempts += 1;
                if let Some(latency) = value(latencies, row) {
                    entry.latencies.push(latency);
                }
            }
            let failure = [Outcome::Failed, Outcome::DeadLettered, Outcome::Expired]
                .iter()
                .any(|o| o.as_str() == outcome);
            if failure {
                let at = u64::try_from(finished_at).unwrap_or(0);
                stats.failures += 1;
                stats.first_failure_ms = Some(stats.first_failure_ms.map_or(at, |f| f.min(at)));
                stats.last_failure_ms = Some(stats.last_failure_ms.map_or(at, |l| l.max(at)));
            }
            if let Some(kind) = text(errors, row) {
                *entry.errors.entry(kind.to_string()).or_default() += 1;
            }
        }
        Ok(())
    };
    report.scan = scan_archive(dir, &options, &keep, &mut collect)?;

    for (endpoint_id, mut entry) in per_endpoint {
        let mut stats = entry.stats;
        stats.endpoint_id = endpoint_id;
        stats.success_ratio =
            (stats.deliveries > 0).then(|| stats.delivered as f64 / stats.deliveries as f64);
        entry.latencies.sort_unstable();
        stats.latency_p50_ms = nearest_rank(&entry.latencies, 50);
        stats.latency_p99_ms = nearest_rank(&entry.latencies, 99);
        let mut errors: Vec<(String, u64)> = entry.errors.into_iter().collect();
        errors.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        errors.truncate(TOP_ERROR_KINDS);
        stats.top_error_kinds = errors;
        report.endpoints.push(stats);
    }
    Ok(report)
}

/// Returns the nearest-rank `percent` percentile of sorted `values`.
fn nearest_rank(values: &[u64], percent: u64) -> Option<u64> {
    if values.is_empty() {
        return None;
    }
    let rank = (percent * values.len() as u64).div_ceil(100).max(1);
    values.get(usize::try_from(rank - 1).unwrap_or(0)).copied()
}

impl StatsReport {
    /// Formats the report as a table, one line per endpoint.
    pub fn render(&self) -> String {
        let mut out = format!(
            "{:<24} {:>10} {:>9} {:>8} {:>8} {:>7} {:>7}  {:<24} {:<24}  {}\n",
            "endpoint",
            "deliveries",
            "delivered",
            "success",
            "attempts",
            "p50 ms",
            "p99 ms",
            "first failure",
            "last failure",
            "top error kinds"
        );
        let time = |ms: Option<Millis>| ms.map_or_else(|| "-".to_string(), format_millis);
        let number = |n: Option<u64>| n.map_or_else(|| "-".to_string(), |n| n.to_string());
        for e in &self.endpoints {
            let ratio = e
                .success_ratio
                .map_or_else(|| "-".to_string(), |r| format!("{:.1}%", r * 100.0));
            let errors = e
                .top_error_kinds
                .iter()
                .map(|(kind, count)| format!("{kind} {count}"))
                .collect::<Vec<_>>()
                .join(", ");
            out.push_str(&format!(
                "{:<24} {:>10} {:>9} {:>8} {:>8} {:>7} {:>7}  {:<24} {:<24}  {}\n",
                e.endpoint_id,
                e.deliveries,
                e.delivered,
                ratio,
                e.attempts,
                number(e.latency_p50_ms),
                number(e.latency_p99_ms),
                time(e.first_failure_ms),
                time(e.last_failure_ms),
                if errors.is_empty() { "-" } else { &errors }
            ));
        }
        out.push_str(&format!(
            "unrouted rows: {}, invalid rows: {}\n",
            self.unrouted, self.invalid
        ));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_table() {
        let values: Vec<u64> = (1..=100).collect();
        assert_eq!(nearest_rank(&values, 50), Some(50));
        assert_eq!(nearest_rank(&values, 99), Some(99));
        assert_eq!(nearest_rank(&[7], 99), Some(7));
        assert_eq!(nearest_rank(&[1, 2, 3], 50), Some(2));
        assert_eq!(nearest_rank(&[], 50), None);
    }
}
