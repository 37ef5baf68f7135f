//! Endpoints (a customer's receiving URL) and the event-type patterns they subscribe with.

use serde::{Deserialize, Serialize};

/// A customer's webhook endpoint.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Endpoint {
    /// Globally unique id.
    pub id: String,
    /// The tenant whose events this endpoint receives.
    pub tenant: String,
    /// The URL deliveries are POSTed to.
    pub url: String,
    /// The event types the endpoint subscribes to; an event matching any of them is delivered.
    pub event_types: Vec<EventTypePattern>,
    /// Signing secrets (`whsec_` followed by base64); each active one signs every request.
    pub secrets: Vec<String>,
    /// Limit on a whole request, from connect to the last response byte read (ms).
    pub timeout_ms: u64,
    /// Limit on establishing the connection (ms).
    pub connect_timeout_ms: u64,
    /// Maximum requests in flight to this endpoint at once.
    pub max_in_flight: usize,
    /// Whether deliveries are attempted.
    pub enabled: bool,
    /// Requests allowed per fixed window, if the endpoint is rate limited.
    pub rate_limit: Option<RateLimit>,
}

/// A fixed-window rate limit: at most `max_requests` requests start in each window of
/// `window_ms`, windows aligned to multiples of `window_ms` since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RateLimit {
    /// Requests allowed to start per window; at least 1.
    pub max_requests: u32,
    /// The window length in ms; at least 1.
    pub window_ms: u64,
}

impl Endpoint {
    /// Returns whether the endpoint subscribes to `event_type`.
    pub fn subscribes_to(&self, event_type: &str) -> bool {
        self.event_types.iter().any(|p| p.matches(event_type))
    }
}

/// An event-type pattern: `*` (every type), `prefix.*` (every type under `prefix.`), or an
/// exact type such as `charge.succeeded`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct EventTypePattern(String);

/// Why an event-type pattern was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid event-type pattern `{pattern}`: {reason}")]
pub struct PatternError {
    /// The pattern as written.
    pub pattern: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl EventTypePattern {
    /// Parses a pattern.
    ///
    /// # Errors
    ///
    /// Rejects empty patterns, and `*` anywhere but as the whole pattern or the last segment
    /// after a dot.
    pub fn parse(pattern: &str) -> Result<Self, PatternError> {
        let reject = |reason| {
            Err(PatternError {
                pattern: pattern.to_string(),
                reason,
            })
        };
        if pattern.is_empty() {
            return reject("must not be empty");
        }
        if pattern.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return reject("must not contain whitespace");
        }
        let stars = pattern.matches('*').count();
        if stars > 1 || (stars == 1 && pattern != "*" && !pattern.ends_with(".*")) {
            return reject("`*` may only stand alone or as the last segment, as in `charge.*`");
        }
        if pattern.split('.').any(str::is_empty) {
            return reject("segments between dots must not be empty");
        }
        Ok(EventTypePattern(pattern.to_string()))
    }

    /// Returns whether `event_type` matches this pattern.
    pub fn matches(&self, event_type: &str) -> bool {
        match self.0.strip_suffix('*') {
            None => self.0 == event_type,
            Some("") => true,
            Some(prefix) => event_type.len() > prefix.len() && event_type.starts_with(prefix),
        }
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for EventTypePattern {
    type Error = PatternError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        EventTypePattern::parse(&value)
    }
}

impl From<EventTypePattern> for String {
    fn from(value: EventTypePattern) -> Self {
        value.0
    }
}

impl std::fmt::Display for EventTypePattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_matching_table() {
        let cases = [
            ("*", "charge.succeeded", true),
            ("charge.*", "charge.succeeded", true),
            ("charge.*", "charge.refund.created", true),
            ("charge.*", "charge", false),
            ("charge.*", "charges.succeeded", false),
            ("charge.succeeded", "charge.succeeded", true),
            ("charge.succeeded", "charge.failed", false),
        ];
        for (pattern, event_type, expected) in cases {
            let parsed = EventTypePattern::parse(pattern).expect("valid pattern");
            assert_eq!(
                parsed.matches(event_type),
                expected,
                "{pattern} vs {event_type}"
            );
        }
    }

    #[test]
    fn pattern_rejects_misplaced_star() {
        for bad in ["", "char*", "*.succeeded", "a.*.b", "a..b", "a b", "**"] {
            assert!(
                EventTypePattern::parse(bad).is_err(),
                "`{bad}` must be rejected"
            );
        }
    }
}
