//! Regression tests for real-world webhook failures, one or more per case, named after the
//! case id (`b01_…`). Each test sends the case's payload bytes with the case's message id as
//! the event id, and asserts body hashes and signatures computed independently for those bytes
//! (Python's `hashlib` and `hmac`).
//!
//! Receivers are real axum servers, or raw tokio listeners where a case needs a peer that
//! misbehaves, all on 127.0.0.x ephemeral ports and started by the test that uses them. Made-up
//! host names (`rx.test`, `metadata.google.internal`) resolve through a fixed table, never the
//! system resolver. Timeouts are scaled down to a few hundred ms, so each test takes at most
//! about a second. Parts of a case that need a feature outside the deliver client and
//! operator are left out with a comment that names the feature.

mod support;

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use hookflow_operators::clock::{Clock, VirtualClock, WallClock};
use hookflow_operators::deliver::{AddressPolicy, ClientConfig, DeliverContext, DeliveryClient};
use hookflow_operators::health::HealthPolicy;
use hookflow_operators::retry::RetryPolicy;
use hookflow_operators::retry_after::{clamp_retry_after, parse_retry_after};
use hookflow_schemas::{Delivery, Endpoint, ErrorKind, Millis, Outcome, SigningSecret};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use support::dataflow::{run_on_virtual_clock, run_on_wall_clock, MemoryLog, Run};
use support::*;

/// Test secret S1; its key is the ASCII bytes `webhook-test-secret-0123456789ab`.
const S1: &str = "whsec_d2ViaG9vay10ZXN0LXNlY3JldC0wMTIzNDU2Nzg5YWI=";

/// Test secret S2, as after a rotation; its key is `webhook-test-secret-ROTATED-9876`.
const S2: &str = "whsec_d2ViaG9vay10ZXN0LXNlY3JldC1ST1RBVEVELTk4NzY=";

/// The cases' fake clock start, 2023-11-14T22:13:20Z, in seconds.
const T0: u64 = 1_700_000_000;

/// [`T0`] in ms.
const T0_MS: Millis = T0 * 1000;

/// The timestamp tolerance of the `standardwebhooks` crate (1.0.1), in seconds.
const TOLERANCE_S: u64 = 300;

/// The address receivers bind when a case has no reason to use another.
const LOOPBACK: &str = "127.0.0.1:0";

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// Creates an enabled endpoint at `url` signed with S1, with timeouts short enough for tests.
fn case_endpoint(id: &str, url: &str) -> Endpoint {
    let mut endpoint = endpoint(id, url);
    endpoint.secrets = vec![SigningSecret::new(S1)];
    endpoint.timeout_ms = 2_000;
    endpoint.connect_timeout_ms = 500;
    endpoint
}

/// Creates the first-attempt delivery of message `message_id` with `payload`, read at T0.
fn case_delivery(endpoint_id: &str, message_id: &str, payload: &[u8]) -> Delivery {
    let mut delivery = delivery(endpoint_id, message_id, payload);
    delivery.ingested.appended_at_ms = Some(T0_MS);
    delivery.ingested.read_at_ms = T0_MS;
    delivery
}

/// Creates a clock that reads `at_ms` every time.
fn fixed_clock(at_ms: Millis) -> SteppingClock {
    SteppingClock::new(at_ms, 0)
}

/// Creates a client that resolves each of `names` to `ip` and may reach the addresses
/// `allowed` (CIDR notation) besides public ones.
fn client_resolving(names: &[&str], ip: &str, allowed: &[&str]) -> DeliveryClient {
    let address: SocketAddr = format!("{ip}:0").parse().expect("valid IP address");
    let table = names
        .iter()
        .map(|name| (name.to_string(), vec![address]))
        .collect();
    let allowed = allowed
        .iter()
        .map(|net| {
            net.parse()
                .unwrap_or_else(|e| panic!("`{net}` is not a CIDR: {e}"))
        })
        .collect();
    let config = ClientConfig {
        address_policy: AddressPolicy::new(allowed),
        resolver: Some(Arc::new(FixedResolver { table })),
        ..ClientConfig::default()
    };
    DeliveryClient::new(config).expect("client builds")
}

/// Creates a deliver context on `clock` with `client` and `retry`.
fn case_context(
    runtime: &tokio::runtime::Runtime,
    client: DeliveryClient,
    endpoints: Vec<Endpoint>,
    clock: Arc<dyn Clock>,
    retry: RetryPolicy,
) -> DeliverContext {
    let directory: HashMap<String, Endpoint> =
        endpoints.into_iter().map(|e| (e.id.clone(), e)).collect();
    let mut context =
        DeliverContext::new(runtime.handle().clone(), client, Arc::new(directory), clock);
    context.retry = retry;
    context
}

/// Runs `deliveries` through the deliver operator on a virtual clock, reading retry payloads
/// back from a log that contains every delivery's payload.
fn run_virtual(
    runtime: &tokio::runtime::Runtime,
    clock: &Arc<VirtualClock>,
    client: DeliveryClient,
    endpoints: Vec<Endpoint>,
    retry: RetryPolicy,
    deliveries: Vec<(u64, Delivery)>,
) -> Run {
    let shared: Arc<dyn Clock> = Arc::clone(clock) as Arc<dyn Clock>;
    let context = case_context(runtime, client, endpoints, shared, retry);
    let log = MemoryLog::of(deliveries.iter().map(|(_, delivery)| delivery));
    run_on_virtual_clock(Arc::clone(clock), context, deliveries, log)
}

/// Creates a retry policy without jitter whose delays are `schedule_ms`.
fn fixed_schedule(schedule_ms: &[u64]) -> RetryPolicy {
    RetryPolicy {
        schedule_ms: schedule_ms.to_vec(),
        jitter_percent: 0,
        ..RetryPolicy::default()
    }
}

/// One request as a [`CaseReceiver`] saw it.
#[derive(Debug, Clone)]
struct Seen {
    /// The path and query of the request line.
    target: String,
    headers: HeaderMap,
    body: Vec<u8>,
    /// The receiver's clock when the request arrived, in ms.
    clock_ms: Millis,
}

impl Seen {
    /// Returns a header as text, or an empty string when it is absent or not visible ASCII.
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
    }

    /// Returns the `webhook-timestamp` header in seconds, or 0 when it is absent or invalid.
    fn timestamp(&self) -> u64 {
        self.header("webhook-timestamp").parse().unwrap_or(0)
    }

    /// Returns the signatures of the `webhook-signature` header.
    fn signatures(&self) -> BTreeSet<String> {
        self.header("webhook-signature")
            .split(' ')
            .filter(|signature| !signature.is_empty())
            .map(str::to_string)
            .collect()
    }
}

/// Picks the response to a request from the request and its number at the receiver,
/// counting from 1.
type Respond = dyn Fn(&Seen, usize) -> Response + Send + Sync;

/// A receiver that records every request to any path, with the time of a clock shared with
/// the test, and responds with what its script picks.
#[derive(Clone)]
struct CaseReceiver {
    seen: Arc<Mutex<Vec<Seen>>>,
    address: SocketAddr,
}

impl CaseReceiver {
    /// Starts the receiver on `bind`, an IP address with port 0.
    async fn start(bind: &str, clock: Arc<dyn Clock>, respond: Arc<Respond>) -> Self {
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let recorded = Arc::clone(&seen);
        let router = Router::new().fallback(move |uri: Uri, headers: HeaderMap, body: Bytes| {
            let request = Seen {
                target: uri
                    .path_and_query()
                    .map(|target| target.as_str().to_string())
                    .unwrap_or_default(),
                headers,
                body: body.to_vec(),
                clock_ms: clock.now_ms(),
            };
            let mut seen = recorded.lock().expect("receiver lock");
            seen.push(request.clone());
            let response = respond(&request, seen.len());
            async move { response }
        });
        let address = serve_at(bind, router).await;
        CaseReceiver { seen, address }
    }

    /// Starts a receiver on 127.0.0.1 that responds to every request with `status`.
    async fn answering(status: u16) -> Self {
        let clock: Arc<dyn Clock> = Arc::new(WallClock);
        CaseReceiver::start(LOOPBACK, clock, Arc::new(move |_: &Seen, _| reply(status))).await
    }

    /// Returns the URL of `path` on this receiver, by its IP address.
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }

    /// Returns the URL of `path` on this receiver under the host name `host`.
    fn url_as(&self, host: &str, path: &str) -> String {
        format!("http://{host}:{}{path}", self.address.port())
    }

    /// Returns every request so far, in arrival order.
    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("receiver lock").clone()
    }

    /// Returns how many requests named `path` (without query) so far.
    fn count_to(&self, path: &str) -> usize {
        self.seen()
            .iter()
            .filter(|request| request.target.split('?').next() == Some(path))
            .count()
    }
}

/// Creates a response with `status` and an empty body.
fn reply(status: u16) -> Response {
    StatusCode::from_u16(status)
        .expect("valid status")
        .into_response()
}

/// Creates a response with `status` and the header `name: value`.
fn reply_with(status: u16, name: &'static str, value: &str) -> Response {
    let mut response = reply(status);
    let value = HeaderValue::from_str(value).expect("valid header value");
    response
        .headers_mut()
        .insert(HeaderName::from_static(name), value);
    response
}

/// Checks a request as a Standard Webhooks receiver holding only `secret` would, on a clock
/// reading `now_s`: the timestamp is within the 300 s tolerance and one of the signatures is
/// `secret`'s over `id.timestamp.body`. The signature comes from the independent
/// `standardwebhooks` crate, whose own `verify` reads the real clock.
fn verifies(secret: &str, request: &Seen, now_s: u64) -> bool {
    let timestamp = request.timestamp();
    if now_s.abs_diff(timestamp) > TOLERANCE_S {
        return false;
    }
    let expected = standardwebhooks::Webhook::new(secret)
        .expect("valid secret")
        .sign(
            request.header("webhook-id"),
            i64::try_from(timestamp).expect("timestamp fits i64"),
            &request.body,
        )
        .expect("UTF-8 body");
    request.signatures().contains(&expected)
}

/// Returns whether `text` contains any of the credential forms of the B18 endpoint URL.
fn leaks_b18_credentials(text: &str) -> bool {
    ["p@ss", "p%40ss", "aG9va3VzZXI6cEBzczp3b3Jk"]
        .iter()
        .any(|secret| text.contains(secret))
}

/// Returns where the first HTTP/1.1 request head in `buffer` ends, just past its blank line.
fn head_end(buffer: &[u8]) -> Option<usize> {
    buffer
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .map(|position| position + 4)
}

/// Reads one HTTP/1.1 request (head and `content-length` body) from `socket` and returns its
/// head. Returns `None` when the peer closed the connection or sent more than 64 KiB of head.
async fn read_request(socket: &mut TcpStream) -> Option<String> {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let end = loop {
        if let Some(end) = head_end(&buffer) {
            break end;
        }
        if buffer.len() > 64 * 1024 {
            return None;
        }
        let read = socket.read(&mut chunk).await.ok()?;
        if read == 0 {
            return None;
        }
        buffer.extend_from_slice(&chunk[..read]);
    };
    let head = String::from_utf8_lossy(&buffer[..end]).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length:"))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0);
    let mut received = buffer.len() - end;
    while received < length {
        let read = socket.read(&mut chunk).await.ok()?;
        if read == 0 {
            return None;
        }
        received += read;
    }
    Some(head)
}

/// When a connection was accepted and, once it is, closed.
type Span = (Instant, Option<Instant>);

/// Counts a raw listener's connections: accepted in all and open now, with when each was
/// open.
#[derive(Debug, Clone, Default)]
struct Connections {
    accepted: Arc<AtomicUsize>,
    open: Arc<AtomicUsize>,
    /// When each connection was accepted and, once it is, closed; by connection number.
    spans: Arc<Mutex<Vec<Span>>>,
}

impl Connections {
    /// Records an accepted connection and returns its number.
    fn opened(&self) -> usize {
        self.accepted.fetch_add(1, Ordering::SeqCst);
        self.open.fetch_add(1, Ordering::SeqCst);
        let mut spans = self.spans.lock().expect("spans lock");
        spans.push((Instant::now(), None));
        spans.len() - 1
    }

    /// Records that `connection` closed.
    fn closed(&self, connection: usize) {
        self.open.fetch_sub(1, Ordering::SeqCst);
        let mut spans = self.spans.lock().expect("spans lock");
        spans[connection].1 = Some(Instant::now());
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// Returns the most connections open at once, with each close moved `slack` earlier.
    ///
    /// The client tears a connection down in the background after it has moved on to the next
    /// request. The listener sees the close only after that teardown, so a finished connection
    /// can overlap the next one by a moment.
    fn max_open(&self, slack: Duration) -> usize {
        let spans = self.spans.lock().expect("spans lock").clone();
        let mut changes: Vec<(Instant, i64)> = Vec::new();
        for (opened, closed) in spans {
            match closed.and_then(|closed| closed.checked_sub(slack)) {
                Some(closed) if closed <= opened => {}
                Some(closed) => changes.extend([(opened, 1), (closed, -1)]),
                None => changes.push((opened, 1)),
            }
        }
        // At equal times a close counts before an open.
        changes.sort();
        let mut open: i64 = 0;
        let mut max: i64 = 0;
        for (_, change) in changes {
            open += change;
            max = max.max(open);
        }
        usize::try_from(max).unwrap_or(0)
    }
}

/// How a [`silent_server`] treats each connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Silence {
    /// Reads the request, never responds, and waits for the client to close.
    AfterRequest,
    /// Never reads, so an upload stalls once the socket buffers are full. Keeps the
    /// connection open for 10 s.
    Unread,
}

/// Starts a listener on `bind` that accepts connections and never responds.
async fn silent_server(bind: &str, silence: Silence) -> (SocketAddr, Connections) {
    let listener = TcpListener::bind(bind).await.expect("bind");
    let address = listener.local_addr().expect("local address");
    let connections = Connections::default();
    let counted = connections.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let connection = counted.opened();
            let counted = counted.clone();
            tokio::spawn(async move {
                match silence {
                    Silence::AfterRequest => {
                        if read_request(&mut socket).await.is_some() {
                            // Wait for the client to give up and close, for at most 10 s.
                            let mut rest = [0u8; 1024];
                            let wait =
                                async { while let Ok(1..) = socket.read(&mut rest).await {} };
                            let _ = tokio::time::timeout(Duration::from_secs(10), wait).await;
                        }
                    }
                    Silence::Unread => tokio::time::sleep(Duration::from_secs(10)).await,
                }
                counted.closed(connection);
            });
        }
    });
    (address, connections)
}

/// Starts a listener on 127.0.0.1 that reads each request, writes `head`, then writes `drip`
/// every `interval`, at most 100 times or until the client closes.
async fn drip_server(head: &'static [u8], drip: &'static [u8], interval: Duration) -> SocketAddr {
    let listener = TcpListener::bind(LOOPBACK).await.expect("bind");
    let address = listener.local_addr().expect("local address");
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                if read_request(&mut socket).await.is_none()
                    || socket.write_all(head).await.is_err()
                {
                    return;
                }
                for _ in 0..100 {
                    if socket.write_all(drip).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(interval).await;
                }
            });
        }
    });
    address
}

/// How many bytes a [`flood_server`] wrote on each connection before it stopped, in
/// connection order; an entry appears once that connection is done.
type Written = Arc<Mutex<Vec<u64>>>;

/// Starts a listener on 127.0.0.1 that reads each request, writes `head`, then writes `chunk`
/// over and over until the client closes or `limit` bytes are written.
async fn flood_server(
    head: &'static [u8],
    chunk: Arc<Vec<u8>>,
    limit: u64,
) -> (SocketAddr, Written) {
    let listener = TcpListener::bind(LOOPBACK).await.expect("bind");
    let address = listener.local_addr().expect("local address");
    let written: Written = Arc::default();
    let recorded = Arc::clone(&written);
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let chunk = Arc::clone(&chunk);
            let recorded = Arc::clone(&recorded);
            tokio::spawn(async move {
                if read_request(&mut socket).await.is_none()
                    || socket.write_all(head).await.is_err()
                {
                    return;
                }
                let mut total: u64 = 0;
                while total < limit {
                    // A closed client shows as an error within a few writes; the timeout
                    // ends a client that stops reading without closing.
                    let write = socket.write_all(&chunk);
                    match tokio::time::timeout(Duration::from_secs(5), write).await {
                        Ok(Ok(())) => total += chunk.len() as u64,
                        _ => break,
                    }
                }
                recorded.lock().expect("flood record lock").push(total);
            });
        }
    });
    (address, written)
}

/// Waits up to 5 s until `count` connections of a [`flood_server`] are done, and returns what
/// each wrote.
async fn flood_results(written: &Written, count: usize) -> Vec<u64> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let done = written.lock().expect("flood record lock").clone();
        if done.len() >= count || Instant::now() > deadline {
            return done;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How a [`keep_alive_server`] handles the requests on one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeepAlive {
    /// Responds 200 and closes the connection after it has been idle for this long.
    IdleClose(Duration),
    /// Responds 200 with `connection: close` and closes.
    ConnectionClose,
    /// Responds 200 to the first request and closes the connection on the second one without
    /// a response byte. A server that closes an idle connection just as the client reuses it
    /// looks the same to the client.
    CloseOnReuse,
    /// Responds 200 with `keep-alive: timeout=1` and keeps the connection open.
    HintOneSecond,
}

/// Starts an HTTP/1.1 listener on 127.0.0.1 that handles up to 100 requests per connection in
/// the `keep_alive` mode, and counts connections and requests.
async fn keep_alive_server(keep_alive: KeepAlive) -> (SocketAddr, Connections, Arc<AtomicUsize>) {
    let listener = TcpListener::bind(LOOPBACK).await.expect("bind");
    let address = listener.local_addr().expect("local address");
    let connections = Connections::default();
    let requests = Arc::new(AtomicUsize::new(0));
    let (counted, requested) = (connections.clone(), Arc::clone(&requests));
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let connection = counted.opened();
            let (counted, requested) = (counted.clone(), Arc::clone(&requested));
            tokio::spawn(async move {
                for request_number in 1..=100 {
                    let request = match keep_alive {
                        KeepAlive::IdleClose(idle) if request_number > 1 => {
                            // A connection idle for longer is closed.
                            let read = read_request(&mut socket);
                            tokio::time::timeout(idle, read).await.ok().flatten()
                        }
                        _ => read_request(&mut socket).await,
                    };
                    if request.is_none() {
                        break;
                    }
                    requested.fetch_add(1, Ordering::SeqCst);
                    let response: &[u8] = match keep_alive {
                        KeepAlive::CloseOnReuse if request_number > 1 => break,
                        KeepAlive::ConnectionClose => {
                            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                        }
                        KeepAlive::HintOneSecond => {
                            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nkeep-alive: timeout=1\r\n\r\n"
                        }
                        _ => b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
                    };
                    if socket.write_all(response).await.is_err()
                        || keep_alive == KeepAlive::ConnectionClose
                    {
                        break;
                    }
                }
                counted.closed(connection);
            });
        }
    });
    (address, connections, requests)
}

// ---------------------------------------------------------------------------------------
// B01: the signature covers exactly the bytes sent
// ---------------------------------------------------------------------------------------

const B01_PAYLOAD: &[u8] =
    br#"{"id": "evt_b01", "type": "device.down", "data": {"name": "Router A", "ip": "192.0.2.10"}}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b01_signature_over_sent_bytes() {
    let receiver = CaseReceiver::answering(200).await;
    let endpoint = case_endpoint("ep_b01", &receiver.url("/hook"));
    let delivery = case_delivery("ep_b01", "msg_b01", B01_PAYLOAD);
    let client = loopback_client();

    let result = client
        .attempt(&endpoint, &delivery, &fixed_clock(T0_MS))
        .await;

    assert_eq!(result.verdict.outcome, Outcome::Delivered, "{result:?}");
    let seen = receiver.seen();
    assert_eq!(seen.len(), 1);
    let request = &seen[0];
    assert_eq!(request.body, B01_PAYLOAD, "the body is not the payload");
    assert_eq!(
        sha256_hex(&request.body),
        "45292fc75cc746ef215770bd580109c9f4da4e21bdbdab83e6bc3c0a7bc1cbc0"
    );
    assert_eq!(request.header("content-length"), "90");
    assert_eq!(request.header("webhook-id"), "msg_b01");
    assert_eq!(request.header("webhook-timestamp"), "1700000000");
    assert_eq!(
        request.header("webhook-signature"),
        "v1,8gsP+mqOKBqWOjc2NRbtNN3vidEufJ3HDtCDKqOATdM="
    );
    // The signature over the compact re-serialization of this body: a sender that signs one
    // serialization and sends another produces this pair.
    assert!(!request
        .signatures()
        .contains("v1,tijVLiUMkvic6qCbF1NA52bYu+tKw33rKiBaoJYvNPk="));
    assert!(verifies(S1, request, T0), "S1 does not verify");
    let row = result.to_row(&delivery, T0_MS);
    assert_eq!(
        row.body_sha256.as_deref(),
        Some(sha256_hex(&request.body).as_str()),
        "the archived hash is not the hash of the bytes sent"
    );

    // The independent verifier checks the timestamp against the real clock, so this send
    // reads the real clock too.
    let result = client.attempt(&endpoint, &delivery, &WallClock).await;
    assert_eq!(result.verdict.outcome, Outcome::Delivered, "{result:?}");
    let request = &receiver.seen()[1];
    standardwebhooks::Webhook::new(S1)
        .expect("valid secret")
        .verify(&request.body, &request.headers)
        .expect("standardwebhooks rejects the request");
}

// ---------------------------------------------------------------------------------------
// B02: non-ASCII text, escapes and numbers are sent, signed and retried as the same bytes
// ---------------------------------------------------------------------------------------

const B02_PAYLOAD: &str = r#"{"id":"evt_b02","type":"place.updated","data":{"name":"Plaça Pau Vila 1","emoji":"😊","note":"a\u2028b","price":1.10,"qty":1e2,"big":12345678901234567890}}"#;

const B02_SHA256: &str = "7b5d0ec547c15e2b8ed6b19d11af555c990ea83ffa8107462f9b32f1b177f1c4";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b02_non_ascii_payload_verbatim() {
    assert_eq!(B02_PAYLOAD.len(), 158, "UTF-8 bytes");
    assert_eq!(B02_PAYLOAD.chars().count(), 154, "code points");
    assert_eq!(B02_PAYLOAD.encode_utf16().count(), 155, "UTF-16 units");
    let receiver = CaseReceiver::answering(200).await;
    let endpoint = case_endpoint("ep_b02", &receiver.url("/hook"));
    let delivery = case_delivery("ep_b02", "msg_b02", B02_PAYLOAD.as_bytes());

    let result = loopback_client()
        .attempt(&endpoint, &delivery, &fixed_clock(T0_MS))
        .await;

    assert_eq!(result.verdict.outcome, Outcome::Delivered, "{result:?}");
    let request = &receiver.seen()[0];
    assert_eq!(request.body, B02_PAYLOAD.as_bytes());
    assert_eq!(sha256_hex(&request.body), B02_SHA256);
    assert_eq!(result.body_sha256, B02_SHA256);
    assert_eq!(request.header("content-length"), "158");
    assert_eq!(
        request.header("webhook-signature"),
        "v1,tA+nUGvbWF1iEdOO5KUKdQIgA66wMiwx8q3AA4Lfjks="
    );
    let body = String::from_utf8(request.body.clone()).expect("UTF-8 body");
    assert!(
        body.contains("12345678901234567890"),
        "the integer was rounded"
    );
    assert!(
        body.contains(r#""price":1.10,"qty":1e2"#),
        "numbers were rewritten"
    );
    assert!(body.contains(r"a\u2028b"), "the escape was decoded");
}

/// The retry reads the payload back from the source log, so it must send the bytes the first
/// attempt sent. The replay of `evt_b02` from the Parquet archive belongs to the replay tool.
#[test]
fn b02_retry_sends_same_bytes() {
    let runtime = runtime();
    let clock = Arc::new(VirtualClock::new(T0_MS));
    let shared: Arc<dyn Clock> = Arc::clone(&clock) as Arc<dyn Clock>;
    let script = |_: &Seen, number: usize| reply(if number == 1 { 500 } else { 200 });
    let receiver = runtime.block_on(CaseReceiver::start(LOOPBACK, shared, Arc::new(script)));
    let endpoint = case_endpoint("ep_b02", &receiver.url("/hook"));
    let delivery = case_delivery("ep_b02", "msg_b02", B02_PAYLOAD.as_bytes());

    let run = run_virtual(
        &runtime,
        &clock,
        loopback_client(),
        vec![endpoint],
        fixed_schedule(&[5_000]),
        vec![(T0_MS, delivery)],
    );

    let rows = run.rows_of("ep_b02", "msg_b02");
    let outcomes: Vec<&str> = rows.iter().map(|row| row.outcome.as_str()).collect();
    assert_eq!(outcomes, ["failed", "delivered"]);
    let seen = receiver.seen();
    assert_eq!(seen.len(), 2);
    for (request, row) in seen.iter().zip(&rows) {
        assert_eq!(
            request.body,
            B02_PAYLOAD.as_bytes(),
            "attempt {}",
            row.attempt
        );
        assert_eq!(row.body_sha256.as_deref(), Some(B02_SHA256));
    }
}

// ---------------------------------------------------------------------------------------
// B03: each attempt carries its own send time, and that same value is signed
// ---------------------------------------------------------------------------------------

const B03_PAYLOAD: &[u8] =
    br#"{"id":"evt_b03","type":"invoice.paid","occurred_at":"2023-11-14T22:13:20Z"}"#;

#[test]
fn b03_retry_stamped_with_send_time() {
    let runtime = runtime();
    let clock = Arc::new(VirtualClock::new(T0_MS));
    let shared: Arc<dyn Clock> = Arc::clone(&clock) as Arc<dyn Clock>;
    // Attempt 1 gets 503; later attempts get 200 only if they verify on the fake clock.
    let script = |request: &Seen, number: usize| match number {
        1 => reply(503),
        _ if verifies(S1, request, request.clock_ms / 1000) => reply(200),
        _ => reply(400),
    };
    let receiver = runtime.block_on(CaseReceiver::start(LOOPBACK, shared, Arc::new(script)));
    let endpoint = case_endpoint("ep_b03", &receiver.url("/hook"));
    let delivery = case_delivery("ep_b03", "msg_b03", B03_PAYLOAD);

    let run = run_virtual(
        &runtime,
        &clock,
        loopback_client(),
        vec![endpoint],
        fixed_schedule(&[400_000]),
        vec![(T0_MS, delivery)],
    );

    let seen = receiver.seen();
    assert_eq!(seen.len(), 2, "attempts: {seen:#?}");
    let retry = &seen[1];
    assert_eq!(
        retry.clock_ms,
        T0_MS + 400_000,
        "attempt 2 left at the wrong time"
    );
    assert_eq!(retry.header("webhook-timestamp"), "1700000400");
    assert_eq!(
        retry.header("webhook-signature"),
        "v1,zMKjY9m9iHhdS+hbYlFUn5mzPGz3BoHHFURJUZyHCm8="
    );
    assert_eq!(retry.body, B03_PAYLOAD, "the body changed");
    assert_eq!(seen[0].header("webhook-timestamp"), "1700000000");
    assert_eq!(
        seen[0].header("webhook-signature"),
        "v1,9eT2Y1QMP/WoWTEazvaCp6UjvEzx9N9hK8brr117cEY="
    );
    let rows = run.rows_of("ep_b03", "msg_b03");
    let statuses: Vec<Option<u16>> = rows.iter().map(|row| row.http_status).collect();
    assert_eq!(statuses, [Some(503), Some(200)]);
    assert_eq!(rows[1].outcome, "delivered");
    assert_eq!(rows[1].attempt, 2);
}

/// A clock that reads a different value on every call must still yield a header and a
/// signature that agree, because one read feeds both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b03_one_clock_read_per_attempt() {
    let receiver = CaseReceiver::answering(200).await;
    let endpoint = case_endpoint("ep_b03", &receiver.url("/hook"));
    let delivery = case_delivery("ep_b03", "msg_b03", B03_PAYLOAD);
    // Starts at the real time, so the independent verifier's clock check passes, and moves
    // 1.5 s per read, so two reads would disagree in seconds.
    let clock = SteppingClock::new(WallClock.now_ms(), 1_500);

    let result = loopback_client()
        .attempt(&endpoint, &delivery, &clock)
        .await;

    assert_eq!(result.verdict.outcome, Outcome::Delivered, "{result:?}");
    let request = &receiver.seen()[0];
    assert_eq!(request.timestamp(), result.started_at_ms / 1000);
    standardwebhooks::Webhook::new(S1)
        .expect("valid secret")
        .verify(&request.body, &request.headers)
        .expect("the header and the signed timestamp disagree");
}

// ---------------------------------------------------------------------------------------
// B04: a retry is signed like the first attempt
// ---------------------------------------------------------------------------------------

const B04_PAYLOAD: &[u8] =
    br#"{"id":"evt_b04","type":"contact.updated","data":{"contact_id":"c_1"}}"#;

/// The variants where the worker restarts between the attempts, or the replay tool triggers
/// attempt 2, belong to the restart and replay features.
#[test]
fn b04_retry_signed_like_first() {
    let runtime = runtime();
    let clock = Arc::new(VirtualClock::new(T0_MS));
    let shared: Arc<dyn Clock> = Arc::clone(&clock) as Arc<dyn Clock>;
    let script = |_: &Seen, number: usize| reply(if number == 1 { 500 } else { 200 });
    let receiver = runtime.block_on(CaseReceiver::start(LOOPBACK, shared, Arc::new(script)));
    let endpoint = case_endpoint("ep_b04", &receiver.url("/hook"));
    let delivery = case_delivery("ep_b04", "msg_b04", B04_PAYLOAD);

    let run = run_virtual(
        &runtime,
        &clock,
        loopback_client(),
        vec![endpoint],
        fixed_schedule(&[60_000]),
        vec![(T0_MS, delivery)],
    );

    let seen = receiver.seen();
    assert_eq!(seen.len(), 2);
    let clock_ms: Vec<Millis> = seen.iter().map(|request| request.clock_ms).collect();
    assert_eq!(clock_ms, [T0_MS, T0_MS + 60_000]);
    let expected = [
        "v1,big74yhz3FghzhEMyeZDoDE7LXfnMh2cW8ESuiDBjGw=",
        "v1,YSgLmQcpLctpcz6D1+Gvlm+0J+mSB3BTPmXbf1pGiGs=",
    ];
    for (attempt, (request, signature)) in (1..).zip(seen.iter().zip(expected)) {
        assert_eq!(request.header("webhook-id"), "msg_b04", "attempt {attempt}");
        assert_eq!(
            sha256_hex(&request.body),
            "7c68eca7c8ec748c7b627602eb6618baa64b66c9ac6abf28bb2d47a0c6de863d",
            "attempt {attempt}"
        );
        assert_eq!(
            request.header("webhook-signature"),
            signature,
            "attempt {attempt}"
        );
        assert!(
            verifies(S1, request, request.clock_ms / 1000),
            "attempt {attempt} does not verify"
        );
    }
    let unsigned = seen
        .iter()
        .filter(|request| !request.headers.contains_key("webhook-signature"))
        .count();
    assert_eq!(unsigned, 0, "attempts without a signature");
    let outcomes: Vec<String> = run
        .rows_of("ep_b04", "msg_b04")
        .into_iter()
        .map(|row| row.outcome)
        .collect();
    assert_eq!(outcomes, ["failed", "delivered"]);
}

// ---------------------------------------------------------------------------------------
// B05: Retry-After in both formats, capped, and junk treated as absent
// ---------------------------------------------------------------------------------------

/// Parses and caps the `Retry-After` values of rate-limit responses. The deliver operator does
/// not use them yet: pausing the whole endpoint on a valid `Retry-After`, the penalty floor
/// for a 429 without one, and the throttling counters are wired in separately.
#[test]
fn b05_retry_after_formats() {
    const FLOOR_MS: u64 = 1_000;
    const CAP_MS: u64 = 300_000;

    let until = parse_retry_after("3", T0_MS).expect("delay-seconds");
    let next = clamp_retry_after(until, T0_MS, FLOOR_MS, CAP_MS);
    assert!(
        (T0_MS + 3_000..=T0_MS + 4_000).contains(&next),
        "`3` waits until {next}"
    );

    for date in [
        "Tue, 14 Nov 2023 22:13:30 GMT",
        "Tuesday, 14-Nov-23 22:13:30 GMT",
        "Tue Nov 14 22:13:30 2023",
    ] {
        let until = parse_retry_after(date, T0_MS);
        assert_eq!(until, Some(T0_MS + 10_000), "{date}");
    }

    let until = parse_retry_after("555", T0_MS).expect("delay-seconds");
    assert_eq!(
        until,
        T0_MS + 555_000,
        "555 is seconds, as the HTTP spec says"
    );
    let capped = clamp_retry_after(until, T0_MS, FLOOR_MS, CAP_MS);
    assert_eq!(capped, T0_MS + 300_000);
    assert!(capped < until, "a capped wait must be detectable");

    for junk in ["abc", "-5", "1.5", ""] {
        assert_eq!(parse_retry_after(junk, T0_MS), None, "{junk:?}");
    }
}

/// Every 429 is archived as an attempt with its status and the raw `Retry-After` value, and
/// the archived value parses to the expected wait, or to none when it is invalid.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b05_throttled_attempt_archives_header() {
    let table: Vec<(u16, Option<&str>, Option<Millis>)> = vec![
        (429, Some("3"), Some(T0_MS + 3_000)),
        (
            429,
            Some("Tue, 14 Nov 2023 22:13:30 GMT"),
            Some(T0_MS + 10_000),
        ),
        (429, Some("555"), Some(T0_MS + 555_000)),
        (429, Some("abc"), None),
        (429, Some("-5"), None),
        (429, Some("1.5"), None),
        (429, Some(""), None),
        (503, Some("3"), Some(T0_MS + 3_000)),
        (429, None, None),
    ];
    let responses = table.clone();
    let script = move |_: &Seen, number: usize| {
        let (status, retry_after, _) = responses[number - 1];
        match retry_after {
            Some(value) => reply_with(status, "retry-after", value),
            None => reply(status),
        }
    };
    let clock: Arc<dyn Clock> = Arc::new(WallClock);
    let receiver = CaseReceiver::start(LOOPBACK, clock, Arc::new(script)).await;
    let endpoint = case_endpoint("ep_b05", &receiver.url("/hook"));
    let client = loopback_client();

    for (index, (status, retry_after, until)) in table.into_iter().enumerate() {
        let message_id = format!("msg_b05_{index}");
        let delivery = case_delivery("ep_b05", &message_id, br#"{"id":"evt_b05"}"#);

        let result = client
            .attempt(&endpoint, &delivery, &fixed_clock(T0_MS))
            .await;
        let row = result.to_row(&delivery, T0_MS);

        assert_eq!(row.http_status, Some(status), "{message_id}");
        assert_eq!(row.attempt, 1, "{message_id}: not archived as an attempt");
        assert_eq!(row.outcome, "failed", "{message_id}: not retried");
        assert_eq!(row.retry_after.as_deref(), retry_after, "{message_id}");
        let parsed = row
            .retry_after
            .as_deref()
            .and_then(|value| parse_retry_after(value, T0_MS));
        assert_eq!(parsed, until, "{message_id}: {retry_after:?}");
    }
    assert_eq!(receiver.seen().len(), 9);
}

// ---------------------------------------------------------------------------------------
// B06: redirects are not followed
// ---------------------------------------------------------------------------------------

/// Starts the B06 receiver: `/hook` responds with `status` and a `Location` of `/final` on
/// `rx.test`, and `/final` responds with 200 to anything.
async fn redirecting_receiver(status: u16) -> CaseReceiver {
    let port = Arc::new(Mutex::new(0u16));
    let known = Arc::clone(&port);
    let script = move |request: &Seen, _: usize| {
        if request.target.starts_with("/final") {
            return reply(200);
        }
        let port = *known.lock().expect("port lock");
        reply_with(status, "location", &format!("http://rx.test:{port}/final"))
    };
    let clock: Arc<dyn Clock> = Arc::new(WallClock);
    let receiver = CaseReceiver::start(LOOPBACK, clock, Arc::new(script)).await;
    *port.lock().expect("port lock") = receiver.address.port();
    receiver
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b06_redirect_not_followed() {
    let client = client_resolving(&["rx.test"], "127.0.0.1", &["127.0.0.1/32"]);
    for status in [301, 302, 303, 307, 308] {
        let receiver = redirecting_receiver(status).await;
        let endpoint = case_endpoint("ep_b06", &receiver.url_as("rx.test", "/hook"));
        let delivery = case_delivery(
            "ep_b06",
            "msg_b06",
            br#"{"id":"evt_b06","type":"report.ready"}"#,
        );

        let result = client
            .attempt(&endpoint, &delivery, &fixed_clock(T0_MS))
            .await;
        let row = result.to_row(&delivery, T0_MS);

        assert_eq!(receiver.count_to("/hook"), 1, "{status}: requests to /hook");
        assert_eq!(
            receiver.count_to("/final"),
            0,
            "{status}: the redirect was followed"
        );
        assert_eq!(row.http_status, Some(status));
        assert_ne!(row.outcome, "delivered", "{status}");
        assert_eq!(row.error_kind.as_deref(), Some("redirect"), "{status}");
        let location = format!("http://rx.test:{}/final", receiver.address.port());
        assert_eq!(row.location.as_deref(), Some(location.as_str()), "{status}");
        let message = row.error_message.unwrap_or_default();
        assert!(message.contains("final URL"), "{status}: {message}");
    }
}

/// A redirect is retried on the normal schedule, each attempt one POST to `/hook`. Marking
/// it a permanent misconfiguration after repeated redirects is not built.
#[test]
fn b06_redirect_retried_on_schedule() {
    let runtime = runtime();
    let receiver = runtime.block_on(redirecting_receiver(301));
    let clock = Arc::new(VirtualClock::new(T0_MS));
    let client = client_resolving(&["rx.test"], "127.0.0.1", &["127.0.0.1/32"]);
    let endpoint = case_endpoint("ep_b06", &receiver.url_as("rx.test", "/hook"));
    let delivery = case_delivery(
        "ep_b06",
        "msg_b06",
        br#"{"id":"evt_b06","type":"report.ready"}"#,
    );

    let run = run_virtual(
        &runtime,
        &clock,
        client,
        vec![endpoint],
        fixed_schedule(&[5_000]),
        vec![(T0_MS, delivery)],
    );

    let rows = run.rows_of("ep_b06", "msg_b06");
    let outcomes: Vec<&str> = rows.iter().map(|row| row.outcome.as_str()).collect();
    assert_eq!(outcomes, ["failed", "dead_lettered"]);
    assert_eq!(rows[0].next_attempt_at_ms, Some(T0_MS + 5_000));
    assert_eq!(rows[1].started_at_ms, Some(T0_MS + 5_000));
    assert_eq!(receiver.count_to("/hook"), 2, "one POST per attempt");
    assert_eq!(receiver.count_to("/final"), 0, "the redirect was followed");
    for request in receiver.seen() {
        assert_eq!(request.body, br#"{"id":"evt_b06","type":"report.ready"}"#);
    }
}

// ---------------------------------------------------------------------------------------
// B07: internal addresses are refused at delivery time, in every notation
// ---------------------------------------------------------------------------------------
//
// Refusing these URLs at registration belongs to the management API. The test policy allows
// only 127.0.0.1, so 127.0.0.2 is an internal address here. Every URL points at 127.0.0.2, so
// even a policy failure reaches only the test's own listener. The error kind of a rejected
// address is `refused`.

#[test]
fn b07_internal_address_never_contacted() {
    let runtime = runtime();
    let (address, connections) =
        runtime.block_on(silent_server("127.0.0.2:0", Silence::AfterRequest));
    let port = address.port();
    let names = [
        "rx-internal.test",
        "metadata.google.internal",
        "localhost.",
        "foo.localhost",
    ];
    let client = client_resolving(&names, "127.0.0.2", &["127.0.0.1/32"]);
    let urls = [
        format!("http://127.0.0.2:{port}/h"),
        format!("http://2130706434:{port}/h"),
        format!("http://0x7f000002:{port}/h"),
        format!("http://0177.0.0.2:{port}/h"),
        format!("http://127.0.2:{port}/h"),
        format!("http://[::ffff:127.0.0.2]:{port}/h"),
        format!("http://[::ffff:7f00:2]:{port}/h"),
        format!("http://rx-internal.test:{port}/h"),
        format!("http://metadata.google.internal:{port}/computeMetadata/v1/"),
        format!("http://LOCALHOST.:{port}/h"),
        format!("http://foo.localhost:{port}/h"),
    ];
    let mut endpoints = Vec::new();
    let mut deliveries = Vec::new();
    for (index, url) in urls.iter().enumerate() {
        let endpoint_id = format!("ep_b07_{index}");
        endpoints.push(case_endpoint(&endpoint_id, url));
        let payload = br#"{"id":"evt_b07"}"#;
        let delivery = delivery_with_offset(&endpoint_id, "msg_b07", payload, index as u64);
        deliveries.push((T0_MS, delivery));
    }
    let clock = Arc::new(VirtualClock::new(T0_MS));

    let run = run_virtual(
        &runtime,
        &clock,
        client,
        endpoints,
        fixed_schedule(&[5_000]),
        deliveries,
    );

    assert_eq!(
        connections.accepted(),
        0,
        "an internal address was contacted"
    );
    assert!(
        run.retries.is_empty(),
        "a refusal was retried: {:?}",
        run.retries
    );
    for (index, url) in urls.iter().enumerate() {
        let rows = run.rows_of(&format!("ep_b07_{index}"), "msg_b07");
        assert_eq!(rows.len(), 1, "{url}: {rows:#?}");
        let row = &rows[0];
        assert_eq!(row.outcome, "dead_lettered", "{url}");
        assert_eq!(row.error_kind.as_deref(), Some("refused"), "{url}: {row:?}");
        assert_eq!(row.attempt, 0, "{url}: counted as a request");
        let message = row.error_message.as_deref().unwrap_or_default();
        assert!(message.contains("127.0.0.2"), "{url}: {message}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b07_redirect_to_internal_not_followed() {
    let (internal, connections) = silent_server("127.0.0.2:0", Silence::AfterRequest).await;
    let location = format!("http://{internal}/x");
    let clock: Arc<dyn Clock> = Arc::new(WallClock);
    let script = move |_: &Seen, _: usize| reply_with(302, "location", &location);
    let receiver = CaseReceiver::start(LOOPBACK, clock, Arc::new(script)).await;
    let endpoint = case_endpoint("ep_b07", &receiver.url("/hook"));
    let delivery = case_delivery("ep_b07", "msg_b07", br#"{"id":"evt_b07"}"#);

    let result = loopback_client()
        .attempt(&endpoint, &delivery, &fixed_clock(T0_MS))
        .await;

    assert_eq!(connections.accepted(), 0, "the redirect reached 127.0.0.2");
    assert_eq!(receiver.seen().len(), 1);
    assert_eq!(result.http_status, Some(302));
    assert_eq!(result.verdict.error_kind, Some(ErrorKind::Redirect));
    assert_eq!(result.verdict.outcome, Outcome::Failed);
    let expected = format!("http://{internal}/x");
    assert_eq!(result.location.as_deref(), Some(expected.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b07_allowed_cidr_opt_in() {
    let clock: Arc<dyn Clock> = Arc::new(WallClock);
    let allowed =
        CaseReceiver::start("127.0.0.2:0", clock, Arc::new(|_: &Seen, _| reply(200))).await;
    let (other, connections) = silent_server("127.0.0.3:0", Silence::AfterRequest).await;
    let config = ClientConfig {
        address_policy: AddressPolicy::new(vec!["127.0.0.2/32".parse().expect("valid CIDR")]),
        ..ClientConfig::default()
    };
    let client = DeliveryClient::new(config).expect("client builds");
    let delivery = case_delivery("ep_b07", "msg_b07", br#"{"id":"evt_b07"}"#);

    let endpoint = case_endpoint("ep_b07", &allowed.url("/h"));
    let result = client
        .attempt(&endpoint, &delivery, &fixed_clock(T0_MS))
        .await;
    assert_eq!(result.verdict.outcome, Outcome::Delivered, "{result:?}");
    assert_eq!(allowed.seen().len(), 1);

    let endpoint = case_endpoint("ep_b07", &format!("http://{other}/h"));
    let result = client
        .attempt(&endpoint, &delivery, &fixed_clock(T0_MS))
        .await;
    assert_eq!(
        result.verdict.error_kind,
        Some(ErrorKind::Refused),
        "{result:?}"
    );
    assert_eq!(result.verdict.outcome, Outcome::DeadLettered);
    assert_eq!(connections.accepted(), 0, "127.0.0.3 was contacted");
}

// ---------------------------------------------------------------------------------------
// B10: every attempt ends by its deadline, whatever the receiver does
// ---------------------------------------------------------------------------------------
//
// Request timeouts are 300 ms and connect timeouts 200 ms, so each test ends within a second.

const B10_TIMEOUT_MS: u64 = 300;

/// Makes one attempt to `url` with the B10 timeouts and returns the result and how long the
/// attempt took.
async fn b10_attempt(
    url: &str,
    payload: &[u8],
) -> (hookflow_operators::deliver::AttemptResult, Duration) {
    let mut endpoint = case_endpoint("ep_b10", url);
    endpoint.timeout_ms = B10_TIMEOUT_MS;
    let delivery = case_delivery("ep_b10", "msg_b10", payload);
    let started = Instant::now();
    let result = loopback_client()
        .attempt(&endpoint, &delivery, &WallClock)
        .await;
    (result, started.elapsed())
}

/// Asserts that an attempt with the B10 timeout ended at that timeout, give or take 1 s.
fn assert_ended_at_timeout(elapsed: Duration) {
    let timeout = Duration::from_millis(B10_TIMEOUT_MS);
    assert!(
        elapsed >= timeout,
        "ended after {elapsed:?}, before the timeout"
    );
    assert!(
        elapsed < timeout + Duration::from_secs(1),
        "took {elapsed:?} for a {timeout:?} timeout"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b10_silent_receiver_times_out() {
    let (address, connections) = silent_server(LOOPBACK, Silence::AfterRequest).await;

    let (result, elapsed) =
        b10_attempt(&format!("http://{address}/"), br#"{"id":"evt_b10"}"#).await;

    assert_ended_at_timeout(elapsed);
    assert_eq!(
        result.verdict.error_kind,
        Some(ErrorKind::Timeout),
        "{result:?}"
    );
    assert_eq!(
        result.verdict.outcome,
        Outcome::Failed,
        "a timeout is retried"
    );
    assert_eq!(connections.accepted(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b10_unread_upload_times_out() {
    let (address, connections) = silent_server(LOOPBACK, Silence::Unread).await;
    // A 2 MiB JSON string: more than loopback socket buffers take in at once, as a rule.
    let mut payload = Vec::with_capacity(2 * 1024 * 1024 + 2);
    payload.push(b'"');
    payload.resize(2 * 1024 * 1024 + 1, b'a');
    payload.push(b'"');

    let (result, elapsed) = b10_attempt(&format!("http://{address}/"), &payload).await;

    assert_ended_at_timeout(elapsed);
    assert_eq!(
        result.verdict.error_kind,
        Some(ErrorKind::Timeout),
        "{result:?}"
    );
    assert_eq!(result.verdict.outcome, Outcome::Failed);
    assert_eq!(connections.accepted(), 1);
}

/// The status line decides the outcome. A body that trickles past the deadline is kept as far
/// as it came and marked truncated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b10_trickled_body_still_delivers() {
    let head = b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n";
    let address = drip_server(head, b"x", Duration::from_millis(100)).await;

    let (result, elapsed) =
        b10_attempt(&format!("http://{address}/"), br#"{"id":"evt_b10"}"#).await;

    assert_ended_at_timeout(elapsed);
    assert_eq!(result.verdict.outcome, Outcome::Delivered, "{result:?}");
    assert_eq!(result.http_status, Some(200));
    assert_eq!(result.response_truncated, Some(true));
    assert!(
        result.response_bytes_read < 100_000,
        "{}",
        result.response_bytes_read
    );
    let snippet = result.response_snippet.unwrap_or_default();
    assert!(
        snippet.starts_with('x') && snippet.bytes().all(|b| b == b'x'),
        "{snippet:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b10_unfinished_chunked_body_delivers() {
    let head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
    let address = drip_server(head, b"1\r\nx\r\n", Duration::from_millis(100)).await;

    let (result, elapsed) =
        b10_attempt(&format!("http://{address}/"), br#"{"id":"evt_b10"}"#).await;

    assert_ended_at_timeout(elapsed);
    assert_eq!(result.verdict.outcome, Outcome::Delivered, "{result:?}");
    assert_eq!(result.response_truncated, Some(true));
    let snippet = result.response_snippet.unwrap_or_default();
    assert!(
        snippet.starts_with('x') && snippet.bytes().all(|b| b == b'x'),
        "{snippet:?}"
    );
}

/// A listener whose accept queue is full drops new SYNs, so connecting hangs as it does to
/// a blackholed address, and the connect timeout ends the attempt well before the total one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b10_full_backlog_connect_timeout() {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind("127.0.0.1:0".parse().expect("address"))
        .expect("bind");
    let listener = socket.listen(0).expect("listen");
    let address = listener.local_addr().expect("local address");
    // Linux queues one connection for a backlog of 0; connect until one hangs.
    let mut queued = Vec::new();
    for _ in 0..8 {
        let connect = TcpStream::connect(address);
        match tokio::time::timeout(Duration::from_millis(100), connect).await {
            Ok(Ok(stream)) => queued.push(stream),
            _ => break,
        }
    }
    assert!(queued.len() < 8, "the accept queue never filled");
    let mut endpoint = case_endpoint("ep_b10", &format!("http://{address}/"));
    endpoint.timeout_ms = 3_000;
    endpoint.connect_timeout_ms = 200;
    let delivery = case_delivery("ep_b10", "msg_b10", br#"{"id":"evt_b10"}"#);

    let started = Instant::now();
    let result = loopback_client()
        .attempt(&endpoint, &delivery, &WallClock)
        .await;
    let elapsed = started.elapsed();

    assert!(
        elapsed >= Duration::from_millis(200),
        "ended after {elapsed:?}"
    );
    assert!(elapsed < Duration::from_millis(1_500), "took {elapsed:?}");
    assert_eq!(
        result.verdict.error_kind,
        Some(ErrorKind::Timeout),
        "{result:?}"
    );
    assert_eq!(result.verdict.outcome, Outcome::Failed);
    let message = result.error_message.unwrap_or_default();
    assert!(message.contains("connect timeout of 200 ms"), "{message}");
    drop(listener);
}

/// A silent endpoint neither blocks another endpoint nor exceeds its own in-flight limit,
/// and its connections close once its attempts end. With 12 queued events, at most 3 in
/// flight (fewer once its timeouts halve the cap) and a 250 ms timeout, the run takes a few
/// seconds. The breaker is kept out of the way: it would hold the last events for its
/// cooldown, which `breaker_holds_failing_endpoint` tests.
#[test]
fn b10_slow_endpoint_blocks_no_other() {
    let runtime = runtime();
    let (silent, connections) = runtime.block_on(silent_server(LOOPBACK, Silence::AfterRequest));
    let healthy = runtime.block_on(CaseReceiver::answering(200));
    let mut slow = case_endpoint("ep_b10_slow", &format!("http://{silent}/"));
    slow.timeout_ms = 250;
    slow.max_in_flight = 3;
    let fast = case_endpoint("ep_b10_fast", &healthy.url("/hook"));

    let start_ms = WallClock.now_ms();
    let mut deliveries = Vec::new();
    for offset in 0..12u64 {
        let mut delivery =
            delivery_with_offset("ep_b10_slow", &format!("msg_b10_{offset}"), b"{}", offset);
        delivery.ingested.read_at_ms = start_ms;
        deliveries.push((start_ms, delivery));
    }
    let mut fast_delivery = delivery_with_offset("ep_b10_fast", "msg_b10_fast", b"{}", 100);
    fast_delivery.ingested.read_at_ms = start_ms;
    deliveries.push((start_ms, fast_delivery));
    let log = MemoryLog::of(deliveries.iter().map(|(_, delivery)| delivery));
    let context = case_context(
        &runtime,
        loopback_client(),
        vec![slow, fast],
        Arc::new(WallClock),
        fixed_schedule(&[]),
    );
    let context = DeliverContext {
        health: HealthPolicy {
            breaker_min_requests: 1_000,
            ..HealthPolicy::default()
        },
        ..context
    };
    let requests_in_flight = Arc::clone(&context.requests_in_flight);

    let run = run_on_wall_clock(1, context, deliveries, log);

    let fast_rows = run.rows_of("ep_b10_fast", "msg_b10_fast");
    assert_eq!(fast_rows.len(), 1);
    assert_eq!(fast_rows[0].outcome, "delivered");
    let waited_ms = fast_rows[0].finished_at_ms - start_ms;
    assert!(
        waited_ms < 1_000,
        "the healthy endpoint waited {waited_ms} ms"
    );
    let slow_rows: Vec<_> = run
        .rows
        .iter()
        .filter(|(_, row)| row.endpoint_id.as_deref() == Some("ep_b10_slow"))
        .collect();
    assert_eq!(slow_rows.len(), 12);
    for (_, row) in &slow_rows {
        assert_eq!(row.error_kind.as_deref(), Some("timeout"), "{row:?}");
    }
    assert_eq!(connections.accepted(), 12);
    let max_open = connections.max_open(Duration::from_millis(20));
    assert!(
        (1..=3).contains(&max_open),
        "{max_open} requests in flight at once"
    );
    assert_eq!(requests_in_flight.load(Ordering::SeqCst), 0);
    let deadline = Instant::now() + Duration::from_secs(2);
    while connections.open() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(connections.open(), 0, "connections left open");
}

// ---------------------------------------------------------------------------------------
// B11: huge and endless response bodies are read only up to the cap
// ---------------------------------------------------------------------------------------
//
// Memory use and Parquet row size belong to the benchmark and the archive. These tests check
// the bounded read that keeps both small. Refusing an oversized payload at ingest
// belongs to the decode stage.

const FIFTY_MIB: u64 = 50 * 1024 * 1024;

/// The maximum body bytes an attempt may read with the default 64 KiB cap. hyper 1.x hands
/// over at most its 408 KiB read buffer per chunk, so the read stops within one such chunk.
const MAX_BODY_READ: u64 = 64 * 1024 + 512 * 1024;

/// 64 KiB of `a`.
fn filler_chunk() -> Arc<Vec<u8>> {
    Arc::new(vec![b'a'; 64 * 1024])
}

/// 64 KiB of `a` framed as one chunk of a chunked body.
fn filler_frame() -> Arc<Vec<u8>> {
    let mut frame = b"10000\r\n".to_vec();
    frame.resize(frame.len() + 64 * 1024, b'a');
    frame.extend_from_slice(b"\r\n");
    Arc::new(frame)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b11_huge_body_read_to_cap() {
    let head = b"HTTP/1.1 200 OK\r\ncontent-length: 52428800\r\n\r\n";
    let (address, written) = flood_server(head, filler_chunk(), FIFTY_MIB).await;
    let endpoint = case_endpoint("ep_b11", &format!("http://{address}/"));
    let delivery = case_delivery("ep_b11", "msg_b11", br#"{"id":"evt_b11"}"#);

    let started = Instant::now();
    let result = loopback_client()
        .attempt(&endpoint, &delivery, &WallClock)
        .await;
    let elapsed = started.elapsed();

    assert_eq!(result.verdict.outcome, Outcome::Delivered, "{result:?}");
    assert_eq!(result.response_truncated, Some(true));
    assert!(
        result.response_bytes_read <= MAX_BODY_READ,
        "read {}",
        result.response_bytes_read
    );
    let snippet = result.response_snippet.unwrap_or_default();
    assert!(snippet.len() <= 64 * 1024, "kept {} bytes", snippet.len());
    assert!(
        elapsed < Duration::from_secs(1),
        "took {elapsed:?}, as if draining the body"
    );
    let written = flood_results(&written, 1).await;
    assert_eq!(written.len(), 1, "the connection was not closed");
    assert!(written[0] < FIFTY_MIB, "the whole body was drained");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b11_endless_chunked_body_capped() {
    let head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
    let (address, written) = flood_server(head, filler_frame(), 4 * FIFTY_MIB).await;
    let endpoint = case_endpoint("ep_b11", &format!("http://{address}/"));
    let delivery = case_delivery("ep_b11", "msg_b11", br#"{"id":"evt_b11"}"#);

    let started = Instant::now();
    let result = loopback_client()
        .attempt(&endpoint, &delivery, &WallClock)
        .await;
    let elapsed = started.elapsed();

    assert_eq!(result.verdict.outcome, Outcome::Delivered, "{result:?}");
    assert_eq!(result.response_truncated, Some(true));
    assert!(
        result.response_bytes_read <= MAX_BODY_READ,
        "read {}",
        result.response_bytes_read
    );
    assert!(elapsed < Duration::from_secs(1), "took {elapsed:?}");
    let written = flood_results(&written, 1).await;
    assert_eq!(written.len(), 1, "the connection was not closed");
    assert!(written[0] < FIFTY_MIB, "the endless body was read on");
}

/// A 500 with a huge body fails, is archived, and each retry step fires exactly once.
#[test]
fn b11_huge_error_body_retried_once() {
    let runtime = runtime();
    let head = b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 52428800\r\n\r\n";
    let (address, written) = runtime.block_on(flood_server(head, filler_chunk(), FIFTY_MIB));
    let clock = Arc::new(VirtualClock::new(T0_MS));
    let endpoint = case_endpoint("ep_b11", &format!("http://{address}/"));
    let delivery = case_delivery("ep_b11", "msg_b11", br#"{"id":"evt_b11"}"#);

    let run = run_virtual(
        &runtime,
        &clock,
        loopback_client(),
        vec![endpoint],
        fixed_schedule(&[1_000, 2_000]),
        vec![(T0_MS, delivery)],
    );

    let rows = run.rows_of("ep_b11", "msg_b11");
    let attempts: Vec<u32> = rows.iter().map(|row| row.attempt).collect();
    assert_eq!(attempts, [1, 2, 3], "one row per attempt");
    let started: Vec<Option<Millis>> = rows.iter().map(|row| row.started_at_ms).collect();
    assert_eq!(
        started,
        [Some(T0_MS), Some(T0_MS + 1_000), Some(T0_MS + 3_000)],
        "each step fires once, on time"
    );
    for row in &rows {
        assert_eq!(row.http_status, Some(500));
        assert_eq!(row.response_truncated, Some(true));
    }
    assert_eq!(rows[2].outcome, "dead_lettered");
    assert_eq!(run.retries.len(), 2);
    let written = runtime.block_on(flood_results(&written, 3));
    assert_eq!(written.len(), 3, "attempts made: {written:?}");
}

/// A 413 is archived with its status. Whether a 413 is retried is a design choice: like every
/// 4xx but 408, 410 and 429, it is a `client_error`, retried `client_error_retries` times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b11_payload_too_large_archived() {
    let receiver = CaseReceiver::answering(413).await;
    let endpoint = case_endpoint("ep_b11", &receiver.url("/hook"));
    let mut payload = b"\"".to_vec();
    payload.resize(1024 * 1024 - 1, b'a');
    payload.push(b'"');
    let delivery = case_delivery("ep_b11", "msg_b11", &payload);

    let result = loopback_client()
        .attempt(&endpoint, &delivery, &fixed_clock(T0_MS))
        .await;
    let row = result.to_row(&delivery, T0_MS);

    assert_eq!(row.http_status, Some(413));
    assert_eq!(row.error_kind.as_deref(), Some("client_error"));
    assert_ne!(row.outcome, "delivered");
    assert_eq!(receiver.seen()[0].body.len(), 1024 * 1024);
}

// ---------------------------------------------------------------------------------------
// B12: NUL bytes and invalid UTF-8 neither change the body nor break the row
// ---------------------------------------------------------------------------------------
//
// The Parquet flush with one odd row among 999 belongs to the archive, and dead-lettering
// invalid JSON or UTF-8 at ingest to the decode stage.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b12_nul_escape_sent_verbatim() {
    let payload = br#"{"id":"evt_b12","type":"log.line","data":{"text":"abc\u0000def"}}"#;
    let receiver = CaseReceiver::answering(200).await;
    let endpoint = case_endpoint("ep_b12", &receiver.url("/hook"));
    let delivery = case_delivery("ep_b12", "msg_b12", payload);

    let result = loopback_client()
        .attempt(&endpoint, &delivery, &fixed_clock(T0_MS))
        .await;
    let row = result.to_row(&delivery, T0_MS);

    assert_eq!(row.outcome, "delivered", "{row:?}");
    let request = &receiver.seen()[0];
    assert_eq!(request.body, payload);
    let sha256 = "d5681d0a8eccdf980f3449948c81a9f63692e34d6cb673bae7471126af93f6e9";
    assert_eq!(sha256_hex(&request.body), sha256);
    assert_eq!(row.body_sha256.as_deref(), Some(sha256));
    assert_eq!(
        request.header("webhook-signature"),
        "v1,U/vkkb+rx0AcrEy2dRQXNwiLoS6USrHviR46GcJB0xQ="
    );
}

/// Starts a receiver that responds with 200 and the body `ok`, NUL, `FF FE` and a newline.
async fn binary_answering_receiver() -> CaseReceiver {
    let clock: Arc<dyn Clock> = Arc::new(WallClock);
    let script = |_: &Seen, _: usize| {
        (StatusCode::OK, Bytes::from_static(b"ok\x00\xff\xfe\n")).into_response()
    };
    CaseReceiver::start(LOOPBACK, clock, Arc::new(script)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b12_binary_response_delivered() {
    let receiver = binary_answering_receiver().await;
    let endpoint = case_endpoint("ep_b12", &receiver.url("/hook"));
    let delivery = case_delivery("ep_b12", "msg_b12", br#"{"id":"evt_b12"}"#);

    let result = loopback_client()
        .attempt(&endpoint, &delivery, &fixed_clock(T0_MS))
        .await;
    let row = result.to_row(&delivery, T0_MS);

    assert_eq!(row.outcome, "delivered", "{row:?}");
    assert_eq!(
        row.response_snippet.as_deref(),
        Some("ok\u{0}\u{fffd}\u{fffd}\n"),
        "invalid bytes are not replaced with U+FFFD"
    );
    assert_eq!(row.response_truncated, Some(false));
}

/// The attempt row records when its response snippet is not the bytes received, in a column
/// of the archive schema.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b12_lossy_response_flagged() {
    let receiver = binary_answering_receiver().await;
    let endpoint = case_endpoint("ep_b12", &receiver.url("/hook"));
    let delivery = case_delivery("ep_b12", "msg_b12", br#"{"id":"evt_b12"}"#);
    let client = loopback_client();

    let result = client
        .attempt(&endpoint, &delivery, &fixed_clock(T0_MS))
        .await;
    let row = result.to_row(&delivery, T0_MS);

    assert_eq!(row.outcome, "delivered", "{row:?}");
    assert_eq!(row.response_lossy, Some(true), "{row:?}");
    let schema = hookflow_schemas::attempt_schema();
    let field = schema
        .field_with_name("response_lossy")
        .expect("the archive schema has response_lossy");
    assert!(field.is_nullable());

    let clean = CaseReceiver::answering(200).await;
    let endpoint = case_endpoint("ep_b12", &clean.url("/hook"));
    let result = client
        .attempt(&endpoint, &delivery, &fixed_clock(T0_MS))
        .await;
    assert_eq!(
        result.response_lossy,
        Some(false),
        "an empty body is not lossy"
    );
}

// ---------------------------------------------------------------------------------------
// B16: during a secret rotation every active secret signs
// ---------------------------------------------------------------------------------------
//
// The rotate call itself belongs to the management API. Here a rotated endpoint has S2 and
// S1 with an expiry 24 h after T0, as a rotation at T0 leaves it, and the attempt's clock
// read decides which of them sign.

/// The B16 rotation's grace period, in ms.
const B16_GRACE_MS: Millis = 86_400_000;

/// Creates the B16 endpoint after the rotation from S1 to S2 at T0.
fn b16_rotated_endpoint(url: &str) -> Endpoint {
    let mut endpoint = case_endpoint("ep_b16", url);
    endpoint.secrets = vec![
        SigningSecret::new(S2),
        SigningSecret::expiring(S1, T0_MS + B16_GRACE_MS),
    ];
    endpoint
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b16_rotation_signs_with_both() {
    let payload = br#"{"id":"evt_b16","type":"ping"}"#;
    let receiver = CaseReceiver::answering(200).await;
    let client = loopback_client();
    let delivery = case_delivery("ep_b16", "msg_b16", payload);
    let before_rotation = case_endpoint("ep_b16", &receiver.url("/hook"));
    let rotated = b16_rotated_endpoint(&receiver.url("/hook"));
    let table = [
        Rotation {
            offset_s: -10,
            endpoint: &before_rotation,
            signatures: &["v1,Mv3s66l8shMvG3Aadd4B9EbLNUNUSmvOfZ1we7WEbdc="],
            s1_verifies: true,
            s2_verifies: false,
        },
        Rotation {
            offset_s: 60,
            endpoint: &rotated,
            signatures: &[
                "v1,aXHPUcCu2t4ElChG2BYeZxOLMG+8I1gCI/gxFhnw8xo=",
                "v1,3lswmVKKaWelEiOZs/oKNARFKt5txo0tX4RnZrBffpY=",
            ],
            s1_verifies: true,
            s2_verifies: true,
        },
        Rotation {
            offset_s: 86_399,
            endpoint: &rotated,
            signatures: &[
                "v1,Sg7LcW+Ph7xzlnDwUzCW2uQPx+RapVtGh8B1Es3Q/P8=",
                "v1,3+OAWQwqhcwTkGIidp03kUbPBVaVifryJysMyXcZNbI=",
            ],
            s1_verifies: true,
            s2_verifies: true,
        },
        Rotation {
            offset_s: 86_401,
            endpoint: &rotated,
            signatures: &["v1,GR7/5Di+mahTL8tcsSQnlwhZv9XgybFMDrsfB+hMa+g="],
            s1_verifies: false,
            s2_verifies: true,
        },
    ];

    for (index, row) in table.iter().enumerate() {
        let when = format!("T0{:+}", row.offset_s);
        let at_s = T0
            .checked_add_signed(row.offset_s)
            .expect("time after 1970");

        let result = client
            .attempt(row.endpoint, &delivery, &fixed_clock(at_s * 1000))
            .await;

        assert_eq!(result.verdict.outcome, Outcome::Delivered, "{when}");
        let request = &receiver.seen()[index];
        let expected: BTreeSet<String> = row.signatures.iter().map(|s| s.to_string()).collect();
        assert_eq!(request.signatures(), expected, "{when}");
        assert_eq!(verifies(S1, request, at_s), row.s1_verifies, "S1 at {when}");
        assert_eq!(verifies(S2, request, at_s), row.s2_verifies, "S2 at {when}");
        assert_eq!(request.header("webhook-id"), "msg_b16", "{when}");
        assert_eq!(request.body, payload, "{when}");
    }
}

/// One row of the B16 table: an attempt during a rotation from S1 to S2 at T0.
struct Rotation<'a> {
    /// When the attempt leaves, in seconds after T0.
    offset_s: i64,
    /// The endpoint as configured then.
    endpoint: &'a Endpoint,
    /// The signatures `webhook-signature` must contain, in any order.
    signatures: &'static [&'static str],
    /// Whether a receiver holding only S1 accepts the request.
    s1_verifies: bool,
    /// Whether a receiver holding only S2 accepts the request.
    s2_verifies: bool,
}

/// A retry that leaves after the old secret expired is signed by the new secret alone,
/// although the endpoint did not change: the expiry is decided on the attempt's clock read.
#[test]
fn b16_retry_past_expiry_signed_by_new() {
    let payload = br#"{"id":"evt_b16","type":"ping"}"#;
    let runtime = runtime();
    let clock = Arc::new(VirtualClock::new(T0_MS + 60_000));
    let shared: Arc<dyn Clock> = Arc::clone(&clock) as Arc<dyn Clock>;
    let script = |_: &Seen, number: usize| if number == 1 { reply(500) } else { reply(200) };
    let receiver = runtime.block_on(CaseReceiver::start(LOOPBACK, shared, Arc::new(script)));
    let endpoint = b16_rotated_endpoint(&receiver.url("/hook"));
    let delivery = case_delivery("ep_b16", "msg_b16", payload);

    let run = run_virtual(
        &runtime,
        &clock,
        loopback_client(),
        vec![endpoint],
        fixed_schedule(&[B16_GRACE_MS - 60_000 + 1_000]),
        vec![(T0_MS + 60_000, delivery)],
    );

    let seen = receiver.seen();
    assert_eq!(seen.len(), 2, "attempts: {seen:#?}");
    assert_eq!(
        seen[1].clock_ms,
        T0_MS + 86_401_000,
        "the retry left at the wrong time"
    );
    let first: BTreeSet<String> = [
        "v1,aXHPUcCu2t4ElChG2BYeZxOLMG+8I1gCI/gxFhnw8xo=",
        "v1,3lswmVKKaWelEiOZs/oKNARFKt5txo0tX4RnZrBffpY=",
    ]
    .map(str::to_string)
    .into();
    assert_eq!(seen[0].signatures(), first);
    let retry: BTreeSet<String> =
        ["v1,GR7/5Di+mahTL8tcsSQnlwhZv9XgybFMDrsfB+hMa+g=".to_string()].into();
    assert_eq!(seen[1].signatures(), retry);
    assert!(verifies(S2, &seen[1], T0 + 86_401));
    assert!(!verifies(S1, &seen[1], T0 + 86_401));
    let rows = run.rows_of("ep_b16", "msg_b16");
    let outcomes: Vec<&str> = rows.iter().map(|row| row.outcome.as_str()).collect();
    assert_eq!(outcomes, ["failed", "delivered"]);
}

/// An endpoint whose secrets have all expired gets no unsigned request: the attempt fails
/// without contacting it, and the message says what to change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b16_all_secrets_expired_not_sent() {
    let receiver = CaseReceiver::answering(200).await;
    let mut endpoint = case_endpoint("ep_b16", &receiver.url("/hook"));
    endpoint.secrets = vec![SigningSecret::expiring(S1, T0_MS)];
    let delivery = case_delivery("ep_b16", "msg_b16", br#"{"id":"evt_b16"}"#);

    let result = loopback_client()
        .attempt(&endpoint, &delivery, &fixed_clock(T0_MS))
        .await;

    assert_eq!(receiver.seen().len(), 0, "an unsigned request was sent");
    assert_eq!(
        result.verdict.error_kind,
        Some(ErrorKind::Request),
        "{result:?}"
    );
    let message = result.error_message.unwrap_or_default();
    assert!(message.contains("has expired"), "{message}");
    assert!(message.contains("2023-11-14T22:13:20Z"), "{message}");
    assert!(!message.contains(&S1[6..]), "{message}");
}

// ---------------------------------------------------------------------------------------
// B17: pooled keep-alive connections that the receiver closes
// ---------------------------------------------------------------------------------------
//
// A long loop of deliveries with pauses near the receiver's idle timeout, which meets the
// close race only by chance, belongs to the benchmark. These tests pin down each behaviour
// with a receiver that acts the same way every time. `DeliveryClient::stale_connection_resends`
// counts the resends; the pipeline does not export it as a metric yet.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b17_closed_idle_connection_replaced() {
    let (address, connections, requests) =
        keep_alive_server(KeepAlive::IdleClose(Duration::from_millis(50))).await;
    let endpoint = case_endpoint("ep_b17", &format!("http://{address}/"));
    let client = loopback_client();

    for number in 0..4 {
        let delivery = case_delivery("ep_b17", &format!("msg_b17_{number}"), b"{}");
        let result = client.attempt(&endpoint, &delivery, &WallClock).await;
        assert_eq!(
            result.verdict.outcome,
            Outcome::Delivered,
            "{number}: {result:?}"
        );
        // Well past the receiver's idle timeout, so it has closed the connection.
        tokio::time::sleep(Duration::from_millis(150)).await;
    }

    assert_eq!(requests.load(Ordering::SeqCst), 4);
    assert_eq!(connections.accepted(), 4, "a closed connection was reused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b17_connection_close_one_per_request() {
    let (address, connections, requests) = keep_alive_server(KeepAlive::ConnectionClose).await;
    let endpoint = case_endpoint("ep_b17", &format!("http://{address}/"));
    let client = loopback_client();

    for number in 0..5 {
        let delivery = case_delivery("ep_b17", &format!("msg_b17_{number}"), b"{}");
        let result = client.attempt(&endpoint, &delivery, &WallClock).await;
        assert_eq!(
            result.verdict.outcome,
            Outcome::Delivered,
            "{number}: {result:?}"
        );
    }

    assert_eq!(requests.load(Ordering::SeqCst), 5);
    assert_eq!(connections.accepted(), 5, "one TCP connection per request");
}

/// A request sent on a pooled connection that the receiver closes before any response byte
/// must be sent again at once on a fresh connection, within the same attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b17_stale_connection_resent_at_once() {
    let (address, connections, requests) = keep_alive_server(KeepAlive::CloseOnReuse).await;
    let endpoint = case_endpoint("ep_b17", &format!("http://{address}/"));
    let client = loopback_client();

    for number in 0..2 {
        // The pool gets the first connection back only once its connection task has seen
        // the response end. A request sent before that has the client connect again at the
        // same time, and whichever is ready first carries it, so the case would not be sure
        // to reuse the connection.
        if number > 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let delivery = case_delivery("ep_b17", &format!("msg_b17_{number}"), b"{}");
        let result = client.attempt(&endpoint, &delivery, &WallClock).await;
        assert_eq!(
            result.verdict.outcome,
            Outcome::Delivered,
            "delivery {number}: {:?} {:?}",
            result.verdict.error_kind,
            result.error_message
        );
    }

    assert_eq!(requests.load(Ordering::SeqCst), 3, "requests received");
    assert_eq!(client.stale_connection_resends(), 1);
    // A second connection carried the resend. The client may also have opened one more
    // while it took the pooled one; that connection carries no request.
    assert!(
        (2..=3).contains(&connections.accepted()),
        "the resend used a fresh connection: {} accepted",
        connections.accepted()
    );
}

/// A receiver that closes every connection without a response gets the request twice per
/// attempt, not more, and the attempt fails as an I/O error that the schedule retries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b17_resend_happens_once() {
    let listener = TcpListener::bind(LOOPBACK).await.expect("bind");
    let address = listener.local_addr().expect("local address");
    let requests = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&requests);
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            if read_request(&mut socket).await.is_some() {
                counted.fetch_add(1, Ordering::SeqCst);
            }
        }
    });
    let endpoint = case_endpoint("ep_b17", &format!("http://{address}/"));
    let delivery = case_delivery("ep_b17", "msg_b17", b"{}");
    let client = loopback_client();

    let result = client.attempt(&endpoint, &delivery, &WallClock).await;

    assert_eq!(result.verdict.error_kind, Some(ErrorKind::Io), "{result:?}");
    assert_eq!(result.verdict.outcome, Outcome::Failed);
    assert_eq!(requests.load(Ordering::SeqCst), 2, "requests received");
    assert_eq!(client.stale_connection_resends(), 1);
}

/// A connection idle for longer than the receiver's `Keep-Alive: timeout` is not reused, and
/// one idle for less is.
///
/// The first response teaches the client the hint, so the second request already uses a
/// pool whose idle limit follows it, on a new connection. The third waits past the hint and
/// needs a new connection; the fourth follows at once and reuses the third's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b17_keep_alive_hint_limits_reuse() {
    let (address, connections, requests) = keep_alive_server(KeepAlive::HintOneSecond).await;
    let endpoint = case_endpoint("ep_b17", &format!("http://{address}/"));
    let client = loopback_client();
    let pauses_ms = [0, 1_100, 0, 0];

    for (number, pause_ms) in pauses_ms.iter().enumerate() {
        let delivery = case_delivery("ep_b17", &format!("msg_b17_{number}"), b"{}");
        let result = client.attempt(&endpoint, &delivery, &WallClock).await;
        assert_eq!(
            result.verdict.outcome,
            Outcome::Delivered,
            "{number}: {result:?}"
        );
        tokio::time::sleep(Duration::from_millis(*pause_ms)).await;
    }

    assert_eq!(requests.load(Ordering::SeqCst), 4);
    assert_eq!(
        connections.accepted(),
        3,
        "a connection idle past its hint was reused, or one within it was not"
    );
    assert_eq!(client.stale_connection_resends(), 0);
}

// ---------------------------------------------------------------------------------------
// B18: credentials in the endpoint URL become Basic auth and appear nowhere else
// ---------------------------------------------------------------------------------------
//
// Log lines, metric labels and API responses are outside the deliver client. These tests check
// the attempt row, which the archive writes, and its error messages. Endpoints cannot configure
// an `Authorization` header yet, so its precedence over URL credentials is not tested.

/// Returns the B18 endpoint URL on `port`. Its password decodes to `p@ss:word`.
fn b18_url(port: u16) -> String {
    format!("http://hookuser:p%40ss%3Aword@rx.test:{port}/hooks/in?x=1")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b18_url_credentials_as_basic_auth() {
    let receiver = CaseReceiver::answering(200).await;
    let port = receiver.address.port();
    let client = client_resolving(&["rx.test"], "127.0.0.1", &["127.0.0.1/32"]);
    let endpoint = case_endpoint("ep_b18", &b18_url(port));
    let delivery = case_delivery("ep_b18", "msg_b18", br#"{"id":"evt_b18"}"#);

    let result = client
        .attempt(&endpoint, &delivery, &fixed_clock(T0_MS))
        .await;
    let row = result.to_row(&delivery, T0_MS);

    assert_eq!(row.outcome, "delivered", "{row:?}");
    let request = &receiver.seen()[0];
    assert_eq!(request.target, "/hooks/in?x=1");
    assert_eq!(
        request.header("authorization"),
        "Basic aG9va3VzZXI6cEBzczp3b3Jk"
    );
    assert_eq!(request.header("host"), format!("rx.test:{port}"));
    let url = format!("http://rx.test:{port}/hooks/in?x=1");
    assert_eq!(row.url.as_deref(), Some(url.as_str()));
    let archived = serde_json::to_string(&row).expect("row serializes");
    assert!(!leaks_b18_credentials(&archived), "{archived}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b18_failures_hide_credentials() {
    let failing = CaseReceiver::answering(500).await;
    let redirecting = {
        let clock: Arc<dyn Clock> = Arc::new(WallClock);
        let script = |_: &Seen, _: usize| reply_with(302, "location", "/elsewhere");
        CaseReceiver::start(LOOPBACK, clock, Arc::new(script)).await
    };
    let closed_port = {
        let listener = std::net::TcpListener::bind(LOOPBACK).expect("bind");
        listener.local_addr().expect("local address").port()
    };
    let client = client_resolving(&["rx.test"], "127.0.0.1", &["127.0.0.1/32"]);
    let refusing = client_resolving(&["rx.test"], "127.0.0.1", &[]);
    let delivery = case_delivery("ep_b18", "msg_b18", br#"{"id":"evt_b18"}"#);
    let cases = [
        (
            "500",
            &client,
            failing.address.port(),
            ErrorKind::HttpStatus,
        ),
        (
            "302",
            &client,
            redirecting.address.port(),
            ErrorKind::Redirect,
        ),
        ("closed port", &client, closed_port, ErrorKind::Connect),
        (
            "refused address",
            &refusing,
            failing.address.port(),
            ErrorKind::Refused,
        ),
    ];

    for (name, client, port, kind) in cases {
        let endpoint = case_endpoint("ep_b18", &b18_url(port));

        let result = client
            .attempt(&endpoint, &delivery, &fixed_clock(T0_MS))
            .await;
        let row = result.to_row(&delivery, T0_MS);

        assert_eq!(result.verdict.error_kind, Some(kind), "{name}: {row:?}");
        let archived = serde_json::to_string(&row).expect("row serializes");
        assert!(!leaks_b18_credentials(&archived), "{name}: {archived}");
        assert!(!archived.contains("hookuser"), "{name}: {archived}");
    }
}
