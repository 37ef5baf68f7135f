//! Inspect routes (admin token): an event's deliveries and attempts, and the recent failed
//! attempts of an endpoint.
//!
//! Deliveries come from the state store (the journal for settled ones, `pending` for those
//! waiting), found through the event's first occurrence. Attempts come from the Parquet
//! archive, read with `hookflow-replay`'s scanner so that row groups whose statistics rule
//! out the tenant, event or endpoint are skipped. In a cluster only process 0's state store
//! is read, and the response says so in `scope`. The archive is shared and read whole.
//!
//! Attempts not yet in a complete Parquet file are read from the state store's staging
//! table, so an attempt appears as soon as its result is durable. Deliveries appear as soon
//! as the journal or `pending` has them.

use std::path::Path;

use axum::extract::State;
use axum::Json;
use hookflow_connectors::{StagedFilter, StateStore};
use hookflow_replay::scan::{scan_archive, text, value, Columns, ScanOptions};
use hookflow_replay::timespec::{parse_time, utc_date};
use hookflow_schemas::{AttemptRow, Millis, Outcome};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::auth::Admin;
use super::error::{ApiError, ApiPath, ApiQuery, ErrorBody};
use super::ingest::rfc3339_ms;
use super::HttpState;

/// The largest `limit` of a failures listing.
pub const MAX_FAILURES_LIMIT: usize = 1000;

/// The part of the cluster a response covers.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Scope {
    /// The process whose state store was read (always 0).
    pub process: usize,
    /// Processes in the cluster.
    pub processes: usize,
    /// False in a multi-process cluster: deliveries owned by other processes are missing.
    pub complete: bool,
}

/// The source position of the event's first record.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct FirstSeenView {
    /// Source partition.
    pub partition: u32,
    /// Offset in the partition.
    pub offset: u64,
    /// When the pipeline first read it.
    pub first_seen_at: String,
}

/// One delivery of the event to one endpoint in one generation.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DeliveryView {
    /// The endpoint.
    pub endpoint_id: String,
    /// 0 for the original delivery, more for resends and replays.
    pub generation: u32,
    /// `delivered`, `dead_lettered`, `expired` (settled), `pending` (waiting for a retry) or
    /// `parked` (its endpoint is disabled).
    pub status: String,
    /// When it settled, for a settled delivery.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub settled_at: Option<String>,
    /// The next attempt's number, for a pending delivery.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_attempt: Option<u32>,
    /// When the next attempt is due, for a pending delivery.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub due_at: Option<String>,
}

/// One archived attempt.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AttemptView {
    /// The event's tenant.
    pub tenant: Option<String>,
    /// The event's id.
    pub event_id: Option<String>,
    /// The endpoint.
    pub endpoint_id: Option<String>,
    /// The delivery's generation.
    pub generation: u32,
    /// The replay or resend that made the generation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replay_id: Option<String>,
    /// 1 for the first attempt of a generation.
    pub attempt: u32,
    /// `delivered`, `failed` (retried), `dead_lettered`, `expired`, ...
    pub outcome: String,
    /// The response status, when there was one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_status: Option<u16>,
    /// The error's kind, such as `timeout` or `http_5xx`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_kind: Option<String>,
    /// The error's text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_message: Option<String>,
    /// When the request started.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    /// When the attempt ended.
    pub finished_at: String,
    /// The same time in ms since the Unix epoch.
    pub finished_at_ms: u64,
    /// The attempt's time in ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<u64>,
}

/// The response of `GET /v1/events/{tenant}/{id}`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EventView {
    /// The event's tenant.
    pub tenant: String,
    /// The event's id.
    pub id: String,
    /// Its first record, while inside the dedup window.
    pub first_seen: Option<FirstSeenView>,
    /// Its deliveries, by generation and endpoint.
    pub deliveries: Vec<DeliveryView>,
    /// Its archived attempts, oldest first.
    pub attempts: Vec<AttemptView>,
    /// The part of the cluster this response covers.
    pub scope: Scope,
}

/// The response of `GET /v1/endpoints/{id}/failures`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct FailuresView {
    /// The endpoint.
    pub endpoint_id: String,
    /// The lower bound applied.
    pub since: String,
    /// Failed attempts, newest first, at most `limit`.
    pub failures: Vec<AttemptView>,
    /// Whether more failures matched than `limit`.
    pub truncated: bool,
}

/// Query of the failures listing.
#[derive(Debug, Clone, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct FailuresQuery {
    /// Attempts that ended at or after this time: RFC 3339, a date, or relative such as
    /// `1h` or `7d`. Default `24h`.
    pub since: Option<String>,
    /// At most this many, newest first; 1 to 1000, default 100.
    pub limit: Option<usize>,
}

/// An event's deliveries and attempts.
#[utoipa::path(
    get,
    path = "/v1/events/{tenant}/{id}",
    tag = "events",
    params(("tenant" = String, Path, description = "the event's tenant"), ("id" = String, Path, description = "the event's id")),
    responses(
        (status = 200, description = "what the state store and the archive know", body = EventView),
        (status = 401, description = "no bearer token", body = ErrorBody),
        (status = 403, description = "not the admin token", body = ErrorBody),
        (status = 404, description = "neither the state store nor the archive knows the event", body = ErrorBody),
    ),
    security(("admin_token" = []))
)]
pub async fn get_event(
    _admin: Admin,
    State(state): State<HttpState>,
    ApiPath((tenant, id)): ApiPath<(String, String)>,
) -> Result<Json<EventView>, ApiError> {
    let view = tokio::task::spawn_blocking(move || event_view(&state, tenant, id))
        .await
        .map_err(|e| ApiError::internal("the inspect task failed", &e))??;
    Ok(Json(view))
}

fn event_view(state: &HttpState, tenant: String, id: String) -> Result<EventView, ApiError> {
    let store = open_store(state)?;
    let record = store
        .event_record(&tenant, &id)
        .map_err(|e| ApiError::internal("cannot read the state store", &e))?;
    let mut deliveries: Vec<DeliveryView> = record
        .journal
        .iter()
        .map(|entry| DeliveryView {
            endpoint_id: entry.endpoint_id.clone(),
            generation: entry.generation,
            status: entry.outcome.clone(),
            settled_at: Some(rfc3339_ms(entry.settled_at_ms)),
            next_attempt: None,
            due_at: None,
        })
        .collect();
    deliveries.extend(record.pending.iter().map(|entry| {
        DeliveryView {
            endpoint_id: entry.endpoint_id.clone(),
            generation: entry.generation,
            status: if entry.is_parked() {
                "parked"
            } else {
                "pending"
            }
            .to_string(),
            settled_at: None,
            next_attempt: Some(entry.attempt),
            due_at: (!entry.is_parked()).then(|| rfc3339_ms(entry.due_ms)),
        }
    }));
    deliveries.sort_by(|a, b| (a.generation, &a.endpoint_id).cmp(&(b.generation, &b.endpoint_id)));

    let archive = crate::dataflow::archive_dir(&state.config, &state.data_dir);
    let mut attempts = read_attempts(
        &archive,
        &Filter::Event {
            tenant: &tenant,
            id: &id,
        },
    )?;
    let staged = store
        .staged_rows_matching(StagedFilter::Event {
            tenant: &tenant,
            event_id: &id,
        })
        .map_err(|e| ApiError::internal("cannot read staged attempts", &e))?;
    add_staged(&mut attempts, &staged);
    attempts.sort_by(|a, b| {
        (a.generation, a.finished_at_ms, a.attempt).cmp(&(
            b.generation,
            b.finished_at_ms,
            b.attempt,
        ))
    });
    if record.first_seen.is_none() && deliveries.is_empty() && attempts.is_empty() {
        return Err(ApiError::new(
            axum::http::StatusCode::NOT_FOUND,
            "event_not_found",
            format!(
                "no event `{id}` of tenant `{tenant}` in the state store or the archive \
                 (it may not be read yet, or be older than the dedup window and the archive)"
            ),
        ));
    }
    Ok(EventView {
        first_seen: record.first_seen.map(|first| FirstSeenView {
            partition: first.partition,
            offset: first.offset,
            first_seen_at: rfc3339_ms(first.first_seen_ms),
        }),
        tenant,
        id,
        deliveries,
        attempts,
        scope: scope(state),
    })
}

/// Recent failed attempts of an endpoint.
#[utoipa::path(
    get,
    path = "/v1/endpoints/{id}/failures",
    tag = "endpoints",
    params(("id" = String, Path, description = "the endpoint's id"), FailuresQuery),
    responses(
        (status = 200, description = "failed, dead-lettered and expired attempts, newest first", body = FailuresView),
        (status = 400, description = "bad `since` or `limit`", body = ErrorBody),
        (status = 401, description = "no bearer token", body = ErrorBody),
        (status = 403, description = "not the admin token", body = ErrorBody),
    ),
    security(("admin_token" = []))
)]
pub async fn endpoint_failures(
    _admin: Admin,
    State(state): State<HttpState>,
    ApiPath(endpoint_id): ApiPath<String>,
    ApiQuery(query): ApiQuery<FailuresQuery>,
) -> Result<Json<FailuresView>, ApiError> {
    let now = state.clock.now_ms();
    let since_ms = parse_since(query.since.as_deref(), now)?;
    let limit = query.limit.unwrap_or(100);
    if !(1..=MAX_FAILURES_LIMIT).contains(&limit) {
        return Err(ApiError::invalid_field(
            "limit",
            format!("`limit` must be between 1 and {MAX_FAILURES_LIMIT}"),
        ));
    }
    let view = tokio::task::spawn_blocking(move || {
        let archive = crate::dataflow::archive_dir(&state.config, &state.data_dir);
        let mut failures = read_attempts(
            &archive,
            &Filter::Failures {
                endpoint_id: &endpoint_id,
                since_ms,
            },
        )?;
        let staged = open_store(&state)?
            .staged_rows_matching(StagedFilter::Endpoint {
                endpoint_id: &endpoint_id,
                since_ms,
            })
            .map_err(|e| ApiError::internal("cannot read staged attempts", &e))?;
        let failed: Vec<AttemptRow> = staged
            .into_iter()
            .filter(|row| row.outcome != Outcome::Delivered.as_str())
            .collect();
        add_staged(&mut failures, &failed);
        failures.sort_by_key(|attempt| std::cmp::Reverse(attempt.finished_at_ms));
        let truncated = failures.len() > limit;
        failures.truncate(limit);
        Ok::<_, ApiError>(FailuresView {
            endpoint_id,
            since: rfc3339_ms(since_ms),
            failures,
            truncated,
        })
    })
    .await
    .map_err(|e| ApiError::internal("the inspect task failed", &e))??;
    Ok(Json(view))
}

/// Adds the staged rows that are not also in `attempts`: a row stays staged until just after
/// its Parquet file is complete, so it can be in both for a moment.
fn add_staged(attempts: &mut Vec<AttemptView>, staged: &[AttemptRow]) {
    for row in staged {
        let view = AttemptView {
            tenant: row.tenant.clone(),
            event_id: row.event_id.clone(),
            endpoint_id: row.endpoint_id.clone(),
            generation: row.generation,
            replay_id: row.replay_id.clone(),
            attempt: row.attempt,
            outcome: row.outcome.clone(),
            http_status: row.http_status,
            error_kind: row.error_kind.clone(),
            error_message: row.error_message.clone(),
            started_at: row.started_at_ms.map(rfc3339_ms),
            finished_at: rfc3339_ms(row.finished_at_ms),
            finished_at_ms: row.finished_at_ms,
            latency_ms: row.latency_ms,
        };
        let known = attempts.iter().any(|seen| {
            (
                seen.tenant.as_ref(),
                seen.event_id.as_ref(),
                seen.endpoint_id.as_ref(),
            ) == (
                view.tenant.as_ref(),
                view.event_id.as_ref(),
                view.endpoint_id.as_ref(),
            ) && (seen.generation, seen.attempt, seen.finished_at_ms)
                == (view.generation, view.attempt, view.finished_at_ms)
        });
        if !known {
            attempts.push(view);
        }
    }
}

/// Parses a `since` query value (default 24 hours back), naming the field when bad.
pub fn parse_since(since: Option<&str>, now_ms: Millis) -> Result<Millis, ApiError> {
    match since {
        None => Ok(now_ms.saturating_sub(24 * 3600 * 1000)),
        Some(text) => {
            parse_time(text, now_ms).map_err(|e| ApiError::invalid_field("since", e.to_string()))
        }
    }
}

/// Opens this process's state store for reading.
pub fn open_store(state: &HttpState) -> Result<StateStore, ApiError> {
    let dir = state.cluster.state_dir(&state.data_dir);
    StateStore::open_dir(&dir).map_err(|e| ApiError::internal("cannot open the state store", &e))
}

fn scope(state: &HttpState) -> Scope {
    Scope {
        process: state.cluster.process_index(),
        processes: state.cluster.processes(),
        complete: !state.cluster.is_multi_process(),
    }
}

/// The attempts to read: one event's, or one endpoint's recent failures.
enum Filter<'a> {
    Event {
        tenant: &'a str,
        id: &'a str,
    },
    Failures {
        endpoint_id: &'a str,
        since_ms: Millis,
    },
}

const ATTEMPT_COLUMNS: &[&str] = &[
    "event_id",
    "tenant",
    "endpoint_id",
    "generation",
    "replay_id",
    "attempt",
    "started_at",
    "finished_at",
    "latency_ms",
    "outcome",
    "http_status",
    "error_kind",
    "error_message",
];

/// Reads the archived attempts that match `filter`, skipping row groups and dates that cannot
/// hold any.
fn read_attempts(archive: &Path, filter: &Filter<'_>) -> Result<Vec<AttemptView>, ApiError> {
    let options = ScanOptions {
        columns: ATTEMPT_COLUMNS,
        first_date: match filter {
            Filter::Failures { since_ms, .. } => Some(utc_date(*since_ms)),
            Filter::Event { .. } => None,
        },
        last_date: None,
    };
    let keep = |bounds: &hookflow_replay::scan::RowGroupBounds<'_>| match filter {
        Filter::Event { tenant, id } => {
            bounds.may_contain("tenant", tenant) && bounds.may_contain("event_id", id)
        }
        Filter::Failures {
            endpoint_id,
            since_ms,
        } => {
            let recent = bounds
                .int_range("finished_at")
                .is_none_or(|(_, max)| max >= i64::try_from(*since_ms).unwrap_or(i64::MAX));
            recent && bounds.may_contain("endpoint_id", endpoint_id)
        }
    };
    let mut found = Vec::new();
    scan_archive(archive, &options, &keep, &mut |batch, path| {
        let columns = Columns::new(batch, path);
        let event_ids = columns.strings("event_id")?;
        let tenants = columns.strings("tenant")?;
        let endpoints = columns.strings("endpoint_id")?;
        let generations = columns.u32s("generation")?;
        let replay_ids = columns.strings("replay_id")?;
        let attempts = columns.u32s("attempt")?;
        let started = columns.times("started_at")?;
        let finished = columns.times("finished_at")?;
        let latencies = columns.u64s("latency_ms")?;
        let outcomes = columns.strings("outcome")?;
        let statuses = columns.u16s("http_status")?;
        let kinds = columns.strings("error_kind")?;
        let messages = columns.strings("error_message")?;
        for row in 0..batch.num_rows() {
            let finished_ms = value(finished, row).unwrap_or(0).max(0) as Millis;
            let outcome = text(outcomes, row).unwrap_or_default();
            let keep = match filter {
                Filter::Event { tenant, id } => {
                    text(tenants, row) == Some(*tenant) && text(event_ids, row) == Some(*id)
                }
                Filter::Failures {
                    endpoint_id,
                    since_ms,
                } => {
                    text(endpoints, row) == Some(*endpoint_id)
                        && finished_ms >= *since_ms
                        && outcome != Outcome::Delivered.as_str()
                }
            };
            if !keep {
                continue;
            }
            found.push(AttemptView {
                tenant: text(tenants, row).map(str::to_string),
                event_id: text(event_ids, row).map(str::to_string),
                endpoint_id: text(endpoints, row).map(str::to_string),
                generation: value(generations, row).unwrap_or(0),
                replay_id: text(replay_ids, row).map(str::to_string),
                attempt: value(attempts, row).unwrap_or(0),
                outcome: outcome.to_string(),
                http_status: value(statuses, row),
                error_kind: text(kinds, row).map(str::to_string),
                error_message: text(messages, row).map(str::to_string),
                started_at: value(started, row).map(|ms| rfc3339_ms(ms.max(0) as Millis)),
                finished_at: rfc3339_ms(finished_ms),
                finished_at_ms: finished_ms,
                latency_ms: value(latencies, row),
            });
        }
        Ok(())
    })
    .map_err(|e| ApiError::internal("cannot read the archive", &e))?;
    Ok(found)
}
