//! The attempt row: one per HTTP attempt, plus one per decision made without a request
//! (invalid record, unrouted event). Its Arrow schema is the Parquet archive's file schema.
//!
//! ```text
//! column              type                  null  meaning
//! event_id            utf8                  yes   producer's id (absent for undecodable records)
//! tenant              utf8                  yes
//! endpoint_id         utf8                  yes   absent for invalid and unrouted rows
//! event_type          utf8                  yes
//! generation          uint32                no    0 original, >0 replay or resend
//! replay_id           utf8                  yes
//! attempt             uint32                no    1 for the first request; 0 without a request
//! partition           uint32                no    source partition of the record
//! offset              uint64                no    source offset of the record
//! url                 utf8                  yes   endpoint URL without credentials
//! ingested_at         timestamp[ms, UTC]    yes   appended to the source
//! due_at              timestamp[ms, UTC]    no    dataflow time the attempt was due
//! started_at          timestamp[ms, UTC]    yes   request start (one clock read with the signature)
//! finished_at         timestamp[ms, UTC]    no    outcome known; `date=` partitions use it
//! latency_ms          uint64                yes   finished - started
//! outcome             utf8                  no    see `Outcome`
//! http_status         uint16                yes
//! error_kind          utf8                  yes   see `ErrorKind` and `DecodeError::kind`
//! error_message       utf8                  yes
//! response_snippet    utf8                  yes   first bytes of the response body (lossy UTF-8)
//! response_truncated  bool                  yes   the body was longer than the snippet
//! body_sha256         utf8                  yes   hex SHA-256 of the request body
//! next_attempt_at     timestamp[ms, UTC]    yes   when a retry is scheduled
//! retry_after         utf8                  yes   the response's Retry-After, as sent
//! location            utf8                  yes   the response's Location (redirects)
//! response_lossy      bool                  yes   the snippet replaced invalid UTF-8 (since v2)
//! ```
//!
//! A later schema version only adds nullable columns; files carry the version in their
//! key-value metadata under `hookflow.attempt_schema_version`. Version 2 added
//! `response_lossy`; readers treat it as null in version 1 files.

use std::sync::Arc;

use arrow::array::{
    ArrayRef, BooleanBuilder, RecordBatch, StringBuilder, TimestampMillisecondBuilder,
    UInt16Builder, UInt32Builder, UInt64Builder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use serde::{Deserialize, Serialize};

use crate::Millis;

/// Version of the attempt schema written into every archive file's metadata.
pub const ATTEMPT_SCHEMA_VERSION: u32 = 2;

/// The result an attempt row records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Outcome {
    /// The endpoint responded with a 2xx status.
    Delivered,
    /// The attempt failed and a retry is scheduled (`next_attempt_at`).
    Failed,
    /// The delivery was given up: permanent failure or retries exhausted.
    DeadLettered,
    /// No endpoint subscribes to the event.
    Unrouted,
    /// The record could not be decoded into an event.
    Invalid,
    /// The event outlived the maximum event age before it could be delivered.
    Expired,
}

impl Outcome {
    /// The name archived in the `outcome` column.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Delivered => "delivered",
            Outcome::Failed => "failed",
            Outcome::DeadLettered => "dead_lettered",
            Outcome::Unrouted => "unrouted",
            Outcome::Invalid => "invalid",
            Outcome::Expired => "expired",
        }
    }

    /// Returns whether nothing more will happen to the delivery or record.
    pub fn is_terminal(self) -> bool {
        !matches!(self, Outcome::Failed)
    }
}

/// Why an HTTP attempt did not deliver, archived in the `error_kind` column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum ErrorKind {
    /// The endpoint responded with a 5xx status, 408, or another status no other kind names.
    HttpStatus,
    /// The endpoint responded with 429 Too Many Requests.
    Throttled,
    /// The endpoint responded with 410 Gone: it asked not to be sent anything more.
    Gone,
    /// The endpoint responded with a 4xx status other than 408, 410 and 429.
    ClientError,
    /// The endpoint responded with a redirect, which is not followed.
    Redirect,
    /// Connecting failed (refused, unreachable, DNS).
    Connect,
    /// The connect or total timeout elapsed.
    Timeout,
    /// The connection broke during the request or response.
    Io,
    /// The endpoint's address is not allowed (private, loopback, … not in the allow list).
    Refused,
    /// The endpoint is not configured on this pipeline.
    UnknownEndpoint,
    /// The request could not be built (invalid URL, header or secret).
    Request,
    /// The endpoint is disabled.
    EndpointDisabled,
    /// The event is older than the maximum event age.
    Expired,
    /// The payload is gone from the source (past its retention) when a delivery came due.
    PayloadExpired,
    /// The endpoint was deleted while the delivery was pending, queued or parked.
    EndpointDeleted,
}

impl ErrorKind {
    /// Every kind, in declaration order.
    pub const ALL: [ErrorKind; 15] = [
        ErrorKind::HttpStatus,
        ErrorKind::Throttled,
        ErrorKind::Gone,
        ErrorKind::ClientError,
        ErrorKind::Redirect,
        ErrorKind::Connect,
        ErrorKind::Timeout,
        ErrorKind::Io,
        ErrorKind::Refused,
        ErrorKind::UnknownEndpoint,
        ErrorKind::Request,
        ErrorKind::EndpointDisabled,
        ErrorKind::Expired,
        ErrorKind::PayloadExpired,
        ErrorKind::EndpointDeleted,
    ];

    /// The kind whose archived name is `name`, if any.
    pub fn from_name(name: &str) -> Option<ErrorKind> {
        ErrorKind::ALL
            .into_iter()
            .find(|kind| kind.as_str() == name)
    }

    /// The name archived in the `error_kind` column.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::HttpStatus => "http_status",
            ErrorKind::Throttled => "throttled",
            ErrorKind::Gone => "gone",
            ErrorKind::ClientError => "client_error",
            ErrorKind::Redirect => "redirect",
            ErrorKind::Connect => "connect",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Io => "io",
            ErrorKind::Refused => "refused",
            ErrorKind::UnknownEndpoint => "unknown_endpoint",
            ErrorKind::Request => "request",
            ErrorKind::EndpointDisabled => "endpoint_disabled",
            ErrorKind::Expired => "expired",
            ErrorKind::PayloadExpired => "payload_expired",
            ErrorKind::EndpointDeleted => "endpoint_deleted",
        }
    }
}

/// One row of the attempt archive. See the module documentation for the columns.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
#[allow(missing_docs)]
pub struct AttemptRow {
    pub event_id: Option<String>,
    pub tenant: Option<String>,
    pub endpoint_id: Option<String>,
    pub event_type: Option<String>,
    pub generation: u32,
    pub replay_id: Option<String>,
    pub attempt: u32,
    pub partition: u32,
    pub offset: u64,
    pub url: Option<String>,
    pub ingested_at_ms: Option<Millis>,
    pub due_at_ms: Millis,
    pub started_at_ms: Option<Millis>,
    pub finished_at_ms: Millis,
    pub latency_ms: Option<u64>,
    /// The `outcome` column, as [`Outcome::as_str`] spells it.
    pub outcome: String,
    pub http_status: Option<u16>,
    pub error_kind: Option<String>,
    pub error_message: Option<String>,
    pub response_snippet: Option<String>,
    pub response_truncated: Option<bool>,
    pub body_sha256: Option<String>,
    pub next_attempt_at_ms: Option<Millis>,
    pub retry_after: Option<String>,
    pub location: Option<String>,
    /// Whether `response_snippet` differs from the bytes received, because bytes that are not
    /// UTF-8 were replaced with U+FFFD. `None` without a response.
    pub response_lossy: Option<bool>,
}

impl AttemptRow {
    /// Builds the row of a record that could not be decoded: dead-lettered with the decode
    /// error, without a request.
    pub fn invalid(
        record: &crate::SourceRecord,
        error: &crate::DecodeError,
        due_at_ms: Millis,
        finished_at_ms: Millis,
    ) -> Self {
        // Whatever identifies the event is kept, when the record parses that far.
        let parsed: Option<serde_json::Map<String, serde_json::Value>> =
            serde_json::from_slice(&record.value).ok();
        let text = |name: &str| {
            parsed
                .as_ref()
                .and_then(|fields| fields.get(name)?.as_str().map(str::to_string))
        };
        AttemptRow {
            event_id: text("id"),
            tenant: text("tenant"),
            event_type: text("type"),
            partition: record.partition,
            offset: record.offset,
            ingested_at_ms: record.appended_at_ms,
            due_at_ms,
            finished_at_ms,
            outcome: Outcome::Invalid.as_str().to_string(),
            error_kind: Some(error.kind().to_string()),
            error_message: Some(error.to_string()),
            ..AttemptRow::default()
        }
    }

    /// Builds the row of an event that no endpoint subscribes to, decided without a request.
    pub fn unrouted(
        ingested: &crate::IngestedEvent,
        due_at_ms: Millis,
        finished_at_ms: Millis,
    ) -> Self {
        AttemptRow {
            event_id: Some(ingested.event.id.clone()),
            tenant: Some(ingested.event.tenant.clone()),
            event_type: Some(ingested.event.event_type.clone()),
            partition: ingested.partition,
            offset: ingested.offset,
            ingested_at_ms: ingested.appended_at_ms,
            due_at_ms,
            finished_at_ms,
            outcome: Outcome::Unrouted.as_str().to_string(),
            ..AttemptRow::default()
        }
    }
}

/// Returns the Arrow schema of the attempt archive.
pub fn attempt_schema() -> SchemaRef {
    let ts = || DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()));
    let metadata = [(
        "hookflow.attempt_schema_version".to_string(),
        ATTEMPT_SCHEMA_VERSION.to_string(),
    )];
    Arc::new(
        Schema::new(vec![
            Field::new("event_id", DataType::Utf8, true),
            Field::new("tenant", DataType::Utf8, true),
            Field::new("endpoint_id", DataType::Utf8, true),
            Field::new("event_type", DataType::Utf8, true),
            Field::new("generation", DataType::UInt32, false),
            Field::new("replay_id", DataType::Utf8, true),
            Field::new("attempt", DataType::UInt32, false),
            Field::new("partition", DataType::UInt32, false),
            Field::new("offset", DataType::UInt64, false),
            Field::new("url", DataType::Utf8, true),
            Field::new("ingested_at", ts(), true),
            Field::new("due_at", ts(), false),
            Field::new("started_at", ts(), true),
            Field::new("finished_at", ts(), false),
            Field::new("latency_ms", DataType::UInt64, true),
            Field::new("outcome", DataType::Utf8, false),
            Field::new("http_status", DataType::UInt16, true),
            Field::new("error_kind", DataType::Utf8, true),
            Field::new("error_message", DataType::Utf8, true),
            Field::new("response_snippet", DataType::Utf8, true),
            Field::new("response_truncated", DataType::Boolean, true),
            Field::new("body_sha256", DataType::Utf8, true),
            Field::new("next_attempt_at", ts(), true),
            Field::new("retry_after", DataType::Utf8, true),
            Field::new("location", DataType::Utf8, true),
            Field::new("response_lossy", DataType::Boolean, true),
        ])
        .with_metadata(
            metadata
                .into_iter()
                .collect::<std::collections::HashMap<_, _>>(),
        ),
    )
}

/// Converts rows into one Arrow record batch with [`attempt_schema`].
///
/// # Errors
///
/// Fails only if the arrays disagree with the schema, which would be a bug here.
pub fn attempts_to_record_batch(
    rows: &[AttemptRow],
) -> Result<RecordBatch, arrow::error::ArrowError> {
    let strings = |get: &dyn Fn(&AttemptRow) -> Option<&str>| -> ArrayRef {
        let mut builder = StringBuilder::new();
        for row in rows {
            builder.append_option(get(row));
        }
        Arc::new(builder.finish())
    };
    let times = |get: &dyn Fn(&AttemptRow) -> Option<Millis>| -> ArrayRef {
        let mut builder = TimestampMillisecondBuilder::new().with_timezone("UTC");
        for row in rows {
            builder.append_option(get(row).map(millis_to_i64));
        }
        Arc::new(builder.finish())
    };
    let u32s = |get: &dyn Fn(&AttemptRow) -> u32| -> ArrayRef {
        let mut builder = UInt32Builder::new();
        for row in rows {
            builder.append_value(get(row));
        }
        Arc::new(builder.finish())
    };
    let u64s = |get: &dyn Fn(&AttemptRow) -> Option<u64>| -> ArrayRef {
        let mut builder = UInt64Builder::new();
        for row in rows {
            builder.append_option(get(row));
        }
        Arc::new(builder.finish())
    };
    let mut status = UInt16Builder::new();
    let mut truncated = BooleanBuilder::new();
    let mut lossy = BooleanBuilder::new();
    for row in rows {
        status.append_option(row.http_status);
        truncated.append_option(row.response_truncated);
        lossy.append_option(row.response_lossy);
    }

    let columns: Vec<ArrayRef> = vec![
        strings(&|r| r.event_id.as_deref()),
        strings(&|r| r.tenant.as_deref()),
        strings(&|r| r.endpoint_id.as_deref()),
        strings(&|r| r.event_type.as_deref()),
        u32s(&|r| r.generation),
        strings(&|r| r.replay_id.as_deref()),
        u32s(&|r| r.attempt),
        u32s(&|r| r.partition),
        u64s(&|r| Some(r.offset)),
        strings(&|r| r.url.as_deref()),
        times(&|r| r.ingested_at_ms),
        times(&|r| Some(r.due_at_ms)),
        times(&|r| r.started_at_ms),
        times(&|r| Some(r.finished_at_ms)),
        u64s(&|r| r.latency_ms),
        strings(&|r| Some(r.outcome.as_str())),
        Arc::new(status.finish()),
        strings(&|r| r.error_kind.as_deref()),
        strings(&|r| r.error_message.as_deref()),
        strings(&|r| r.response_snippet.as_deref()),
        Arc::new(truncated.finish()),
        strings(&|r| r.body_sha256.as_deref()),
        times(&|r| r.next_attempt_at_ms),
        strings(&|r| r.retry_after.as_deref()),
        strings(&|r| r.location.as_deref()),
        Arc::new(lossy.finish()),
    ];
    RecordBatch::try_new(attempt_schema(), columns)
}

fn millis_to_i64(ms: Millis) -> i64 {
    i64::try_from(ms).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_kind_names_round_trip() {
        for kind in ErrorKind::ALL {
            assert_eq!(ErrorKind::from_name(kind.as_str()), Some(kind));
        }
        assert_eq!(ErrorKind::from_name("no_such_kind"), None);
    }
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::UInt32Type;

    #[test]
    fn record_batch_matches_schema() {
        let rows = vec![
            AttemptRow {
                event_id: Some("evt_1".into()),
                attempt: 1,
                outcome: Outcome::Delivered.as_str().into(),
                http_status: Some(200),
                finished_at_ms: 1_700_000_000_000,
                response_lossy: Some(true),
                ..AttemptRow::default()
            },
            AttemptRow {
                outcome: Outcome::Invalid.as_str().into(),
                error_kind: Some("invalid_json".into()),
                ..AttemptRow::default()
            },
        ];
        let batch = attempts_to_record_batch(&rows).expect("batch");
        assert_eq!(batch.num_rows(), 2);
        assert_eq!(batch.schema(), attempt_schema());
        let attempts = batch.column_by_name("attempt").expect("attempt column");
        assert_eq!(attempts.as_primitive::<UInt32Type>().value(0), 1);
        let event_ids = batch.column_by_name("event_id").expect("event_id column");
        assert!(event_ids.is_null(1));
        let lossy = batch
            .column_by_name("response_lossy")
            .expect("response_lossy column");
        assert!(lossy.as_boolean().value(0));
        assert!(lossy.is_null(1));
    }
}
