//! `POST /v1/events`: validates one event exactly as `hookflow publish` does, appends it to
//! the configured source and returns 202 with its acceptance. A repeated (tenant, id) gets
//! 200 with the original acceptance.
//!
//! Acceptances are kept in a SQLite file of their own, `<data-dir>/api/ingest.sqlite`:
//!
//! ```text
//! acceptances(tenant TEXT, id TEXT, accepted_at_ms INTEGER, partition INTEGER,
//!             log_offset INTEGER, PRIMARY KEY (tenant, id))
//! ```
//!
//! Invariants: a row exists only for an event already appended to the source (the append
//! comes first); posts are handled one at a time under one lock, so concurrent identical
//! posts append once. A crash between the append and the row makes a retried post append
//! again; the pipeline's deduplication then drops the second record, so nothing is
//! delivered twice.
//!
//! Rows are kept until `pipeline.dedup_window_secs` after acceptance, the time the pipeline
//! itself remembers a (tenant, id).

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Mutex;

use crate::publish::{Appender, PublishTarget};
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use hookflow_schemas::{decode_event, DecodeError, Millis};
use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::auth::Producer;
use super::error::{json_body, ApiError, ErrorBody};
use super::HttpState;

/// An error of the ingest ledger or the source.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The ledger database failed.
    #[error("ingest ledger {path}: {action}")]
    Ledger {
        /// The action that failed.
        action: &'static str,
        /// The database file.
        path: PathBuf,
        /// SQLite's error.
        source: rusqlite::Error,
    },
    /// The source refused the append.
    #[error("cannot append to the source")]
    Source(#[source] Box<hookflow_connectors::ConnectorError>),
    /// The data directory cannot hold the ledger.
    #[error("cannot create {path}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// The acceptance of an event, returned the first time and on every repeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Acceptance {
    /// The event's id.
    pub id: String,
    /// The event's tenant.
    pub tenant: String,
    /// When hookflow first accepted it (RFC 3339, UTC, ms).
    pub accepted_at: String,
    /// The same time in ms since the Unix epoch.
    pub accepted_at_ms: u64,
    /// The source partition the event went to.
    pub partition: u32,
    /// Its offset in that partition.
    pub offset: u64,
}

/// The destination of accepted events: the configured source.
pub struct EventSink(Appender);

impl EventSink {
    /// Opens the configured source for appending.
    ///
    /// # Errors
    ///
    /// Fails if the source cannot be opened.
    pub fn open(target: &PublishTarget) -> Result<Self, IngestError> {
        Appender::open(target)
            .map(EventSink)
            .map_err(|e| IngestError::Source(Box::new(e)))
    }

    /// Appends one record keyed by tenant, as `hookflow publish` does; returns its position.
    fn append(
        &mut self,
        tenant: &str,
        record: &[u8],
        now_ms: Millis,
    ) -> Result<(u32, u64), IngestError> {
        let positions = self
            .0
            .append(&[(tenant.as_bytes(), record)], now_ms)
            .map_err(|e| IngestError::Source(Box::new(e)))?;
        positions
            .first()
            .copied()
            .ok_or_else(|| IngestError::Source(Box::new(empty_append())))
    }
}

fn empty_append() -> hookflow_connectors::ConnectorError {
    hookflow_connectors::ConnectorError::Io {
        action: "append one record",
        path: PathBuf::new(),
        source: std::io::Error::other("the log returned no position"),
    }
}

/// The ledger of acceptances and the sink, behind one lock.
pub struct IngestLedger {
    inner: Mutex<Inner>,
    path: PathBuf,
    keep_ms: u64,
}

struct Inner {
    connection: Connection,
    sink: EventSink,
}

impl IngestLedger {
    /// Opens (creating) `<data_dir>/api/ingest.sqlite` and the source.
    ///
    /// # Errors
    ///
    /// Fails if the file or the source cannot be opened.
    pub fn open(
        data_dir: &Path,
        target: &PublishTarget,
        keep_ms: u64,
    ) -> Result<Self, IngestError> {
        let dir = data_dir.join("api");
        std::fs::create_dir_all(&dir).map_err(|source| IngestError::Dir {
            path: dir.clone(),
            source,
        })?;
        let path = dir.join("ingest.sqlite");
        let sqlite = |action| {
            let path = path.clone();
            move |source| IngestError::Ledger {
                action,
                path,
                source,
            }
        };
        let connection = Connection::open(&path).map_err(sqlite("open"))?;
        connection
            .execute_batch(
                "PRAGMA journal_mode = WAL;
                 PRAGMA synchronous = FULL;
                 CREATE TABLE IF NOT EXISTS acceptances (
                     tenant TEXT NOT NULL,
                     id TEXT NOT NULL,
                     accepted_at_ms INTEGER NOT NULL,
                     partition INTEGER NOT NULL,
                     log_offset INTEGER NOT NULL,
                     PRIMARY KEY (tenant, id)
                 ) WITHOUT ROWID;
                 CREATE INDEX IF NOT EXISTS acceptances_by_time ON acceptances (accepted_at_ms);",
            )
            .map_err(sqlite("create the table"))?;
        let sink = EventSink::open(target)?;
        Ok(IngestLedger {
            inner: Mutex::new(Inner { connection, sink }),
            path,
            keep_ms,
        })
    }

    /// Returns the original acceptance of (tenant, id), or appends `record` and records a new
    /// one. The flag is true for a new acceptance.
    ///
    /// # Errors
    ///
    /// Fails if the ledger or the source fails; nothing is recorded then.
    pub fn accept(
        &self,
        tenant: &str,
        id: &str,
        record: &[u8],
        now_ms: Millis,
    ) -> Result<(Acceptance, bool), IngestError> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let sqlite = |action| {
            let path = self.path.clone();
            move |source| IngestError::Ledger {
                action,
                path,
                source,
            }
        };
        let found = inner
            .connection
            .query_row(
                "SELECT accepted_at_ms, partition, log_offset FROM acceptances
                 WHERE tenant = ?1 AND id = ?2",
                params![tenant, id],
                |row| {
                    Ok((
                        row.get::<_, i64>(0)?,
                        row.get::<_, i64>(1)?,
                        row.get::<_, i64>(2)?,
                    ))
                },
            )
            .optional()
            .map_err(sqlite("look up an acceptance"))?;
        if let Some((at, partition, offset)) = found {
            let acceptance = acceptance(tenant, id, at as u64, partition as u32, offset as u64);
            return Ok((acceptance, false));
        }

        let (partition, offset) = inner.sink.append(tenant, record, now_ms)?;
        let at = i64::try_from(now_ms).unwrap_or(i64::MAX);
        inner
            .connection
            .execute(
                "INSERT INTO acceptances (tenant, id, accepted_at_ms, partition, log_offset)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![tenant, id, at, partition, offset as i64],
            )
            .map_err(sqlite("record an acceptance"))?;
        let cutoff = i64::try_from(now_ms.saturating_sub(self.keep_ms)).unwrap_or(0);
        // Pruning a few rows per insert keeps the file bounded without a timer.
        inner
            .connection
            .execute(
                "DELETE FROM acceptances WHERE (tenant, id) IN (SELECT tenant, id
                 FROM acceptances WHERE accepted_at_ms < ?1 LIMIT 16)",
                params![cutoff],
            )
            .map_err(sqlite("prune old acceptances"))?;
        Ok((acceptance(tenant, id, now_ms, partition, offset), true))
    }
}

fn acceptance(tenant: &str, id: &str, at_ms: u64, partition: u32, offset: u64) -> Acceptance {
    Acceptance {
        id: id.to_string(),
        tenant: tenant.to_string(),
        accepted_at: rfc3339_ms(at_ms),
        accepted_at_ms: at_ms,
        partition,
        offset,
    }
}

/// Formats ms since the Unix epoch as RFC 3339 in UTC.
pub fn rfc3339_ms(at_ms: u64) -> String {
    let nanos = i128::from(at_ms) * 1_000_000;
    time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// Accept one event.
///
/// The body is one event as `hookflow publish` reads it: `id`, `tenant`, `type`,
/// `created_at` (RFC 3339) and `payload`.
#[utoipa::path(
    post,
    path = "/v1/events",
    tag = "events",
    request_body(content = serde_json::Value, description = "one event: id, tenant, type, created_at, payload", content_type = "application/json"),
    responses(
        (status = 202, description = "accepted and appended to the source", body = Acceptance),
        (status = 200, description = "this (tenant, id) was accepted before; the original acceptance", body = Acceptance),
        (status = 400, description = "invalid event, naming the field", body = ErrorBody),
        (status = 401, description = "no bearer token", body = ErrorBody),
        (status = 403, description = "not the producer token", body = ErrorBody),
        (status = 413, description = "payload over `pipeline.max_payload_bytes`", body = ErrorBody),
        (status = 415, description = "not JSON", body = ErrorBody),
    ),
    security(("producer_token" = []))
)]
pub async fn post_event(
    _producer: Producer,
    State(state): State<HttpState>,
    request: Request,
) -> Result<Response, ApiError> {
    let Some(ledger) = state.ingest.clone() else {
        return Err(ApiError::not_found("no such route"));
    };
    let counters = state.counters.clone();
    let rejected = |error: ApiError| {
        counters.ingest_rejected.fetch_add(1, Ordering::Relaxed);
        error
    };
    let body = json_body(request, &state).await.map_err(rejected)?;
    let record = body.trim_ascii();
    let event = decode_event(record, state.config.pipeline.max_payload_bytes)
        .map_err(|e| rejected(decode_error(e)))?;
    if event.replay.is_some() {
        return Err(rejected(ApiError::invalid_field(
            "replay",
            "`replay` is set by hookflow's own resend and replay, not by producers",
        )));
    }
    let record = record.to_vec();
    let now_ms = state.clock.now_ms();
    let accepted = tokio::task::spawn_blocking(move || {
        ledger.accept(&event.tenant, &event.id, &record, now_ms)
    })
    .await
    .map_err(|e| ApiError::internal("the ingest task failed", &e))?
    .map_err(|e| ApiError::internal("cannot accept the event", &error_chain(&e)))?;
    let (acceptance, new) = accepted;
    let status = if new {
        state
            .counters
            .ingest_accepted
            .fetch_add(1, Ordering::Relaxed);
        tracing::debug!(tenant = %acceptance.tenant, id = %acceptance.id, "Event accepted.");
        StatusCode::ACCEPTED
    } else {
        state
            .counters
            .ingest_repeated
            .fetch_add(1, Ordering::Relaxed);
        StatusCode::OK
    };
    Ok((status, Json(acceptance)).into_response())
}

/// The error and its causes on one line.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn decode_error(error: DecodeError) -> ApiError {
    let message = error.to_string();
    match error {
        DecodeError::MissingField(field) | DecodeError::InvalidField { field, .. } => {
            ApiError::invalid_field(field, message)
        }
        DecodeError::PayloadTooLarge { .. } => {
            ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", message)
                .with_field("payload")
        }
        DecodeError::NotUtf8 { .. } | DecodeError::InvalidJson(_) => {
            ApiError::new(StatusCode::BAD_REQUEST, "invalid_json", message)
        }
    }
}
