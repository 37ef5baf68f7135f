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
use hookflow_schemas::{ErrorKind, Outcome, SigningSecret};

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
        endpoint.secrets = vec![
            SigningSecret::new(SECRET),
            SigningSecret::new(SECOND_SECRET),
        ];
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
        endpoint.secrets = vec![SigningSecret::new(SECRET), SigningSecret::new("AAECAwQF")];
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

mod headers {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn static_headers_sent() {
        let (recorder, address) = recording_receiver().await;
        let mut endpoint = endpoint("ep_headers", &format!("http://{address}/hooks"));
        endpoint.headers = [
            ("x-team".to_string(), "payments".to_string()),
            ("authorization".to_string(), "Bearer abc".to_string()),
        ]
        .into();
        let delivery = delivery("ep_headers", "evt_headers", b"{}");

        let result = loopback_client()
            .attempt(&endpoint, &delivery, &WallClock)
            .await;

        assert_eq!(result.verdict.outcome, Outcome::Delivered, "{result:?}");
        let request = &recorder.requests()[0];
        assert_eq!(request.headers["x-team"], "payments");
        assert_eq!(request.headers["authorization"], "Bearer abc");
        assert_eq!(request.headers["content-type"], "application/json");
        assert_eq!(request.headers["webhook-id"], "evt_headers");
    }

    /// Endpoints that bypassed config validation (written by a later API, say) are checked
    /// again at send time and get no request.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn invalid_static_headers_send_nothing() {
        let (recorder, address) = recording_receiver().await;
        let url = format!("http://{address}/hooks");
        let credentials_url = format!("http://user:pw@{address}/hooks");
        let cases = [
            (
                url.as_str(),
                "webhook-id",
                "forged",
                "sets this header itself",
            ),
            (
                url.as_str(),
                "content-type",
                "text/plain",
                "sets this header itself",
            ),
            (url.as_str(), "x-bad", "a\r\nb", "control character"),
            (
                credentials_url.as_str(),
                "authorization",
                "Bearer abc",
                "keep only one",
            ),
        ];
        for (url, name, value, problem) in cases {
            let mut endpoint = endpoint("ep_headers", url);
            endpoint.headers = [(name.to_string(), value.to_string())].into();
            let delivery = delivery("ep_headers", "evt_headers", b"{}");

            let result = loopback_client()
                .attempt(&endpoint, &delivery, &WallClock)
                .await;

            assert_eq!(
                result.verdict.error_kind,
                Some(ErrorKind::Request),
                "{name}"
            );
            let message = result.error_message.unwrap_or_default();
            assert!(message.contains(problem), "{name}: {message}");
            assert!(!message.contains(value), "{name}: value in {message}");
        }
        assert_eq!(recorder.count(), 0, "a request was sent");
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

/// Reads one HTTP/1.1 request (head and `content-length` body) from `stream` and returns the
/// head and the body. Returns `None` when the peer closes first or sends more than 64 KiB.
async fn read_http_request<S>(stream: &mut S) -> Option<(String, Vec<u8>)>
where
    S: tokio::io::AsyncRead + Unpin,
{
    use tokio::io::AsyncReadExt;

    let mut buffer = Vec::new();
    let mut chunk = [0u8; 8 * 1024];
    let end = loop {
        if let Some(position) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break position + 4;
        }
        if buffer.len() > 64 * 1024 {
            return None;
        }
        let read = stream.read(&mut chunk).await.ok()?;
        if read == 0 {
            return None;
        }
        buffer.extend_from_slice(&chunk[..read]);
    };
    let head = String::from_utf8_lossy(&buffer[..end]).into_owned();
    let length: usize = head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())
                .flatten()
        })
        .unwrap_or(0);
    let mut body = buffer[end..].to_vec();
    while body.len() < length {
        let read = stream.read(&mut chunk).await.ok()?;
        if read == 0 {
            return None;
        }
        body.extend_from_slice(&chunk[..read]);
    }
    Some((head, body))
}

/// Starts a listener on 127.0.0.1 that counts connections and closes each at once.
async fn counting_listener() -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("local address");
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = Arc::clone(&accepted);
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            drop(socket);
        }
    });
    (address, accepted)
}

mod ip_literals {
    use super::*;
    use std::sync::atomic::Ordering;

    /// Every notation the URL parser accepts for an IPv4 or IPv6 address, of loopback, private
    /// and metadata addresses, is refused before any connection. The loopback forms go through
    /// a whole attempt against a listener that counts connections. The other forms are checked
    /// with `check_url` only, so that a failing test cannot send a packet off this machine.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_notation_refused_unconnected() {
        let (address, accepted) = counting_listener().await;
        let port = address.port();
        let client = DeliveryClient::new(ClientConfig::default()).expect("client builds");
        let loopback_forms = [
            "127.0.0.1",
            "2130706433",
            "0x7f000001",
            "0x7f.1",
            "0x7f.0.0.1",
            "0177.0.0.1",
            "0177.1",
            "017700000001",
            "127.1",
            "127.0.1",
            "127.000.000.001",
            "[::1]",
            "[0:0:0:0:0:0:0:1]",
            "[::ffff:127.0.0.1]",
            "[::ffff:7f00:1]",
            "[0:0:0:0:0:ffff:7f00:0001]",
            "[64:ff9b::7f00:1]",
            "[2002:7f00:1::]",
            "0.0.0.0",
            "0",
            "[::]",
        ];
        for host in loopback_forms {
            let url = format!("http://{host}:{port}/h");
            let endpoint = endpoint("ep_literal", &url);
            let delivery = delivery("ep_literal", "evt_literal", b"{}");

            let result = client.attempt(&endpoint, &delivery, &WallClock).await;

            assert_eq!(
                result.verdict.error_kind,
                Some(ErrorKind::Refused),
                "{url}: {result:?}"
            );
            assert_eq!(result.verdict.outcome, Outcome::DeadLettered, "{url}");
            assert_eq!(result.response_bytes_read, 0, "{url}");
        }
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            0,
            "a refused address was contacted"
        );

        let other_forms = [
            ("10.0.0.1", "10.0.0.1", "private"),
            ("167772161", "10.0.0.1", "private"),
            ("0xa000001", "10.0.0.1", "private"),
            ("0xa.1", "10.0.0.1", "private"),
            ("012.0.0.1", "10.0.0.1", "private"),
            ("10.1", "10.0.0.1", "private"),
            ("[::ffff:a00:1]", "10.0.0.1", "private"),
            ("192.168.1.1", "192.168.1.1", "private"),
            ("0xc0.0xa8.1.1", "192.168.1.1", "private"),
            ("3232235777", "192.168.1.1", "private"),
            ("0300.0250.1.1", "192.168.1.1", "private"),
            ("172.16.0.1", "172.16.0.1", "private"),
            ("[fd00::1]", "fd00::1", "private"),
            ("169.254.169.254", "169.254.169.254", "link-local"),
            ("2852039166", "169.254.169.254", "link-local"),
            ("0xa9fea9fe", "169.254.169.254", "link-local"),
            ("0xa9.0xfe.0xa9.0xfe", "169.254.169.254", "link-local"),
            ("0251.0376.0251.0376", "169.254.169.254", "link-local"),
            ("169.254.43518", "169.254.169.254", "link-local"),
            ("[::ffff:169.254.169.254]", "169.254.169.254", "link-local"),
            ("[::ffff:a9fe:a9fe]", "169.254.169.254", "link-local"),
            ("[fe80::1]", "fe80::1", "link-local"),
            ("[fd00:ec2::254]", "fd00:ec2::254", "private"),
            ("100.100.100.200", "100.100.100.200", "shared address space"),
        ];
        for (host, address, range) in other_forms {
            let url =
                url::Url::parse(&format!("http://{host}/h")).expect("the URL parser accepts it");

            let refusal = client.check_url(&url).expect_err(host).to_string();

            assert!(refusal.contains(address), "{host}: {refusal}");
            assert!(refusal.contains(range), "{host}: {refusal}");
        }
    }

    #[test]
    fn public_notations_pass_check() {
        let client = DeliveryClient::new(ClientConfig::default()).expect("client builds");
        for host in [
            "8.8.8.8",
            "134744072",
            "0x8.0x8.0x8.0x8",
            "[2606:4700:4700::1111]",
            "[::ffff:8.8.8.8]",
            "hooks.example.com",
        ] {
            let url = url::Url::parse(&format!("https://{host}/h")).expect("valid URL");
            assert!(client.check_url(&url).is_ok(), "{host}");
        }
    }
}

mod https_only {
    use super::*;

    fn https_only_client() -> DeliveryClient {
        let config = ClientConfig {
            address_policy: loopback_policy(),
            https_only: true,
            ..ClientConfig::default()
        };
        DeliveryClient::new(config).expect("client builds")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn http_url_dead_lettered_unsent() {
        let (recorder, address) = recording_receiver().await;
        let endpoint = endpoint("ep_https", &format!("http://{address}/hooks"));
        let delivery = delivery("ep_https", "evt_https", b"{}");

        let result = https_only_client()
            .attempt(&endpoint, &delivery, &WallClock)
            .await;

        assert_eq!(recorder.count(), 0, "an http request was sent");
        assert_eq!(
            result.verdict.error_kind,
            Some(ErrorKind::Refused),
            "{result:?}"
        );
        assert_eq!(result.verdict.outcome, Outcome::DeadLettered);
        let message = result.error_message.unwrap_or_default();
        assert!(message.contains("delivery.https_only"), "{message}");
    }
}

mod proxy {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    use tokio::io::AsyncWriteExt;

    /// The request lines a [`forwarding_proxy`] received, and its connection count.
    #[derive(Clone, Default)]
    struct ProxyLog {
        request_lines: Arc<Mutex<Vec<String>>>,
        connections: Arc<AtomicUsize>,
    }

    /// Starts a forward HTTP proxy on 127.0.0.1 that sends every request to `upstream`,
    /// whatever host its target names, adding `via: 1.1 test-proxy`. One request per
    /// connection.
    async fn forwarding_proxy(upstream: std::net::SocketAddr) -> (url::Url, ProxyLog) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("local address");
        let log = ProxyLog::default();
        let recorded = log.clone();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                recorded.connections.fetch_add(1, Ordering::SeqCst);
                let recorded = recorded.clone();
                tokio::spawn(async move {
                    let Some((head, body)) = read_http_request(&mut socket).await else {
                        return;
                    };
                    let mut lines = head.split("\r\n");
                    let request_line = lines.next().unwrap_or_default().to_string();
                    recorded
                        .request_lines
                        .lock()
                        .expect("proxy log lock")
                        .push(request_line.clone());

                    // `POST http://host:port/path HTTP/1.1` becomes `POST /path HTTP/1.1`.
                    let mut parts = request_line.splitn(3, ' ');
                    let (method, target, version) = (
                        parts.next().unwrap_or_default(),
                        parts.next().unwrap_or_default(),
                        parts.next().unwrap_or_default(),
                    );
                    let path = url::Url::parse(target)
                        .map(|url| url[url::Position::BeforePath..].to_string())
                        .unwrap_or_else(|_| target.to_string());
                    let mut forwarded = format!("{method} {path} {version}\r\n");
                    for line in lines.filter(|line| !line.is_empty()) {
                        let name = line
                            .split(':')
                            .next()
                            .unwrap_or_default()
                            .to_ascii_lowercase();
                        if name != "connection" && name != "proxy-connection" {
                            forwarded.push_str(line);
                            forwarded.push_str("\r\n");
                        }
                    }
                    forwarded.push_str("via: 1.1 test-proxy\r\nconnection: close\r\n\r\n");

                    let Ok(mut upstream) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    if upstream.write_all(forwarded.as_bytes()).await.is_err()
                        || upstream.write_all(&body).await.is_err()
                    {
                        return;
                    }
                    let _ = tokio::io::copy(&mut upstream, &mut socket).await;
                    let _ = socket.shutdown().await;
                });
            }
        });
        let url = url::Url::parse(&format!("http://{address}")).expect("proxy URL");
        (url, log)
    }

    /// Creates a client that sends through `proxy` and resolves the names of `table`.
    fn proxied_client(proxy: url::Url, table: &[(&str, &[&str])]) -> DeliveryClient {
        let table = table
            .iter()
            .map(|(name, addresses)| {
                let addresses = addresses
                    .iter()
                    .map(|address| address.parse().expect("valid socket address"))
                    .collect();
                (name.to_string(), addresses)
            })
            .collect();
        let config = ClientConfig {
            address_policy: loopback_policy(),
            resolver: Some(Arc::new(FixedResolver { table })),
            proxy: Some(proxy),
            ..ClientConfig::default()
        };
        DeliveryClient::new(config).expect("client builds")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn delivers_through_configured_proxy() {
        let (recorder, receiver) = recording_receiver().await;
        let (proxy, log) = forwarding_proxy(receiver).await;
        let client = proxied_client(proxy, &[("rx.test", &["127.0.0.1:0"])]);
        let port = receiver.port();
        let mut endpoint = endpoint("ep_proxy", &format!("http://rx.test:{port}/hooks?x=1"));
        endpoint.secrets = vec![SigningSecret::new(SECRET)];
        let delivery = delivery("ep_proxy", "evt_proxy", br#"{"a":1}"#);

        let result = client.attempt(&endpoint, &delivery, &WallClock).await;

        assert_eq!(result.verdict.outcome, Outcome::Delivered, "{result:?}");
        let lines = log.request_lines.lock().expect("proxy log lock").clone();
        assert_eq!(
            lines,
            [format!("POST http://rx.test:{port}/hooks?x=1 HTTP/1.1")]
        );
        let requests = recorder.requests();
        assert_eq!(requests.len(), 1);
        assert_eq!(
            requests[0].headers["via"], "1.1 test-proxy",
            "bypassed the proxy"
        );
        assert_eq!(requests[0].body, br#"{"a":1}"#);
        standardwebhooks::Webhook::new(SECRET)
            .expect("valid secret")
            .verify(&requests[0].body, &requests[0].headers)
            .expect("signature verifies through the proxy");
    }

    /// The proxy would resolve the target itself, so the target is resolved and checked
    /// first, and the proxy never sees a request for a refused target.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn refused_targets_never_reach_proxy() {
        let (recorder, receiver) = recording_receiver().await;
        let (proxy, log) = forwarding_proxy(receiver).await;
        let client = proxied_client(
            proxy,
            &[
                ("internal.test", &["10.0.0.5:0"]),
                ("metadata.test", &["169.254.169.254:0"]),
                ("mixed.test", &["127.0.0.1:0", "192.168.0.10:0"]),
                ("loopback.test", &["127.0.0.2:0"]),
            ],
        );
        let cases = [
            ("http://internal.test/h", "10.0.0.5"),
            ("http://metadata.test/latest/meta-data/", "169.254.169.254"),
            ("http://mixed.test/h", "192.168.0.10"),
            ("http://loopback.test/h", "127.0.0.2"),
            (
                "http://169.254.169.254/latest/meta-data/",
                "169.254.169.254",
            ),
            ("http://0xa9fea9fe/", "169.254.169.254"),
            ("http://10.1/h", "10.0.0.1"),
            ("http://[::ffff:127.0.0.2]/h", "127.0.0.2"),
        ];
        for (url, address) in cases {
            let endpoint = endpoint("ep_proxy", url);
            let delivery = delivery("ep_proxy", "evt_proxy", b"{}");

            let result = client.attempt(&endpoint, &delivery, &WallClock).await;

            assert_eq!(
                result.verdict.error_kind,
                Some(ErrorKind::Refused),
                "{url}: {result:?}"
            );
            let message = result.error_message.unwrap_or_default();
            assert!(message.contains(address), "{url}: {message}");
        }
        assert_eq!(
            log.connections.load(Ordering::SeqCst),
            0,
            "the proxy was contacted"
        );
        assert_eq!(recorder.count(), 0);
    }

    /// Without a configured proxy, `HTTP_PROXY` and `ALL_PROXY` are ignored.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn environment_proxy_ignored() {
        let (recorder, receiver) = recording_receiver().await;
        let (trap, trapped) = counting_listener().await;
        for name in ["HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"] {
            std::env::set_var(name, format!("http://{trap}"));
        }
        let client = loopback_client();
        let endpoint = endpoint("ep_env", &format!("http://{receiver}/hooks"));
        let delivery = delivery("ep_env", "evt_env", b"{}");

        let result = client.attempt(&endpoint, &delivery, &WallClock).await;

        assert_eq!(result.verdict.outcome, Outcome::Delivered, "{result:?}");
        assert_eq!(recorder.count(), 1);
        assert_eq!(
            trapped.load(Ordering::SeqCst),
            0,
            "the environment's proxy was used"
        );
    }
}

mod tls {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::AsyncWriteExt;
    use tokio_rustls::rustls;

    /// A private CA and a certificate it issued for `rx.test`, made at test time.
    struct PrivateCa {
        ca_pem: String,
        server_config: Arc<rustls::ServerConfig>,
    }

    fn private_ca() -> PrivateCa {
        let ca_key = rcgen::KeyPair::generate().expect("CA key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "hookflow test CA");
        let ca_cert = ca_params.self_signed(&ca_key).expect("CA certificate");
        let issuer = rcgen::Issuer::new(ca_params, ca_key);

        let leaf_key = rcgen::KeyPair::generate().expect("server key");
        let leaf_params =
            rcgen::CertificateParams::new(vec!["rx.test".to_string()]).expect("server params");
        let leaf_cert = leaf_params
            .signed_by(&leaf_key, &issuer)
            .expect("server certificate");

        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server_config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(vec![leaf_cert.der().clone()], key)
            .expect("server config");
        PrivateCa {
            ca_pem: ca_cert.pem(),
            server_config: Arc::new(server_config),
        }
    }

    /// Starts an HTTPS receiver on 127.0.0.1 that responds 200 to every request whose TLS
    /// handshake succeeds, and counts those requests.
    async fn tls_receiver(
        config: Arc<rustls::ServerConfig>,
    ) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("local address");
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let requests = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&requests);
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let counted = Arc::clone(&counted);
                tokio::spawn(async move {
                    let Ok(mut stream) = acceptor.accept(socket).await else {
                        return;
                    };
                    if read_http_request(&mut stream).await.is_some() {
                        counted.fetch_add(1, Ordering::SeqCst);
                        let response =
                            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
                        let _ = stream.write_all(response).await;
                        let _ = stream.shutdown().await;
                    }
                });
            }
        });
        (address, requests)
    }

    fn client_with_bundle(ca_bundle_pem: Option<Vec<u8>>) -> DeliveryClient {
        let config = ClientConfig {
            address_policy: loopback_policy(),
            resolver: Some(Arc::new(FixedResolver::with("rx.test", &["127.0.0.1:0"]))),
            ca_bundle_pem,
            ..ClientConfig::default()
        };
        DeliveryClient::new(config).expect("client builds")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn private_ca_trusted_with_bundle_only() {
        let ca = private_ca();
        let (address, requests) = tls_receiver(Arc::clone(&ca.server_config)).await;
        let endpoint = endpoint(
            "ep_tls",
            &format!("https://rx.test:{}/hooks", address.port()),
        );
        let delivery = delivery("ep_tls", "evt_tls", b"{}");

        let without = client_with_bundle(None)
            .attempt(&endpoint, &delivery, &WallClock)
            .await;
        assert_eq!(without.verdict.outcome, Outcome::Failed, "{without:?}");
        assert_eq!(
            without.verdict.error_kind,
            Some(ErrorKind::Connect),
            "{without:?}"
        );
        assert_eq!(requests.load(Ordering::SeqCst), 0);

        let with = client_with_bundle(Some(ca.ca_pem.into_bytes()))
            .attempt(&endpoint, &delivery, &WallClock)
            .await;
        assert_eq!(with.verdict.outcome, Outcome::Delivered, "{with:?}");
        assert_eq!(requests.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn invalid_bundle_fails_build() {
        let config = ClientConfig {
            ca_bundle_pem: Some(
                b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n".to_vec(),
            ),
            ..ClientConfig::default()
        };
        let err = DeliveryClient::new(config).expect_err("invalid bundle");
        assert!(err.to_string().contains("invalid CA bundle"), "{err}");
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

    /// A request task that runs after its rate-limit window has ended sends nothing and takes
    /// a later slot, so no window starts more than its budget. A clock that moves 150 ms on
    /// every read makes most tasks read a later time than the operator that granted them.
    #[test]
    fn late_task_waits_for_its_next_window() {
        let runtime = runtime();
        let (concurrency, address) = runtime.block_on(slow_receiver(Duration::ZERO));
        let mut limited = endpoint("ep_limited", &format!("http://{address}/ep_limited"));
        limited.max_in_flight = 8;
        limited.rate_limit = Some(hookflow_schemas::RateLimit {
            max_requests: 3,
            window_ms: 1_000,
        });
        let start_ms = 1_700_000_000_000;
        let clock = Arc::new(SteppingClock::new(start_ms, 150));

        let deliveries: Vec<(u64, Delivery)> = (0..12u64)
            .map(|n| {
                let mut delivery =
                    delivery_with_offset("ep_limited", &format!("evt_late_{n}"), b"{}", n);
                delivery.ingested.read_at_ms = start_ms;
                (start_ms, delivery)
            })
            .collect();
        let context = deliver_context(&runtime, vec![limited], clock as Arc<dyn Clock>);
        let run = run_dataflow(1, context, deliveries);

        let mut per_window: std::collections::BTreeMap<u64, u32> = Default::default();
        for (_, row) in &run.rows {
            assert_eq!(row.outcome, "delivered", "{row:?}");
            let started = row.started_at_ms.expect("a delivered row has a start");
            *per_window.entry(started / 1_000).or_default() += 1;
        }
        assert_eq!(run.rows.len(), 12, "every delivery once");
        assert!(
            per_window.values().all(|count| *count <= 3),
            "starts per window: {per_window:?}"
        );
        assert_eq!(concurrency.lock().expect("lock").total, 12);
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
