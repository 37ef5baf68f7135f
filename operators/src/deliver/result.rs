//! The result of one delivery attempt, its classification, and the attempt row built from it.

use hookflow_schemas::{AttemptRow, Delivery, ErrorKind, Millis, Outcome};

/// The observation an attempt is classified by: the response status, or the failure that
/// kept a response from arriving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observation {
    /// The endpoint responded with this HTTP status.
    Status(u16),
    /// No response arrived, or no request was sent.
    Failure(ErrorKind),
}

/// The classification of an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// The outcome of the delivery.
    pub outcome: Outcome,
    /// The reason the attempt did not deliver, or `None` when it delivered.
    pub error_kind: Option<ErrorKind>,
}

/// Classifies an attempt by what it observed.
///
/// # Contract
///
/// | observation                                   | outcome         | error kind      |
/// | --------------------------------------------- | --------------- | --------------- |
/// | 2xx                                           | `delivered`     | none            |
/// | 3xx (redirects are not followed)              | `failed`        | `redirect`      |
/// | 410 Gone                                      | `dead_lettered` | `gone`          |
/// | 429 Too Many Requests                         | `failed`        | `throttled`     |
/// | 408, 5xx and any other status                 | `failed`        | `http_status`   |
/// | other 4xx                                     | `failed`        | `client_error`  |
/// | connect error, timeout, broken connection     | `failed`        | that kind       |
/// | refused address, unusable request, no endpoint| `dead_lettered` | that kind       |
///
/// `failed` means "retry on the schedule"; the deliver operator dead-letters a `client_error`
/// after [`RetryPolicy::client_error_retries`](crate::retry::RetryPolicy) retries, and
/// disables the endpoint on `gone`, since the receiver asked for both.
pub fn classify(observation: Observation) -> Verdict {
    let error_kind = match observation {
        Observation::Status(200..=299) => None,
        Observation::Status(300..=399) => Some(ErrorKind::Redirect),
        Observation::Status(410) => Some(ErrorKind::Gone),
        Observation::Status(429) => Some(ErrorKind::Throttled),
        Observation::Status(408) => Some(ErrorKind::HttpStatus),
        Observation::Status(400..=499) => Some(ErrorKind::ClientError),
        Observation::Status(_) => Some(ErrorKind::HttpStatus),
        Observation::Failure(kind) => Some(kind),
    };
    let outcome = match error_kind {
        None => Outcome::Delivered,
        Some(kind) if is_retryable(kind) => Outcome::Failed,
        Some(_) => Outcome::DeadLettered,
    };
    Verdict {
        outcome,
        error_kind,
    }
}

/// Returns whether a later attempt may succeed where one that failed with `kind` did not.
pub fn is_retryable(kind: ErrorKind) -> bool {
    matches!(
        kind,
        ErrorKind::HttpStatus
            | ErrorKind::Throttled
            | ErrorKind::ClientError
            | ErrorKind::Redirect
            | ErrorKind::Connect
            | ErrorKind::Timeout
            | ErrorKind::Io
    )
}

/// Returns whether a failure of `kind` means that the endpoint is overloaded (429, or a
/// timeout), which slows the endpoint down: see the module `health`.
pub fn is_overload(kind: ErrorKind) -> bool {
    matches!(kind, ErrorKind::Throttled | ErrorKind::Timeout)
}

/// Returns whether an attempt that failed with `kind` contacted the endpoint at all.
///
/// A rejected address, an unusable request and a missing endpoint are decisions made
/// without a request, which the attempt row records as attempt number 0.
pub fn contacted_endpoint(kind: Option<ErrorKind>) -> bool {
    !matches!(
        kind,
        Some(ErrorKind::Refused | ErrorKind::Request | ErrorKind::UnknownEndpoint)
    )
}

/// Everything one attempt recorded, before it is combined with its delivery into a row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptResult {
    /// The one clock read that fed both `webhook-timestamp` and the row's `started_at`.
    pub started_at_ms: Millis,
    /// When the outcome was known.
    pub finished_at_ms: Millis,
    /// The endpoint URL without user name and password; `None` when it does not parse.
    pub url: Option<String>,
    /// The classification.
    pub verdict: Verdict,
    /// The response status, when a response arrived.
    pub http_status: Option<u16>,
    /// A description of the failure for a person to read.
    pub error_message: Option<String>,
    /// The first bytes of the response body as lossy UTF-8, when a response arrived.
    pub response_snippet: Option<String>,
    /// Whether the body was longer than the snippet or its reading stopped early.
    pub response_truncated: Option<bool>,
    /// Whether the snippet replaced bytes that are not UTF-8 with U+FFFD, when a response
    /// arrived.
    pub response_lossy: Option<bool>,
    /// How many response body bytes were read: at most the configured cap plus the rest of
    /// the chunk that reached it.
    pub response_bytes_read: u64,
    /// Hex SHA-256 of the request body.
    pub body_sha256: String,
    /// The response's `Retry-After` header as sent (cut at 1 KiB).
    pub retry_after: Option<String>,
    /// The response's `Location` header as sent (cut at 1 KiB).
    pub location: Option<String>,
}

impl AttemptResult {
    /// Time from the start of the request to the outcome, in ms.
    pub fn latency_ms(&self) -> u64 {
        self.finished_at_ms.saturating_sub(self.started_at_ms)
    }

    /// Builds the attempt row for `delivery`, due at dataflow time `due_at_ms`.
    pub fn to_row(&self, delivery: &Delivery, due_at_ms: Millis) -> AttemptRow {
        let contacted = contacted_endpoint(self.verdict.error_kind);
        AttemptRow {
            attempt: if contacted { delivery.attempt } else { 0 },
            url: self.url.clone(),
            started_at_ms: Some(self.started_at_ms),
            finished_at_ms: self.finished_at_ms,
            latency_ms: Some(self.latency_ms()),
            outcome: self.verdict.outcome.as_str().to_string(),
            http_status: self.http_status,
            error_kind: self
                .verdict
                .error_kind
                .map(|kind| kind.as_str().to_string()),
            error_message: self.error_message.clone(),
            response_snippet: self.response_snippet.clone(),
            response_truncated: self.response_truncated,
            response_lossy: self.response_lossy,
            body_sha256: Some(self.body_sha256.clone()),
            retry_after: self.retry_after.clone(),
            location: self.location.clone(),
            ..delivery_row(delivery, due_at_ms)
        }
    }
}

/// Builds the dead-letter row for a delivery decided without a request (unknown or disabled
/// endpoint), finished at `now_ms`. `error_kind` is the `error_kind` column's value.
pub fn dead_letter_row(
    delivery: &Delivery,
    due_at_ms: Millis,
    now_ms: Millis,
    error_kind: &str,
    message: String,
) -> AttemptRow {
    AttemptRow {
        finished_at_ms: now_ms,
        outcome: Outcome::DeadLettered.as_str().to_string(),
        error_kind: Some(error_kind.to_string()),
        error_message: Some(message),
        ..delivery_row(delivery, due_at_ms)
    }
}

/// Builds the columns that come from the delivery itself, with attempt number 0 and no
/// request columns.
fn delivery_row(delivery: &Delivery, due_at_ms: Millis) -> AttemptRow {
    let ingested = &delivery.ingested;
    AttemptRow {
        event_id: Some(ingested.event.id.clone()),
        tenant: Some(ingested.event.tenant.clone()),
        endpoint_id: Some(delivery.endpoint_id.clone()),
        event_type: Some(ingested.event.event_type.clone()),
        generation: delivery.generation,
        replay_id: ingested.event.replay_id().map(str::to_string),
        attempt: 0,
        partition: ingested.partition,
        offset: ingested.offset,
        ingested_at_ms: ingested.appended_at_ms,
        due_at_ms,
        ..AttemptRow::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_table() {
        use ErrorKind::*;
        use Outcome::{DeadLettered, Delivered, Failed};
        let status = Observation::Status;
        let failure = Observation::Failure;
        #[rustfmt::skip]
        let cases = [
            (status(200), Delivered, None),
            (status(204), Delivered, None),
            (status(299), Delivered, None),
            (status(301), Failed, Some(Redirect)),
            (status(302), Failed, Some(Redirect)),
            (status(303), Failed, Some(Redirect)),
            (status(307), Failed, Some(Redirect)),
            (status(308), Failed, Some(Redirect)),
            (status(100), Failed, Some(HttpStatus)),
            (status(400), Failed, Some(ClientError)),
            (status(401), Failed, Some(ClientError)),
            (status(403), Failed, Some(ClientError)),
            (status(404), Failed, Some(ClientError)),
            (status(408), Failed, Some(HttpStatus)),
            (status(410), DeadLettered, Some(Gone)),
            (status(413), Failed, Some(ClientError)),
            (status(429), Failed, Some(Throttled)),
            (status(499), Failed, Some(ClientError)),
            (status(500), Failed, Some(HttpStatus)),
            (status(501), Failed, Some(HttpStatus)),
            (status(502), Failed, Some(HttpStatus)),
            (status(503), Failed, Some(HttpStatus)),
            (status(504), Failed, Some(HttpStatus)),
            (status(599), Failed, Some(HttpStatus)),
            (status(999), Failed, Some(HttpStatus)),
            (failure(Connect), Failed, Some(Connect)),
            (failure(Timeout), Failed, Some(Timeout)),
            (failure(Io), Failed, Some(Io)),
            (failure(Refused), DeadLettered, Some(Refused)),
            (failure(Request), DeadLettered, Some(Request)),
            (failure(UnknownEndpoint), DeadLettered, Some(UnknownEndpoint)),
        ];
        for (observation, outcome, error_kind) in cases {
            let verdict = classify(observation);
            assert_eq!(verdict.outcome, outcome, "{observation:?}");
            assert_eq!(verdict.error_kind, error_kind, "{observation:?}");
        }
    }

    #[test]
    fn overload_kinds() {
        use ErrorKind::*;
        for kind in [Throttled, Timeout] {
            assert!(is_overload(kind), "{kind:?}");
        }
        for kind in [
            HttpStatus,
            ClientError,
            Gone,
            Redirect,
            Connect,
            Io,
            Refused,
        ] {
            assert!(!is_overload(kind), "{kind:?}");
        }
    }

    #[test]
    fn contacted_endpoint_table() {
        use ErrorKind::*;
        #[rustfmt::skip]
        let cases = [
            (None, true),
            (Some(HttpStatus), true),
            (Some(Redirect), true),
            (Some(Connect), true),
            (Some(Timeout), true),
            (Some(Io), true),
            (Some(Refused), false),
            (Some(Request), false),
            (Some(UnknownEndpoint), false),
        ];
        for (kind, expected) in cases {
            assert_eq!(contacted_endpoint(kind), expected, "{kind:?}");
        }
    }
}
