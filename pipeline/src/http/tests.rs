//! In-process tests of the router: the OpenAPI document against the mounted routes, and the
//! endpoint routes against a real registry on a real state store.
//!
//! A thread acts as worker 0 of the dataflow and reports each registry change as
//! absorbed at once, so that every field and error of the endpoint routes is checked without
//! a pipeline. `tests/api.rs` checks the routes against a running `hookflow run`.

use std::collections::{BTreeSet, HashMap};
use std::io::{Read, Write};
use std::net::{IpAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hookflow_operators::clock::WallClock;
use hookflow_operators::stop::StopSignal;
use serde_json::{json, Value};

use super::endpoints::Resolver;
use super::*;
use crate::cluster::Cluster;
use crate::registry::EndpointRegistry;

const ADMIN: &str = "admin-token-for-tests-0123";

/// Resolves only the names in its table and fails for others, so no test queries DNS.
struct TableResolver(HashMap<String, Vec<IpAddr>>);

impl Resolver for TableResolver {
    fn resolve(&self, host: &str, _port: u16) -> std::io::Result<Vec<IpAddr>> {
        self.0
            .get(host)
            .cloned()
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "unknown name"))
    }
}

fn state(config_text: &str, data_dir: &Path) -> HttpState {
    let config = Config::parse(config_text, Path::new("test.toml")).expect("config");
    HttpState::new(
        Arc::new(config),
        data_dir.to_path_buf(),
        Cluster::default(),
        Arc::new(WallClock),
        Arc::new(StopSignal::new()),
    )
    .expect("state")
}

/// Serves `state` on 127.0.0.1 in a runtime of its own; returns the address and the runtime.
fn serve(state: HttpState) -> (String, tokio::runtime::Runtime) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let address = listener.local_addr().expect("address").to_string();
    runtime.spawn(async move {
        let _ = axum::serve(listener, router(state)).await;
    });
    (address, runtime)
}

fn call(
    address: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let mut stream = TcpStream::connect(address).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let text = body.map(|b| b.to_string()).unwrap_or_default();
    let mut request =
        format!("{method} {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n");
    if let Some(token) = token {
        request.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    if !text.is_empty() {
        request.push_str("Content-Type: application/json\r\n");
    }
    request.push_str(&format!("Content-Length: {}\r\n\r\n{text}", text.len()));
    stream.write_all(request.as_bytes()).expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    let (head, body) = response.split_once("\r\n\r\n").expect("response");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

#[test]
fn openapi_matches_mounted_routes() {
    let dir = tempfile::tempdir().expect("dir");
    let state = state(
        &format!(
            "[http]\nadmin_token = \"{ADMIN}\"\nproducer_token = \"producer-token-0123456789\"\n"
        ),
        dir.path(),
    );
    let served: BTreeSet<(String, String)> = served_routes(&state)
        .into_iter()
        .map(|(method, path)| (method.as_str().to_lowercase(), path))
        .collect();
    let document = serde_json::to_value(openapi::document()).expect("document");
    let mut documented = BTreeSet::new();
    for (path, item) in document["paths"].as_object().expect("paths") {
        for method in item.as_object().expect("path item").keys() {
            documented.insert((method.clone(), path.clone()));
        }
    }
    assert_eq!(served, documented);
    assert_eq!(served.len(), 14, "{served:?}");

    // Every documented error is the shared shape, and every protected route names a token.
    for ((method, path), operation) in documented
        .iter()
        .map(|key| (key, &document["paths"][&key.1][&key.0]))
    {
        if path.starts_with("/v1/") {
            assert!(
                operation["security"].is_array(),
                "{method} {path} has no security"
            );
        }
    }
}

#[test]
fn without_tokens_only_operations_routes_are_mounted() {
    let dir = tempfile::tempdir().expect("dir");
    let state = state("", dir.path());
    let served: Vec<String> = served_routes(&state).into_iter().map(|(_, p)| p).collect();
    assert_eq!(
        served,
        ["/metrics", "/health/live", "/health/ready", "/openapi.json"]
    );
}

#[test]
fn endpoint_routes_create_list_update_rotate_and_delete() {
    let dir = tempfile::tempdir().expect("dir");
    let mut state = state(
        &format!(
            "[delivery]\nallowed_private_cidrs = [\"127.0.0.1/32\"]\n[http]\nadmin_token = \"{ADMIN}\"\n"
        ),
        dir.path(),
    );
    let (registry, feed) = EndpointRegistry::open(&dir.path().join("state")).expect("registry");
    let absorber = std::thread::spawn(move || {
        let mut seen = 0;
        while let Ok(pending) = feed.recv() {
            seen += 1;
            let _ = pending.fed.send(1_000 + seen);
        }
        seen
    });
    state.registry = Some(registry);
    state.resolver = Arc::new(TableResolver(HashMap::from([
        (
            "hooks.internal".to_string(),
            vec!["10.1.2.3".parse().expect("ip")],
        ),
        (
            "localhost".to_string(),
            vec!["127.0.0.1".parse().expect("ip")],
        ),
    ])));
    let (address, runtime) = serve(state.clone());
    let call = |method: &str, path: &str, body: Option<Value>| {
        call(&address, method, path, Some(ADMIN), body)
    };

    // Create with a generated id and secret; the secret is shown this once.
    let (status, created) = call(
        "POST",
        "/v1/endpoints",
        Some(json!({
            "tenant": "acme",
            "url": "http://localhost:9/hooks",
            "event_types": ["invoice.*"],
            "rate_limit": { "max_requests": 5 }
        })),
    );
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_str().expect("id").to_string();
    assert!(id.starts_with("ep_"), "{id}");
    let secret = created["secret"].as_str().expect("secret").to_string();
    assert!(secret.starts_with("whsec_"), "{secret}");
    assert_eq!(
        created["rate_limit"],
        json!({ "max_requests": 5, "window_ms": 1000 })
    );

    // Create with a given id; a second create of the id conflicts.
    let given = json!({ "id": "billing", "tenant": "acme", "url": "http://127.0.0.1:9/b", "event_types": ["*"] });
    assert_eq!(call("POST", "/v1/endpoints", Some(given.clone())).0, 201);
    let (status, body) = call("POST", "/v1/endpoints", Some(given));
    assert_eq!(
        (status, body["code"].as_str()),
        (409, Some("endpoint_exists")),
        "{body}"
    );

    // List and get never show a secret's value.
    let (status, list) = call("GET", "/v1/endpoints", None);
    assert_eq!(status, 200);
    assert_eq!(
        list["endpoints"].as_array().map(Vec::len),
        Some(2),
        "{list}"
    );
    assert!(!list.to_string().contains(&secret), "{list}");
    let (status, one) = call("GET", &format!("/v1/endpoints/{id}"), None);
    assert_eq!(status, 200);
    assert_eq!(one["secrets"], json!([{ "expires_at": null }]), "{one}");
    assert!(one.get("secret").is_none(), "{one}");

    // Update: disable, change patterns, drop the rate limit.
    let (status, updated) = call(
        "PATCH",
        &format!("/v1/endpoints/{id}"),
        Some(json!({ "enabled": false, "event_types": ["invoice.paid"], "rate_limit": null })),
    );
    assert_eq!(status, 200, "{updated}");
    assert_eq!(updated["enabled"], false);
    assert_eq!(updated["event_types"], json!(["invoice.paid"]));
    assert_eq!(updated["rate_limit"], Value::Null);
    assert_eq!(updated["secret"], Value::Null);

    // Rotate: a new secret shown once; the old one kept until its expiry.
    let (status, rotated) = call(
        "PATCH",
        &format!("/v1/endpoints/{id}"),
        Some(json!({ "rotate_secret": { "old_secret_expires_at": "2999-01-01T00:00:00Z" } })),
    );
    assert_eq!(status, 200, "{rotated}");
    let new_secret = rotated["secret"].as_str().expect("new secret");
    assert_ne!(new_secret, secret);
    assert_eq!(
        rotated["secrets"],
        json!([{ "expires_at": null }, { "expires_at": "2999-01-01T00:00:00Z" }])
    );
    let stored = state
        .registry
        .as_ref()
        .and_then(|r| r.get(&id).ok().flatten())
        .expect("stored endpoint");
    assert_eq!(stored.secrets[0].value, new_secret);
    assert_eq!(stored.secrets[1].value, secret);

    // Bad input names the field; refused destinations give a reason.
    for (method, path, body, want_status, code, field, reason) in [
        (
            "POST",
            "/v1/endpoints".to_string(),
            json!({ "tenant": "acme", "url": "http://10.0.0.7/h", "event_types": ["*"] }),
            400,
            "unsafe_url",
            Some("url"),
            Some("private_address"),
        ),
        (
            "POST",
            "/v1/endpoints".to_string(),
            json!({ "tenant": "acme", "url": "https://hooks.internal/h", "event_types": ["*"] }),
            400,
            "unsafe_url",
            Some("url"),
            Some("private_address"),
        ),
        (
            "POST",
            "/v1/endpoints".to_string(),
            json!({ "tenant": "acme", "url": "https://unknown.invalid/h", "event_types": ["*"] }),
            400,
            "unsafe_url",
            Some("url"),
            Some("unresolvable"),
        ),
        (
            "POST",
            "/v1/endpoints".to_string(),
            json!({ "tenant": "acme", "url": "http://[::1]:9/h", "event_types": ["*"] }),
            400,
            "unsafe_url",
            Some("url"),
            Some("loopback_address"),
        ),
        (
            "POST",
            "/v1/endpoints".to_string(),
            json!({ "tenant": "acme", "url": "ftp://x/h", "event_types": ["*"] }),
            400,
            "invalid_field",
            Some("url"),
            None,
        ),
        (
            "POST",
            "/v1/endpoints".to_string(),
            json!({ "tenant": "acme", "url": "http://127.0.0.1/h", "event_types": ["in*voice"] }),
            400,
            "invalid_field",
            Some("event_types[0]"),
            None,
        ),
        (
            "POST",
            "/v1/endpoints".to_string(),
            json!({ "tenant": "acme", "url": "http://127.0.0.1/h", "event_types": [] }),
            400,
            "invalid_field",
            Some("event_types"),
            None,
        ),
        (
            "POST",
            "/v1/endpoints".to_string(),
            json!({ "tenant": "acme", "url": "http://127.0.0.1/h", "event_types": ["*"], "rate_limit": { "max_requests": 0 } }),
            400,
            "invalid_field",
            Some("rate_limit.max_requests"),
            None,
        ),
        (
            "POST",
            "/v1/endpoints".to_string(),
            json!({ "tenant": "acme", "url": "http://127.0.0.1/h", "event_types": ["*"], "rate_limit": { "max_requests": -1 } }),
            400,
            "invalid_field",
            Some("rate_limit.max_requests"),
            None,
        ),
        (
            "POST",
            "/v1/endpoints".to_string(),
            json!({ "tenant": "acme", "url": "http://127.0.0.1/h", "event_types": ["*"], "secret": "whsec_short" }),
            400,
            "invalid_field",
            Some("secret"),
            None,
        ),
        (
            "POST",
            "/v1/endpoints".to_string(),
            json!({ "url": "http://127.0.0.1/h", "event_types": ["*"] }),
            400,
            "invalid_field",
            Some("tenant"),
            None,
        ),
        (
            "POST",
            "/v1/endpoints".to_string(),
            json!({ "id": "has space", "tenant": "acme", "url": "http://127.0.0.1/h", "event_types": ["*"] }),
            400,
            "invalid_field",
            Some("id"),
            None,
        ),
        (
            "PATCH",
            format!("/v1/endpoints/{id}"),
            json!({ "url": "http://169.254.169.254/latest" }),
            400,
            "unsafe_url",
            Some("url"),
            Some("link_local_address"),
        ),
        (
            "PATCH",
            format!("/v1/endpoints/{id}"),
            json!({ "rotate_secret": { "old_secret_expires_at": "soon" } }),
            400,
            "invalid_field",
            Some("rotate_secret.old_secret_expires_at"),
            None,
        ),
        (
            "PATCH",
            format!("/v1/endpoints/{id}"),
            json!({ "max_in_flight": 0 }),
            400,
            "invalid_field",
            Some("max_in_flight"),
            None,
        ),
        (
            "PATCH",
            format!("/v1/endpoints/{id}"),
            json!({ "colour": "red" }),
            400,
            "invalid_field",
            Some("colour"),
            None,
        ),
        (
            "PATCH",
            "/v1/endpoints/missing".to_string(),
            json!({ "enabled": true }),
            404,
            "endpoint_not_found",
            None,
            None,
        ),
    ] {
        let (status, body) = call(method, &path, Some(body.clone()));
        assert_eq!(status, want_status, "{method} {path} {body}");
        assert_eq!(body["code"].as_str(), Some(code), "{method} {path} {body}");
        assert_eq!(body["field"].as_str(), field, "{method} {path} {body}");
        assert_eq!(body["reason"].as_str(), reason, "{method} {path} {body}");
    }

    // Delete, then it is gone.
    let (status, _) = call("DELETE", &format!("/v1/endpoints/{id}"), None);
    assert_eq!(status, 204);
    let (status, body) = call("GET", &format!("/v1/endpoints/{id}"), None);
    assert_eq!(
        (status, body["code"].as_str()),
        (404, Some("endpoint_not_found"))
    );
    let (status, body) = call("DELETE", &format!("/v1/endpoints/{id}"), None);
    assert_eq!(
        (status, body["code"].as_str()),
        (404, Some("endpoint_not_found"))
    );

    // Tokens: missing → 401, wrong → 403.
    let (status, body) = super::tests::call(&address, "GET", "/v1/endpoints", None, None);
    assert_eq!((status, body["code"].as_str()), (401, Some("unauthorized")));
    let (status, body) = super::tests::call(
        &address,
        "GET",
        "/v1/endpoints",
        Some("not-the-admin-token"),
        None,
    );
    assert_eq!((status, body["code"].as_str()), (403, Some("forbidden")));

    // Five changes were absorbed: two creates, two updates and one delete.
    let changes = state
        .counters
        .endpoint_changes
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(changes, 5);

    drop(runtime);
    state.registry = None;
    assert!(absorber.join().is_ok());
}
