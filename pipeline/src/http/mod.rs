//! The HTTP server inside `hookflow run`: health and metrics for every process, and on
//! process 0 the management API (admin token) and the ingest route (producer token).
//!
//! [`start`] binds the configured address before the workers start, serves on the process's
//! shared tokio runtime, writes the bound address to `<data-dir>/http.addr` (process 0) or
//! `<data-dir>/http-process-N.addr`, and stops accepting once the pipeline's stop signal is
//! set. [`router`] is the one place where every route group is merged. A group whose token
//! is not configured is not mounted, so its paths return 404. [`HttpState`] is what handlers
//! share: the configuration, the data directory, the cluster, the clock and the stop signal.

pub mod auth;
pub mod config;
pub mod endpoints;
pub mod error;
pub mod ingest;
pub mod inspect;
pub mod openapi;
pub mod resend;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::http::Method;
use axum::routing::{get, patch, post, MethodRouter};
use axum::{Json, Router};
use hookflow_operators::clock::Clock;
use hookflow_operators::stop::StopSignal;

pub use self::config::{ApiToken, HttpConfig, Listen};
pub use self::error::{ApiError, ErrorBody};
use crate::cluster::Cluster;
use crate::config::Config;

/// The state shared by every handler. Cheap to clone.
#[derive(Clone)]
pub struct HttpState {
    /// The validated configuration of the run.
    pub config: Arc<Config>,
    /// The data directory of the run.
    pub data_dir: PathBuf,
    /// The cluster this process belongs to.
    pub cluster: Cluster,
    /// The run's clock.
    pub clock: Arc<dyn Clock>,
    /// The pipeline's stop signal.
    pub stop: Arc<StopSignal>,
    /// The acceptances of `POST /v1/events`, when this process serves it.
    pub ingest: Option<Arc<ingest::IngestLedger>>,
    /// What `/metrics` and `/health/*` read. [`HttpState::new`] gives it metrics of its own,
    /// all zero; `hookflow run` replaces them with the pipeline's.
    pub monitor: crate::monitor::Monitor,
    /// Held while a resend plans and appends, one at a time.
    pub resend_lock: Arc<std::sync::Mutex<()>>,
    /// The endpoint directory of the running pipeline, on the process that serves the
    /// management API. Without it the endpoint routes return 503.
    pub registry: Option<crate::registry::EndpointRegistry>,
    /// Resolves endpoint host names for the registration check.
    pub resolver: endpoints::SharedResolver,
    /// Counts of what the API did, for `/metrics`.
    pub counters: Arc<ApiCounters>,
}

/// Counts of what the API did since the process started. `/metrics` reads them at scrape
/// time; each is a monotonic counter.
#[derive(Debug, Default)]
pub struct ApiCounters {
    /// Events accepted by `POST /v1/events` and appended to the source.
    pub ingest_accepted: AtomicU64,
    /// Posts of a (tenant, id) accepted before, which got the original acceptance back.
    pub ingest_repeated: AtomicU64,
    /// Posts rejected as invalid (4xx), nothing appended.
    pub ingest_rejected: AtomicU64,
    /// Events appended by resends (each a delivery generation of its own).
    pub resent_events: AtomicU64,
    /// Endpoint changes (create, update, delete) absorbed by the dataflow.
    pub endpoint_changes: AtomicU64,
}

impl HttpState {
    /// Builds the state of a run and opens the ingest ledger when this process serves ingest.
    ///
    /// # Errors
    ///
    /// Fails if the ledger or the source cannot be opened.
    pub fn new(
        config: Arc<Config>,
        data_dir: PathBuf,
        cluster: Cluster,
        clock: Arc<dyn Clock>,
        stop: Arc<StopSignal>,
    ) -> anyhow::Result<Self> {
        let monitor = crate::monitor::Monitor::new(
            Arc::new(crate::metrics::Metrics::default()),
            crate::dataflow::archive_dir(&config, &data_dir),
        );
        let mut state = HttpState {
            config,
            data_dir,
            cluster,
            clock,
            stop,
            ingest: None,
            resend_lock: Arc::default(),
            registry: None,
            resolver: Arc::new(endpoints::SystemResolver),
            counters: monitor.metrics().api.clone(),
            monitor,
        };
        if state.serves_ingest() {
            let keep_ms = state.config.pipeline.dedup_window_secs.saturating_mul(1000);
            let ledger = ingest::IngestLedger::open(
                &state.data_dir,
                &state.config.publish_target(&state.data_dir),
                keep_ms,
            )
            .context("cannot open the ingest ledger of POST /v1/events")?;
            state.ingest = Some(Arc::new(ledger));
        }
        Ok(state)
    }

    /// Returns whether this process mounts the management routes (admin token set, process 0).
    pub fn serves_management(&self) -> bool {
        self.cluster.serves_management_api() && self.config.http.admin_token().is_some()
    }

    /// Returns whether this process mounts `POST /v1/events` (producer token set, process 0).
    pub fn serves_ingest(&self) -> bool {
        self.cluster.serves_management_api() && self.config.http.producer_token().is_some()
    }
}

/// Builds every route this process serves, with JSON fallbacks for unknown routes and methods.
pub fn router(state: HttpState) -> Router {
    let (router, _) = routes(&state);
    // An event may carry `pipeline.max_payload_bytes` of payload plus its envelope; a larger
    // body is rejected with 413 before it is read whole.
    let body_limit = state
        .config
        .pipeline
        .max_payload_bytes
        .saturating_add(64 * 1024)
        .max(2 * 1024 * 1024);
    router
        .layer(axum::extract::DefaultBodyLimit::max(body_limit))
        .fallback(error::no_route)
        .method_not_allowed_fallback(error::wrong_method)
        .with_state(state)
}

/// Lists the (method, path) of every route [`router`] mounts for `state`, for the OpenAPI test.
pub fn served_routes(state: &HttpState) -> Vec<(Method, String)> {
    routes(state)
        .1
        .into_iter()
        .map(|(m, p)| (m, p.to_string()))
        .collect()
}

/// Builds the routes and records each one, so that the list cannot drift from the router.
fn routes(state: &HttpState) -> (Router<HttpState>, Vec<(Method, &'static str)>) {
    let mut table = RouteTable::default();
    table.merge(
        crate::monitor::routes(state.monitor.clone()),
        &crate::monitor::ROUTES,
    );
    table.add(Method::GET, "/openapi.json", get(openapi_json));
    if state.serves_ingest() {
        table.add(Method::POST, "/v1/events", post(ingest::post_event));
    }
    if state.serves_management() {
        table.add(Method::POST, "/v1/endpoints", post(endpoints::create));
        table.add(Method::GET, "/v1/endpoints", get(endpoints::list));
        table.add(Method::GET, "/v1/endpoints/{id}", get(endpoints::get_one));
        table.add(
            Method::PATCH,
            "/v1/endpoints/{id}",
            patch(endpoints::update),
        );
        table.add(
            Method::DELETE,
            "/v1/endpoints/{id}",
            axum::routing::delete(endpoints::delete),
        );
        table.add(
            Method::GET,
            "/v1/events/{tenant}/{id}",
            get(inspect::get_event),
        );
        table.add(
            Method::POST,
            "/v1/events/{tenant}/{id}/resend",
            post(resend::resend_event),
        );
        table.add(
            Method::GET,
            "/v1/endpoints/{id}/failures",
            get(inspect::endpoint_failures),
        );
        table.add(
            Method::POST,
            "/v1/endpoints/{id}/resend-failed",
            post(resend::resend_failed),
        );
    }
    (table.router, table.served)
}

#[derive(Default)]
struct RouteTable {
    router: Router<HttpState>,
    served: Vec<(Method, &'static str)>,
}

impl RouteTable {
    fn add(&mut self, method: Method, path: &'static str, handler: MethodRouter<HttpState>) {
        let router = std::mem::take(&mut self.router);
        self.router = router.route(path, handler);
        self.served.push((method, path));
    }

    /// Merges a route group whose routes carry their own state; `routes` lists them.
    fn merge(&mut self, router: Router<HttpState>, routes: &[(Method, &'static str)]) {
        let merged = std::mem::take(&mut self.router);
        self.router = merged.merge(router);
        self.served.extend(routes.iter().cloned());
    }
}

/// The OpenAPI document of this API.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "operations",
    responses((status = 200, description = "the OpenAPI 3.1 document", content_type = "application/json"))
)]
pub async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(openapi::document())
}

/// A running server.
#[derive(Debug, Clone, Copy)]
pub struct HttpServer {
    /// The address it accepts connections on.
    pub local_addr: SocketAddr,
}

/// Returns the path of the file a process writes its bound address to.
pub fn addr_file(data_dir: &Path, cluster: &Cluster) -> PathBuf {
    if cluster.process_index() == 0 {
        data_dir.join("http.addr")
    } else {
        data_dir.join(format!("http-process-{}.addr", cluster.process_index()))
    }
}

/// Binds the configured address and serves [`router`] on `runtime` until `state.stop` is set.
/// Returns `None` when HTTP is off, or when the default address is taken.
///
/// # Errors
///
/// Fails if a configured address cannot be bound or the address file cannot be written.
pub fn start(
    state: HttpState,
    runtime: &tokio::runtime::Handle,
) -> anyhow::Result<Option<HttpServer>> {
    let listen = state
        .config
        .http
        .listen()
        .map_err(|(field, problem)| anyhow::anyhow!("{field}: {problem}"))?;
    let address_file = addr_file(&state.data_dir, &state.cluster);
    match std::fs::remove_file(&address_file) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => {
            return Err(error).with_context(|| format!("cannot remove {}", address_file.display()))
        }
    }
    let (address, configured) = match listen {
        Listen::Off => {
            tracing::info!("HTTP server is off (`http.enabled = false`).");
            return Ok(None);
        }
        Listen::Configured(address) => (address, true),
        Listen::Default(address) => (address, false),
    };
    let listener = match std::net::TcpListener::bind(address) {
        Ok(listener) => listener,
        Err(error) if !configured => {
            tracing::warn!(%address, %error, "Cannot listen on the default HTTP address; running without metrics, health and API. Set `http.listen` to choose one.");
            return Ok(None);
        }
        Err(error) => {
            return Err(error).with_context(|| format!("http.listen: cannot listen on {address}"))
        }
    };
    listener
        .set_nonblocking(true)
        .context("cannot make the HTTP listener non-blocking")?;
    let local_addr = listener
        .local_addr()
        .context("cannot read the HTTP address")?;
    let listener = {
        let _entered = runtime.enter();
        tokio::net::TcpListener::from_std(listener).context("cannot register the HTTP listener")?
    };
    write_addr_file(&address_file, local_addr)?;

    tracing::info!(
        address = %local_addr,
        management = state.serves_management(),
        ingest = state.serves_ingest(),
        "HTTP server listening on {local_addr}."
    );
    let stop = state.stop.clone();
    let app = router(state);
    runtime.spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                // TODO: the stop signal wakes timely activators only; an async waker on it
                // would end this polling.
                while !stop.is_stopped() {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
            .await;
        if let Err(error) = served {
            tracing::error!(%error, "HTTP server stopped with an error.");
        }
    });
    Ok(Some(HttpServer { local_addr }))
}

/// Writes the address atomically, so a reader never sees half of it.
fn write_addr_file(path: &Path, address: SocketAddr) -> anyhow::Result<()> {
    let partial = path.with_extension("addr.partial");
    std::fs::write(&partial, format!("{address}\n"))
        .and_then(|()| std::fs::rename(&partial, path))
        .with_context(|| format!("cannot write the HTTP address to {}", path.display()))
}

#[cfg(test)]
mod tests;
