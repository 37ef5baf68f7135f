//! Helpers for the deliver and retry tests: endpoints and deliveries, recording receivers on
//! 127.0.0.1, and a fixed resolver so that no test sends a made-up name to the system
//! resolver. The [`dataflow`] module runs the deliver operator with its retry loop.

#![allow(dead_code)]

pub mod dataflow;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::http::HeaderMap;
use axum::Router;
use hookflow_operators::clock::{Clock, Wakeup};
use hookflow_operators::deliver::{AddressPolicy, ClientConfig, DeliveryClient};
use hookflow_schemas::{
    Delivery, Endpoint, Event, EventTypePattern, IngestedEvent, Millis, SigningSecret,
};
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// The first signing secret of [`endpoint`]: the key is the 24 bytes 0, 1, …, 23.
pub const SECRET: &str = "whsec_AAECAwQFBgcICQoLDA0ODxAREhMUFRYX";

/// A second secret, as during a key rotation.
pub const SECOND_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// Creates an enabled endpoint at `url` with one secret and generous limits.
pub fn endpoint(id: &str, url: &str) -> Endpoint {
    Endpoint {
        id: id.to_string(),
        tenant: "acme".to_string(),
        url: url.to_string(),
        event_types: vec![EventTypePattern::parse("*").expect("valid pattern")],
        secrets: vec![SigningSecret::new(SECRET)],
        headers: Default::default(),
        timeout_ms: 5_000,
        connect_timeout_ms: 1_000,
        max_in_flight: 4,
        enabled: true,
        rate_limit: None,
    }
}

/// Creates the first-attempt delivery of event `event_id` with `payload` to `endpoint_id`.
pub fn delivery(endpoint_id: &str, event_id: &str, payload: &[u8]) -> Delivery {
    Delivery {
        endpoint_id: endpoint_id.to_string(),
        generation: 0,
        attempt: 1,
        ingested: IngestedEvent {
            partition: 3,
            offset: 42,
            appended_at_ms: Some(1_700_000_000_000),
            read_at_ms: 1_700_000_000_500,
            event: Event {
                id: event_id.to_string(),
                tenant: "acme".to_string(),
                event_type: "charge.succeeded".to_string(),
                created_at: "2026-12-04T10:00:00Z".to_string(),
                payload: payload.to_vec(),
                replay: None,
            },
        },
    }
}

/// Creates the first-attempt delivery like [`delivery`], with its event at `offset` of
/// partition 3, so that deliveries of different events have different source positions.
pub fn delivery_with_offset(
    endpoint_id: &str,
    event_id: &str,
    payload: &[u8],
    offset: u64,
) -> Delivery {
    let mut delivery = delivery(endpoint_id, event_id, payload);
    delivery.ingested.offset = offset;
    delivery
}

/// Creates a policy that permits 127.0.0.1 besides public addresses.
pub fn loopback_policy() -> AddressPolicy {
    AddressPolicy::new(vec!["127.0.0.1/32".parse().expect("valid CIDR")])
}

/// Creates a client that may reach 127.0.0.1 besides public addresses.
pub fn loopback_client() -> DeliveryClient {
    let config = ClientConfig {
        address_policy: loopback_policy(),
        ..ClientConfig::default()
    };
    DeliveryClient::new(config).expect("client builds")
}

/// One request as the receiver saw it.
#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

/// The requests a receiver has seen, shared between its handlers and the test.
#[derive(Debug, Clone, Default)]
pub struct Recorder {
    requests: Arc<Mutex<Vec<Received>>>,
}

impl Recorder {
    pub fn record(&self, path: &str, headers: &HeaderMap, body: &Bytes) {
        let request = Received {
            path: path.to_string(),
            headers: headers.clone(),
            body: body.to_vec(),
        };
        self.requests.lock().expect("recorder lock").push(request);
    }

    pub fn requests(&self) -> Vec<Received> {
        self.requests.lock().expect("recorder lock").clone()
    }

    pub fn count(&self) -> usize {
        self.requests.lock().expect("recorder lock").len()
    }
}

/// Serves `router` on an ephemeral port of 127.0.0.1 until the runtime stops, and returns
/// its address.
pub async fn serve(router: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1");
    let address = listener.local_addr().expect("local address");
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            panic!("test receiver failed: {e}");
        }
    });
    address
}

/// A resolver that looks names up in a fixed table and fails for every other name.
#[derive(Debug, Clone, Default)]
pub struct FixedResolver {
    pub table: HashMap<String, Vec<SocketAddr>>,
}

impl FixedResolver {
    pub fn with(name: &str, addresses: &[&str]) -> Self {
        let addresses = addresses
            .iter()
            .map(|address| address.parse().expect("valid socket address"))
            .collect();
        FixedResolver {
            table: HashMap::from([(name.to_string(), addresses)]),
        }
    }
}

impl Resolve for FixedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let answer = self.table.get(name.as_str()).cloned();
        let name = name.as_str().to_string();
        Box::pin(async move {
            match answer {
                Some(addresses) => {
                    let addresses: Addrs = Box::new(addresses.into_iter());
                    Ok(addresses)
                }
                None => Err(format!("`{name}` is not in the test resolver's table").into()),
            }
        })
    }
}

/// A clock that advances by `step_ms` on every read, starting at `start_ms`.
#[derive(Debug)]
pub struct SteppingClock {
    next_ms: AtomicU64,
    step_ms: u64,
}

impl SteppingClock {
    pub fn new(start_ms: Millis, step_ms: u64) -> Self {
        SteppingClock {
            next_ms: AtomicU64::new(start_ms),
            step_ms,
        }
    }
}

impl Clock for SteppingClock {
    fn now_ms(&self) -> Millis {
        self.next_ms.fetch_add(self.step_ms, Ordering::SeqCst)
    }

    /// Wakes the operator at once: this clock's time moves on every read, not on a schedule.
    fn wake_at(&self, _at_ms: Millis, wakeup: &Wakeup) {
        wakeup.activate();
    }
}

/// One request as a [`ScriptedReceiver`] saw it.
#[derive(Debug, Clone)]
pub struct Arrival {
    /// The first path segment, which the tests set to the endpoint id.
    pub endpoint_id: String,
    /// The `webhook-id` header.
    pub webhook_id: String,
    /// The `webhook-timestamp` header, in seconds.
    pub webhook_timestamp: u64,
    /// The shared clock's time when the request arrived, in ms.
    pub clock_ms: Millis,
    /// Which request this is for its (endpoint, `webhook-id`), counting from 1.
    pub attempt: u32,
    /// The status the receiver responded with.
    pub status: u16,
    pub body: Vec<u8>,
}

/// Decides the status of a request from its endpoint id, `webhook-id` and attempt number.
pub type Script = dyn Fn(&str, &str, u32) -> u16 + Send + Sync;

/// Decides the status and the `Retry-After` header, if any, of a request from its endpoint
/// id, `webhook-id` and attempt number.
pub type ReplyScript = dyn Fn(&str, &str, u32) -> (u16, Option<String>) + Send + Sync;

/// A receiver on 127.0.0.1 that serves `POST /{endpoint_id}`, responds with the status its
/// script picks, and records every request with the time of a clock shared with the test.
#[derive(Clone)]
pub struct ScriptedReceiver {
    arrivals: Arc<Mutex<Vec<Arrival>>>,
    pub address: SocketAddr,
}

impl ScriptedReceiver {
    /// Starts the receiver on `runtime`.
    pub fn start(
        runtime: &tokio::runtime::Runtime,
        clock: Arc<dyn Clock>,
        script: Arc<Script>,
    ) -> Self {
        let replies = move |endpoint_id: &str, webhook_id: &str, attempt: u32| {
            (script(endpoint_id, webhook_id, attempt), None)
        };
        Self::start_with_replies(runtime, clock, Arc::new(replies))
    }

    /// Starts the receiver on `runtime`, responding with the statuses and `Retry-After`
    /// headers that `script` picks.
    pub fn start_with_replies(
        runtime: &tokio::runtime::Runtime,
        clock: Arc<dyn Clock>,
        script: Arc<ReplyScript>,
    ) -> Self {
        let arrivals: Arc<Mutex<Vec<Arrival>>> = Arc::default();
        let recorded = Arc::clone(&arrivals);
        let router = Router::new().route(
            "/{endpoint_id}",
            axum::routing::post(
                move |axum::extract::Path(endpoint_id): axum::extract::Path<String>,
                      headers: HeaderMap,
                      body: Bytes| {
                    let clock_ms = clock.now_ms();
                    let recorded = Arc::clone(&recorded);
                    let script = Arc::clone(&script);
                    async move {
                        let header = |name: &str| {
                            headers
                                .get(name)
                                .and_then(|value| value.to_str().ok())
                                .unwrap_or_default()
                                .to_string()
                        };
                        let webhook_id = header("webhook-id");
                        let webhook_timestamp = header("webhook-timestamp").parse().unwrap_or(0);
                        let mut arrivals = recorded.lock().expect("arrivals lock");
                        let earlier = arrivals
                            .iter()
                            .filter(|a| a.endpoint_id == endpoint_id && a.webhook_id == webhook_id)
                            .count();
                        let attempt = u32::try_from(earlier).expect("few requests") + 1;
                        let (status, retry_after) = script(&endpoint_id, &webhook_id, attempt);
                        arrivals.push(Arrival {
                            endpoint_id,
                            webhook_id,
                            webhook_timestamp,
                            clock_ms,
                            attempt,
                            status,
                            body: body.to_vec(),
                        });
                        let status =
                            axum::http::StatusCode::from_u16(status).expect("valid status");
                        let mut headers = HeaderMap::new();
                        if let Some(value) = retry_after {
                            headers.insert(
                                axum::http::header::RETRY_AFTER,
                                value.parse().expect("valid header value"),
                            );
                        }
                        (status, headers)
                    }
                },
            ),
        );
        let address = runtime.block_on(serve(router));
        ScriptedReceiver { arrivals, address }
    }

    /// Returns the URL of endpoint `endpoint_id` on this receiver.
    pub fn url(&self, endpoint_id: &str) -> String {
        format!("http://{}/{endpoint_id}", self.address)
    }

    /// Returns every request so far, in arrival order.
    pub fn arrivals(&self) -> Vec<Arrival> {
        self.arrivals.lock().expect("arrivals lock").clone()
    }

    /// Returns the requests of event `webhook_id` to `endpoint_id`, in arrival order.
    pub fn arrivals_of(&self, endpoint_id: &str, webhook_id: &str) -> Vec<Arrival> {
        self.arrivals()
            .into_iter()
            .filter(|a| a.endpoint_id == endpoint_id && a.webhook_id == webhook_id)
            .collect()
    }
}

/// Creates a multi-threaded tokio runtime for receivers and request tasks.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Creates a deliver context for `endpoints` that reaches 127.0.0.1 and reads `clock`.
pub fn deliver_context(
    runtime: &tokio::runtime::Runtime,
    endpoints: Vec<Endpoint>,
    clock: Arc<dyn Clock>,
) -> hookflow_operators::deliver::DeliverContext {
    let directory = endpoints.into_iter().map(|e| (e.id.clone(), e)).collect();
    hookflow_operators::deliver::DeliverContext::new(
        runtime.handle().clone(),
        loopback_client(),
        Arc::new(directory),
        clock,
    )
}

/// Serves `router` on `address` (an IP address with port 0 for an ephemeral port) until the
/// runtime stops, and returns the address bound. Tests that need a second loopback host use
/// 127.0.0.2 or 127.0.0.3, which Linux routes to the loopback interface.
pub async fn serve_at(address: &str, router: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .unwrap_or_else(|e| panic!("bind {address}: {e}"));
    let address = listener.local_addr().expect("local address");
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            panic!("test receiver failed: {e}");
        }
    });
    address
}

/// Returns the lowercase hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}
