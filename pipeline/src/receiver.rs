//! A webhook receiver on 127.0.0.1 for the demo, the benchmarks and the tests.
//!
//! It listens on an ephemeral loopback port in a thread of its own, records every request
//! (path, headers, body, arrival time) and answers each path as configured: 200 by default, a
//! fixed status, or a number of failures per `webhook-id` before succeeding. A test may change
//! a path's behaviour while the receiver runs.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::Router;
use hookflow_operators::clock::{Clock, WallClock};

/// The receiver's response to requests on one path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    /// Always respond with this status.
    Status(u16),
    /// Answer `status` to the first `failures` requests of each `webhook-id`, then 200.
    FailFirst {
        /// Failures per webhook id before success.
        failures: u32,
        /// The failure status.
        status: u16,
    },
    /// Answer `status` to the first n requests of each `webhook-id`, then 200, where n is a
    /// pure function of (seed, path, webhook-id) between 0 and `max_failures`.
    Seeded {
        /// Seed of the failure counts.
        seed: u64,
        /// Maximum failures of one webhook id.
        max_failures: u32,
        /// The failure status.
        status: u16,
    },
}

/// Computes how many failures [`Behaviour::Seeded`] returns to `webhook_id` on `path`.
pub fn seeded_failures(seed: u64, max_failures: u32, path: &str, webhook_id: &str) -> u32 {
    let mut hash = hookflow_schemas::FNV1A_OFFSET ^ seed;
    hash = hookflow_schemas::fnv1a_extend(hash, path.as_bytes());
    hash = hookflow_schemas::fnv1a_extend(hash, &[0xff]);
    hash = hookflow_schemas::fnv1a_extend(hash, webhook_id.as_bytes());
    u32::try_from(hash % (u64::from(max_failures) + 1)).unwrap_or(0)
}

/// One request as the receiver saw it.
#[derive(Debug, Clone)]
pub struct ReceivedRequest {
    /// The request path, such as `/acme/billing`.
    pub path: String,
    /// Header names (lowercase) and values.
    pub headers: Vec<(String, String)>,
    /// The body bytes exactly as received.
    pub body: Vec<u8>,
    /// Arrival time, ms since the Unix epoch.
    pub received_at_ms: u64,
    /// The status the receiver answered.
    pub status: u16,
}

impl ReceivedRequest {
    /// Returns the value of header `name` (lowercase), if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

struct ReceiverState {
    /// How each path answers; [`Receiver::set_behaviour`] changes it while running.
    behaviours: Mutex<HashMap<String, Behaviour>>,
    requests: Mutex<Vec<ReceivedRequest>>,
    /// Requests seen per (path, webhook-id), for `FailFirst`.
    seen: Mutex<HashMap<(String, String), u32>>,
}

/// A running receiver; it stops when dropped.
pub struct Receiver {
    address: SocketAddr,
    state: Arc<ReceiverState>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Receiver {
    /// Starts a receiver on 127.0.0.1 with an ephemeral port; paths not in `behaviours`
    /// answer 200.
    ///
    /// # Errors
    ///
    /// Fails if the runtime cannot start or the port cannot be bound.
    pub fn start(behaviours: HashMap<String, Behaviour>) -> std::io::Result<Receiver> {
        let state = Arc::new(ReceiverState {
            behaviours: Mutex::new(behaviours),
            requests: Mutex::new(Vec::new()),
            seen: Mutex::new(HashMap::new()),
        });
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
        let address = listener.local_addr()?;
        let (shutdown, shutdown_signal) = tokio::sync::oneshot::channel::<()>();

        let app = Router::new().fallback(receive).with_state(state.clone());
        let thread = std::thread::Builder::new()
            .name("receiver".into())
            .spawn(move || {
                let served = runtime.block_on(async move {
                    axum::serve(listener, app)
                        .with_graceful_shutdown(async move {
                            let _ = shutdown_signal.await;
                        })
                        .await
                });
                if let Err(error) = served {
                    tracing::error!(%error, "Receiver stopped with an error.");
                }
            })?;

        Ok(Receiver {
            address,
            state,
            shutdown: Some(shutdown),
            thread: Some(thread),
        })
    }

    /// Returns the receiver's address.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Returns the URL of `path` on this receiver.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.address, path)
    }

    /// Makes `path` answer as `behaviour` from the next request on, as a receiver that
    /// breaks or recovers while the pipeline runs.
    pub fn set_behaviour(&self, path: &str, behaviour: Behaviour) {
        self.state
            .behaviours
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(path.to_string(), behaviour);
    }

    /// Returns every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<ReceivedRequest> {
        self.state
            .requests
            .lock()
            .map(|r| r.clone())
            .unwrap_or_default()
    }

    /// Returns the requests received on `path` so far.
    pub fn requests_to(&self, path: &str) -> Vec<ReceivedRequest> {
        self.requests()
            .into_iter()
            .filter(|r| r.path == path)
            .collect()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Counts a request to (path, webhook id) and returns how many there have been, this one
/// included.
fn count_request(state: &ReceiverState, path: &str, webhook_id: &str) -> u32 {
    let mut seen = state.seen.lock().unwrap_or_else(|e| e.into_inner());
    let count = seen
        .entry((path.to_string(), webhook_id.to_string()))
        .or_insert(0);
    *count += 1;
    *count
}

async fn receive(
    State(state): State<Arc<ReceiverState>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let received_at_ms = WallClock.now_ms();
    let path = uri.path().to_string();
    let webhook_id = headers
        .get("webhook-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();

    let behaviour = state
        .behaviours
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&path)
        .copied();
    let status = match behaviour {
        None => 200,
        Some(Behaviour::Status(status)) => status,
        Some(Behaviour::FailFirst { failures, status }) => {
            let count = count_request(&state, &path, &webhook_id);
            if count <= failures {
                status
            } else {
                200
            }
        }
        Some(Behaviour::Seeded {
            seed,
            max_failures,
            status,
        }) => {
            let count = count_request(&state, &path, &webhook_id);
            if count <= seeded_failures(seed, max_failures, &path, &webhook_id) {
                status
            } else {
                200
            }
        }
    };

    let request = ReceivedRequest {
        path,
        headers: headers
            .iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body: body.to_vec(),
        received_at_ms,
        status,
    };
    state
        .requests
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(request);
    StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}
