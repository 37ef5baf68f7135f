//! The HTTP client that sends one webhook: [`DeliveryClient::attempt`].
//!
//! An attempt runs in three phases. `prepare` parses the URL, checks an IP-literal host
//! against the address policy, signs the body and builds the request. `exchange` POSTs it
//! and waits for the response head. `read_response` reads at most `max_response_bytes` of
//! the body. Host names are resolved by [`PolicyResolver`], which drops every address the
//! policy rejects before reqwest connects, so a name cannot smuggle in a private address.
//! Redirects are never followed and proxies never come from the environment. With a
//! configured proxy the proxy resolves the target itself, so the target's name is resolved
//! here first and refused if any of its addresses is.

use std::collections::HashMap;
use std::error::Error as StdError;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once, PoisonError};
use std::time::Duration;

use hookflow_schemas::{
    format_millis, redact_user_info, Delivery, Endpoint, ErrorKind, Event, Millis,
};
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::header::{
    HeaderMap, HeaderName, HeaderValue, AUTHORIZATION, CONTENT_TYPE, LOCATION, RETRY_AFTER,
};
use sha2::{Digest, Sha256};
use tokio::time::Instant;
use url::{Host, Url};

use super::address::AddressPolicy;
use super::headers::parse_static_header;
use super::result::{classify, AttemptResult, Observation};
use super::signature::signature_header;
use super::DeliverError;
use crate::clock::Clock;

/// The `user-agent` header sent with every request.
pub const USER_AGENT: &str = concat!("hookflow/", env!("CARGO_PKG_VERSION"));

/// The default limit on the response body bytes read per attempt (64 KiB).
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// The default length of the response snippet kept in the attempt row (1 KiB).
pub const DEFAULT_SNIPPET_BYTES: usize = 1024;

/// The longest `Location` or `Retry-After` value kept, in bytes.
const MAX_HEADER_VALUE_BYTES: usize = 1024;

/// Maximum number of HTTP clients kept, one per distinct [`ClientKey`].
const MAX_CACHED_CLIENTS: usize = 32;

/// The maximum idle time of a pooled connection when the receiver sends no `Keep-Alive`
/// hint, in ms. It matches reqwest's own default (0.13).
const DEFAULT_POOL_IDLE_MS: u64 = 90_000;

/// The settings that differ between the reqwest clients of one [`DeliveryClient`]: reqwest
/// sets each of them per client, not per request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct ClientKey {
    /// The connect timeout in ms; 0 for none.
    connect_timeout_ms: u64,
    /// How long an idle connection stays in the pool, in ms; 0 keeps none, so every request
    /// opens a fresh connection.
    pool_idle_ms: u64,
}

/// The boxed error type of [`reqwest::dns::Resolving`].
type BoxError = Box<dyn StdError + Send + Sync>;

/// Settings of a [`DeliveryClient`].
#[derive(Clone)]
pub struct ClientConfig {
    /// The policy on addresses that may be contacted. The default rejects every address
    /// that is not globally reachable.
    pub address_policy: AddressPolicy,
    /// Maximum response body bytes read per attempt. The rest is discarded unread.
    /// Default 64 KiB.
    pub max_response_bytes: usize,
    /// How many leading bytes of the response body the attempt row keeps, at most
    /// `max_response_bytes`. Default 1 KiB.
    pub snippet_bytes: usize,
    /// Resolves host names before the address policy filters them. `None` uses
    /// [`SystemResolver`]; tests inject a fixed table here.
    pub resolver: Option<Arc<dyn Resolve>>,
    /// The HTTP proxy every request goes through (`http://host:port`). Only this setting
    /// turns a proxy on; `HTTP_PROXY` and the like are ignored. The proxy's own address is
    /// trusted, so it may be private. Default: none.
    pub proxy: Option<Url>,
    /// Whether only `https` endpoint URLs are attempted; an `http` one is refused without a
    /// request. Default false.
    pub https_only: bool,
    /// PEM certificates trusted as roots besides the system's, for receivers whose
    /// certificate a private CA issued. Default: none.
    pub ca_bundle_pem: Option<Vec<u8>>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            address_policy: AddressPolicy::default(),
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
            snippet_bytes: DEFAULT_SNIPPET_BYTES,
            resolver: None,
            proxy: None,
            https_only: false,
            ca_bundle_pem: None,
        }
    }
}

impl fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientConfig")
            .field("address_policy", &self.address_policy)
            .field("max_response_bytes", &self.max_response_bytes)
            .field("snippet_bytes", &self.snippet_bytes)
            .field("resolver", &self.resolver.as_ref().map(|_| "custom"))
            .field(
                "proxy",
                &self
                    .proxy
                    .as_ref()
                    .map(|url| redact_user_info(url.as_str())),
            )
            .field("https_only", &self.https_only)
            .field("ca_bundle_pem", &self.ca_bundle_pem.as_ref().map(Vec::len))
            .finish()
    }
}

/// Resolves host names with the operating system's resolver, through tokio.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addresses = tokio::net::lookup_host((host.as_str(), 0)).await?;
            let addresses: Addrs = Box::new(addresses.collect::<Vec<_>>().into_iter());
            Ok(addresses)
        })
    }
}

/// A resolver that keeps only the addresses an [`AddressPolicy`] permits.
pub struct PolicyResolver {
    inner: Arc<dyn Resolve>,
    policy: Arc<AddressPolicy>,
    /// A host name whose addresses are not filtered: the configured proxy, which an operator
    /// chose and which usually sits in a private network.
    trusted_host: Option<String>,
}

impl PolicyResolver {
    /// Wraps `inner` so that `policy` filters the addresses it resolves.
    pub fn new(inner: Arc<dyn Resolve>, policy: AddressPolicy) -> Self {
        PolicyResolver {
            inner,
            policy: Arc::new(policy),
            trusted_host: None,
        }
    }

    /// Exempts `host` (compared without case) from the policy.
    pub fn trusting(mut self, host: &str) -> Self {
        self.trusted_host = Some(host.to_ascii_lowercase());
        self
    }
}

impl Resolve for PolicyResolver {
    /// Resolves `name` and drops the addresses the policy rejects.
    ///
    /// Fails with [`DeliverError::AddressRefused`] when no address remains, naming the first
    /// one rejected, and with [`DeliverError::NoAddress`] when the name resolved to nothing.
    fn resolve(&self, name: Name) -> Resolving {
        let host = name.as_str().to_owned();
        if self.trusted_host.as_deref() == Some(host.to_ascii_lowercase().as_str()) {
            return self.inner.resolve(name);
        }
        let lookup = self.inner.resolve(name);
        let policy = Arc::clone(&self.policy);
        Box::pin(async move {
            let resolved: Vec<SocketAddr> = lookup.await?.collect();
            let permitted = permitted_addresses(&policy, &host, resolved)
                .map_err(|e| Box::new(e) as BoxError)?;
            let addresses: Addrs = Box::new(permitted.into_iter());
            Ok(addresses)
        })
    }
}

/// Keeps the addresses of `host` that `policy` permits.
fn permitted_addresses(
    policy: &AddressPolicy,
    host: &str,
    resolved: Vec<SocketAddr>,
) -> Result<Vec<SocketAddr>, DeliverError> {
    let mut first_refusal = None;
    let mut permitted = Vec::with_capacity(resolved.len());
    for address in resolved {
        match policy.check(address.ip()) {
            Ok(()) => permitted.push(address),
            Err(range) => {
                first_refusal.get_or_insert((address.ip(), range));
            }
        }
    }

    match (permitted.is_empty(), first_refusal) {
        (false, _) => Ok(permitted),
        (true, Some((address, range))) => Err(DeliverError::AddressRefused {
            host: host.to_string(),
            address,
            range,
        }),
        (true, None) => Err(DeliverError::NoAddress {
            host: host.to_string(),
        }),
    }
}

/// Sends webhooks. Built once per process and shared: clones share the connection pools.
///
/// # Contract
///
/// * The body is the event's payload bytes, unchanged, sent with `content-type:
///   application/json` and the `user-agent` [`USER_AGENT`].
/// * The Standard Webhooks headers are `webhook-id` (the event id), `webhook-timestamp`
///   (the send time in seconds) and `webhook-signature`. The signature header contains one
///   `v1,` signature per secret active at the send time, separated by spaces, and is absent
///   when the endpoint has no secret. An endpoint whose secrets have all expired gets no
///   request: the attempt fails with error kind `request`.
/// * The endpoint's static headers are sent too; they never replace the headers above.
/// * Only addresses the [`AddressPolicy`] permits are contacted, and only `https` URLs when
///   `https_only` is set. Redirects are not followed. The only proxy used is the configured
///   one, and a target it would reach is refused when any address of the target is.
/// * `endpoint.timeout_ms` bounds the whole attempt, response body included;
///   `endpoint.connect_timeout_ms` bounds connecting (0: only the whole-attempt bound).
#[derive(Clone)]
pub struct DeliveryClient {
    inner: Arc<ClientInner>,
}

struct ClientInner {
    address_policy: AddressPolicy,
    max_response_bytes: usize,
    snippet_bytes: usize,
    resolver: Arc<PolicyResolver>,
    /// The resolver without the policy, for checking a target that a proxy will resolve.
    lookup: Arc<dyn Resolve>,
    proxy: Option<Url>,
    https_only: bool,
    root_certificates: Vec<reqwest::Certificate>,
    /// One reqwest client per [`ClientKey`]. Requests in flight keep their client alive
    /// after an eviction.
    clients: Mutex<HashMap<ClientKey, reqwest::Client>>,
    /// The pool idle time derived from each endpoint's last `Keep-Alive: timeout=N` hint, in
    /// ms, by endpoint id. Endpoints without a hint have no entry.
    keep_alive_idle_ms: Mutex<HashMap<String, u64>>,
    /// Requests sent a second time because their connection closed before any response
    /// byte.
    stale_connection_resends: AtomicU64,
}

impl fmt::Debug for DeliveryClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeliveryClient")
            .field("address_policy", &self.inner.address_policy)
            .field("max_response_bytes", &self.inner.max_response_bytes)
            .field("snippet_bytes", &self.inner.snippet_bytes)
            .finish_non_exhaustive()
    }
}

impl DeliveryClient {
    /// Builds a client, installing rustls' ring crypto provider as the process default first
    /// unless a provider is installed already.
    ///
    /// # Errors
    ///
    /// [`DeliverError::HttpClient`] when reqwest cannot build a client, for example when the
    /// TLS configuration cannot be created.
    pub fn new(config: ClientConfig) -> Result<Self, DeliverError> {
        install_crypto_provider();

        let lookup = config.resolver.unwrap_or_else(|| Arc::new(SystemResolver));
        let mut resolver = PolicyResolver::new(Arc::clone(&lookup), config.address_policy.clone());
        if let Some(proxy) = &config.proxy {
            if !matches!(proxy.scheme(), "http" | "https") {
                return Err(DeliverError::InvalidProxy {
                    reason: format!(
                        "scheme `{}` is not supported; use http or https",
                        proxy.scheme()
                    ),
                });
            }
            match proxy.host() {
                Some(Host::Domain(name)) => resolver = resolver.trusting(name),
                Some(_) => {}
                None => {
                    return Err(DeliverError::InvalidProxy {
                        reason: "the URL has no host".to_string(),
                    })
                }
            }
        }
        let root_certificates = match &config.ca_bundle_pem {
            Some(pem) => {
                reqwest::Certificate::from_pem_bundle(pem).map_err(DeliverError::InvalidCaBundle)?
            }
            None => Vec::new(),
        };
        let client = DeliveryClient {
            inner: Arc::new(ClientInner {
                address_policy: config.address_policy,
                max_response_bytes: config.max_response_bytes,
                snippet_bytes: config.snippet_bytes.min(config.max_response_bytes),
                resolver: Arc::new(resolver),
                lookup,
                proxy: config.proxy,
                https_only: config.https_only,
                root_certificates,
                clients: Mutex::new(HashMap::new()),
                keep_alive_idle_ms: Mutex::new(HashMap::new()),
                stale_connection_resends: AtomicU64::new(0),
            }),
        };

        // Build one client now, so that a TLS setup problem shows at start and not per attempt.
        client.http_client(ClientKey {
            connect_timeout_ms: 0,
            pool_idle_ms: DEFAULT_POOL_IDLE_MS,
        })?;
        Ok(client)
    }

    /// Returns the address policy this client enforces.
    pub fn address_policy(&self) -> &AddressPolicy {
        &self.inner.address_policy
    }

    /// Returns how many requests were sent a second time, within their attempt, because the
    /// connection closed before any response byte (typically a pooled connection that the
    /// receiver closed as it was reused).
    pub fn stale_connection_resends(&self) -> u64 {
        self.inner.stale_connection_resends.load(Ordering::Relaxed)
    }

    /// Returns how long an idle connection to `endpoint_id` may stay pooled, in ms.
    fn pool_idle_ms(&self, endpoint_id: &str) -> u64 {
        let hints = self
            .inner
            .keep_alive_idle_ms
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        hints
            .get(endpoint_id)
            .copied()
            .unwrap_or(DEFAULT_POOL_IDLE_MS)
    }

    /// Stores the `Keep-Alive` hint of a response from `endpoint_id`, or removes the stored
    /// one when the response has none.
    fn record_keep_alive(&self, endpoint_id: &str, headers: &HeaderMap) {
        let idle_ms = headers
            .get("keep-alive")
            .and_then(|value| value.to_str().ok())
            .and_then(keep_alive_timeout_s)
            .map(pool_idle_ms_for_hint)
            .filter(|idle_ms| *idle_ms < DEFAULT_POOL_IDLE_MS);
        let mut hints = self
            .inner
            .keep_alive_idle_ms
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match idle_ms {
            Some(idle_ms) => {
                if hints.insert(endpoint_id.to_string(), idle_ms) != Some(idle_ms) {
                    tracing::debug!(
                        endpoint_id = %endpoint_id,
                        pool_idle_ms = idle_ms,
                        "Limiting idle connection reuse to the receiver's Keep-Alive hint."
                    );
                }
            }
            None => {
                hints.remove(endpoint_id);
            }
        }
    }

    /// Checks what can be known of `url` without a lookup: its scheme (`http` or `https`, only
    /// `https` under `https_only`), that it has a host, and an IP-literal host against the
    /// address policy, in whatever notation the URL wrote it.
    ///
    /// # Errors
    ///
    /// [`DeliverError::InvalidUrl`], [`DeliverError::HttpsRequired`] or
    /// [`DeliverError::AddressRefused`].
    pub fn check_url(&self, url: &Url) -> Result<(), DeliverError> {
        if !matches!(url.scheme(), "http" | "https") {
            return Err(DeliverError::InvalidUrl {
                reason: format!(
                    "scheme `{}` is not supported; use http or https",
                    url.scheme()
                ),
            });
        }
        if self.inner.https_only && url.scheme() != "https" {
            return Err(DeliverError::HttpsRequired);
        }

        // The URL parser has already turned decimal, hex, octal and shortened IPv4 forms into
        // an address. reqwest connects to an IP-literal host without asking the resolver, so
        // the policy is checked here.
        let address = match url.host() {
            Some(Host::Ipv4(address)) => IpAddr::V4(address),
            Some(Host::Ipv6(address)) => IpAddr::V6(address),
            Some(Host::Domain(_)) => return Ok(()),
            None => {
                return Err(DeliverError::InvalidUrl {
                    reason: "it has no host".to_string(),
                })
            }
        };
        self.inner
            .address_policy
            .check(address)
            .map_err(|range| DeliverError::AddressRefused {
                host: address.to_string(),
                address,
                range,
            })
    }

    /// Resolves the host of a URL that a proxy will fetch, and fails when any of its
    /// addresses is refused: the proxy resolves the name again and may pick any of them.
    async fn check_proxied_target(&self, url: &Url) -> Result<(), Failure> {
        let Some(Host::Domain(host)) = url.host() else {
            return Ok(());
        };
        let name: Name = host.parse().map_err(|_| {
            Failure::request(format!("endpoint host `{host}` is not a valid host name"))
        })?;
        let resolved: Vec<SocketAddr> = match self.inner.lookup.resolve(name).await {
            Ok(addresses) => addresses.collect(),
            Err(e) => {
                return Err(Failure {
                    kind: ErrorKind::Connect,
                    message: format!("resolving host `{host}` failed: {}", error_chain(&*e)),
                })
            }
        };
        if resolved.is_empty() {
            return Err(Failure {
                kind: ErrorKind::Connect,
                message: DeliverError::NoAddress {
                    host: host.to_string(),
                }
                .to_string(),
            });
        }
        for address in resolved {
            if let Err(range) = self.inner.address_policy.check(address.ip()) {
                let refusal = DeliverError::AddressRefused {
                    host: host.to_string(),
                    address: address.ip(),
                    range,
                };
                return Err(Failure {
                    kind: ErrorKind::Refused,
                    message: format!(
                        "{refusal}; through the proxy every address of the host must be permitted"
                    ),
                });
            }
        }
        Ok(())
    }

    /// Makes one delivery attempt of `delivery` to `endpoint` and records what happened.
    ///
    /// One read of `clock` gives both the `webhook-timestamp` header and `started_at_ms`;
    /// a second read after the outcome gives `finished_at_ms`. Returns no error, because
    /// every problem becomes a classified [`AttemptResult`].
    pub async fn attempt(
        &self,
        endpoint: &Endpoint,
        delivery: &Delivery,
        clock: &dyn Clock,
    ) -> AttemptResult {
        let started_at_ms = clock.now_ms();
        self.attempt_started(endpoint, delivery, clock, started_at_ms)
            .await
    }

    /// Makes the attempt of [`DeliveryClient::attempt`] only if the clock read that starts it
    /// is before `not_after_ms`, and returns `None` without sending anything otherwise.
    ///
    /// The deliver operator grants a rate-limit window before the request's task runs; this
    /// keeps a task that runs late from starting its request in the next window.
    pub async fn attempt_before(
        &self,
        endpoint: &Endpoint,
        delivery: &Delivery,
        clock: &dyn Clock,
        not_after_ms: Millis,
    ) -> Option<AttemptResult> {
        let started_at_ms = clock.now_ms();
        if started_at_ms >= not_after_ms {
            return None;
        }
        Some(
            self.attempt_started(endpoint, delivery, clock, started_at_ms)
                .await,
        )
    }

    /// Makes the attempt whose start time, read once by the caller, is `started_at_ms`.
    async fn attempt_started(
        &self,
        endpoint: &Endpoint,
        delivery: &Delivery,
        clock: &dyn Clock,
        started_at_ms: Millis,
    ) -> AttemptResult {
        let event = &delivery.ingested.event;
        let body_sha256 = hex(&Sha256::digest(&event.payload));
        let url = Url::parse(&endpoint.url);

        let exchange = match self.prepare(endpoint, event, started_at_ms, &url) {
            Ok((client, request)) => self.exchange(endpoint, client, request).await,
            Err(failure) => Err(failure),
        };
        let finished_at_ms = clock.now_ms();

        let result = match exchange {
            Ok(response) => {
                let verdict = classify(Observation::Status(response.status));
                AttemptResult {
                    started_at_ms,
                    finished_at_ms,
                    url: url.ok().map(without_credentials),
                    verdict,
                    http_status: Some(response.status),
                    error_message: verdict.error_kind.map(|_| response.describe_failure()),
                    response_snippet: Some(response.snippet),
                    response_truncated: Some(response.truncated),
                    response_lossy: Some(response.lossy),
                    response_bytes_read: response.bytes_read,
                    body_sha256,
                    retry_after: response.retry_after,
                    location: response.location,
                }
            }
            Err(failure) => AttemptResult {
                started_at_ms,
                finished_at_ms,
                url: url.ok().map(without_credentials),
                verdict: classify(Observation::Failure(failure.kind)),
                http_status: None,
                error_message: Some(failure.message),
                response_snippet: None,
                response_truncated: None,
                response_lossy: None,
                response_bytes_read: 0,
                body_sha256,
                retry_after: None,
                location: None,
            },
        };

        tracing::debug!(
            endpoint_id = %endpoint.id,
            event_id = %event.id,
            outcome = result.verdict.outcome.as_str(),
            http_status = result.http_status,
            error_kind = result.verdict.error_kind.map(ErrorKind::as_str),
            latency_ms = result.latency_ms(),
            "Delivery attempt finished."
        );
        result
    }

    /// Builds the signed request and picks the client that sends it, rejecting an IP-literal
    /// host the policy does not permit.
    ///
    /// `now_ms` is the attempt's one clock read: its seconds are the `webhook-timestamp`, and
    /// it decides which secrets are active.
    fn prepare(
        &self,
        endpoint: &Endpoint,
        event: &Event,
        now_ms: u64,
        url: &Result<Url, url::ParseError>,
    ) -> Result<(reqwest::Client, reqwest::Request), Failure> {
        let timestamp = now_ms / 1000;
        let url = match url {
            Ok(url) => url.clone(),
            Err(e) => {
                return Err(Failure::request(format!(
                    "endpoint URL is invalid ({e}); set the endpoint's url to an absolute \
                     http or https URL"
                )))
            }
        };
        self.check_url(&url).map_err(|e| {
            let kind = match e {
                DeliverError::AddressRefused { .. } | DeliverError::HttpsRequired => {
                    ErrorKind::Refused
                }
                _ => ErrorKind::Request,
            };
            Failure {
                kind,
                message: e.to_string(),
            }
        })?;

        let mut headers = HeaderMap::with_capacity(4 + endpoint.headers.len());
        for (name, value) in &endpoint.headers {
            let (name, value) =
                parse_static_header(name, value).map_err(|e| Failure::request(e.to_string()))?;
            headers.insert(name, value);
        }
        // reqwest turns URL credentials into an `authorization` header only when the request
        // has none, so a static one would silently win.
        if headers.contains_key(AUTHORIZATION) && has_credentials(&url) {
            return Err(Failure::request(
                "the endpoint URL contains credentials and the endpoint also has a static \
                 `authorization` header; keep only one of them"
                    .to_string(),
            ));
        }
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        let id = HeaderValue::from_str(&event.id).map_err(|_| {
            Failure::request("event id contains bytes not allowed in a header".to_string())
        })?;
        headers.insert(HeaderName::from_static("webhook-id"), id);
        headers.insert(
            HeaderName::from_static("webhook-timestamp"),
            HeaderValue::from(timestamp),
        );
        if !endpoint.secrets.is_empty() {
            let active: Vec<&str> = endpoint
                .active_secrets(now_ms)
                .map(|secret| secret.value.as_str())
                .collect();
            if active.is_empty() {
                return Err(Failure::request(expired_secrets_message(endpoint)));
            }
            let signatures = signature_header(&active, &event.id, timestamp, &event.payload)
                .map_err(|e| Failure::request(e.to_string()))?;
            let signatures = HeaderValue::from_str(&signatures).map_err(|_| {
                Failure::request("webhook-signature is not a valid header value".to_string())
            })?;
            headers.insert(HeaderName::from_static("webhook-signature"), signatures);
        }

        let key = ClientKey {
            connect_timeout_ms: endpoint.connect_timeout_ms,
            pool_idle_ms: self.pool_idle_ms(&endpoint.id),
        };
        let client = self
            .http_client(key)
            .map_err(|e| Failure::request(error_chain(&e)))?;
        let request = client
            .post(url)
            .headers(headers)
            .body(event.payload.clone())
            .build()
            .map_err(|e| Failure::request(error_chain(&e.without_url())))?;
        Ok((client, request))
    }

    /// Sends `request` and reads the response within `endpoint.timeout_ms`.
    async fn exchange(
        &self,
        endpoint: &Endpoint,
        client: reqwest::Client,
        request: reqwest::Request,
    ) -> Result<ResponseSummary, Failure> {
        let deadline = Instant::now() + Duration::from_millis(endpoint.timeout_ms);

        if self.inner.proxy.is_some() {
            let check = self.check_proxied_target(request.url());
            match tokio::time::timeout_at(deadline, check).await {
                Ok(Ok(())) => {}
                Ok(Err(failure)) => return Err(failure),
                Err(_elapsed) => {
                    return Err(Failure {
                        kind: ErrorKind::Timeout,
                        message: format!(
                            "resolving the endpoint's host took longer than its timeout of {} ms",
                            endpoint.timeout_ms
                        ),
                    })
                }
            }
        }

        // Kept for one resend; a body of bytes always clones.
        let resend = request.try_clone();
        let mut outcome = tokio::time::timeout_at(deadline, client.execute(request)).await;
        if let (Ok(Err(e)), Some(resend)) = (&outcome, resend) {
            if closed_before_response(e) {
                // A pooled connection that the receiver closed just as it was reused fails
                // like this. The request goes again at once on a fresh connection, within
                // the same attempt and deadline. The first copy may have been processed after
                // all, so receivers deduplicate on `webhook-id`.
                self.inner
                    .stale_connection_resends
                    .fetch_add(1, Ordering::Relaxed);
                tracing::debug!(
                    endpoint_id = %endpoint.id,
                    error = %e.source().map(error_chain).unwrap_or_default(),
                    "Connection closed before any response byte; resending on a fresh connection."
                );
                let fresh = self
                    .http_client(ClientKey {
                        connect_timeout_ms: endpoint.connect_timeout_ms,
                        pool_idle_ms: 0,
                    })
                    .map_err(|e| Failure::request(error_chain(&e)))?;
                outcome = tokio::time::timeout_at(deadline, fresh.execute(resend)).await;
            }
        }

        let response = match outcome {
            Ok(Ok(response)) => response,
            Ok(Err(e)) => return Err(Failure::from_reqwest(e, endpoint)),
            Err(_elapsed) => {
                return Err(Failure {
                    kind: ErrorKind::Timeout,
                    message: format!(
                        "no response within the endpoint's timeout of {} ms",
                        endpoint.timeout_ms
                    ),
                })
            }
        };

        Ok(self.read_response(endpoint, response, deadline).await)
    }

    /// Reads the status, the headers kept in the row, and at most `max_response_bytes` of
    /// the body.
    ///
    /// The outcome rests on the status alone: a body that breaks off or outlasts the
    /// deadline only ends the snippet early and marks it truncated.
    async fn read_response(
        &self,
        endpoint: &Endpoint,
        mut response: reqwest::Response,
        deadline: Instant,
    ) -> ResponseSummary {
        let status = response.status();
        self.record_keep_alive(&endpoint.id, response.headers());
        let location = header_text(response.headers(), &LOCATION);
        let retry_after = header_text(response.headers(), &RETRY_AFTER);

        let max_bytes = self.inner.max_response_bytes;
        let snippet_limit = self.inner.snippet_bytes;
        let mut snippet = Vec::new();
        let mut bytes_read: u64 = 0;
        let mut complete = false;
        while bytes_read < max_bytes as u64 {
            match tokio::time::timeout_at(deadline, response.chunk()).await {
                Ok(Ok(Some(chunk))) => {
                    bytes_read += chunk.len() as u64;
                    let room = snippet_limit.saturating_sub(snippet.len());
                    snippet.extend_from_slice(&chunk[..room.min(chunk.len())]);
                }
                Ok(Ok(None)) => {
                    complete = true;
                    break;
                }
                Ok(Err(e)) => {
                    tracing::debug!(
                        endpoint_id = %endpoint.id,
                        error = %error_chain(&e.without_url()),
                        "Reading the response body failed; keeping what was read."
                    );
                    break;
                }
                Err(_elapsed) => {
                    tracing::debug!(
                        endpoint_id = %endpoint.id,
                        timeout_ms = endpoint.timeout_ms,
                        "Response body outlasted the timeout; keeping what was read."
                    );
                    break;
                }
            }
        }

        let truncated = !complete || bytes_read > snippet.len() as u64;
        let (snippet, lossy) = utf8_prefix_lossy(&snippet);
        ResponseSummary {
            status: status.as_u16(),
            reason: status.canonical_reason(),
            location,
            retry_after,
            truncated,
            snippet,
            lossy,
            bytes_read,
        }
    }

    /// Returns the cached reqwest client for `key`, building it on first use.
    fn http_client(&self, key: ClientKey) -> Result<reqwest::Client, DeliverError> {
        let mut clients = self
            .inner
            .clients
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(client) = clients.get(&key) {
            return Ok(client.clone());
        }

        if clients.len() >= MAX_CACHED_CLIENTS {
            if let Some(evicted) = clients.keys().next().copied() {
                clients.remove(&evicted);
                tracing::debug!(
                    connect_timeout_ms = evicted.connect_timeout_ms,
                    pool_idle_ms = evicted.pool_idle_ms,
                    "Evicted an HTTP client; more distinct client settings than cached clients."
                );
            }
        }

        let mut builder = reqwest::Client::builder()
            .user_agent(USER_AGENT)
            .redirect(reqwest::redirect::Policy::none())
            .https_only(self.inner.https_only)
            .tls_certs_merge(self.inner.root_certificates.iter().cloned())
            .dns_resolver(Arc::clone(&self.inner.resolver));
        // A configured proxy replaces the environment's proxies; without one, `no_proxy`
        // keeps reqwest from reading `HTTP_PROXY` and the like.
        builder = match &self.inner.proxy {
            Some(proxy) => builder.proxy(reqwest::Proxy::all(proxy.as_str()).map_err(|e| {
                DeliverError::InvalidProxy {
                    reason: error_chain(&e),
                }
            })?),
            None => builder.no_proxy(),
        };
        if key.connect_timeout_ms > 0 {
            builder = builder.connect_timeout(Duration::from_millis(key.connect_timeout_ms));
        }
        builder = match key.pool_idle_ms {
            0 => builder.pool_max_idle_per_host(0),
            idle_ms => builder.pool_idle_timeout(Duration::from_millis(idle_ms)),
        };
        let client = builder.build().map_err(DeliverError::HttpClient)?;
        clients.insert(key, client.clone());
        Ok(client)
    }
}

/// Installs rustls' ring provider as the process default, once. reqwest is built without a
/// provider of its own and panics when it finds none.
fn install_crypto_provider() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        if rustls::crypto::ring::default_provider()
            .install_default()
            .is_err()
        {
            tracing::debug!("A rustls crypto provider was installed already; keeping it.");
        }
    });
}

/// Returns whether `error` means the connection closed, or was reset, before any byte of a
/// response arrived. The request may or may not have reached the receiver.
fn closed_before_response(error: &reqwest::Error) -> bool {
    if error.is_timeout() || error.is_connect() {
        return false;
    }
    let mut source: Option<&(dyn StdError + 'static)> = Some(error);
    while let Some(current) = source {
        if let Some(hyper_error) = current.downcast_ref::<hyper::Error>() {
            if hyper_error.is_incomplete_message() {
                return true;
            }
        }
        if let Some(io_error) = current.downcast_ref::<std::io::Error>() {
            if matches!(
                io_error.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::BrokenPipe
            ) {
                return true;
            }
        }
        source = current.source();
    }
    false
}

/// Parses the `timeout=N` parameter (seconds) of a `Keep-Alive` header value such as
/// `timeout=5, max=100`.
fn keep_alive_timeout_s(value: &str) -> Option<u64> {
    value.split(',').find_map(|parameter| {
        let (name, seconds) = parameter.split_once('=')?;
        if !name.trim().eq_ignore_ascii_case("timeout") {
            return None;
        }
        seconds.trim().trim_matches('"').parse().ok()
    })
}

/// Returns how long a connection may stay idle in the pool when the receiver closes idle
/// connections after `timeout_s` seconds: a margin below the hint, because the receiver's
/// timer and ours start at slightly different moments. The margin is half the hint, at most
/// 1 s, so a hint of 1 s gives 500 ms and a hint of 5 s gives 4 s. A hint of 0 keeps no idle
/// connection.
fn pool_idle_ms_for_hint(timeout_s: u64) -> u64 {
    let hint_ms = timeout_s.saturating_mul(1000);
    hint_ms - (hint_ms / 2).min(1000)
}

/// The reason an attempt got no response or sent no request.
struct Failure {
    kind: ErrorKind,
    message: String,
}

impl Failure {
    /// Creates the failure of a request that could not be built.
    fn request(message: String) -> Self {
        Failure {
            kind: ErrorKind::Request,
            message,
        }
    }

    /// Classifies a reqwest error. A refusal by [`PolicyResolver`] is found in the error's
    /// source chain.
    fn from_reqwest(error: reqwest::Error, endpoint: &Endpoint) -> Self {
        let error = error.without_url();

        let mut source: Option<&(dyn StdError + 'static)> = Some(&error);
        while let Some(current) = source {
            if let Some(own) = current.downcast_ref::<DeliverError>() {
                let kind = match own {
                    DeliverError::AddressRefused { .. } => ErrorKind::Refused,
                    _ => ErrorKind::Connect,
                };
                return Failure {
                    kind,
                    message: own.to_string(),
                };
            }
            source = current.source();
        }

        let kind = if error.is_timeout() {
            ErrorKind::Timeout
        } else if error.is_connect() {
            ErrorKind::Connect
        } else if error.is_builder() {
            ErrorKind::Request
        } else {
            ErrorKind::Io
        };
        let mut message = error_chain(&error);
        if kind == ErrorKind::Timeout && error.is_connect() {
            message = format!(
                "connecting timed out after the endpoint's connect timeout of {} ms ({message})",
                endpoint.connect_timeout_ms
            );
        }
        Failure { kind, message }
    }
}

/// The parts of a response an attempt row keeps.
struct ResponseSummary {
    status: u16,
    reason: Option<&'static str>,
    location: Option<String>,
    retry_after: Option<String>,
    snippet: String,
    truncated: bool,
    /// Whether `snippet` replaced bytes that are not UTF-8.
    lossy: bool,
    bytes_read: u64,
}

impl ResponseSummary {
    /// Describes a response that did not deliver, telling the operator what to change.
    fn describe_failure(&self) -> String {
        let status = match self.reason {
            Some(reason) => format!("HTTP {} {reason}", self.status),
            None => format!("HTTP {}", self.status),
        };
        if !(300..400).contains(&self.status) {
            return format!("endpoint responded with {status}");
        }
        let target = match &self.location {
            Some(location) => format!("a redirect to `{location}`"),
            None => "a redirect without a Location header".to_string(),
        };
        format!(
            "endpoint responded with {status} and {target}; redirects are not followed, so \
             configure the endpoint with the final URL"
        )
    }
}

/// Describes an endpoint whose every signing secret has expired. Sending the request
/// unsigned instead would make receivers that check signatures reject it, or worse, accept
/// it unchecked.
fn expired_secrets_message(endpoint: &Endpoint) -> String {
    let last = endpoint
        .secrets
        .iter()
        .filter_map(|secret| secret.expires_at_ms)
        .max()
        .map(format_millis)
        .unwrap_or_default();
    format!(
        "every signing secret of the endpoint has expired, the last one at {last}; add a \
         secret without `expires_at` or with a later one"
    )
}

/// Returns whether `url` contains a user name or password.
fn has_credentials(url: &Url) -> bool {
    !url.username().is_empty() || url.password().is_some()
}

/// Returns `url` without user name and password.
pub fn without_credentials(mut url: Url) -> String {
    // Both setters fail only for URLs that cannot have credentials, which have none to strip.
    let _ = url.set_username("");
    let _ = url.set_password(None);
    url.into()
}

/// Returns a header's value as lossy UTF-8, cut at [`MAX_HEADER_VALUE_BYTES`].
fn header_text(headers: &HeaderMap, name: &HeaderName) -> Option<String> {
    let value = headers.get(name)?.as_bytes();
    let value = &value[..value.len().min(MAX_HEADER_VALUE_BYTES)];
    Some(utf8_prefix_lossy(value).0)
}

/// Decodes `bytes` as lossy UTF-8, dropping a character cut in half at the end, and returns
/// whether anything was replaced with U+FFFD. The dropped tail is not a replacement: the
/// snippet's limit cut it, and the truncated flag records that.
fn utf8_prefix_lossy(bytes: &[u8]) -> (String, bool) {
    let mut text = String::with_capacity(bytes.len());
    let mut lossy = false;
    let mut chunks = bytes.utf8_chunks().peekable();
    while let Some(chunk) = chunks.next() {
        text.push_str(chunk.valid());
        let invalid = chunk.invalid();
        if invalid.is_empty() {
            continue;
        }
        // Only the last chunk can end in a sequence that more bytes would have completed.
        let cut_at_end = chunks.peek().is_none()
            && std::str::from_utf8(invalid).is_err_and(|e| e.error_len().is_none());
        if !cut_at_end {
            text.push('\u{fffd}');
            lossy = true;
        }
    }
    (text, lossy)
}

/// Formats an error and its sources, separated by `: `.
fn error_chain(error: &(dyn StdError + 'static)) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(current) = source {
        message.push_str(": ");
        message.push_str(&current.to_string());
        source = current.source();
    }
    message
}

/// Lowercase hexadecimal.
fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut text = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        let _ = write!(text, "{byte:02x}");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn socket(text: &str) -> SocketAddr {
        text.parse()
            .unwrap_or_else(|e| panic!("`{text}` is not a socket address: {e}"))
    }

    #[test]
    fn permitted_addresses_drops_rejected() {
        let policy = AddressPolicy::new(vec!["127.0.0.1/32".parse().expect("CIDR")]);
        let resolved = vec![
            socket("127.0.0.2:0"),
            socket("127.0.0.1:0"),
            socket("[::1]:0"),
        ];
        let permitted = permitted_addresses(&policy, "hooks.test", resolved).expect("one left");
        assert_eq!(permitted, vec![socket("127.0.0.1:0")]);
    }

    #[test]
    fn permitted_addresses_names_first_refusal() {
        let policy = AddressPolicy::default();
        let resolved = vec![socket("10.0.0.1:0"), socket("127.0.0.1:0")];
        let err = permitted_addresses(&policy, "hooks.test", resolved).expect_err("none left");
        assert!(
            matches!(&err, DeliverError::AddressRefused { host, .. } if host == "hooks.test"),
            "{err}"
        );
        assert!(err.to_string().contains("10.0.0.1"), "{err}");
        assert!(err.to_string().contains("private"), "{err}");
    }

    #[test]
    fn permitted_addresses_reports_empty_answer() {
        let err = permitted_addresses(&AddressPolicy::default(), "hooks.test", Vec::new())
            .expect_err("nothing resolved");
        assert!(matches!(err, DeliverError::NoAddress { .. }), "{err}");
    }

    #[test]
    fn credentials_are_stripped() {
        let url = Url::parse("https://user:pa55@hooks.example.com:8443/in?x=1").expect("URL");
        assert_eq!(
            without_credentials(url),
            "https://hooks.example.com:8443/in?x=1"
        );
    }

    #[test]
    fn utf8_prefix_drops_cut_character() {
        let text = "añb".as_bytes();
        assert_eq!(utf8_prefix_lossy(&text[..2]), ("a".to_string(), false));
        assert_eq!(utf8_prefix_lossy(text), ("añb".to_string(), false));
        assert_eq!(
            utf8_prefix_lossy(b"a\xffb"),
            ("a\u{fffd}b".to_string(), true)
        );
        assert_eq!(
            utf8_prefix_lossy(b"\xff\xc3"),
            ("\u{fffd}".to_string(), true),
            "a bad byte before a cut character"
        );
    }

    #[test]
    fn redirect_message_names_location() {
        let summary = ResponseSummary {
            status: 302,
            reason: Some("Found"),
            location: Some("/elsewhere".to_string()),
            retry_after: None,
            snippet: String::new(),
            truncated: false,
            lossy: false,
            bytes_read: 0,
        };
        let message = summary.describe_failure();
        assert!(message.contains("HTTP 302 Found"), "{message}");
        assert!(message.contains("`/elsewhere`"), "{message}");
        assert!(message.contains("final URL"), "{message}");
    }

    #[test]
    fn keep_alive_hint_table() {
        let cases = [
            ("timeout=1", Some(1)),
            ("timeout=5, max=100", Some(5)),
            ("max=100, Timeout = 30", Some(30)),
            ("timeout=\"2\"", Some(2)),
            ("max=100", None),
            ("timeout=soon", None),
            ("", None),
        ];
        for (value, expected) in cases {
            assert_eq!(keep_alive_timeout_s(value), expected, "{value}");
        }
        let idle = [(0, 0), (1, 500), (2, 1_000), (5, 4_000), (60, 59_000)];
        for (hint_s, idle_ms) in idle {
            assert_eq!(pool_idle_ms_for_hint(hint_s), idle_ms, "timeout={hint_s}");
        }
    }

    #[test]
    fn hex_is_lowercase() {
        assert_eq!(hex(&[0x00, 0xab, 0xff]), "00abff");
    }
}
