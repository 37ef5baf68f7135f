//! Endpoints (a customer's receiving URL) and the event-type patterns they subscribe with.
//!
//! An endpoint contains secrets: its signing keys and any credentials written into its URL. The
//! `Debug` output of [`Endpoint`] and [`SigningSecret`] hides both, so that logging an
//! endpoint never logs a secret.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::Millis;

/// A customer's webhook endpoint.
///
/// `Debug` shows the URL without its user info and the secrets without their values.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Endpoint {
    /// Globally unique id.
    pub id: String,
    /// The tenant whose events this endpoint receives.
    pub tenant: String,
    /// The URL deliveries are POSTed to.
    pub url: String,
    /// The event types the endpoint subscribes to; an event matching any of them is delivered.
    pub event_types: Vec<EventTypePattern>,
    /// Signing secrets; each one active at an attempt's send time signs the request.
    pub secrets: Vec<SigningSecret>,
    /// Extra headers sent with every request, by lowercase name. They never replace
    /// `content-type`, `content-length`, `host` or a `webhook-*` header.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
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

    /// Returns the secrets that sign a request sent at `now_ms`, in configured order.
    pub fn active_secrets(&self, now_ms: Millis) -> impl Iterator<Item = &SigningSecret> {
        self.secrets
            .iter()
            .filter(move |secret| secret.is_active_at(now_ms))
    }
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Header values may be credentials (an `authorization` header), so only names show.
        let header_names: Vec<&String> = self.headers.keys().collect();
        f.debug_struct("Endpoint")
            .field("id", &self.id)
            .field("tenant", &self.tenant)
            .field("url", &redact_user_info(&self.url))
            .field("event_types", &self.event_types)
            .field("secrets", &self.secrets)
            .field("headers", &header_names)
            .field("timeout_ms", &self.timeout_ms)
            .field("connect_timeout_ms", &self.connect_timeout_ms)
            .field("max_in_flight", &self.max_in_flight)
            .field("enabled", &self.enabled)
            .field("rate_limit", &self.rate_limit)
            .finish()
    }
}

/// Replaces the user info of `url` (`user:password@`) with `***@`, leaving the rest as is.
pub fn redact_user_info(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let authority_start = scheme_end + 3;
    let authority_len = url[authority_start..]
        .find(['/', '?', '#'])
        .unwrap_or(url.len() - authority_start);
    let authority = &url[authority_start..authority_start + authority_len];
    match authority.rfind('@') {
        Some(at) => format!(
            "{}***{}",
            &url[..authority_start],
            &url[authority_start + at..]
        ),
        None => url.to_string(),
    }
}

/// One signing secret of an endpoint: `whsec_` followed by the base64 of the key, and when
/// it stops signing.
///
/// During a rotation the old secret gets an expiry and the new one is added, so requests
/// carry a signature by each until the old one expires. `Debug` never shows the value.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SigningSecret {
    /// `whsec_` followed by base64.
    pub value: String,
    /// The time from which the secret no longer signs, in ms since the Unix epoch. `None`:
    /// it never expires.
    #[serde(default)]
    pub expires_at_ms: Option<Millis>,
}

impl SigningSecret {
    /// Creates a secret that never expires.
    pub fn new(value: impl Into<String>) -> Self {
        SigningSecret {
            value: value.into(),
            expires_at_ms: None,
        }
    }

    /// Creates a secret that signs requests sent before `expires_at_ms`.
    pub fn expiring(value: impl Into<String>, expires_at_ms: Millis) -> Self {
        SigningSecret {
            value: value.into(),
            expires_at_ms: Some(expires_at_ms),
        }
    }

    /// Returns whether the secret signs a request sent at `now_ms`.
    pub fn is_active_at(&self, now_ms: Millis) -> bool {
        self.expires_at_ms
            .is_none_or(|expires_at_ms| now_ms < expires_at_ms)
    }
}

impl fmt::Debug for SigningSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningSecret")
            .field("value", &"<redacted>")
            .field("expires_at_ms", &self.expires_at_ms)
            .finish()
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

    fn sample_endpoint() -> Endpoint {
        Endpoint {
            id: "ep1".to_string(),
            tenant: "acme".to_string(),
            url: "https://hookuser:p%40ss@hooks.example.com:8443/in?x=1".to_string(),
            event_types: vec![EventTypePattern::parse("*").expect("valid pattern")],
            secrets: vec![
                SigningSecret::expiring("whsec_b2xkLXNlY3JldA==", 2_000),
                SigningSecret::new("whsec_bmV3LXNlY3JldA=="),
            ],
            headers: BTreeMap::from([("authorization".to_string(), "Bearer t0ken".to_string())]),
            timeout_ms: 1_000,
            connect_timeout_ms: 500,
            max_in_flight: 1,
            enabled: true,
            rate_limit: None,
        }
    }

    #[test]
    fn debug_hides_secrets_and_credentials() {
        let text = format!("{:?}", sample_endpoint());
        for hidden in [
            "b2xkLXNlY3JldA",
            "bmV3LXNlY3JldA",
            "p%40ss",
            "hookuser",
            "t0ken",
        ] {
            assert!(!text.contains(hidden), "`{hidden}` in {text}");
        }
        assert!(
            text.contains("https://***@hooks.example.com:8443/in?x=1"),
            "{text}"
        );
        assert!(text.contains("authorization"), "{text}");
        assert!(text.contains("expires_at_ms: Some(2000)"), "{text}");
    }

    #[test]
    fn redact_user_info_table() {
        let cases = [
            ("https://u:p@h/x", "https://***@h/x"),
            ("https://u@h", "https://***@h"),
            ("https://h/x@y", "https://h/x@y"),
            ("https://h?q=a@b", "https://h?q=a@b"),
            ("https://a:b@c@h:1/", "https://***@h:1/"),
            ("not a url", "not a url"),
        ];
        for (url, expected) in cases {
            assert_eq!(redact_user_info(url), expected, "{url}");
        }
    }

    #[test]
    fn secret_expires_at_its_time() {
        let endpoint = sample_endpoint();
        let active = |now_ms| endpoint.active_secrets(now_ms).count();
        assert_eq!(active(1_999), 2);
        assert_eq!(active(2_000), 1);
        assert_eq!(
            endpoint
                .active_secrets(2_000)
                .next()
                .map(|s| s.value.as_str()),
            Some("whsec_bmV3LXNlY3JldA==")
        );
    }

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
