//! Delivery tests against real HTTP receivers on 127.0.0.1 ephemeral ports.
//!
//! Every receiver is started by the test that uses it, receives a bounded number of
//! requests, and stops with the test's runtime. Names other than `localhost` are resolved by a fixed
//! table, never by the system resolver.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::Path;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::routing::post;
use axum::Router;
use hookflow_operators::clock::{Clock, WallClock};
use hookflow_operators::deliver::{AddressPolicy, ClientConfig, DeliveryClient};
use hookflow_schemas::{ErrorKind, Outcome};

use support::*;

/// Starts a receiver that records every request to any path and responds with 204.
async fn recording_receiver() -> (Recorder, std::net::SocketAddr) {
    let recorder = Recorder::default();
    let handler_recorder = recorder.clone();
    let router = Router::new().fallback(move |uri: Uri, headers: HeaderMap, body: Bytes| {
        let recorder = handler_recorder.clone();
        async move {
            recorder.record(uri.path(), &headers, &body);
            StatusCode::NO_CONTENT
        }
    });
    let address = serve(router).await;
    (recorder, address)
}

mod contract {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn signature_verifies_with_standardwebhooks() {
        let (recorder, address) = recording_receiver().await;
        let mut endpoint = endpoint("ep_sig", &format!("http://{address}/hooks"));
        endpoint.secrets = vec![SECRET.to_string(), SECOND_SECRET.to_string()];
        let delivery = delivery("ep_sig", "evt_sig", br#"{"amount":1200,"currency":"EUR"}"#);

        let result = loopback_client()
            .attempt(&endpoint, &delivery, &WallClock)
            .await;

        assert_eq!(
            result.verdict.outcome,
            Outcome::Delivered,
            "{:?}",
            result.error_message
        );
        let requests = recorder.requests();
        assert_eq!(requests.len(), 1);
        let request = &requests[0];
        let signature = request.headers["webhook-signature"]
            .to_str()
            .expect("ASCII header");
        assert_eq!(
            signature.split(' ').count(),
            2,
            "one signature per secret: {signature}"
        );
        for secret in [SECRET, SECOND_SECRET] {
            let webhook = standardwebhooks::Webhook::new(secret).expect("valid secret");
            webhook
                .verify(&request.body, &request.headers)
                .unwrap_or_else(|e| panic!("signature for {secret} does not verify: {e}"));
        }
        let other = standardwebhooks::Webhook::new("whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA")
            .expect("valid secret");
        assert!(
            other.verify(&request.body, &request.headers).is_err(),
            "a wrong key verifies"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_clock_read_feeds_timestamp_and_start() {
        let (recorder, address) = recording_receiver().await;
        let endpoint = endpoint("ep_clock", &format!("http://{address}/"));
        let delivery = delivery("ep_clock", "evt_clock", b"{}");
        let clock = SteppingClock::new(1_700_000_123_456, 7_000);

        let result = loopback_client()
            .attempt(&endpoint, &delivery, &clock)
            .await;

        assert_eq!(result.started_at_ms, 1_700_000_123_456);
        assert_eq!(
            result.finished_at_ms, 1_700_000_130_456,
            "exactly two clock reads"
        );
        assert_eq!(result.latency_ms(), 7_000);
        let request = &recorder.requests()[0];
        assert_eq!(request.headers["webhook-timestamp"], "1700000123");
        let expected = standardwebhooks::Webhook::new(SECRET)
            .expect("valid secret")
            .sign("evt_clock", 1_700_000_123, b"{}")
            .expect("sign");
        assert_eq!(request.headers["webhook-signature"], expected.as_str());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn body_is_payload_bytes() {
        let (recorder, address) = recording_receiver().await;
        let endpoint = endpoint("ep_body", &format!("http://{address}/in"));
        let payload = "{\"b\": 1,  \"a\":\"é ✓ \\u00e9\",\n \"n\": 12345678901234567890}";
        let delivery = delivery("ep_body", "evt_body_1", payload.as_bytes());

        let result = loopback_client()
            .attempt(&endpoint, &delivery, &WallClock)
            .await;

        assert_eq!(
            result.verdict.outcome,
            Outcome::Delivered,
            "{:?}",
            result.error_message
        );
        assert_eq!(result.http_status, Some(204));
        let request = &recorder.requests()[0];
        assert_eq!(
            request.body,
            payload.as_bytes(),
            "body differs from the payload"
        );
        assert_eq!(request.path, "/in");
        assert_eq!(request.headers["content-type"], "application/json");
        assert_eq!(request.headers["webhook-id"], "evt_body_1");
        let user_agent = request.headers["user-agent"]
            .to_str()
            .expect("ASCII header");
        assert!(user_agent.starts_with("hookflow/"), "{user_agent}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn row_records_delivery_and_result() {
        let (_recorder, address) = recording_receiver().await;
        let endpoint = endpoint("ep_row", &format!("http://hook:s3cr3t@{address}/row"));
        let delivery = delivery("ep_row", "evt_row", b"[1,2,3]");

        let result = loopback_client()
            .attempt(&endpoint, &delivery, &WallClock)
            .await;
        let row = result.to_row(&delivery, 1_700_000_000_900);

        assert_eq!(row.event_id.as_deref(), Some("evt_row"));
        assert_eq!(row.tenant.as_deref(), Some("acme"));
        assert_eq!(row.endpoint_id.as_deref(), Some("ep_row"));
        assert_eq!(row.event_type.as_deref(), Some("charge.succeeded"));
        assert_eq!((row.generation, row.attempt), (0, 1));
        assert_eq!((row.partition, row.offset), (3, 42));
        assert_eq!(
            row.url,
            Some(format!("http://{address}/row")),
            "credentials kept"
        );
        assert_eq!(row.ingested_at_ms, Some(1_700_000_000_000));
        assert_eq!(row.due_at_ms, 1_700_000_000_900);
        assert_eq!(row.started_at_ms, Some(result.started_at_ms));
        assert_eq!(row.finished_at_ms, result.finished_at_ms);
        assert_eq!(row.latency_ms, Some(result.latency_ms()));
        assert_eq!(row.outcome, "delivered");
        assert_eq!(row.http_status, Some(204));
        assert_eq!(row.error_kind, None);
        assert_eq!(row.response_snippet.as_deref(), Some(""));
        assert_eq!(row.response_truncated, Some(false));
        // sha256 of "[1,2,3]", computed with `printf '[1,2,3]' | sha256sum`.
        assert_eq!(
            row.body_sha256.as_deref(),
            Some("a615eeaee21de5179de080de8c3052c8da901138406ba71c38c032845f7d54f4")
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn invalid_secret_sends_nothing() {
        let (recorder, address) = recording_receiver().await;
        let mut endpoint = endpoint("ep_secret", &format!("http://{address}/"));
        endpoint.secrets = vec![SECRET.to_string(), "AAECAwQF".to_string()];
        let delivery = delivery("ep_secret", "evt_secret", b"{}");

        let result = loopback_client()
            .attempt(&endpoint, &delivery, &WallClock)
            .await;

        assert_eq!(result.verdict.error_kind, Some(ErrorKind::Request));
        assert_eq!(result.verdict.outcome, Outcome::DeadLettered);
        let message = result.error_message.clone().unwrap_or_default();
        assert!(message.contains("secret 2 of 2"), "{message}");
        assert_eq!(recorder.count(), 0);
        assert_eq!(
            result.to_row(&delivery, 0).attempt,
            0,
            "no request was made"
        );
    }
}

mod responses {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redirect_is_not_followed() {
        let target = Recorder::default();
        let target_handler = target.clone();
        let router = Router::new()
            .route(
                "/start",
                post(|| async { (StatusCode::FOUND, [("location", "/target")], "moved") }),
            )
            .route(
                "/target",
                post(move |headers: HeaderMap, body: Bytes| {
                    let target = target_handler.clone();
                    async move {
                        target.record("target", &headers, &body);
                        StatusCode::OK
                    }
                }),
            );
        let address = serve(router).await;
        let endpoint = endpoint("ep_redirect", &format!("http://{address}/start"));
        let delivery = delivery("ep_redirect", "evt_redirect", b"{}");

        let result = loopback_client()
            .attempt(&endpoint, &delivery, &WallClock)
            .await;

        assert_eq!(target.count(), 0, "the redirect was followed");
        assert_eq!(result.http_status, Some(302));
        assert_eq!(
            result.verdict.outcome,
            Outcome::Failed,
            "a redirect is retried"
        );
        assert_eq!(result.verdict.error_kind, Some(ErrorKind::Redirect));
        assert_eq!(result.location.as_deref(), Some("/target"));
        let message = result.error_message.clone().unwrap_or_default();
        assert!(message.contains("final URL"), "{message}");
        let row = result.to_row(&delivery, 0);
        assert_eq!(row.error_kind.as_deref(), Some("redirect"));
        assert_eq!(row.location.as_deref(), Some("/target"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn server_error_fails_with_snippet() {
        let router = Router::new().route(
            "/",
            post(|| async {
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    [("retry-after", "120")],
                    "database down",
                )
            }),
        );
        let address = serve(router).await;
        let endpoint = endpoint("ep_500", &format!("http://{address}/"));
        let delivery = delivery("ep_500", "evt_500", b"{}");

        let result = loopback_client()
            .attempt(&endpoint, &delivery, &WallClock)
            .await;

        assert_eq!(result.verdict.outcome, Outcome::Failed, "a 500 is retried");
        assert_eq!(result.verdict.error_kind, Some(ErrorKind::HttpStatus));
        assert_eq!(result.http_status, Some(500));
        assert_eq!(result.response_snippet.as_deref(), Some("database down"));
        assert_eq!(result.response_truncated, Some(false));
        assert_eq!(result.retry_after.as_deref(), Some("120"));
        let message = result.error_message.unwrap_or_default();
        assert!(message.contains("500 Internal Server Error"), "{message}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn large_response_is_capped() {
        const BODY_BYTES: usize = 5 * 1024 * 1024;
        let router = Router::new().route("/", post(|| async { vec![b'x'; BODY_BYTES] }));
        let address = serve(router).await;
        let endpoint = endpoint("ep_large", &format!("http://{address}/"));
        let delivery = delivery("ep_large", "evt_large", b"{}");
        let config = ClientConfig {
            address_policy: loopback_policy(),
            max_response_bytes: 64 * 1024,
            snippet_bytes: 1024,
            ..ClientConfig::default()
        };
        let client = DeliveryClient::new(config).expect("client builds");

        let result = client.attempt(&endpoint, &delivery, &WallClock).await;

        assert_eq!(result.verdict.outcome, Outcome::Delivered);
        assert_eq!(result.response_truncated, Some(true));
        assert_eq!(result.response_snippet.as_deref().map(str::len), Some(1024));
        assert!(
            result.response_bytes_read >= 64 * 1024,
            "{}",
            result.response_bytes_read
        );
        // hyper 1.x hands over at most its read buffer per chunk (DEFAULT_MAX_BUFFER_SIZE,
        // 408 KiB), so the read stops within one such chunk past the cap.
        assert!(
            result.response_bytes_read < 64 * 1024 + 512 * 1024,
            "read {} bytes of a {BODY_BYTES}-byte body",
            result.response_bytes_read
        );
    }
}

mod failures {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn silent_server_times_out() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("local address");
        // Accept connections and keep them open without reading or responding.
        tokio::spawn(async move {
            let mut open_sockets = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                open_sockets.push(socket);
            }
        });
        let mut endpoint = endpoint("ep_silent", &format!("http://{address}/"));
        endpoint.timeout_ms = 300;
        let delivery = delivery("ep_silent", "evt_silent", b"{}");

        let started = Instant::now();
        let result = loopback_client()
            .attempt(&endpoint, &delivery, &WallClock)
            .await;
        let elapsed = started.elapsed();

        assert_eq!(result.verdict.error_kind, Some(ErrorKind::Timeout));
        assert_eq!(
            result.verdict.outcome,
            Outcome::Failed,
            "a timeout is retried"
        );
        assert!(
            elapsed >= Duration::from_millis(300),
            "gave up after {elapsed:?}"
        );
        assert!(
            elapsed < Duration::from_millis(1_300),
            "took {elapsed:?} for a 300 ms timeout"
        );
        assert_eq!(result.http_status, None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn closed_port_is_connect_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let address = listener.local_addr().expect("local address");
        drop(listener);
        let endpoint = endpoint("ep_closed", &format!("http://{address}/"));
        let delivery = delivery("ep_closed", "evt_closed", b"{}");

        let result = loopback_client()
            .attempt(&endpoint, &delivery, &WallClock)
            .await;

        assert_eq!(result.verdict.error_kind, Some(ErrorKind::Connect));
        assert_eq!(
            result.verdict.outcome,
            Outcome::Failed,
            "a connect error is retried"
        );
        assert_eq!(
            result.to_row(&delivery, 0).attempt,
            1,
            "a connect error is an attempt"
        );
        let message = result.error_message.unwrap_or_default();
        assert!(message.to_lowercase().contains("refused"), "{message}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn invalid_url_is_request_error() {
        let client = loopback_client();
        for url in ["not a url", "ftp://127.0.0.1/file", "/relative/path"] {
            let endpoint = endpoint("ep_url", url);
            let delivery = delivery("ep_url", "evt_url", b"{}");

            let result = client.attempt(&endpoint, &delivery, &WallClock).await;

            assert_eq!(result.verdict.error_kind, Some(ErrorKind::Request), "{url}");
            assert!(result.error_message.is_some(), "{url}");
        }
    }
}

mod addresses {
    use super::*;

    fn default_client() -> DeliveryClient {
        DeliveryClient::new(ClientConfig::default()).expect("client builds")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn loopback_refused_without_allow_list() {
        let (recorder, address) = recording_receiver().await;
        let endpoint = endpoint("ep_lo", &format!("http://{address}/"));
        let delivery = delivery("ep_lo", "evt_lo", b"{}");

        let result = default_client()
            .attempt(&endpoint, &delivery, &WallClock)
            .await;

        assert_eq!(result.verdict.error_kind, Some(ErrorKind::Refused));
        assert_eq!(result.verdict.outcome, Outcome::DeadLettered);
        assert_eq!(recorder.count(), 0, "a refused address was contacted");
        let message = result.error_message.clone().unwrap_or_default();
        assert!(message.contains("loopback"), "{message}");
        assert_eq!(
            result.to_row(&delivery, 0).attempt,
            0,
            "no request was made"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn loopback_allowed_with_allow_list() {
        let (recorder, address) = recording_receiver().await;
        let endpoint = endpoint("ep_lo_ok", &format!("http://{address}/"));
        let delivery = delivery("ep_lo_ok", "evt_lo_ok", b"{}");

        let result = loopback_client()
            .attempt(&endpoint, &delivery, &WallClock)
            .await;

        assert_eq!(
            result.verdict.outcome,
            Outcome::Delivered,
            "{:?}",
            result.error_message
        );
        assert_eq!(recorder.count(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn localhost_refused_after_resolving() {
        let (recorder, address) = recording_receiver().await;
        let endpoint = endpoint(
            "ep_localhost",
            &format!("http://localhost:{}/", address.port()),
        );
        let delivery = delivery("ep_localhost", "evt_localhost", b"{}");

        let result = default_client()
            .attempt(&endpoint, &delivery, &WallClock)
            .await;

        assert_eq!(
            result.verdict.error_kind,
            Some(ErrorKind::Refused),
            "{:?}",
            result.error_message
        );
        assert_eq!(recorder.count(), 0, "a refused address was contacted");
        let message = result.error_message.unwrap_or_default();
        assert!(message.contains("`localhost`"), "{message}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn resolved_name_is_filtered() {
        let (recorder, address) = recording_receiver().await;
        let endpoint = endpoint(
            "ep_name",
            &format!("http://hooks.example.test:{}/", address.port()),
        );
        let delivery = delivery("ep_name", "evt_name", b"{}");
        let resolver = Arc::new(FixedResolver::with("hooks.example.test", &["127.0.0.1:0"]));

        let default_policy_client = ClientConfig {
            resolver: Some(resolver.clone()),
            ..ClientConfig::default()
        };
        let default_policy_client =
            DeliveryClient::new(default_policy_client).expect("client builds");
        let result = default_policy_client
            .attempt(&endpoint, &delivery, &WallClock)
            .await;
        assert_eq!(
            result.verdict.error_kind,
            Some(ErrorKind::Refused),
            "{:?}",
            result.error_message
        );
        assert_eq!(recorder.count(), 0, "a refused address was contacted");

        let loopback_policy_client = ClientConfig {
            address_policy: loopback_policy(),
            resolver: Some(resolver),
            ..ClientConfig::default()
        };
        let loopback_policy_client =
            DeliveryClient::new(loopback_policy_client).expect("client builds");
        let result = loopback_policy_client
            .attempt(&endpoint, &delivery, &WallClock)
            .await;
        assert_eq!(
            result.verdict.outcome,
            Outcome::Delivered,
            "{:?}",
            result.error_message
        );
        let requests = recorder.requests();
        assert_eq!(requests.len(), 1);
        let host = format!("hooks.example.test:{}", address.port());
        assert_eq!(requests[0].headers["host"], host.as_str());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn policy_resolver_keeps_permitted_addresses() {
        use hookflow_operators::deliver::PolicyResolver;
        use reqwest::dns::Resolve;

        let inner = FixedResolver::with(
            "mixed.example.test",
            &[
                "127.0.0.2:0",
                "127.0.0.1:0",
                "[::1]:0",
                "[::ffff:127.0.0.1]:0",
            ],
        );
        let resolver = PolicyResolver::new(Arc::new(inner), loopback_policy());

        let name = "mixed.example.test".parse().expect("valid name");
        let addresses: Vec<_> = resolver.resolve(name).await.expect("resolves").collect();

        let expected: Vec<std::net::SocketAddr> = vec![
            "127.0.0.1:0".parse().expect("address"),
            "[::ffff:127.0.0.1]:0".parse().expect("address"),
        ];
        assert_eq!(addresses, expected);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn literal_notations_are_refused() {
        let (recorder, address) = recording_receiver().await;
        let port = address.port();
        let client = default_client();
        let notations = [
            format!("http://127.0.0.1:{port}/"),
            format!("http://2130706433:{port}/"),
            format!("http://0x7f.0.0.1:{port}/"),
            format!("http://0177.0.0.1:{port}/"),
            format!("http://127.1:{port}/"),
            format!("http://[::1]:{port}/"),
            format!("http://[::ffff:127.0.0.1]:{port}/"),
            format!("http://[::ffff:7f00:1]:{port}/"),
            format!("http://[0:0:0:0:0:ffff:7f00:0001]:{port}/"),
            format!("http://0.0.0.0:{port}/"),
            format!("http://[::]:{port}/"),
        ];
        for url in &notations {
            let endpoint = endpoint("ep_notation", url);
            let delivery = delivery("ep_notation", "evt_notation", b"{}");

            let result = client.attempt(&endpoint, &delivery, &WallClock).await;

            assert_eq!(result.verdict.error_kind, Some(ErrorKind::Refused), "{url}");
        }
        assert_eq!(recorder.count(), 0, "a refused address was contacted");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn allowed_literal_notations_deliver() {
        let (recorder, address) = recording_receiver().await;
        let port = address.port();
        let client = loopback_client();
        let notations = [
            format!("http://2130706433:{port}/"),
            format!("http://0x7f.0.0.1:{port}/"),
            format!("http://127.0.0.1:{port}/"),
        ];
        for url in &notations {
            let endpoint = endpoint("ep_allowed", url);
            let delivery = delivery("ep_allowed", "evt_allowed", b"{}");

            let result = client.attempt(&endpoint, &delivery, &WallClock).await;

            assert_eq!(
                result.verdict.outcome,
                Outcome::Delivered,
                "{url}: {:?}",
                result.error_message
            );
        }
        assert_eq!(recorder.count(), notations.len());
    }

    #[test]
    fn policy_table_over_notations() {
        use hookflow_operators::deliver::RefusedRange::*;
        let policy = AddressPolicy::default();
        let cases = [
            ("127.0.0.1", Err(Loopback)),
            ("::ffff:127.0.0.1", Err(Loopback)),
            ("0:0:0:0:0:ffff:7f00:1", Err(Loopback)),
            ("::ffff:a9fe:a9fe", Err(LinkLocal)),
            ("64:ff9b::a9fe:a9fe", Err(LinkLocal)),
            ("2002:a9fe:a9fe::", Err(LinkLocal)),
            ("::a9fe:a9fe", Err(Reserved)),
            ("169.254.169.254", Err(LinkLocal)),
            ("fd00:ec2::254", Err(Private)),
            ("100.100.100.200", Err(SharedAddressSpace)),
            ("::ffff:100.64.0.1", Err(SharedAddressSpace)),
            ("255.255.255.255", Err(Broadcast)),
            ("::ffff:255.255.255.255", Err(Broadcast)),
            ("ff05::2", Err(Multicast)),
            ("192.0.2.1", Err(Documentation)),
            ("2001:db8::8", Err(Documentation)),
            ("9.9.9.9", Ok(())),
            ("::ffff:9.9.9.9", Ok(())),
            ("2620:fe::fe", Ok(())),
        ];
        for (text, expected) in cases {
            let ip: std::net::IpAddr = text.parse().expect("valid IP address");
            assert_eq!(policy.check(ip), expected, "{text}");
        }
    }
}

mod operator {
    use std::collections::HashMap;
    use std::sync::Mutex;

    use hookflow_operators::deliver::DeliverContext;
    use hookflow_schemas::{Delivery, Endpoint, PendingDelivery};

    use super::*;

    /// Requests in flight and the most seen at once, per endpoint path.
    #[derive(Debug, Default)]
    struct Concurrency {
        current: HashMap<String, usize>,
        max: HashMap<String, usize>,
        overall_current: usize,
        overall_max: usize,
        total: usize,
    }

    /// Starts a receiver that responds with 200 after `delay`, tracking concurrency per path.
    async fn slow_receiver(delay: Duration) -> (Arc<Mutex<Concurrency>>, std::net::SocketAddr) {
        let concurrency = Arc::new(Mutex::new(Concurrency::default()));
        let tracked = Arc::clone(&concurrency);
        let router = Router::new().route(
            "/{endpoint}",
            post(move |Path(endpoint): Path<String>| {
                let tracked = Arc::clone(&tracked);
                async move {
                    {
                        let mut c = tracked.lock().expect("lock");
                        let current = c.current.entry(endpoint.clone()).or_default();
                        *current += 1;
                        let now = *current;
                        let max = c.max.entry(endpoint.clone()).or_default();
                        *max = (*max).max(now);
                        c.overall_current += 1;
                        c.overall_max = c.overall_max.max(c.overall_current);
                        c.total += 1;
                    }
                    tokio::time::sleep(delay).await;
                    let mut c = tracked.lock().expect("lock");
                    *c.current.entry(endpoint).or_default() -= 1;
                    c.overall_current -= 1;
                    StatusCode::OK
                }
            }),
        );
        (concurrency, serve(router).await)
    }

    fn context(runtime: &tokio::runtime::Runtime, endpoints: Vec<Endpoint>) -> DeliverContext {
        deliver_context(runtime, endpoints, Arc::new(WallClock) as Arc<dyn Clock>)
    }

    /// Runs the deliver operator on `workers` workers with the wall clock, with a source log
    /// that contains every delivery's payload.
    fn run_dataflow(
        workers: usize,
        context: DeliverContext,
        deliveries: Vec<(u64, Delivery)>,
    ) -> dataflow::Run {
        let log = dataflow::MemoryLog::of(deliveries.iter().map(|(_, delivery)| delivery));
        dataflow::run_on_wall_clock(workers, context, deliveries, log)
    }

    /// Creates a delivery due `due_in_ms` after `read_at_ms`, the wall-clock time its event
    /// was read; the event id ends in `_{due_in_ms}_{offset}`.
    fn due_delivery(
        endpoint_id: &str,
        name: &str,
        read_at_ms: u64,
        due_in_ms: u64,
        offset: u64,
    ) -> (u64, Delivery) {
        let event_id = format!("evt_{name}_{due_in_ms}_{offset}");
        let mut delivery = delivery_with_offset(endpoint_id, &event_id, b"{}", offset);
        delivery.ingested.read_at_ms = read_at_ms;
        (read_at_ms + due_in_ms, delivery)
    }

    #[test]
    fn operator_caps_in_flight_per_endpoint() {
        let runtime = runtime();
        let (concurrency, address) = runtime.block_on(slow_receiver(Duration::from_millis(40)));
        let mut busy = endpoint("ep_busy", &format!("http://{address}/ep_busy"));
        busy.max_in_flight = 2;
        let mut calm = endpoint("ep_calm", &format!("http://{address}/ep_calm"));
        calm.max_in_flight = 2;
        let mut off = endpoint("ep_off", &format!("http://{address}/ep_off"));
        off.enabled = false;

        let base = WallClock.now_ms();
        let mut deliveries = Vec::new();
        for i in 0..9u64 {
            deliveries.push(due_delivery(
                "ep_busy",
                "busy",
                base,
                100 + (i / 3) * 100,
                i,
            ));
        }
        for i in 0..4u64 {
            deliveries.push(due_delivery(
                "ep_calm",
                "calm",
                base,
                100 + (i / 2) * 100,
                10 + i,
            ));
        }
        deliveries.push(due_delivery("ep_gone", "gone", base, 250, 20));
        deliveries.push(due_delivery("ep_off", "off", base, 300, 21));
        deliveries.sort_by_key(|(time, _)| *time);
        let sent = deliveries.len();

        let context = context(&runtime, vec![busy, calm, off]);
        let run = run_dataflow(2, context, deliveries);
        let rows = run.rows;

        let concurrency = concurrency.lock().expect("lock");
        assert_eq!(
            concurrency.max.get("ep_busy"),
            Some(&2),
            "ep_busy concurrency"
        );
        assert_eq!(
            concurrency.max.get("ep_calm"),
            Some(&2),
            "ep_calm concurrency"
        );
        assert_eq!(concurrency.total, 13, "requests received");
        assert!(
            !concurrency.max.contains_key("ep_off"),
            "a disabled endpoint was contacted"
        );

        // The disabled endpoint's delivery is parked: pending without a due time, no row.
        assert_eq!(rows.len(), sent - 1, "one row per delivery not parked");
        let parked: Vec<_> = run
            .pending
            .iter()
            .filter(|(_, pending)| pending.is_parked())
            .map(|(_, pending)| pending.event_id.as_str())
            .collect();
        assert_eq!(parked, ["evt_off_300_21"]);
        assert!(run
            .pending
            .iter()
            .all(|(_, pending)| pending.due_ms == PendingDelivery::PARKED
                || pending.endpoint_id != "ep_off"));
        assert!(run.retries.is_empty(), "retries: {:?}", run.retries);
        let mut event_ids: Vec<_> = rows
            .iter()
            .filter_map(|(_, row)| row.event_id.clone())
            .collect();
        event_ids.sort();
        event_ids.dedup();
        assert_eq!(
            event_ids.len(),
            sent - 1,
            "every delivery not parked has exactly one row"
        );
        for (time, row) in &rows {
            let event_id = row.event_id.as_deref().unwrap_or_default();
            let due_in_ms: u64 = event_id
                .split('_')
                .nth(2)
                .and_then(|t| t.parse().ok())
                .expect("due offset in the event id");
            let due = base + due_in_ms;
            // A row may come out later than its delivery was due, because the operator moves
            // the capability of waiting deliveries up to the clock, but never earlier.
            assert!(
                *time >= due,
                "{event_id} came out at {time}, before its due time {due}"
            );
            if let Some(started_at_ms) = row.started_at_ms {
                assert!(
                    started_at_ms >= due,
                    "{event_id} started before its due time"
                );
            }
            assert_eq!(
                row.due_at_ms, due,
                "{event_id}: due_at_ms is not the due time"
            );
        }

        let row_of = |id: &str| {
            rows.iter()
                .map(|(_, row)| row)
                .find(|row| row.event_id.as_deref() == Some(id))
        };
        let unknown_row = row_of("evt_gone_250_20").expect("row for the unknown endpoint");
        assert_eq!(unknown_row.outcome, "dead_lettered");
        assert_eq!(unknown_row.error_kind.as_deref(), Some("unknown_endpoint"));
        assert!(
            row_of("evt_off_300_21").is_none(),
            "a parked delivery has no row"
        );
        let delivered = rows
            .iter()
            .filter(|(_, row)| row.outcome == "delivered")
            .count();
        assert_eq!(delivered, 13);

        // A spinning operator would take thousands of steps in the ~400 ms the run takes.
        assert!(run.steps < 300, "workers took {} steps", run.steps);
    }

    #[test]
    fn operator_caps_in_flight_per_worker() {
        let runtime = runtime();
        let (concurrency, address) = runtime.block_on(slow_receiver(Duration::from_millis(20)));
        let endpoint_ids = ["ep_a", "ep_b", "ep_c"];
        let endpoints: Vec<Endpoint> = endpoint_ids
            .iter()
            .map(|id| endpoint(id, &format!("http://{address}/{id}")))
            .collect();
        let base = WallClock.now_ms();
        let deliveries: Vec<(u64, Delivery)> = (0..9u64)
            .map(|i| {
                let endpoint_id = endpoint_ids[(i % 3) as usize];
                due_delivery(endpoint_id, endpoint_id, base, 10, i)
            })
            .collect();
        let mut context = context(&runtime, endpoints);
        context.max_in_flight_total = 2;

        let rows = run_dataflow(1, context, deliveries).rows;

        let concurrency = concurrency.lock().expect("lock");
        assert_eq!(concurrency.overall_max, 2, "requests in flight at once");
        assert_eq!(rows.len(), 9);
        for (time, row) in &rows {
            let event_id = row.event_id.as_deref().unwrap_or_default();
            assert_eq!(row.outcome, "delivered", "{event_id}");
            assert!(
                *time >= base + 10,
                "{event_id} came out before its due time"
            );
            assert_eq!(
                row.due_at_ms,
                base + 10,
                "{event_id}: due_at_ms is not the due time"
            );
        }
    }

    #[test]
    fn rows_record_due_time() {
        let runtime = runtime();
        let (_concurrency, address) = runtime.block_on(slow_receiver(Duration::from_millis(30)));
        let mut single = endpoint("ep_single", &format!("http://{address}/ep_single"));
        single.max_in_flight = 1;
        let late = endpoint("ep_late", &format!("http://{address}/ep_late"));

        let base = WallClock.now_ms();
        let mut deliveries: Vec<(u64, Delivery)> = (0..3u64)
            .map(|i| due_delivery("ep_single", "queued", base, 50, i))
            .collect();
        // Due before the dataflow even starts, as after a slow read from the source.
        let mut overdue = delivery_with_offset("ep_late", "evt_overdue", b"{}", 10);
        overdue.ingested.read_at_ms = base;
        deliveries.insert(0, (base - 500, overdue));

        let context = context(&runtime, vec![single, late]);
        let rows = run_dataflow(1, context, deliveries.clone()).rows;

        assert_eq!(rows.len(), deliveries.len(), "one row per delivery");
        for (due, delivery) in &deliveries {
            let event_id = delivery.ingested.event.id.as_str();
            let row = rows
                .iter()
                .map(|(_, row)| row)
                .find(|row| row.event_id.as_deref() == Some(event_id))
                .expect("a row for every delivery");
            assert_eq!(row.outcome, "delivered", "{event_id}");
            assert_eq!(
                row.due_at_ms, *due,
                "{event_id}: due_at_ms is not the due time"
            );
        }
    }
}
