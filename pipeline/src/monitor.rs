//! The monitoring routes of the HTTP server: `/metrics`, `/health/live` and `/health/ready`.
//!
//! In: the process's [`Metrics`] and its archive directory. Out: an `axum::Router` that the
//! server of `hookflow run` merges with its other routes; these three are always served,
//! without a token.
//!
//! `/health/ready` runs three checks on every request and returns 200 when all pass, 503
//! otherwise, with a JSON body naming each check and the first failing one:
//!
//! ```text
//! {"status":"not_ready","failing":"archive","checks":[
//!   {"name":"source","ok":true},
//!   {"name":"archive","ok":false,"detail":"cannot create /data/archive/.hookflow-ready-123: Permission denied (os error 13)"},
//!   {"name":"dataflow","ok":true}]}
//! ```
//!
//! * `source`: the last read of the source (or query of its log end) succeeded.
//! * `archive`: a file can be created, written and removed in the archive directory.
//! * `dataflow`: no worker's probe frontier has stood still for longer than
//!   `metrics.ready_stall_secs` while it had records read and not yet settled.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

use crate::metrics::{Metrics, CONTENT_TYPE};

/// The state of the monitoring routes, shared with the pipeline and cheap to clone.
#[derive(Debug, Clone)]
pub struct Monitor {
    metrics: Arc<Metrics>,
    archive_dir: PathBuf,
}

/// The result of one readiness check.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct Check {
    /// `source`, `archive` or `dataflow`.
    pub name: &'static str,
    /// Whether the check passed.
    pub ok: bool,
    /// The reason the check failed; absent when it passed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// The body of `/health/ready`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct Readiness {
    /// `ready` or `not_ready`.
    pub status: &'static str,
    /// The name of the first failing check; absent when ready.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failing: Option<&'static str>,
    /// Every check, in the order they ran.
    pub checks: Vec<Check>,
}

impl Readiness {
    /// Returns whether every check passed.
    pub fn is_ready(&self) -> bool {
        self.failing.is_none()
    }
}

impl Monitor {
    /// Creates the monitor of a pipeline whose archive lives in `archive_dir`.
    pub fn new(metrics: Arc<Metrics>, archive_dir: PathBuf) -> Self {
        Monitor {
            metrics,
            archive_dir,
        }
    }

    /// Returns the metrics the routes serve.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Runs the readiness checks. Blocking: it writes a file in the archive directory.
    pub fn readiness(&self) -> Readiness {
        let source = if self.metrics.source.is_up() {
            pass("source")
        } else {
            let error = self.metrics.source.last_error();
            fail(
                "source",
                error.unwrap_or_else(|| "the source cannot be read".into()),
            )
        };
        let archive = match probe_writable(&self.archive_dir) {
            Ok(()) => pass("archive"),
            Err(detail) => fail("archive", detail),
        };
        let stalled = self.metrics.stalled_workers(wall_clock_ms());
        let dataflow = if stalled == 0 {
            pass("dataflow")
        } else {
            fail(
                "dataflow",
                format!(
                    "{stalled} worker(s) have records outstanding and a frontier that has not moved within metrics.ready_stall_secs"
                ),
            )
        };

        let checks = vec![source, archive, dataflow];
        let failing = checks
            .iter()
            .find(|check| !check.ok)
            .map(|check| check.name);
        self.metrics
            .ready
            .store(u64::from(failing.is_none()), Ordering::Relaxed);
        Readiness {
            status: if failing.is_none() {
                "ready"
            } else {
                "not_ready"
            },
            failing,
            checks,
        }
    }
}

fn pass(name: &'static str) -> Check {
    Check {
        name,
        ok: true,
        detail: None,
    }
}

fn fail(name: &'static str, detail: String) -> Check {
    Check {
        name,
        ok: false,
        detail: Some(detail),
    }
}

fn wall_clock_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as u64)
}

/// Creates, writes, syncs and removes a file in `dir`, the way the archive writer would
/// need to; returns what failed.
fn probe_writable(dir: &Path) -> Result<(), String> {
    let path = dir.join(format!(
        ".hookflow-ready-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .and_then(|mut file| {
            file.write_all(b"ready")?;
            file.sync_all()
        });
    if let Err(error) = written {
        // The file may exist although writing it failed (a full disk).
        let _ = std::fs::remove_file(&path);
        return Err(format!("cannot create {}: {error}", path.display()));
    }
    std::fs::remove_file(&path)
        .map_err(|error| format!("cannot remove {}: {error}", path.display()))
}

/// The (method, path) of every route [`routes`] serves.
pub const ROUTES: [(Method, &str); 3] = [
    (Method::GET, "/metrics"),
    (Method::GET, "/health/live"),
    (Method::GET, "/health/ready"),
];

/// The monitoring routes: `GET /metrics`, `GET /health/live` and `GET /health/ready`. The
/// router is generic over the state of the router it is merged into.
pub fn routes<S>(monitor: Monitor) -> Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    Router::new()
        .route("/metrics", get(metrics))
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
        .with_state(monitor)
}

/// Every metric of this process in the Prometheus text format 0.0.4.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses((status = 200, description = "the metrics in the Prometheus text format 0.0.4", content_type = "text/plain; version=0.0.4; charset=utf-8", body = String))
)]
pub async fn metrics(State(monitor): State<Monitor>) -> Response {
    // The readiness checks write a file, so they run off the runtime's worker threads; they
    // refresh the `hookflow_ready` gauge that the scrape then reads.
    let checked = monitor.clone();
    if let Err(error) = tokio::task::spawn_blocking(move || checked.readiness()).await {
        tracing::warn!(%error, "The readiness checks of a scrape did not finish.");
    }
    let mut text = String::with_capacity(16 * 1024);
    match monitor.metrics.encode(&mut text) {
        Ok(()) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response(),
        Err(_) => {
            tracing::error!("Encoding the metrics failed.");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                Json(serde_json::json!({
                    "code": "metrics_encoding_failed",
                    "message": "encoding the metrics failed",
                })),
            )
                .into_response()
        }
    }
}

/// The body of `/health/live`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct LiveBody {
    /// Always `live`.
    pub status: &'static str,
}

/// Liveness: 200 while the process serves HTTP.
#[utoipa::path(
    get,
    path = "/health/live",
    tag = "operations",
    responses((status = 200, description = "the process is running", body = LiveBody))
)]
pub async fn live() -> Json<LiveBody> {
    Json(LiveBody { status: "live" })
}

/// Readiness: 200 when the source, the archive directory and the dataflow pass their checks,
/// 503 naming the failing check otherwise.
#[utoipa::path(
    get,
    path = "/health/ready",
    tag = "operations",
    responses(
        (status = 200, description = "every check passed", body = Readiness),
        (status = 503, description = "a check failed; `failing` names the first", body = Readiness)
    )
)]
pub async fn ready(State(monitor): State<Monitor>) -> Response {
    match tokio::task::spawn_blocking(move || monitor.readiness()).await {
        Ok(readiness) => {
            let status = if readiness.is_ready() {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            (status, Json(readiness)).into_response()
        }
        Err(error) => {
            tracing::error!(%error, "The readiness checks did not finish.");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(serde_json::json!({
                    "status": "not_ready",
                    "failing": "checks",
                    "checks": [],
                })),
            )
                .into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_names_source_failure() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let metrics = Arc::new(Metrics::default());
        let monitor = Monitor::new(metrics.clone(), dir.path().to_path_buf());
        assert!(monitor.readiness().is_ready());

        metrics.source.mark_down("partition 2: disk I/O error");
        let readiness = monitor.readiness();

        assert_eq!(readiness.status, "not_ready");
        assert_eq!(readiness.failing, Some("source"));
        assert_eq!(
            readiness.checks[0].detail.as_deref(),
            Some("partition 2: disk I/O error")
        );
        assert!(readiness.checks[1].ok);
        assert_eq!(metrics.ready.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn readiness_names_stalled_dataflow() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let metrics = Arc::new(Metrics::new(10, 1, 1_000));
        let worker = metrics.worker(0).expect("worker 0");
        // Records outstanding and a frontier last moved far in the past.
        worker.observe(Some(7), 3, 1);
        let readiness = Monitor::new(metrics, dir.path().to_path_buf()).readiness();

        assert_eq!(readiness.failing, Some("dataflow"));
        assert!(readiness.checks[0].ok);
        assert!(readiness.checks[1].ok);
        assert!(!readiness.checks[2].ok);
    }
}
