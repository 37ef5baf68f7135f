//! The JSON error of every route: `{ "code", "message", "field"? }` with a 4xx status for bad
//! input and a 5xx status only when hookflow itself fails.
//!
//! `code` is stable (clients branch on it), `message` is for people, `field` names the bad
//! part of the input (a JSON path such as `rate_limit.max_requests`, a query parameter or a
//! path segment). Axum's own rejections (a body that is not JSON, a wrong content type, an
//! unknown route or method) are turned into the same shape by [`ApiJson`], [`ApiQuery`],
//! [`ApiPath`] and the router's fallbacks.

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// The body of every error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// Stable machine-readable code, such as `invalid_field` or `unauthorized`.
    pub code: String,
    /// A description of the problem, for people.
    pub message: String,
    /// The bad part of the input, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// Why a URL was refused (`unsafe_url` only): `private_address`, `loopback`, ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// An error a handler returns; it becomes a JSON [`ErrorBody`] response.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// The body.
    pub body: ErrorBody,
}

impl ApiError {
    /// Creates an error with `status`, `code` and `message` and no field.
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            body: ErrorBody {
                code: code.to_string(),
                message: message.into(),
                field: None,
                reason: None,
            },
        }
    }

    /// Creates a 400 `invalid_field` naming `field`.
    pub fn invalid_field(field: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_field", message).with_field(field)
    }

    /// Creates a 404 `not_found`.
    pub fn not_found(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// Creates a 500 `internal`, for a failure of hookflow rather than of the request. The
    /// cause is logged, not sent.
    pub fn internal(context: &str, error: &dyn std::fmt::Display) -> Self {
        tracing::error!(%error, context, "A request failed inside hookflow.");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("{context}; the server log has the cause"),
        )
    }

    /// Adds the field the error is about.
    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.body.field = Some(field.into());
        self
    }

    /// Adds a machine-readable reason.
    pub fn with_reason(mut self, reason: impl Into<String>) -> Self {
        self.body.reason = Some(reason.into());
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let unauthorized = self.status == StatusCode::UNAUTHORIZED;
        let mut response = (self.status, axum::Json(self.body)).into_response();
        if unauthorized {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// Returns the 404 of a path that matches no route.
pub async fn no_route() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route")
}

/// The fallback of a route asked with a method it does not have.
pub async fn wrong_method() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not accept that method",
    )
}

/// A JSON body whose problems come back as [`ApiError`]s naming the field.
#[derive(Debug, Clone)]
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = json_body(request, state).await?;
        parse_json(&bytes).map(ApiJson)
    }
}

/// Reads a body that must be declared `application/json` (or `...+json`).
pub async fn json_body<S: Send + Sync>(
    request: Request,
    state: &S,
) -> Result<axum::body::Bytes, ApiError> {
    let is_json = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<mime_type::Essence>().ok())
        .is_some_and(|essence| essence.is_json());
    if !is_json {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the body as JSON with `Content-Type: application/json`",
        ));
    }
    axum::body::Bytes::from_request(request, state)
        .await
        .map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    rejection.body_text(),
                )
            } else {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_body",
                    rejection.body_text(),
                )
            }
        })
}

/// Parses JSON, naming the field of a type error.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let parsed: T = serde_path_to_error::deserialize(&mut deserializer).map_err(|error| {
        let inner = error.inner();
        if inner.is_syntax() || inner.is_eof() || inner.is_io() {
            return invalid_json(inner);
        }
        let field = field_of(&error.path().to_string(), &inner.to_string());
        let mut api = ApiError::new(StatusCode::BAD_REQUEST, "invalid_field", inner.to_string());
        api.body.field = field;
        api
    })?;
    deserializer.end().map_err(|e| invalid_json(&e))?;
    Ok(parsed)
}

fn invalid_json(error: &serde_json::Error) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "invalid_json",
        format!("the body is not valid JSON: {error}"),
    )
}

/// Returns the field a serde data error is about: the path, or for a missing or unknown field
/// the field's own name under the path.
fn field_of(path: &str, message: &str) -> Option<String> {
    let named = ["missing field `", "unknown field `"]
        .iter()
        .find_map(|prefix| message.strip_prefix(prefix))
        .and_then(|rest| rest.split('`').next());
    let path = (path != ".").then_some(path);
    match (path, named) {
        // An unknown field is already the last segment of the path; a missing one is not.
        (Some(path), Some(name)) if path == name || path.ends_with(&format!(".{name}")) => {
            Some(path.to_string())
        }
        (Some(path), Some(name)) => Some(format!("{path}.{name}")),
        (None, Some(name)) => Some(name.to_string()),
        (Some(path), None) => Some(path.to_string()),
        (None, None) => None,
    }
}

/// Query parameters whose problems come back as [`ApiError`]s.
#[derive(Debug, Clone)]
pub struct ApiQuery<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiQuery<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|query| ApiQuery(query.0))
            .map_err(|rejection: QueryRejection| {
                let text = rejection.body_text();
                let message = text
                    .strip_prefix("Failed to deserialize query string: ")
                    .unwrap_or(&text)
                    .to_string();
                let mut error =
                    ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", message.clone());
                // The deserializer prefixes the parameter's name: `limit: invalid digit ...`.
                let named = message.split_once(": ").and_then(|(name, _)| {
                    let simple = !name.is_empty()
                        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
                    simple.then(|| name.to_string())
                });
                error.body.field = named.or_else(|| field_of(".", &message));
                error
            })
    }
}

/// Path parameters whose problems come back as [`ApiError`]s.
#[derive(Debug, Clone)]
pub struct ApiPath<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiPath<T>
where
    S: Send + Sync,
    T: DeserializeOwned + Send,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|path| ApiPath(path.0))
            .map_err(|rejection: PathRejection| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_path",
                    rejection.body_text(),
                )
            })
    }
}

/// Media type parsing small enough to keep here: only the essence (`type/subtype`) matters.
mod mime_type {
    /// The `type/subtype` of a `Content-Type`, lowercased, parameters dropped.
    pub struct Essence(String);

    impl std::str::FromStr for Essence {
        type Err = ();

        fn from_str(text: &str) -> Result<Self, ()> {
            let essence = text
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            if essence.contains('/') {
                Ok(Essence(essence))
            } else {
                Err(())
            }
        }
    }

    impl Essence {
        /// `application/json` or a `+json` type such as `application/merge-patch+json`.
        pub fn is_json(&self) -> bool {
            self.0 == "application/json"
                || (self.0.starts_with("application/") && self.0.ends_with("+json"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Sample {
        url: String,
        rate_limit: Option<Limit>,
    }

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Limit {
        max_requests: u32,
    }

    #[test]
    fn json_errors_name_the_field() {
        let cases = [
            (r#"{"url": 5}"#, "invalid_field", Some("url")),
            (r#"{}"#, "invalid_field", Some("url")),
            (
                r#"{"url": "x", "color": 1}"#,
                "invalid_field",
                Some("color"),
            ),
            (
                r#"{"url": "x", "rate_limit": {"max_requests": -1}}"#,
                "invalid_field",
                Some("rate_limit.max_requests"),
            ),
            (
                r#"{"url": "x", "rate_limit": {}}"#,
                "invalid_field",
                Some("rate_limit.max_requests"),
            ),
            (r#"{"url": "#, "invalid_json", None),
            (r#"{"url": "x"} trailing"#, "invalid_json", None),
        ];
        for (body, code, field) in cases {
            let error = parse_json::<Sample>(body.as_bytes()).expect_err(body);
            assert_eq!(error.status, StatusCode::BAD_REQUEST, "{body}");
            assert_eq!(error.body.code, code, "{body}");
            assert_eq!(error.body.field.as_deref(), field, "{body}: {error:?}");
        }
    }
}
