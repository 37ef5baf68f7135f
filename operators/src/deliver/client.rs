//! The HTTP client that sends one webhook: [`DeliveryClient::attempt`].
//!
//! An attempt runs in three phases. `prepare` parses the URL, checks an IP-literal host
//! against the address policy, signs the body and builds the request. `exchange` POSTs it
//! and waits for the response head. `read_response` reads at most `max_response_bytes` of
//! the body. Host names are resolved by [`PolicyResolver`], which drops every address the
//! policy rejects before reqwest connects, so a name cannot smuggle in a private address.
//! Redirects are never followed and proxies never come from the environment.

use std::collections::HashMap;
use std::error::Error as StdError;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, Once, PoisonError};
use std::time::Duration;

use hookflow_schemas::{Delivery, Endpoint, ErrorKind, Event};
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE, LOCATION, RETRY_AFTER};
use sha2::{Digest, Sha256};
use tokio::time::Instant;
use url::{Host, Url};

use super::address::AddressPolicy;
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

/// Maximum number of HTTP clients kept, one per distinct connect timeout.
const MAX_CACHED_CLIENTS: usize = 32;

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
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            address_policy: AddressPolicy::default(),
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
            snippet_bytes: DEFAULT_SNIPPET_BYTES,
            resolver: None,
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
}

impl PolicyResolver {
    /// Wraps `inner` so that `policy` filters the addresses it resolves.
    pub fn new(inner: Arc<dyn Resolve>, policy: AddressPolicy) -> Self {
        PolicyResolver {
            inner,
            policy: Arc::new(policy),
        }
    }
}

impl Resolve for PolicyResolver {
    /// Resolves `name` and drops the addresses the policy rejects.
    ///
    /// Fails with [`DeliverError::AddressRefused`] when no address remains, naming the first
    /// one rejected, and with [`DeliverError::NoAddress`] when the name resolved to nothing.
    fn resolve(&self, name: Name) -> Resolving {
        let host = name.as_str().to_owned();
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
///   `v1,` signature per secret, separated by spaces, and is absent when the endpoint has
///   no secret.
/// * Only addresses the [`AddressPolicy`] permits are contacted. Redirects are not followed,
///   proxies are not used.
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
    /// One reqwest client per connect timeout (ms), because reqwest sets that timeout per
    /// client. Requests in flight keep their client alive after an eviction.
    clients: Mutex<HashMap<u64, reqwest::Client>>,
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

        let inner_resolver = config.resolver.unwrap_or_else(|| Arc::new(SystemResolver));
        let resolver = Arc::new(PolicyResolver::new(
            inner_resolver,
            config.address_policy.clone(),
        ));
        let client = DeliveryClient {
            inner: Arc::new(ClientInner {
                address_policy: config.address_policy,
                max_response_bytes: config.max_response_bytes,
                snippet_bytes: config.snippet_bytes.min(config.max_response_bytes),
                resolver,
                clients: Mutex::new(HashMap::new()),
            }),
        };

        // Build one client now, so that a TLS setup problem shows at start and not per attempt.
        client.http_client(0)?;
        Ok(client)
    }

    /// Returns the address policy this client enforces.
    pub fn address_policy(&self) -> &AddressPolicy {
        &self.inner.address_policy
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
        let event = &delivery.ingested.event;
        let body_sha256 = hex(&Sha256::digest(&event.payload));
        let url = Url::parse(&endpoint.url);
        let started_at_ms = clock.now_ms();
        let timestamp = started_at_ms / 1000;

        let exchange = match self.prepare(endpoint, event, timestamp, &url) {
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
    fn prepare(
        &self,
        endpoint: &Endpoint,
        event: &Event,
        timestamp: u64,
        url: &Result<Url, url::ParseError>,
    ) -> Result<(reqwest::Client, reqwest::Request), Failure> {
        let url = match url {
            Ok(url) => url.clone(),
            Err(e) => {
                return Err(Failure::request(format!(
                    "endpoint URL is invalid ({e}); set the endpoint's url to an absolute \
                     http or https URL"
                )))
            }
        };
        if !matches!(url.scheme(), "http" | "https") {
            return Err(Failure::request(format!(
                "endpoint URL scheme `{}` is not supported; use http or https",
                url.scheme()
            )));
        }

        // reqwest connects to an IP-literal host without asking the resolver, so the policy
        // is checked here.
        let literal = match url.host() {
            Some(Host::Ipv4(address)) => Some(IpAddr::V4(address)),
            Some(Host::Ipv6(address)) => Some(IpAddr::V6(address)),
            Some(Host::Domain(_)) => None,
            None => return Err(Failure::request("endpoint URL has no host".to_string())),
        };
        if let Some(address) = literal {
            if let Err(range) = self.inner.address_policy.check(address) {
                let host = address.to_string();
                let refusal = DeliverError::AddressRefused {
                    host,
                    address,
                    range,
                };
                return Err(Failure {
                    kind: ErrorKind::Refused,
                    message: refusal.to_string(),
                });
            }
        }

        let mut headers = HeaderMap::with_capacity(4);
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
            let signatures =
                signature_header(&endpoint.secrets, &event.id, timestamp, &event.payload)
                    .map_err(|e| Failure::request(e.to_string()))?;
            let signatures = HeaderValue::from_str(&signatures).map_err(|_| {
                Failure::request("webhook-signature is not a valid header value".to_string())
            })?;
            headers.insert(HeaderName::from_static("webhook-signature"), signatures);
        }

        let client = self
            .http_client(endpoint.connect_timeout_ms)
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

        let response = match tokio::time::timeout_at(deadline, client.execute(request)).await {
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

        ResponseSummary {
            status: status.as_u16(),
            reason: status.canonical_reason(),
            location,
            retry_after,
            truncated: !complete || bytes_read > snippet.len() as u64,
            snippet: utf8_prefix_lossy(&snippet),
            bytes_read,
        }
    }

    /// Returns the cached reqwest client for `connect_timeout_ms`, building it on first use.
    fn http_client(&self, connect_timeout_ms: u64) -> Result<reqwest::Client, DeliverError> {
        let mut clients = self
            .inner
            .clients
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(client) = clients.get(&connect_timeout_ms) {
            return Ok(client.clone());
        }

        if clients.len() >= MAX_CACHED_CLIENTS {
            if let Some(evicted) = clients.keys().next().copied() {
                clients.remove(&evicted);
                tracing::debug!(
                    connect_timeout_ms = evicted,
                    "Evicted an HTTP client; more distinct connect timeouts than cached clients."
                );
            }
        }

        let mut builder = reqwest::Client::builder()
            .user_agent(USER_AGENT)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .dns_resolver(Arc::clone(&self.inner.resolver));
        if connect_timeout_ms > 0 {
            builder = builder.connect_timeout(Duration::from_millis(connect_timeout_ms));
        }
        let client = builder.build().map_err(DeliverError::HttpClient)?;
        clients.insert(connect_timeout_ms, client.clone());
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
    Some(utf8_prefix_lossy(value))
}

/// Decodes `bytes` as lossy UTF-8, dropping a character cut in half at the end.
fn utf8_prefix_lossy(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(text) => text.to_string(),
        Err(e) if e.error_len().is_none() => {
            String::from_utf8_lossy(&bytes[..e.valid_up_to()]).into_owned()
        }
        Err(_) => String::from_utf8_lossy(bytes).into_owned(),
    }
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
        assert_eq!(utf8_prefix_lossy(&text[..2]), "a");
        assert_eq!(utf8_prefix_lossy(text), "añb");
        assert_eq!(utf8_prefix_lossy(b"a\xffb"), "a\u{fffd}b");
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
            bytes_read: 0,
        };
        let message = summary.describe_failure();
        assert!(message.contains("HTTP 302 Found"), "{message}");
        assert!(message.contains("`/elsewhere`"), "{message}");
        assert!(message.contains("final URL"), "{message}");
    }

    #[test]
    fn hex_is_lowercase() {
        assert_eq!(hex(&[0x00, 0xab, 0xff]), "00abff");
    }
}
