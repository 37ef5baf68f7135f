//! Helpers for the deliver tests: endpoints and deliveries, a recording receiver on
//! 127.0.0.1, and a fixed resolver so that no test sends a made-up name to the system resolver.

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::http::HeaderMap;
use axum::Router;
use hookflow_operators::clock::Clock;
use hookflow_operators::deliver::{AddressPolicy, ClientConfig, DeliveryClient};
use hookflow_schemas::{Delivery, Endpoint, Event, EventTypePattern, IngestedEvent, Millis};
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
        secrets: vec![SECRET.to_string()],
        timeout_ms: 5_000,
        connect_timeout_ms: 1_000,
        max_in_flight: 4,
        enabled: true,
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
            },
        },
    }
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
}
