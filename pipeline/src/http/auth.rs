//! Bearer-token checks of the protected routes, as extractors: a handler that takes
//! [`Admin`] runs only for the admin token, one that takes [`Producer`] only for the producer
//! token.
//!
//! A request without a usable `Authorization: Bearer <token>` header gets 401
//! `unauthorized` (with `WWW-Authenticate: Bearer`); one with a token that is not the route's
//! gets 403 `forbidden`. Tokens are compared in constant time.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, StatusCode};

use super::config::ApiToken;
use super::error::ApiError;
use super::HttpState;

/// Proof that the request carried the admin token.
#[derive(Debug, Clone, Copy)]
pub struct Admin;

/// Proof that the request carried the producer token.
#[derive(Debug, Clone, Copy)]
pub struct Producer;

impl FromRequestParts<HttpState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &HttpState) -> Result<Self, ApiError> {
        check(parts, state.config.http.admin_token()).map(|()| Admin)
    }
}

impl FromRequestParts<HttpState> for Producer {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &HttpState) -> Result<Self, ApiError> {
        check(parts, state.config.http.producer_token()).map(|()| Producer)
    }
}

fn check(parts: &Parts, expected: Option<&ApiToken>) -> Result<(), ApiError> {
    // Routes are only mounted when their token is set; a missing token here denies all.
    let Some(expected) = expected else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this route has no token configured",
        ));
    };
    let presented = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| {
            let (scheme, token) = value.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        })
        .filter(|token| !token.is_empty());
    let Some(presented) = presented else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "send `Authorization: Bearer <token>`",
        ));
    };
    if expected.matches(presented) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "the token is not valid for this route",
        ))
    }
}
