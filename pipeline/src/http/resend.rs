//! Resend routes (admin token): one event again to one or all of its endpoints, or every
//! failed delivery of an endpoint since a time.
//!
//! Both reuse `hookflow-replay`: a [`Selection`] becomes a plan from the archive, the ledger
//! in `<data-dir>/replay/` hands out a new generation and records the run, and the plan's
//! replay records are appended to the source, where the running pipeline delivers them. The
//! journal is keyed by generation, so each resend is delivered once, and a resend asked twice
//! is two generations, each delivered once. Resends and `hookflow replay` take the same lock,
//! so they never append at once.
//!
//! Only settled deliveries are resent: one still retrying is left to its own retries and
//! counted as skipped.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use hookflow_connectors::{FluvioSource, LocalLog, LocalLogOptions, SourceStatus};
use hookflow_replay::config::{EndpointView, ToolConfig};
use hookflow_replay::ledger::Ledger;
use hookflow_replay::republish::{republish, ProgressStyle, ReplayTarget, RepublishOptions};
use hookflow_replay::select::{build_plan, OutcomeFilter, Plan, PlanItem, Selection, Skipped};
use hookflow_schemas::Millis;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::auth::Admin;
use super::error::{json_body, parse_json, ApiError, ApiPath, ApiQuery, ErrorBody};
use super::inspect::parse_since;
use super::HttpState;

/// The optional body of an event resend.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResendEventRequest {
    /// Resend only to this endpoint; all the event's endpoints when absent.
    pub endpoint_id: Option<String>,
}

/// Query of `resend-failed`.
#[derive(Debug, Clone, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ResendFailedQuery {
    /// Events ingested at or after this time: RFC 3339, a date, or relative such as `1h`.
    /// Default `24h`.
    pub since: Option<String>,
}

/// The summary of what a resend queued.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Resend {
    /// The replay id the ledger records (`hookflow replay --list` shows it).
    pub replay_id: Option<String>,
    /// The new generation; absent when nothing was queued.
    pub generation: Option<u32>,
    /// Events appended to the source.
    pub events: u64,
    /// Deliveries those events make.
    pub deliveries: u64,
    /// Deliveries by endpoint id.
    pub endpoints: BTreeMap<String, u64>,
    /// Deliveries left out: still retrying, endpoint gone, payload gone from the log.
    pub skipped: SkippedView,
}

/// Counts of what a resend left out.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct SkippedView {
    /// Deliveries still retrying in their latest generation.
    pub still_retrying: u64,
    /// Deliveries to an endpoint no longer configured or no longer subscribed.
    pub not_subscribed: u64,
    /// Events whose original record left the log (past `local_log.retention_secs`).
    pub payload_gone: u64,
    /// Events whose record no longer matches the archive.
    pub payload_changed: u64,
}

impl From<Skipped> for SkippedView {
    fn from(skipped: Skipped) -> Self {
        SkippedView {
            still_retrying: skipped.still_retrying,
            not_subscribed: skipped.not_subscribed,
            payload_gone: skipped.payload_gone,
            payload_changed: skipped.payload_changed,
        }
    }
}

/// Resend one event.
#[utoipa::path(
    post,
    path = "/v1/events/{tenant}/{id}/resend",
    tag = "events",
    params(("tenant" = String, Path, description = "the event's tenant"), ("id" = String, Path, description = "the event's id")),
    request_body(content = Option<ResendEventRequest>, description = "optional: `endpoint_id` to resend to one endpoint only", content_type = "application/json"),
    responses(
        (status = 202, description = "queued as a new generation", body = Resend),
        (status = 400, description = "bad body", body = ErrorBody),
        (status = 401, description = "no bearer token", body = ErrorBody),
        (status = 403, description = "not the admin token", body = ErrorBody),
        (status = 404, description = "unknown endpoint, or no settled delivery of the event", body = ErrorBody),
        (status = 409, description = "another replay is running", body = ErrorBody),
    ),
    security(("admin_token" = []))
)]
pub async fn resend_event(
    _admin: Admin,
    State(state): State<HttpState>,
    ApiPath((tenant, id)): ApiPath<(String, String)>,
    request: Request,
) -> Result<Response, ApiError> {
    let body = read_optional_body(request, &state).await?;
    let reader = state.clone();
    let config = tokio::task::spawn_blocking(move || tool_config(&reader))
        .await
        .map_err(|e| ApiError::internal("the resend task failed", &e))??;
    if let Some(endpoint_id) = &body.endpoint_id {
        check_endpoint(&config, endpoint_id, Some(&tenant))?;
    }
    let now = state.clock.now_ms();
    let selection = |outcome| Selection {
        tenant: Some(tenant.clone()),
        endpoint: body.endpoint_id.clone(),
        event_ids: Some(BTreeSet::from([id.clone()])),
        outcome: Some(outcome),
        ..Selection::default()
    };
    // Redeliver mode needs an outcome; an event is resent whatever its deliveries ended as.
    let selections = vec![
        selection(OutcomeFilter::Delivered),
        selection(OutcomeFilter::Failed),
    ];
    let resend = run_blocking(state, config, selections, now).await?;
    if resend.generation.is_none() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "nothing_to_resend",
            format!(
                "event `{id}` of tenant `{tenant}` has no settled delivery in the archive{} \
                 (a delivery still retrying is not resent, and a settled one reaches the \
                 archive within `archive.max_file_age_secs`)",
                body.endpoint_id
                    .as_deref()
                    .map(|e| format!(" to endpoint `{e}`"))
                    .unwrap_or_default()
            ),
        ));
    }
    Ok((StatusCode::ACCEPTED, Json(resend)).into_response())
}

/// Resend every failed delivery of an endpoint.
#[utoipa::path(
    post,
    path = "/v1/endpoints/{id}/resend-failed",
    tag = "endpoints",
    params(("id" = String, Path, description = "the endpoint's id"), ResendFailedQuery),
    responses(
        (status = 202, description = "queued as a new generation", body = Resend),
        (status = 200, description = "nothing failed in that time; nothing queued", body = Resend),
        (status = 400, description = "bad `since`", body = ErrorBody),
        (status = 401, description = "no bearer token", body = ErrorBody),
        (status = 403, description = "not the admin token", body = ErrorBody),
        (status = 404, description = "unknown endpoint", body = ErrorBody),
        (status = 409, description = "another replay is running", body = ErrorBody),
    ),
    security(("admin_token" = []))
)]
pub async fn resend_failed(
    _admin: Admin,
    State(state): State<HttpState>,
    ApiPath(endpoint_id): ApiPath<String>,
    ApiQuery(query): ApiQuery<ResendFailedQuery>,
) -> Result<Response, ApiError> {
    let now = state.clock.now_ms();
    let since_ms = parse_since(query.since.as_deref(), now)?;
    let reader = state.clone();
    let config = tokio::task::spawn_blocking(move || tool_config(&reader))
        .await
        .map_err(|e| ApiError::internal("the resend task failed", &e))??;
    check_endpoint(&config, &endpoint_id, None)?;
    let selections = vec![Selection {
        since_ms: Some(since_ms),
        endpoint: Some(endpoint_id),
        outcome: Some(OutcomeFilter::Failed),
        ..Selection::default()
    }];
    let resend = run_blocking(state, config, selections, now).await?;
    let status = if resend.generation.is_some() {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(resend)).into_response())
}

/// Builds replay's view of the endpoints a resend may go to. It reads the registry when this
/// process has one, because the store is the truth for endpoints, and the configuration
/// otherwise.
fn tool_config(state: &HttpState) -> Result<ToolConfig, ApiError> {
    let endpoints = match &state.registry {
        Some(registry) => registry
            .list()
            .map_err(|e| ApiError::internal("cannot read the endpoints", &e))?,
        None => state.config.endpoints(),
    };
    Ok(ToolConfig {
        archive_dir: Some(crate::dataflow::archive_dir(&state.config, &state.data_dir)),
        partitions: Some(state.config.local_log.partitions),
        endpoints: endpoints
            .into_iter()
            .map(|endpoint| EndpointView {
                id: endpoint.id,
                tenant: endpoint.tenant,
                event_types: endpoint.event_types,
            })
            .collect(),
        fluvio: state.config.fluvio().map(|fluvio| {
            // A resend must not move the consumer offset that mirrors the checkpoint.
            let mut options = fluvio.options();
            options.consumer = String::new();
            options
        }),
    })
}

fn check_endpoint(config: &ToolConfig, id: &str, tenant: Option<&str>) -> Result<(), ApiError> {
    match config.endpoint(id) {
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "endpoint_not_found",
            format!("no endpoint `{id}`"),
        )
        .with_field("endpoint_id")),
        Some(endpoint) if tenant.is_some_and(|t| t != endpoint.tenant) => {
            Err(ApiError::invalid_field(
                "endpoint_id",
                format!("endpoint `{id}` belongs to another tenant"),
            ))
        }
        Some(_) => Ok(()),
    }
}

async fn run_blocking(
    state: HttpState,
    config: ToolConfig,
    selections: Vec<Selection>,
    now: Millis,
) -> Result<Resend, ApiError> {
    tokio::task::spawn_blocking(move || {
        // One resend at a time in this process; the lock file also keeps `hookflow replay` out.
        let _serial = state.resend_lock.lock().unwrap_or_else(|e| e.into_inner());
        queue(&state, &config, &selections, now)
    })
    .await
    .map_err(|e| ApiError::internal("the resend task failed", &e))?
}

/// Plans the selections, records one run with a new generation and appends its records.
fn queue(
    state: &HttpState,
    config: &ToolConfig,
    selections: &[Selection],
    now: Millis,
) -> Result<Resend, ApiError> {
    let internal = |context: &'static str| {
        move |e: hookflow_replay::ReplayError| ApiError::internal(context, &e)
    };
    let mut log: Box<dyn ReplayTarget> = match &config.fluvio {
        Some(fluvio) => Box::new(
            FluvioSource::connect(fluvio.clone(), SourceStatus::new())
                .map_err(|e| ApiError::internal("cannot open the Fluvio topic", &e))?,
        ),
        None => Box::new(
            LocalLog::open(
                &state.data_dir,
                &LocalLogOptions {
                    partitions: state.config.local_log.partitions,
                },
            )
            .map_err(|e| ApiError::internal("cannot open the local log", &e))?,
        ),
    };
    let archive = crate::dataflow::archive_dir(&state.config, &state.data_dir);

    let mut merged: Option<Plan> = None;
    for selection in selections {
        let plan = build_plan(selection, config, &archive, log.as_mut())
            .map_err(internal("cannot plan the resend"))?;
        merged = Some(match merged {
            None => plan,
            Some(earlier) => merge(earlier, plan),
        });
    }
    let plan = merged.unwrap_or_default();
    let skipped = SkippedView::from(plan.summary.skipped);
    if plan.items.is_empty() {
        return Ok(Resend {
            replay_id: None,
            generation: None,
            events: 0,
            deliveries: 0,
            endpoints: BTreeMap::new(),
            skipped,
        });
    }

    let mut ledger =
        Ledger::open(&state.data_dir).map_err(internal("cannot open the replay ledger"))?;
    let _lock = hookflow_replay::cli::lock_replays(&state.data_dir)
        .map_err(|e| ApiError::new(StatusCode::CONFLICT, "replay_running", format!("{e:#}")))?;
    let generation = ledger
        .next_generation(plan.summary.max_generation_seen)
        .map_err(internal("cannot read the replay ledger"))?;
    let replay_id = format!("api-resend-g{generation}");
    let selection = selections.first().cloned().unwrap_or_default();
    ledger
        .create_run(
            &replay_id,
            generation,
            &selection,
            &plan.summary,
            &plan.items,
            now,
        )
        .map_err(internal("cannot record the resend"))?;
    let options = RepublishOptions {
        rate_per_sec: f64::INFINITY,
        progress: ProgressStyle::Quiet,
        stop: Arc::new(AtomicBool::new(false)),
    };
    let clock = state.clock.clone();
    let report = republish(&mut ledger, generation, log.as_mut(), &options, &|| {
        clock.now_ms()
    })
    .map_err(internal("cannot append the resend"))?;
    state
        .counters
        .resent_events
        .fetch_add(report.appended, std::sync::atomic::Ordering::Relaxed);
    tracing::info!(
        replay_id = %replay_id,
        generation,
        events = report.appended,
        "Resend queued."
    );
    let endpoints = plan
        .summary
        .endpoints
        .iter()
        .map(|(id, endpoint)| (id.clone(), endpoint.deliveries))
        .collect();
    Ok(Resend {
        replay_id: Some(replay_id),
        generation: Some(generation),
        events: report.appended,
        deliveries: plan.summary.deliveries,
        endpoints,
        skipped: SkippedView {
            payload_gone: skipped.payload_gone + report.payload_gone,
            ..skipped
        },
    })
}

/// Joins two plans over the same events: one item per event, with both plans' endpoints.
fn merge(mut into: Plan, other: Plan) -> Plan {
    for item in other.items {
        match into
            .items
            .iter_mut()
            .find(|known| known.tenant == item.tenant && known.event_id == item.event_id)
        {
            Some(known) => add_endpoints(known, &item),
            None => into.items.push(item),
        }
    }
    let summary = &mut into.summary;
    summary.events = into.items.len() as u64;
    summary.deliveries += other.summary.deliveries;
    for (id, endpoint) in other.summary.endpoints {
        let entry = summary.endpoints.entry(id).or_default();
        entry.deliveries += endpoint.deliveries;
        entry.samples.extend(endpoint.samples);
    }
    summary.max_generation_seen = summary
        .max_generation_seen
        .max(other.summary.max_generation_seen);
    // Both plans read the same rows, so their skip counts are the same deliveries.
    summary.skipped.not_subscribed = summary
        .skipped
        .not_subscribed
        .max(other.summary.skipped.not_subscribed);
    summary.skipped.still_retrying = summary
        .skipped
        .still_retrying
        .max(other.summary.skipped.still_retrying);
    summary.skipped.payload_gone = summary
        .skipped
        .payload_gone
        .max(other.summary.skipped.payload_gone);
    summary.skipped.payload_changed = summary
        .skipped
        .payload_changed
        .max(other.summary.skipped.payload_changed);
    into
}

fn add_endpoints(known: &mut PlanItem, item: &PlanItem) {
    for endpoint in &item.endpoints {
        if !known.endpoints.contains(endpoint) {
            known.endpoints.push(endpoint.clone());
        }
    }
    known.endpoints.sort();
}

/// Reads the optional body; a non-empty one must be declared JSON.
async fn read_optional_body(
    request: Request,
    state: &HttpState,
) -> Result<ResendEventRequest, ApiError> {
    let declared_json = request
        .headers()
        .contains_key(axum::http::header::CONTENT_TYPE);
    let bytes = if declared_json {
        json_body(request, state).await?
    } else {
        use axum::extract::FromRequest;
        axum::body::Bytes::from_request(request, state)
            .await
            .map_err(|rejection| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_body",
                    rejection.body_text(),
                )
            })?
    };
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(ResendEventRequest::default());
    }
    if !declared_json {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the body as JSON with `Content-Type: application/json`",
        ));
    }
    parse_json(&bytes)
}
