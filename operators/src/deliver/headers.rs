//! Static headers: the extra headers an endpoint sends with every request.
//!
//! A static header may carry a credential (an `authorization` or API-key header), so no
//! error here contains a header value. Names hookflow sets itself, and names that frame the
//! request, are reserved: an endpoint that could replace them could break the signature
//! contract (`webhook-*`, `content-type`) or the HTTP framing (`content-length`, `host`).

use reqwest::header::{HeaderName, HeaderValue};

use super::DeliverError;

/// Header names a static header may not set, besides every name starting with `webhook-`.
pub const RESERVED_HEADERS: &[&str] = &[
    "content-type",
    "content-length",
    "host",
    "transfer-encoding",
    "connection",
];

/// Parses one static header, rejecting reserved names and bytes not allowed in a header.
///
/// The name may be written in any case; the returned [`HeaderName`] is lowercase.
///
/// # Errors
///
/// [`DeliverError::InvalidHeader`] naming the header and the problem, never its value.
pub fn parse_static_header(
    name: &str,
    value: &str,
) -> Result<(HeaderName, HeaderValue), DeliverError> {
    let invalid = |reason: String| DeliverError::InvalidHeader {
        name: name.to_string(),
        reason,
    };

    let parsed_name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
        invalid("the name is not a valid HTTP header name (a token such as `x-team`)".to_string())
    })?;
    if parsed_name.as_str().starts_with("webhook-")
        || RESERVED_HEADERS.contains(&parsed_name.as_str())
    {
        return Err(invalid(
            "hookflow sets this header itself, so an endpoint may not override it".to_string(),
        ));
    }
    let parsed_value = HeaderValue::from_str(value).map_err(|_| {
        invalid(
            "the value contains a control character or a byte not allowed in a header".to_string(),
        )
    })?;
    Ok((parsed_name, parsed_value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_header_table() {
        let cases: &[(&str, &str, Option<&str>)] = &[
            ("x-team", "a", None),
            ("X-Team", "payments team", None),
            ("authorization", "Bearer abc", None),
            (
                "content-type",
                "text/plain",
                Some("sets this header itself"),
            ),
            ("Content-Length", "3", Some("sets this header itself")),
            ("host", "example.com", Some("sets this header itself")),
            ("webhook-id", "msg_1", Some("sets this header itself")),
            ("Webhook-Signature", "v1,x", Some("sets this header itself")),
            (
                "transfer-encoding",
                "chunked",
                Some("sets this header itself"),
            ),
            ("x team", "team-a", Some("not a valid HTTP header name")),
            ("", "team-a", Some("not a valid HTTP header name")),
            ("x-ok", "line\r\nx-evil: 1", Some("control character")),
            ("x-ok", "nul\0", Some("control character")),
        ];
        for (name, value, problem) in cases {
            let result = parse_static_header(name, value);
            match problem {
                None => {
                    let (parsed, _) = result.unwrap_or_else(|e| panic!("{name}: {e}"));
                    assert_eq!(parsed.as_str(), name.to_ascii_lowercase());
                }
                Some(problem) => {
                    let message = result.expect_err(name).to_string();
                    assert!(message.contains(problem), "{name}: {message}");
                    assert!(message.contains(&format!("`{name}`")), "{name}: {message}");
                    assert!(!message.contains(value), "{name}: value in {message}");
                }
            }
        }
    }
}
