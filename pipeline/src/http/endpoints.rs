//! Endpoint routes (admin token): create, list, get, update (including secret rotation) and
//! delete, on top of [`EndpointRegistry`], which stores each change and returns once the
//! running dataflow has absorbed it.
//!
//! A signing secret is returned only by create and by a rotation, once. Every other response
//! describes secrets by expiry only. A URL is refused at registration when delivery would
//! refuse its destination: an address literal, `localhost`, or a host name resolved through
//! the injected [`Resolver`] that lands in a range the SSRF rules refuse (see
//! `AddressPolicy`), with the range as a machine-readable `reason`.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use hookflow_connectors::DisabledEndpoint;
use hookflow_operators::deliver::{AddressPolicy, RefusedRange};
use hookflow_schemas::{
    redact_user_info, Endpoint, EventTypePattern, Millis, RateLimit, SigningSecret,
};
use serde::{Deserialize, Deserializer, Serialize};
use utoipa::ToSchema;

use super::auth::Admin;
use super::error::{ApiError, ApiJson, ApiPath, ErrorBody};
use super::ingest::rfc3339_ms;
use super::HttpState;
use crate::registry::{EndpointChange, EndpointRegistry, RegistryError};

/// Resolves a host name to addresses for the registration check. Injected so that tests
/// resolve nothing but `localhost`.
pub trait Resolver: Send + Sync {
    /// Resolves `host` to its addresses, or returns why there are none.
    fn resolve(&self, host: &str, port: u16) -> std::io::Result<Vec<IpAddr>>;
}

/// The system resolver, as delivery uses.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemResolver;

impl Resolver for SystemResolver {
    fn resolve(&self, host: &str, port: u16) -> std::io::Result<Vec<IpAddr>> {
        use std::net::ToSocketAddrs;
        Ok((host, port).to_socket_addrs()?.map(|a| a.ip()).collect())
    }
}

/// An endpoint as the API shows it: never a secret's value.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EndpointView {
    /// Globally unique id.
    pub id: String,
    /// The tenant whose events it receives.
    pub tenant: String,
    /// The URL deliveries are sent to, without user info.
    pub url: String,
    /// Event-type patterns: `*`, `prefix.*` or exact.
    pub event_types: Vec<String>,
    /// Requests per window, if limited.
    pub rate_limit: Option<RateLimitBody>,
    /// Whether deliveries are attempted.
    pub enabled: bool,
    /// Limit on a whole request, in ms.
    pub timeout_ms: u64,
    /// Limit on connecting, in ms.
    pub connect_timeout_ms: u64,
    /// Requests in flight at once.
    pub max_in_flight: usize,
    /// The names of the extra request headers (values are not shown).
    pub headers: Vec<String>,
    /// The signing secrets, by expiry only.
    pub secrets: Vec<SecretView>,
    /// Set while hookflow itself has disabled the endpoint (410 Gone, or failing for too long)
    /// and its deliveries are parked. An update with `enabled: true` ends it.
    pub disabled: Option<DisabledView>,
}

/// A disabling hookflow decided at run time.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DisabledView {
    /// When the endpoint was disabled (RFC 3339).
    pub at: String,
    /// The status or failure that disabled it.
    pub reason: String,
}

/// A signing secret without its value.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SecretView {
    /// When it stops signing; absent: never.
    pub expires_at: Option<String>,
}

/// `{ "max_requests", "window_ms" }`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RateLimitBody {
    /// Requests that may start per window; at least 1.
    pub max_requests: u32,
    /// The window in ms; default 1000.
    #[serde(default = "default_window_ms")]
    pub window_ms: u64,
}

fn default_window_ms() -> u64 {
    1000
}

/// The body of a create.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateEndpoint {
    /// The id; generated (`ep_...`) when absent.
    pub id: Option<String>,
    /// The tenant whose events it receives.
    pub tenant: String,
    /// `http` or `https` URL deliveries are POSTed to.
    pub url: String,
    /// Event-type patterns, at least one.
    pub event_types: Vec<String>,
    /// Optional rate limit.
    pub rate_limit: Option<RateLimitBody>,
    /// Default true.
    pub enabled: Option<bool>,
    /// `whsec_` + base64 of 24 to 64 bytes; generated when absent. Returned once.
    pub secret: Option<String>,
    /// Default 15000.
    pub timeout_ms: Option<u64>,
    /// Default 5000.
    pub connect_timeout_ms: Option<u64>,
    /// Default 8.
    pub max_in_flight: Option<usize>,
}

/// The body of an update; absent fields keep their value.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateEndpoint {
    /// A new URL.
    pub url: Option<String>,
    /// New patterns.
    pub event_types: Option<Vec<String>>,
    /// A new rate limit; `null` removes it.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<RateLimitBody>)]
    pub rate_limit: Option<Option<RateLimitBody>>,
    /// Enable or disable deliveries.
    pub enabled: Option<bool>,
    /// Rotate the signing secret.
    pub rotate_secret: Option<RotateSecret>,
    /// A new request limit in ms.
    pub timeout_ms: Option<u64>,
    /// A new connect limit in ms.
    pub connect_timeout_ms: Option<u64>,
    /// A new in-flight limit.
    pub max_in_flight: Option<usize>,
}

/// A secret rotation: the new secret signs from now, the old ones until they expire.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RotateSecret {
    /// The new secret; generated when absent. Returned once.
    pub secret: Option<String>,
    /// When the current secrets stop signing (RFC 3339); default 24 hours from now. A time
    /// in the past ends them at once.
    pub old_secret_expires_at: Option<String>,
}

/// Distinguishes an explicit `null` from an absent field.
fn present<'de, D, T>(deserializer: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(deserializer).map(Some)
}

/// The response of create and of an update that rotated the secret.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EndpointWithSecret {
    /// The endpoint.
    #[serde(flatten)]
    pub endpoint: EndpointView,
    /// The new signing secret. Shown this once; store it now.
    pub secret: Option<String>,
    /// The dataflow time from which events are routed with this version (RFC 3339).
    pub effective_at: String,
}

/// The response of the list route.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EndpointList {
    /// Every endpoint, by id.
    pub endpoints: Vec<EndpointView>,
}

/// The endpoint as the API shows it, with its run-time disabling if `disabled` names it.
fn view_with(endpoint: &Endpoint, disabled: &[DisabledEndpoint]) -> EndpointView {
    let disabled = disabled
        .iter()
        .find(|entry| entry.endpoint_id == endpoint.id)
        .map(|entry| DisabledView {
            at: rfc3339_ms(entry.disabled_at_ms),
            reason: entry.reason.clone(),
        });
    EndpointView {
        disabled,
        ..view(endpoint)
    }
}

/// The endpoint as the API shows it after a change: a change stores `enabled`, which ends a
/// run-time disabling when true.
fn view(endpoint: &Endpoint) -> EndpointView {
    EndpointView {
        disabled: None,
        id: endpoint.id.clone(),
        tenant: endpoint.tenant.clone(),
        url: redact_user_info(&endpoint.url),
        event_types: endpoint
            .event_types
            .iter()
            .map(|p| p.as_str().to_string())
            .collect(),
        rate_limit: endpoint.rate_limit.map(|limit| RateLimitBody {
            max_requests: limit.max_requests,
            window_ms: limit.window_ms,
        }),
        enabled: endpoint.enabled,
        timeout_ms: endpoint.timeout_ms,
        connect_timeout_ms: endpoint.connect_timeout_ms,
        max_in_flight: endpoint.max_in_flight,
        headers: endpoint.headers.keys().cloned().collect(),
        secrets: endpoint
            .secrets
            .iter()
            .map(|secret| SecretView {
                expires_at: secret.expires_at_ms.map(rfc3339_ms),
            })
            .collect(),
    }
}

fn registry(state: &HttpState) -> Result<&EndpointRegistry, ApiError> {
    state.registry.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "registry_unavailable",
            "this process has no endpoint registry",
        )
    })
}

fn registry_error(error: RegistryError) -> ApiError {
    match error {
        RegistryError::NotFound { id } => endpoint_not_found(&id),
        RegistryError::Invalid { field, problem } => ApiError::invalid_field(field, problem),
        RegistryError::PipelineStopped { .. } => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "pipeline_stopped",
            error.to_string(),
        ),
        RegistryError::Store(source) => ApiError::internal("the endpoint store failed", &source),
    }
}

/// Applies a change through the registry and counts it once the dataflow has absorbed it.
async fn apply(
    state: &HttpState,
    registry: &EndpointRegistry,
    change: EndpointChange,
) -> Result<crate::registry::Applied, ApiError> {
    let applied = registry.apply(change).await.map_err(registry_error)?;
    state
        .counters
        .endpoint_changes
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Ok(applied)
}

fn endpoint_not_found(id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "endpoint_not_found",
        format!("no endpoint `{id}`"),
    )
}

/// Create an endpoint.
#[utoipa::path(
    post,
    path = "/v1/endpoints",
    tag = "endpoints",
    request_body = CreateEndpoint,
    responses(
        (status = 201, description = "created; the secret is shown this once", body = EndpointWithSecret),
        (status = 400, description = "bad field, or a URL whose destination is refused (`unsafe_url` with a `reason`)", body = ErrorBody),
        (status = 401, description = "no bearer token", body = ErrorBody),
        (status = 403, description = "not the admin token", body = ErrorBody),
        (status = 409, description = "the id is taken", body = ErrorBody),
        (status = 503, description = "the pipeline stopped before absorbing the change", body = ErrorBody),
    ),
    security(("admin_token" = []))
)]
pub async fn create(
    _admin: Admin,
    State(state): State<HttpState>,
    ApiJson(body): ApiJson<CreateEndpoint>,
) -> Result<Response, ApiError> {
    let registry = registry(&state)?.clone();
    let id = match body.id {
        Some(id) => id,
        None => format!("ep_{}", random_token(12)),
    };
    if id.is_empty()
        || id.len() > 128
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err(ApiError::invalid_field(
            "id",
            "use 1 to 128 letters, digits, `-`, `_` or `.`",
        ));
    }
    check_url(&state, &body.url).await?;
    let event_types = patterns(&body.event_types)?;
    let secret = match body.secret {
        Some(secret) => {
            crate::config::check_secret(&secret)
                .map_err(|p| ApiError::invalid_field("secret", p))?;
            secret
        }
        None => generate_secret(),
    };
    let lookup = registry.clone();
    let lookup_id = id.clone();
    let exists = tokio::task::spawn_blocking(move || lookup.get(&lookup_id))
        .await
        .map_err(|e| ApiError::internal("the registry task failed", &e))?
        .map_err(registry_error)?;
    if exists.is_some() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "endpoint_exists",
            format!("endpoint `{id}` exists; PATCH it or choose another id"),
        )
        .with_field("id"));
    }
    let endpoint = Endpoint {
        id,
        tenant: body.tenant,
        url: body.url,
        event_types,
        secrets: vec![SigningSecret::new(secret.clone())],
        headers: BTreeMap::new(),
        timeout_ms: body.timeout_ms.unwrap_or(15_000),
        connect_timeout_ms: body.connect_timeout_ms.unwrap_or(5_000),
        max_in_flight: body.max_in_flight.unwrap_or(8),
        enabled: body.enabled.unwrap_or(true),
        rate_limit: body.rate_limit.map(|limit| RateLimit {
            max_requests: limit.max_requests,
            window_ms: limit.window_ms,
        }),
    };
    // TODO: two creates of one id that both pass the lookup above both succeed, and the
    // second acts as an update. A create-only change in `EndpointRegistry` would close this.
    let applied = apply(&state, &registry, EndpointChange::Upsert(endpoint.clone())).await?;
    let answer = EndpointWithSecret {
        endpoint: view(&endpoint),
        secret: Some(secret),
        effective_at: rfc3339_ms(applied.effective_at_ms),
    };
    Ok((StatusCode::CREATED, Json(answer)).into_response())
}

/// List endpoints.
#[utoipa::path(
    get,
    path = "/v1/endpoints",
    tag = "endpoints",
    responses(
        (status = 200, description = "every endpoint, secrets by expiry only", body = EndpointList),
        (status = 401, description = "no bearer token", body = ErrorBody),
        (status = 403, description = "not the admin token", body = ErrorBody),
    ),
    security(("admin_token" = []))
)]
pub async fn list(
    _admin: Admin,
    State(state): State<HttpState>,
) -> Result<Json<EndpointList>, ApiError> {
    let registry = registry(&state)?.clone();
    let (endpoints, disabled) = tokio::task::spawn_blocking(move || {
        Ok::<_, RegistryError>((registry.list()?, registry.disabled_at_run_time()?))
    })
    .await
    .map_err(|e| ApiError::internal("the registry task failed", &e))?
    .map_err(registry_error)?;
    Ok(Json(EndpointList {
        endpoints: endpoints
            .iter()
            .map(|endpoint| view_with(endpoint, &disabled))
            .collect(),
    }))
}

/// Get one endpoint.
#[utoipa::path(
    get,
    path = "/v1/endpoints/{id}",
    tag = "endpoints",
    params(("id" = String, Path, description = "the endpoint's id")),
    responses(
        (status = 200, description = "the endpoint, secrets by expiry only", body = EndpointView),
        (status = 401, description = "no bearer token", body = ErrorBody),
        (status = 403, description = "not the admin token", body = ErrorBody),
        (status = 404, description = "no such endpoint", body = ErrorBody),
    ),
    security(("admin_token" = []))
)]
pub async fn get_one(
    _admin: Admin,
    State(state): State<HttpState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<EndpointView>, ApiError> {
    let endpoint = load(&state, &id).await?;
    let registry = registry(&state)?.clone();
    let disabled = tokio::task::spawn_blocking(move || registry.disabled_at_run_time())
        .await
        .map_err(|e| ApiError::internal("the registry task failed", &e))?
        .map_err(registry_error)?;
    Ok(Json(view_with(&endpoint, &disabled)))
}

async fn load(state: &HttpState, id: &str) -> Result<Endpoint, ApiError> {
    let registry = registry(state)?.clone();
    let wanted = id.to_string();
    tokio::task::spawn_blocking(move || registry.get(&wanted))
        .await
        .map_err(|e| ApiError::internal("the registry task failed", &e))?
        .map_err(registry_error)?
        .ok_or_else(|| endpoint_not_found(id))
}

/// Update an endpoint.
#[utoipa::path(
    patch,
    path = "/v1/endpoints/{id}",
    tag = "endpoints",
    params(("id" = String, Path, description = "the endpoint's id")),
    request_body = UpdateEndpoint,
    responses(
        (status = 200, description = "updated; `secret` is set only after a rotation", body = EndpointWithSecret),
        (status = 400, description = "bad field, or a refused URL (`unsafe_url`)", body = ErrorBody),
        (status = 401, description = "no bearer token", body = ErrorBody),
        (status = 403, description = "not the admin token", body = ErrorBody),
        (status = 404, description = "no such endpoint", body = ErrorBody),
        (status = 503, description = "the pipeline stopped before absorbing the change", body = ErrorBody),
    ),
    security(("admin_token" = []))
)]
pub async fn update(
    _admin: Admin,
    State(state): State<HttpState>,
    ApiPath(id): ApiPath<String>,
    ApiJson(body): ApiJson<UpdateEndpoint>,
) -> Result<Json<EndpointWithSecret>, ApiError> {
    let mut endpoint = load(&state, &id).await?;
    if let Some(url) = body.url {
        check_url(&state, &url).await?;
        endpoint.url = url;
    }
    if let Some(event_types) = body.event_types {
        endpoint.event_types = patterns(&event_types)?;
    }
    if let Some(limit) = body.rate_limit {
        endpoint.rate_limit = limit.map(|limit| RateLimit {
            max_requests: limit.max_requests,
            window_ms: limit.window_ms,
        });
    }
    if let Some(enabled) = body.enabled {
        endpoint.enabled = enabled;
    }
    if let Some(timeout_ms) = body.timeout_ms {
        endpoint.timeout_ms = timeout_ms;
    }
    if let Some(connect_timeout_ms) = body.connect_timeout_ms {
        endpoint.connect_timeout_ms = connect_timeout_ms;
    }
    if let Some(max_in_flight) = body.max_in_flight {
        endpoint.max_in_flight = max_in_flight;
    }
    let mut shown = None;
    if let Some(rotation) = body.rotate_secret {
        let now = state.clock.now_ms();
        let expires_at_ms = match rotation.old_secret_expires_at.as_deref() {
            None => now + 24 * 3600 * 1000,
            Some(text) => parse_rfc3339(text)
                .map_err(|p| ApiError::invalid_field("rotate_secret.old_secret_expires_at", p))?,
        };
        let secret = match rotation.secret {
            Some(secret) => {
                crate::config::check_secret(&secret)
                    .map_err(|p| ApiError::invalid_field("rotate_secret.secret", p))?;
                secret
            }
            None => generate_secret(),
        };
        endpoint.secrets = rotate(&endpoint.secrets, &secret, expires_at_ms, now);
        shown = Some(secret);
    }
    let registry = registry(&state)?.clone();
    let applied = apply(&state, &registry, EndpointChange::Upsert(endpoint.clone())).await?;
    Ok(Json(EndpointWithSecret {
        endpoint: view(&endpoint),
        secret: shown,
        effective_at: rfc3339_ms(applied.effective_at_ms),
    }))
}

/// Builds the secrets after a rotation: the new one first, then the old ones that have not
/// expired, each ending at `expires_at_ms` at the latest.
fn rotate(
    old: &[SigningSecret],
    new: &str,
    expires_at_ms: Millis,
    now: Millis,
) -> Vec<SigningSecret> {
    let mut secrets = vec![SigningSecret::new(new)];
    for secret in old {
        let until = secret
            .expires_at_ms
            .map_or(expires_at_ms, |at| at.min(expires_at_ms));
        if until > now && secret.value != new {
            secrets.push(SigningSecret::expiring(secret.value.clone(), until));
        }
    }
    secrets
}

/// Delete an endpoint; its waiting deliveries are dead-lettered as `endpoint_deleted`.
#[utoipa::path(
    delete,
    path = "/v1/endpoints/{id}",
    tag = "endpoints",
    params(("id" = String, Path, description = "the endpoint's id")),
    responses(
        (status = 204, description = "deleted"),
        (status = 401, description = "no bearer token", body = ErrorBody),
        (status = 403, description = "not the admin token", body = ErrorBody),
        (status = 404, description = "no such endpoint", body = ErrorBody),
        (status = 503, description = "the pipeline stopped before absorbing the change", body = ErrorBody),
    ),
    security(("admin_token" = []))
)]
pub async fn delete(
    _admin: Admin,
    State(state): State<HttpState>,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    let registry = registry(&state)?.clone();
    apply(&state, &registry, EndpointChange::Delete { id }).await?;
    Ok(StatusCode::NO_CONTENT)
}

fn patterns(texts: &[String]) -> Result<Vec<EventTypePattern>, ApiError> {
    if texts.is_empty() {
        return Err(ApiError::invalid_field(
            "event_types",
            "list at least one pattern, such as \"*\"",
        ));
    }
    texts
        .iter()
        .enumerate()
        .map(|(index, text)| {
            EventTypePattern::parse(text).map_err(|e| {
                ApiError::invalid_field(format!("event_types[{index}]"), e.to_string())
            })
        })
        .collect()
}

/// Refuses a URL that is not http(s) with a host, breaks `delivery.https_only`, or whose
/// destination the SSRF rules refuse.
async fn check_url(state: &HttpState, url: &str) -> Result<(), ApiError> {
    let parsed = url::Url::parse(url)
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
        .ok_or_else(|| {
            ApiError::invalid_field("url", "must be an http or https URL with a host")
        })?;
    if state.config.delivery.https_only && parsed.scheme() != "https" {
        return Err(unsafe_url(
            "https_required",
            "`delivery.https_only` is set; use an https URL",
        ));
    }
    let policy = AddressPolicy::new(state.config.allowed_networks().map_err(
        |(field, problem)| {
            ApiError::internal("bad allowed networks", &format!("{field}: {problem}"))
        },
    )?);
    let port = parsed.port_or_known_default().unwrap_or(443);
    let addresses: Vec<IpAddr> = match parsed.host() {
        Some(url::Host::Ipv4(address)) => vec![address.into()],
        Some(url::Host::Ipv6(address)) => vec![address.into()],
        Some(url::Host::Domain(name)) => {
            let resolver = state.resolver.clone();
            let name = name.to_string();
            let resolved = tokio::task::spawn_blocking(move || resolver.resolve(&name, port))
                .await
                .map_err(|e| ApiError::internal("the resolver task failed", &e))?;
            match resolved {
                Ok(addresses) if !addresses.is_empty() => addresses,
                _ => {
                    return Err(unsafe_url(
                        "unresolvable",
                        "the host name does not resolve, so its destination cannot be checked",
                    ))
                }
            }
        }
        None => Vec::new(),
    };
    for address in addresses {
        if let Err(range) = policy.check(address) {
            return Err(unsafe_url(
                reason(range),
                &format!(
                    "the URL points at {address}, a {} address; delivery refuses it (list its network in `delivery.allowed_private_cidrs` if it is trusted)",
                    range.as_str()
                ),
            ));
        }
    }
    Ok(())
}

fn unsafe_url(reason: &str, message: &str) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "unsafe_url", message)
        .with_field("url")
        .with_reason(reason)
}

/// Returns the machine-readable name of a refused range.
fn reason(range: RefusedRange) -> &'static str {
    match range {
        RefusedRange::Unspecified => "unspecified_address",
        RefusedRange::Loopback => "loopback_address",
        RefusedRange::Private => "private_address",
        RefusedRange::SharedAddressSpace => "shared_address_space",
        RefusedRange::LinkLocal => "link_local_address",
        RefusedRange::Broadcast => "broadcast_address",
        RefusedRange::Documentation => "documentation_address",
        RefusedRange::Multicast => "multicast_address",
        RefusedRange::Reserved => "reserved_address",
    }
}

fn parse_rfc3339(text: &str) -> Result<Millis, String> {
    let time = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .map_err(|e| {
            format!("`{text}` is not an RFC 3339 time such as 2026-01-31T00:00:00Z ({e})")
        })?;
    Millis::try_from(time.unix_timestamp_nanos() / 1_000_000)
        .map_err(|_| format!("`{text}` is before 1970"))
}

/// Generates a `whsec_` secret of 32 random bytes.
fn generate_secret() -> String {
    let key: [u8; 32] = rand::random();
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(key)
    )
}

fn random_token(bytes: usize) -> String {
    (0..bytes)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}

/// Shares a resolver.
pub type SharedResolver = Arc<dyn Resolver>;
