//! The data model shared by every hookflow crate.
//!
//! Events come off the source as raw bytes and are decoded here ([`decode_event`]) by both the
//! `publish` command and the pipeline, so both reject the same lines for the same reasons.
//! Endpoints and their event-type patterns, the delivery that pairs one event with one
//! endpoint, and the attempt row that the Parquet archive stores are defined here too, together
//! with the Arrow schema of that archive. Nothing here performs I/O or keeps state.

#![warn(missing_docs)]

mod attempt;
mod endpoint;
mod event;
mod hash;
mod replay;

pub use attempt::{
    attempt_schema, attempts_to_record_batch, AttemptRow, ErrorKind, Outcome,
    ATTEMPT_SCHEMA_VERSION,
};
pub use endpoint::{
    redact_user_info, Endpoint, EventTypePattern, PatternError, RateLimit, SigningSecret,
};
pub use event::{
    decode_event, DecodeError, Delivery, Event, FirstSeen, IngestedEvent, PendingDelivery,
    SourceRecord, DEFAULT_MAX_PAYLOAD_BYTES,
};
pub use hash::{fnv1a, fnv1a_extend, FNV1A_OFFSET};
pub use replay::{encode_replay_record, Replay};

/// Milliseconds since the Unix epoch, UTC. Dataflow timestamps use the same unit.
pub type Millis = u64;

/// Formats milliseconds since the Unix epoch as RFC 3339 in UTC, for logs and messages.
pub fn format_millis(ms: Millis) -> String {
    let nanos = i128::from(ms) * 1_000_000;
    time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("{ms} ms"))
}
