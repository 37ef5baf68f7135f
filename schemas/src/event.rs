//! Events as producers publish them, and the records and deliveries built from them.
//!
//! An event on the stream is one JSON object:
//!
//! ```text
//! {"id": "evt_1", "tenant": "acme", "type": "charge.succeeded",
//!  "created_at": "2026-12-04T10:00:00Z", "payload": {...any JSON...}}
//! ```
//!
//! The payload is kept as the exact bytes the producer wrote, because receivers verify
//! signatures over those bytes and a re-serialization could reorder keys, change number
//! spelling or escape unicode differently.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::{Millis, Replay};

/// The default limit on a payload's size in bytes (256 KiB).
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 256 * 1024;

/// The longest `id`, `tenant` or `type` accepted, in bytes.
const MAX_NAME_BYTES: usize = 255;

/// A validated event.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Event {
    /// The producer's idempotency key, unique within its tenant.
    pub id: String,
    /// The tenant (the producer's customer) the event belongs to.
    pub tenant: String,
    /// The event type, such as `charge.succeeded`.
    pub event_type: String,
    /// The producer's creation time as written (RFC 3339).
    pub created_at: String,
    /// The payload exactly as the producer wrote it: valid JSON, stored as bytes.
    pub payload: Vec<u8>,
    /// Set on a replay record: the replay run it belongs to and the endpoints it goes to.
    #[serde(default)]
    pub replay: Option<Replay>,
}

/// One record as read from a source partition, before decoding.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SourceRecord {
    /// The partition the record was read from.
    pub partition: u32,
    /// The record's offset within its partition.
    pub offset: u64,
    /// When the record was appended to the source, if the source keeps that (ms since epoch).
    pub appended_at_ms: Option<Millis>,
    /// The record's bytes.
    pub value: Vec<u8>,
}

/// A decoded event together with where and when the pipeline read it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct IngestedEvent {
    /// The source partition of the record.
    pub partition: u32,
    /// The record's offset within its partition.
    pub offset: u64,
    /// When the record was appended to the source, if known (ms since epoch).
    pub appended_at_ms: Option<Millis>,
    /// When the pipeline read the record (ms since epoch).
    pub read_at_ms: Millis,
    /// The event itself.
    pub event: Event,
}

/// One event bound for one endpoint: the unit the deliver operator sends.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Delivery {
    /// The endpoint the event goes to.
    pub endpoint_id: String,
    /// 0 for the original delivery; a replay or resend gets a higher generation.
    pub generation: u32,
    /// The attempt about to be made, counting from 1.
    pub attempt: u32,
    /// The event and its source position. On the retry loop the payload is left empty (a
    /// valid event's payload never is) and the deliver operator reads it back from the
    /// source when the retry is due, so that pending retries hold no payload in memory.
    pub ingested: IngestedEvent,
}

impl Delivery {
    /// Returns whether the payload is present, as opposed to left behind on the retry loop.
    pub fn has_payload(&self) -> bool {
        !self.ingested.event.payload.is_empty()
    }
}

/// A delivery stamped to a later time, as the state store keeps it: without its payload,
/// keyed by (partition, offset, endpoint id, generation). The payload is read back from the
/// source when the delivery comes due.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PendingDelivery {
    /// The source partition of the event's record.
    pub partition: u32,
    /// The record's offset within its partition.
    pub offset: u64,
    /// The endpoint the event goes to.
    pub endpoint_id: String,
    /// 0 for the original delivery; a replay or resend gets a higher generation.
    pub generation: u32,
    /// The attempt to make when the delivery comes due, counting from 1.
    pub attempt: u32,
    /// When the delivery is due (ms since epoch).
    pub due_ms: Millis,
    /// The event's tenant.
    pub tenant: String,
    /// The event's id.
    pub event_id: String,
    /// The event's type.
    pub event_type: String,
    /// The event's creation time as the producer wrote it.
    pub created_at: String,
    /// When the pipeline first read the event (ms since epoch); the maximum age counts from it.
    pub read_at_ms: Millis,
    /// When the record was appended to the source, if known.
    pub appended_at_ms: Option<Millis>,
    /// The replay the delivery belongs to, if it comes from a replay record. Entries written
    /// before replays existed decode with none.
    #[serde(default)]
    pub replay_id: Option<String>,
}

impl PendingDelivery {
    /// The due time of a parked delivery: one whose endpoint is disabled, which waits without
    /// a due time until the endpoint is enabled again. The state store keeps it as no time.
    pub const PARKED: Millis = i64::MAX as Millis;

    /// Returns whether the delivery is parked (see [`PendingDelivery::PARKED`]).
    pub fn is_parked(&self) -> bool {
        self.due_ms == Self::PARKED
    }

    /// Builds the pending form of `delivery`, due at `due_ms`.
    pub fn from_delivery(delivery: &Delivery, due_ms: Millis) -> Self {
        let ingested = &delivery.ingested;
        PendingDelivery {
            partition: ingested.partition,
            offset: ingested.offset,
            endpoint_id: delivery.endpoint_id.clone(),
            generation: delivery.generation,
            attempt: delivery.attempt,
            due_ms,
            tenant: ingested.event.tenant.clone(),
            event_id: ingested.event.id.clone(),
            event_type: ingested.event.event_type.clone(),
            created_at: ingested.event.created_at.clone(),
            read_at_ms: ingested.read_at_ms,
            appended_at_ms: ingested.appended_at_ms,
            replay_id: ingested.event.replay_id().map(str::to_string),
        }
    }

    /// Rebuilds the delivery this entry restores, without its payload.
    pub fn to_delivery(&self) -> Delivery {
        Delivery {
            endpoint_id: self.endpoint_id.clone(),
            generation: self.generation,
            attempt: self.attempt,
            ingested: IngestedEvent {
                partition: self.partition,
                offset: self.offset,
                appended_at_ms: self.appended_at_ms,
                read_at_ms: self.read_at_ms,
                event: Event {
                    id: self.event_id.clone(),
                    tenant: self.tenant.clone(),
                    event_type: self.event_type.clone(),
                    created_at: self.created_at.clone(),
                    payload: Vec::new(),
                    // Only the id and generation matter once routed: the attempt rows carry
                    // them. The targets were used up by route.
                    replay: self.replay_id.as_ref().map(|id| Replay {
                        id: id.clone(),
                        generation: self.generation,
                        endpoints: vec![self.endpoint_id.clone()],
                        from_partition: None,
                        from_offset: None,
                    }),
                },
            },
        }
    }
}

/// The first occurrence of a (tenant, event id), as dedup remembers it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct FirstSeen {
    /// The event's tenant.
    pub tenant: String,
    /// The event's id.
    pub event_id: String,
    /// The partition of the first record.
    pub partition: u32,
    /// The offset of the first record.
    pub offset: u64,
    /// When the pipeline first read it (ms since epoch).
    pub first_seen_ms: Millis,
}

/// Why a record could not be decoded into an [`Event`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The bytes are not valid UTF-8.
    #[error("record is not valid UTF-8 (invalid byte at position {position})")]
    NotUtf8 {
        /// Byte offset of the first invalid byte.
        position: usize,
    },
    /// The bytes are not a JSON object of the expected shape.
    #[error("invalid JSON: {0}")]
    InvalidJson(String),
    /// A required field is absent.
    #[error("missing field `{0}`")]
    MissingField(&'static str),
    /// A field is present but unusable.
    #[error("invalid field `{field}`: {reason}")]
    InvalidField {
        /// The field's name.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The payload exceeds the configured limit.
    #[error("payload is {size} bytes, over the limit of {limit} bytes")]
    PayloadTooLarge {
        /// The payload's size in bytes.
        size: usize,
        /// The configured limit in bytes.
        limit: usize,
    },
}

impl DecodeError {
    /// A short stable name for the error, archived as the attempt row's error kind.
    pub fn kind(&self) -> &'static str {
        match self {
            DecodeError::NotUtf8 { .. } => "not_utf8",
            DecodeError::InvalidJson(_) => "invalid_json",
            DecodeError::MissingField(_) => "missing_field",
            DecodeError::InvalidField { .. } => "invalid_field",
            DecodeError::PayloadTooLarge { .. } => "payload_too_large",
        }
    }
}

/// The wire shape, borrowed from the input so that the payload's bytes are not re-encoded.
#[derive(Deserialize)]
struct WireEvent<'a> {
    #[serde(borrow)]
    id: Option<&'a RawValue>,
    #[serde(borrow)]
    tenant: Option<&'a RawValue>,
    #[serde(rename = "type", borrow)]
    event_type: Option<&'a RawValue>,
    #[serde(borrow)]
    created_at: Option<&'a RawValue>,
    #[serde(borrow)]
    payload: Option<&'a RawValue>,
    #[serde(borrow)]
    replay: Option<&'a RawValue>,
}

/// Decodes and validates one record.
///
/// Unknown top-level fields are ignored so that producers can add metadata. `id`, `tenant`
/// and `type` must be non-empty strings of at most 255 bytes without control characters;
/// `created_at` must be RFC 3339; `payload` may be any JSON value up to `max_payload_bytes`.
///
/// # Errors
///
/// Returns the first problem found, naming the field.
pub fn decode_event(bytes: &[u8], max_payload_bytes: usize) -> Result<Event, DecodeError> {
    let text = std::str::from_utf8(bytes).map_err(|e| DecodeError::NotUtf8 {
        position: e.valid_up_to(),
    })?;

    let wire: WireEvent<'_> =
        serde_json::from_str(text.trim_end_matches(['\r', '\n'])).map_err(|e| {
            if text.trim_start().starts_with('{') {
                DecodeError::InvalidJson(e.to_string())
            } else {
                DecodeError::InvalidJson("expected a JSON object, one event per line".to_string())
            }
        })?;

    let id = name_field("id", wire.id)?;
    let tenant = name_field("tenant", wire.tenant)?;
    let event_type = name_field("type", wire.event_type)?;
    let created_at = string_field("created_at", wire.created_at)?;
    time::OffsetDateTime::parse(&created_at, &time::format_description::well_known::Rfc3339)
        .map_err(|e| DecodeError::InvalidField {
            field: "created_at",
            reason: format!("`{created_at}` is not an RFC 3339 time ({e})"),
        })?;

    let payload = wire
        .payload
        .ok_or(DecodeError::MissingField("payload"))?
        .get()
        .as_bytes();
    if payload.len() > max_payload_bytes {
        return Err(DecodeError::PayloadTooLarge {
            size: payload.len(),
            limit: max_payload_bytes,
        });
    }

    let replay = match wire.replay {
        None => None,
        Some(raw) => Some(replay_field(raw)?),
    };

    Ok(Event {
        id,
        tenant,
        event_type,
        created_at,
        payload: payload.to_vec(),
        replay,
    })
}

/// Decodes the `replay` mark of a replay record.
fn replay_field(raw: &RawValue) -> Result<Replay, DecodeError> {
    let invalid = |reason: String| DecodeError::InvalidField {
        field: "replay",
        reason,
    };
    let replay: Replay = serde_json::from_str(raw.get()).map_err(|e| invalid(e.to_string()))?;
    let names = std::iter::once(&replay.id).chain(&replay.endpoints);
    for name in names {
        if name.is_empty() || name.len() > MAX_NAME_BYTES || name.chars().any(char::is_control) {
            return Err(invalid(format!(
                "`{}` is not a valid id (1 to {MAX_NAME_BYTES} bytes, no control characters)",
                truncate(name, 40)
            )));
        }
    }
    if replay.generation == 0 {
        return Err(invalid(
            "generation must be above 0 (0 is the original delivery)".into(),
        ));
    }
    if replay.endpoints.is_empty() {
        return Err(invalid("endpoints must name at least one endpoint".into()));
    }
    Ok(replay)
}

fn string_field(field: &'static str, raw: Option<&RawValue>) -> Result<String, DecodeError> {
    let raw = raw.ok_or(DecodeError::MissingField(field))?;
    serde_json::from_str::<String>(raw.get()).map_err(|_| DecodeError::InvalidField {
        field,
        reason: format!("expected a string, found `{}`", truncate(raw.get(), 40)),
    })
}

fn name_field(field: &'static str, raw: Option<&RawValue>) -> Result<String, DecodeError> {
    let value = string_field(field, raw)?;
    let problem = if value.is_empty() {
        Some("must not be empty".to_string())
    } else if value.len() > MAX_NAME_BYTES {
        Some(format!(
            "is {} bytes, over the limit of {MAX_NAME_BYTES}",
            value.len()
        ))
    } else if value.chars().any(char::is_control) {
        Some("must not contain control characters".to_string())
    } else {
        None
    };
    match problem {
        Some(reason) => Err(DecodeError::InvalidField { field, reason }),
        None => Ok(value),
    }
}

fn truncate(text: &str, max_chars: usize) -> String {
    match text.char_indices().nth(max_chars) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{"id":"evt_1","tenant":"acme","type":"charge.succeeded","created_at":"2026-12-04T10:00:00Z","payload":{"b": 1,  "a":"é", "n": 12345678901234567890}}"#;

    #[test]
    fn decode_keeps_payload_bytes() {
        let event = decode_event(GOOD.as_bytes(), DEFAULT_MAX_PAYLOAD_BYTES).expect("valid event");
        assert_eq!(event.id, "evt_1");
        assert_eq!(event.tenant, "acme");
        assert_eq!(event.event_type, "charge.succeeded");
        assert_eq!(
            event.payload,
            r#"{"b": 1,  "a":"é", "n": 12345678901234567890}"#.as_bytes()
        );
    }

    #[test]
    fn decode_rejects_bad_records() {
        let cases: &[(&[u8], &str)] = &[
            (b"\xff\xfe", "not_utf8"),
            (b"{not json", "invalid_json"),
            (b"[1,2]", "invalid_json"),
            (br#"{"tenant":"a","type":"t","created_at":"2026-12-04T10:00:00Z","payload":1}"#, "missing_field"),
            (br#"{"id":7,"tenant":"a","type":"t","created_at":"2026-12-04T10:00:00Z","payload":1}"#, "invalid_field"),
            (br#"{"id":"","tenant":"a","type":"t","created_at":"2026-12-04T10:00:00Z","payload":1}"#, "invalid_field"),
            (br#"{"id":"e","tenant":"a","type":"t","created_at":"yesterday","payload":1}"#, "invalid_field"),
            (br#"{"id":"e","tenant":"a","type":"t","created_at":"2026-12-04T10:00:00Z"}"#, "missing_field"),
            (br#"{"id":"e","tenant":"a","type":"t","created_at":"2026-12-04T10:00:00Z","payload":1,"replay":{"id":"r","generation":0,"endpoints":["ep"]}}"#, "invalid_field"),
            (br#"{"id":"e","tenant":"a","type":"t","created_at":"2026-12-04T10:00:00Z","payload":1,"replay":{"id":"r","generation":1,"endpoints":[]}}"#, "invalid_field"),
            (br#"{"id":"e","tenant":"a","type":"t","created_at":"2026-12-04T10:00:00Z","payload":1,"replay":{"id":"","generation":1,"endpoints":["ep"]}}"#, "invalid_field"),
            (br#"{"id":"e","tenant":"a","type":"t","created_at":"2026-12-04T10:00:00Z","payload":1,"replay":"rp"}"#, "invalid_field"),
        ];
        for (bytes, kind) in cases {
            let err = decode_event(bytes, DEFAULT_MAX_PAYLOAD_BYTES).expect_err("must be rejected");
            assert_eq!(
                err.kind(),
                *kind,
                "{}: {err}",
                String::from_utf8_lossy(bytes)
            );
        }
    }

    #[test]
    fn decode_names_missing_field() {
        let err = decode_event(
            br#"{"id":"e","tenant":"a","created_at":"2026-12-04T10:00:00Z","payload":1}"#,
            1024,
        )
        .expect_err("type is missing");
        assert_eq!(err.to_string(), "missing field `type`");
    }

    #[test]
    fn decode_enforces_payload_limit() {
        let err = decode_event(GOOD.as_bytes(), 10).expect_err("payload over 10 bytes");
        assert!(
            matches!(err, DecodeError::PayloadTooLarge { limit: 10, .. }),
            "{err}"
        );
    }
}
