//! The loopback receiver the benchmark delivers to, run as a process of its own
//! (`hookflow-bench receiver`) so that its CPU time and memory are not the pipeline's.
//!
//! It listens on an ephemeral port of 127.0.0.1, prints `listening on 127.0.0.1:PORT` as its
//! first line of standard output, and exits when its standard input closes, so it never
//! outlives the benchmark that started it. Webhooks go to `/e/<endpoint>/<mode>`, where the
//! mode selects the response:
//!
//! ```text
//! /e/17/ok                   200 at once
//! /e/17/fail                 503 at once
//! /e/17/hang                 holds the request for HANG_HOLD (30 s), then 503
//! /e/17/ok?delay_ms=5        200 after 5 ms
//! /e/17/ok?fail_percent=10   503 to 10 % of requests, spread evenly, 200 to the rest
//! ```
//!
//! Every webhook is recorded as an [`Arrival`]. Control paths: `GET /__stats` returns counts
//! per status as JSON, `GET /__arrivals` returns every arrival as text lines (see
//! [`Arrival::to_line`]), and `POST /__reset` forgets all of them.

use std::collections::BTreeMap;
use std::future::IntoFuture;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::measure::{now_micros, process_cpu};

/// Time a `hang` endpoint keeps a request open before it responds with 503. Clients time out
/// long before, so the bound only keeps held requests from piling up forever.
pub const HANG_HOLD: Duration = Duration::from_secs(30);

/// The status recorded for a request held by a `hang` endpoint, which gets no response in time.
pub const HELD: u16 = 0;

/// The event number recorded when the `webhook-id` header has no number after its last `_`.
pub const UNKNOWN_EVENT: u64 = u64::MAX;

/// One webhook request as the receiver recorded it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arrival {
    /// The number after the last `_` of the `webhook-id` header (`evt_42` is 42), or
    /// [`UNKNOWN_EVENT`].
    pub event: u64,
    /// The endpoint number of the path.
    pub endpoint: u32,
    /// The response status, or [`HELD`] for a held request.
    pub status: u16,
    /// Arrival time in microseconds since the Unix epoch.
    pub received_us: u64,
}

impl Arrival {
    /// Formats the arrival as `event endpoint status received_us`.
    pub fn to_line(self) -> String {
        format!(
            "{} {} {} {}",
            self.event, self.endpoint, self.status, self.received_us
        )
    }

    /// Parses a line written by [`Arrival::to_line`].
    pub fn parse_line(line: &str) -> Option<Arrival> {
        let mut fields = line.split_ascii_whitespace();
        let arrival = Arrival {
            event: fields.next()?.parse().ok()?,
            endpoint: fields.next()?.parse().ok()?,
            status: fields.next()?.parse().ok()?,
            received_us: fields.next()?.parse().ok()?,
        };
        fields.next().is_none().then_some(arrival)
    }
}

/// The answer to `GET /__stats`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ReceiverStats {
    /// Webhook requests recorded since the last reset.
    pub requests: u64,
    /// Requests per response status ([`HELD`] for held ones).
    pub by_status: BTreeMap<u16, u64>,
    /// CPU time the receiver process has used since it started, in seconds.
    pub cpu_seconds: f64,
}

impl ReceiverStats {
    /// Returns the number of requests with response status `status`.
    pub fn count(&self, status: u16) -> u64 {
        self.by_status.get(&status).copied().unwrap_or(0)
    }
}

/// The behaviour a webhook path selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// The endpoint number.
    pub endpoint: u32,
    /// How to answer.
    pub mode: Mode,
    /// Wait before answering, in ms.
    pub delay_ms: u64,
    /// Percentage of requests that get 503 instead of 200 (`ok` mode only).
    pub fail_percent: u8,
}

/// The response a webhook path selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// 200.
    Ok,
    /// 503.
    Fail,
    /// Held for [`HANG_HOLD`], then 503.
    Hang,
}

impl Mode {
    /// Returns the path segment that selects this mode.
    pub fn segment(self) -> &'static str {
        match self {
            Mode::Ok => "ok",
            Mode::Fail => "fail",
            Mode::Hang => "hang",
        }
    }
}

/// Parses `/e/<endpoint>/<mode>` and its optional `delay_ms` and `fail_percent` query
/// parameters; `None` for any other path or an unknown parameter.
pub fn parse_route(path: &str, query: Option<&str>) -> Option<Route> {
    let rest = path.strip_prefix("/e/")?;
    let (endpoint, mode) = rest.split_once('/')?;
    let mode = match mode {
        "ok" => Mode::Ok,
        "fail" => Mode::Fail,
        "hang" => Mode::Hang,
        _ => return None,
    };
    let mut route = Route {
        endpoint: endpoint.parse().ok()?,
        mode,
        delay_ms: 0,
        fail_percent: 0,
    };
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (name, value) = pair.split_once('=')?;
        match name {
            "delay_ms" => route.delay_ms = value.parse().ok()?,
            "fail_percent" => route.fail_percent = value.parse().ok().filter(|p| *p <= 100)?,
            _ => return None,
        }
    }
    Some(route)
}

/// Returns the number after the last `_` of a webhook id.
fn event_number(webhook_id: &str) -> u64 {
    webhook_id
        .rsplit_once('_')
        .and_then(|(_, number)| number.parse().ok())
        .unwrap_or(UNKNOWN_EVENT)
}

/// Returns whether the `count`-th request to a `fail_percent` path fails. Consecutive
/// counts are spread over the 100 residues by a factor coprime to 100, so that failures do
/// not come in runs.
fn fails(count: u64, fail_percent: u8) -> bool {
    (count.wrapping_mul(37) % 100) < u64::from(fail_percent)
}

#[derive(Default)]
struct ReceiverState {
    arrivals: Mutex<Vec<Arrival>>,
    /// Requests to paths with a `fail_percent`, for [`fails`].
    ratio_requests: AtomicU64,
}

impl ReceiverState {
    fn record(&self, arrival: Arrival) {
        self.arrivals
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(arrival);
    }
}

/// Runs the receiver until its standard input closes; `threads` is the number of tokio
/// worker threads.
///
/// # Errors
///
/// Fails if the runtime cannot start, the port cannot be bound or the server fails.
pub fn serve(threads: usize) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .thread_name("receiver")
        .enable_all()
        .build()
        .context("cannot start the receiver's runtime")?;
    let state = Arc::new(ReceiverState::default());
    let app = Router::new()
        .route("/__stats", get(stats))
        .route("/__arrivals", get(arrivals))
        .route("/__reset", post(reset))
        .fallback(receive)
        .with_state(state);

    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("cannot bind 127.0.0.1:0")?;
        let address = listener.local_addr().context("cannot read the bound address")?;
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "listening on {address}").context("cannot write to stdout")?;
        stdout.flush().context("cannot write to stdout")?;
        drop(stdout);
        tracing::info!(%address, threads, "Receiver listening.");

        let (closed, stdin_closed) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("stdin-watch".into())
            .spawn(move || {
                // Any read result (end of input, an error, stray bytes) ends the wait: the
                // parent never writes to this pipe.
                let mut byte = [0u8; 1];
                let _ = std::io::stdin().read(&mut byte);
                let _ = closed.send(());
            })
            .context("cannot start the stdin watcher")?;
        // No graceful shutdown: it would wait up to HANG_HOLD for held requests, and the
        // receiver keeps nothing that needs one.
        tokio::select! {
            served = axum::serve(listener, app).into_future() => served.context("the receiver failed"),
            _ = stdin_closed => Ok(()),
        }
    })?;
    runtime.shutdown_background();
    Ok(())
}

async fn receive(
    State(state): State<Arc<ReceiverState>>,
    uri: Uri,
    headers: HeaderMap,
    _body: axum::body::Bytes,
) -> StatusCode {
    let received_us = now_micros();
    let Some(route) = parse_route(uri.path(), uri.query()) else {
        return StatusCode::NOT_FOUND;
    };
    let event = headers
        .get("webhook-id")
        .and_then(|value| value.to_str().ok())
        .map_or(UNKNOWN_EVENT, event_number);

    let status = match route.mode {
        Mode::Ok if route.fail_percent > 0 => {
            let count = state.ratio_requests.fetch_add(1, Ordering::Relaxed);
            if fails(count, route.fail_percent) {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::OK
            }
        }
        Mode::Ok => StatusCode::OK,
        Mode::Fail | Mode::Hang => StatusCode::SERVICE_UNAVAILABLE,
    };
    let recorded = if route.mode == Mode::Hang {
        HELD
    } else {
        status.as_u16()
    };
    state.record(Arrival {
        event,
        endpoint: route.endpoint,
        status: recorded,
        received_us,
    });

    let wait = match route.mode {
        Mode::Hang => HANG_HOLD,
        _ => Duration::from_millis(route.delay_ms),
    };
    if !wait.is_zero() {
        tokio::time::sleep(wait).await;
    }
    status
}

async fn stats(State(state): State<Arc<ReceiverState>>) -> Json<ReceiverStats> {
    let mut stats = ReceiverStats {
        cpu_seconds: process_cpu().map_or(0.0, |cpu| cpu.as_secs_f64()),
        ..ReceiverStats::default()
    };
    let arrivals = state
        .arrivals
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    stats.requests = arrivals.len() as u64;
    for arrival in arrivals.iter() {
        *stats.by_status.entry(arrival.status).or_default() += 1;
    }
    Json(stats)
}

async fn arrivals(State(state): State<Arc<ReceiverState>>) -> String {
    let arrivals = state
        .arrivals
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let mut text = String::with_capacity(arrivals.len() * 40);
    for arrival in arrivals.iter() {
        text.push_str(&arrival.to_line());
        text.push('\n');
    }
    text
}

async fn reset(State(state): State<Arc<ReceiverState>>) -> StatusCode {
    state
        .arrivals
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .clear();
    state.ratio_requests.store(0, Ordering::Relaxed);
    StatusCode::NO_CONTENT
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_parse() {
        let cases = [
            ("/e/3/ok", None, Some((3, Mode::Ok, 0, 0))),
            ("/e/0/fail", None, Some((0, Mode::Fail, 0, 0))),
            ("/e/12/hang", None, Some((12, Mode::Hang, 0, 0))),
            ("/e/1/ok", Some("delay_ms=5"), Some((1, Mode::Ok, 5, 0))),
            (
                "/e/1/ok",
                Some("fail_percent=10&delay_ms=2"),
                Some((1, Mode::Ok, 2, 10)),
            ),
            ("/e/1/ok", Some(""), Some((1, Mode::Ok, 0, 0))),
            ("/e/1/ok", Some("fail_percent=101"), None),
            ("/e/1/ok", Some("colour=red"), None),
            ("/e/x/ok", None, None),
            ("/e/1/slow", None, None),
            ("/e/1", None, None),
            ("/__stats", None, None),
        ];
        for (path, query, expected) in cases {
            let parsed = parse_route(path, query).map(|route| {
                (
                    route.endpoint,
                    route.mode,
                    route.delay_ms,
                    route.fail_percent,
                )
            });
            assert_eq!(parsed, expected, "{path} {query:?}");
        }
    }

    #[test]
    fn mode_segments_parse_back() {
        for mode in [Mode::Ok, Mode::Fail, Mode::Hang] {
            let path = format!("/e/7/{}", mode.segment());
            assert_eq!(parse_route(&path, None).map(|r| r.mode), Some(mode));
        }
    }

    #[test]
    fn event_numbers_parse() {
        assert_eq!(event_number("evt_42"), 42);
        assert_eq!(event_number("raw_0"), 0);
        assert_eq!(event_number("a_b_7"), 7);
        assert_eq!(event_number("evt"), UNKNOWN_EVENT);
        assert_eq!(event_number("evt_x"), UNKNOWN_EVENT);
    }

    #[test]
    fn fail_percent_is_exact_per_hundred() {
        for percent in [0u8, 1, 10, 37, 100] {
            let failed = (0..1000).filter(|count| fails(*count, percent)).count();
            assert_eq!(failed, usize::from(percent) * 10, "{percent} %");
        }
    }

    #[test]
    fn arrival_lines_round_trip() {
        let arrival = Arrival {
            event: 9,
            endpoint: 4,
            status: HELD,
            received_us: 1_700_000_000_123_456,
        };
        assert_eq!(Arrival::parse_line(&arrival.to_line()), Some(arrival));
        assert_eq!(Arrival::parse_line("1 2 3"), None);
        assert_eq!(Arrival::parse_line("1 2 3 4 5"), None);
    }
}
