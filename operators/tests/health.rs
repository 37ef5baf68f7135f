//! Endpoint health in the deliver operator, against real HTTP receivers on 127.0.0.1
//! ephemeral ports: `Retry-After` pauses, the penalty floor and halved budget after a 429,
//! 410 Gone, limited retries of other 4xx, the circuit breaker, disabling after a long
//! failure, and isolation of a healthy endpoint from a hanging one.
//!
//! All but the isolation test run on a virtual clock (see `support::dataflow`), so minutes of
//! pauses and cooldowns take milliseconds; every receiver gets a bounded number of requests.

mod support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hookflow_operators::clock::{Clock, VirtualClock, WallClock};
use hookflow_operators::deliver::{DeliverContext, DeliverCounters};
use hookflow_operators::health::HealthPolicy;
use hookflow_operators::retry::RetryPolicy;
use hookflow_schemas::{Delivery, Endpoint, Millis, PendingDelivery, RateLimit};

use support::dataflow::{run_on_virtual_clock, run_on_wall_clock, MemoryLog, Run};
use support::*;

/// 2023-11-14T22:13:20Z, the cases' `T0`, so that HTTP-dates in `Retry-After` mean something.
const T0_MS: Millis = 1_700_000_000_000;

/// A virtual clock at `T0_MS`, a runtime, and a receiver that responds as its script decides.
struct Setup {
    runtime: tokio::runtime::Runtime,
    clock: Arc<VirtualClock>,
    receiver: ScriptedReceiver,
}

impl Setup {
    fn start(script: Arc<ReplyScript>) -> Self {
        let runtime = runtime();
        let clock = Arc::new(VirtualClock::new(T0_MS));
        let shared: Arc<dyn Clock> = Arc::clone(&clock) as Arc<dyn Clock>;
        let receiver = ScriptedReceiver::start_with_replies(&runtime, shared, script);
        Setup {
            runtime,
            clock,
            receiver,
        }
    }

    /// Creates an endpoint on this receiver that takes one request at a time, so each response
    /// is known before the next request starts.
    fn endpoint(&self, endpoint_id: &str) -> Endpoint {
        let mut endpoint = endpoint(endpoint_id, &self.receiver.url(endpoint_id));
        endpoint.max_in_flight = 1;
        endpoint
    }

    /// Runs `deliveries` with `retry` and `health`, and returns the run and the counters.
    fn run(
        &self,
        endpoints: Vec<Endpoint>,
        retry: RetryPolicy,
        health: HealthPolicy,
        deliveries: Vec<(u64, Delivery)>,
    ) -> (Run, Arc<DeliverCounters>) {
        let shared: Arc<dyn Clock> = Arc::clone(&self.clock) as Arc<dyn Clock>;
        let context = DeliverContext {
            retry,
            health,
            ..deliver_context(&self.runtime, endpoints, shared)
        };
        let counters = Arc::clone(&context.counters);
        let log = MemoryLog::of(deliveries.iter().map(|(_, delivery)| delivery));
        let run = run_on_virtual_clock(Arc::clone(&self.clock), context, deliveries, log);
        (run, counters)
    }

    /// Returns the arrival times of every request to `endpoint_id`, in ms after `T0_MS`, with
    /// the `webhook-id` of each.
    fn arrivals(&self, endpoint_id: &str) -> Vec<(u64, String)> {
        self.receiver
            .arrivals()
            .into_iter()
            .filter(|arrival| arrival.endpoint_id == endpoint_id)
            .map(|arrival| (arrival.clock_ms - T0_MS, arrival.webhook_id))
            .collect()
    }
}

/// `count` deliveries to `endpoint_id`, all due at `T0_MS`, with event ids `m1`, `m2`, ….
fn queued(endpoint_id: &str, count: u64) -> Vec<(u64, Delivery)> {
    (1..=count)
        .map(|n| {
            let mut delivery = delivery_with_offset(endpoint_id, &format!("m{n}"), b"{}", n);
            delivery.ingested.read_at_ms = T0_MS;
            (T0_MS, delivery)
        })
        .collect()
}

/// Builds a schedule of `retries` equal delays, without jitter.
fn schedule(delay_ms: u64, retries: usize) -> RetryPolicy {
    RetryPolicy {
        schedule_ms: vec![delay_ms; retries],
        jitter_percent: 0,
        ..RetryPolicy::default()
    }
}

/// Builds a health policy whose breaker never opens in these short runs.
fn no_breaker() -> HealthPolicy {
    HealthPolicy {
        breaker_min_requests: 10_000,
        retry_after_max_ms: 300_000,
        ..HealthPolicy::default()
    }
}

/// B05: five messages queued for one endpoint (5 requests per second). `m1` gets the response in
/// the table, and the others get 200. A valid `Retry-After` pauses the whole endpoint; an invalid one
/// counts as absent, never as zero.
#[test]
fn b05_retry_after_pauses_whole_endpoint() {
    // (status, Retry-After, when m2 may arrive at the earliest and at the latest, in ms after
    // T0, the earliest retry of m1, and whether the value is capped or invalid).
    struct Row {
        status: u16,
        retry_after: Option<&'static str>,
        m2_within: (u64, u64),
        m1_retry_at_least: u64,
        capped: u64,
        invalid: u64,
    }
    let penalty = RetryPolicy::default().penalty_floor_ms;
    let pause = |from: u64, to: u64, m1: u64| ((from, to), m1);
    let table = [
        (429, Some("3"), pause(3_000, 4_000, 5_000), 0, 0),
        (
            429,
            Some("Tue, 14 Nov 2023 22:13:30 GMT"),
            pause(10_000, 10_000, 10_000),
            0,
            0,
        ),
        (429, Some("555"), pause(300_000, 300_000, 300_000), 1, 0),
        (429, Some("abc"), pause(0, 1_000, penalty), 0, 1),
        (429, Some("-5"), pause(0, 1_000, penalty), 0, 1),
        (429, Some("1.5"), pause(0, 1_000, penalty), 0, 1),
        (429, Some(""), pause(0, 1_000, penalty), 0, 1),
        (503, Some("3"), pause(3_000, 4_000, 5_000), 0, 0),
        (429, None, pause(0, 1_000, penalty), 0, 0),
    ]
    .map(
        |(status, retry_after, ((from, to), m1), capped, invalid)| Row {
            status,
            retry_after,
            m2_within: (from, to),
            m1_retry_at_least: m1,
            capped,
            invalid,
        },
    );

    for row in table {
        let label = format!("{} Retry-After: {:?}", row.status, row.retry_after);
        let (status, retry_after) = (row.status, row.retry_after);
        let script = move |_: &str, webhook_id: &str, attempt: u32| {
            if webhook_id == "m1" && attempt == 1 {
                (status, retry_after.map(str::to_string))
            } else {
                (200, None)
            }
        };
        let setup = Setup::start(Arc::new(script));
        let mut endpoint = setup.endpoint("ep_b05");
        endpoint.rate_limit = Some(RateLimit {
            max_requests: 5,
            window_ms: 1_000,
        });

        let (run, counters) = setup.run(
            vec![endpoint],
            schedule(5_000, 3),
            no_breaker(),
            queued("ep_b05", 5),
        );

        let arrivals = setup.arrivals("ep_b05");
        assert_eq!(arrivals[0], (0, "m1".to_string()), "{label}");
        let (m2_at, m2) = &arrivals[1];
        assert_eq!(m2, "m2", "{label}: {arrivals:?}");
        let (from, to) = row.m2_within;
        assert!(
            (from..=to).contains(m2_at),
            "{label}: m2 arrived at +{m2_at} ms, expected {from}..={to}"
        );
        let m1_retry = arrivals
            .iter()
            .find(|(at, id)| id == "m1" && *at > 0)
            .map(|(at, _)| *at)
            .expect("m1 retried");
        assert!(
            m1_retry >= row.m1_retry_at_least,
            "{label}: m1 retried at +{m1_retry} ms, before +{} ms",
            row.m1_retry_at_least
        );
        assert_eq!(arrivals.len(), 6, "{label}: {arrivals:?}");

        let first = &run.rows_of("ep_b05", "m1")[0];
        assert_eq!(first.http_status, Some(row.status), "{label}");
        assert_eq!(first.retry_after.as_deref(), row.retry_after, "{label}");
        assert_eq!(
            first.next_attempt_at_ms,
            Some(T0_MS + m1_retry),
            "{label}: the archived next attempt is when it came"
        );
        let expected_kind = if row.status == 429 {
            "throttled"
        } else {
            "http_status"
        };
        assert_eq!(first.error_kind.as_deref(), Some(expected_kind), "{label}");
        assert_eq!(
            counters.retry_after_capped.load(Ordering::Relaxed),
            row.capped,
            "{label}"
        );
        assert_eq!(
            counters.retry_after_invalid.load(Ordering::Relaxed),
            row.invalid,
            "{label}"
        );
        assert_eq!(
            counters.throttled.load(Ordering::Relaxed),
            u64::from(row.status == 429),
            "{label}"
        );
    }
}

/// A 429 without `Retry-After` halves the endpoint's budget, for its queued backlog too, and
/// successes restore it step by step. The throttled delivery waits at least the penalty floor.
#[test]
fn throttling_halves_budget_until_successes_restore_it() {
    let script = |_: &str, webhook_id: &str, attempt: u32| {
        if webhook_id == "m1" && attempt == 1 {
            (429, None)
        } else {
            (200, None)
        }
    };
    let setup = Setup::start(Arc::new(script));
    let mut endpoint = setup.endpoint("ep_halve");
    endpoint.rate_limit = Some(RateLimit {
        max_requests: 4,
        window_ms: 1_000,
    });

    setup.run(
        vec![endpoint],
        schedule(5_000, 3),
        no_breaker(),
        queued("ep_halve", 24),
    );

    let arrivals = setup.arrivals("ep_halve");
    assert_eq!(arrivals.len(), 25, "every message delivered: {arrivals:?}");
    let mut per_window: BTreeMap<u64, u32> = BTreeMap::new();
    for (at, _) in &arrivals {
        *per_window.entry(at / 1_000).or_default() += 1;
    }
    // Window 0 sent m1 (429) and then, with the budget halved to 2, one more: the rest of
    // its reserved backlog moved to later windows.
    assert_eq!(per_window.get(&0), Some(&2), "{per_window:?}");
    // Two successes restore the halving, after which windows carry the full budget again.
    assert!(
        per_window.values().any(|count| *count == 4),
        "the budget was never restored: {per_window:?}"
    );
    assert!(
        per_window.values().all(|count| *count <= 4),
        "{per_window:?}"
    );

    let m1_retry = arrivals
        .iter()
        .filter(|(_, id)| id == "m1")
        .nth(1)
        .map(|(at, _)| *at)
        .expect("m1 retried");
    assert!(
        m1_retry >= RetryPolicy::default().penalty_floor_ms,
        "m1 retried at +{m1_retry} ms"
    );
}

/// A 410 Gone dead-letters the delivery and disables the endpoint: its other deliveries are
/// parked, not attempted, and another endpoint goes on.
#[test]
fn gone_disables_endpoint_and_parks_its_deliveries() {
    let script = |endpoint_id: &str, _: &str, _: u32| {
        if endpoint_id == "ep_gone" {
            (410, None)
        } else {
            (200, None)
        }
    };
    let setup = Setup::start(Arc::new(script));
    let mut deliveries = queued("ep_gone", 4);
    deliveries.extend(
        queued("ep_other", 3)
            .into_iter()
            .map(|(time, mut delivery)| {
                delivery.ingested.offset += 100;
                (time, delivery)
            }),
    );

    let (run, counters) = setup.run(
        vec![setup.endpoint("ep_gone"), setup.endpoint("ep_other")],
        schedule(5_000, 3),
        no_breaker(),
        deliveries,
    );

    assert_eq!(setup.arrivals("ep_gone").len(), 1, "one request, then none");
    assert_eq!(setup.arrivals("ep_other").len(), 3);
    let gone_rows: Vec<_> = run
        .rows
        .iter()
        .map(|(_, row)| row)
        .filter(|row| row.endpoint_id.as_deref() == Some("ep_gone"))
        .collect();
    assert_eq!(gone_rows.len(), 1, "{gone_rows:?}");
    assert_eq!(gone_rows[0].outcome, "dead_lettered");
    assert_eq!(gone_rows[0].error_kind.as_deref(), Some("gone"));
    assert!(gone_rows[0]
        .error_message
        .as_deref()
        .unwrap_or_default()
        .contains("endpoint disabled"));

    let disabled: Vec<_> = run
        .disabled
        .iter()
        .map(|(_, d)| d.endpoint_id.as_str())
        .collect();
    assert_eq!(disabled, ["ep_gone"]);
    assert!(run.disabled[0].1.reason.contains("410"));
    let mut parked: Vec<_> = run
        .pending
        .iter()
        .filter(|(_, pending)| pending.is_parked())
        .map(|(_, pending)| (pending.endpoint_id.as_str(), pending.event_id.as_str()))
        .collect();
    parked.sort();
    assert_eq!(
        parked,
        [("ep_gone", "m2"), ("ep_gone", "m3"), ("ep_gone", "m4")]
    );
    assert_eq!(counters.endpoints_disabled.load(Ordering::Relaxed), 1);
    assert_eq!(counters.deliveries_parked.load(Ordering::Relaxed), 3);
}

/// A 4xx other than 408, 410 and 429 is retried `client_error_retries` times, then
/// dead-lettered with a message that gives the reason.
#[test]
fn client_errors_get_limited_retries() {
    let setup = Setup::start(Arc::new(|_: &str, _: &str, _: u32| (404, None)));
    let retry = RetryPolicy {
        client_error_retries: 2,
        ..schedule(1_000, 8)
    };

    let (run, _) = setup.run(
        vec![setup.endpoint("ep_404")],
        retry,
        no_breaker(),
        queued("ep_404", 1),
    );

    let rows = run.rows_of("ep_404", "m1");
    let outcomes: Vec<_> = rows.iter().map(|row| row.outcome.as_str()).collect();
    assert_eq!(outcomes, ["failed", "failed", "dead_lettered"]);
    assert!(rows
        .iter()
        .all(|row| row.error_kind.as_deref() == Some("client_error")));
    let message = rows[2].error_message.as_deref().unwrap_or_default();
    assert!(message.contains("gave up after 3 attempts"), "{message}");
    assert!(message.contains("4xx"), "{message}");
    assert_eq!(setup.arrivals("ep_404").len(), 3);
}

/// Sustained failure opens the breaker, which keeps the endpoint's queue waiting, durably
/// pending, until one probe after the cooldown. The probe's success closes the breaker and the
/// queue drains.
#[test]
fn breaker_holds_failing_endpoint_until_probe_succeeds() {
    let answered = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&answered);
    let script = move |_: &str, _: &str, _: u32| {
        // The first four requests fail, every later one succeeds.
        if count.fetch_add(1, Ordering::SeqCst) < 4 {
            (500, None)
        } else {
            (200, None)
        }
    };
    let setup = Setup::start(Arc::new(script));
    let health = HealthPolicy {
        breaker_window_ms: 60_000,
        breaker_min_requests: 4,
        breaker_failure_percent: 50,
        breaker_cooldown_ms: 10_000,
        ..no_breaker()
    };

    let (run, counters) = setup.run(
        vec![setup.endpoint("ep_breaker")],
        schedule(3_600_000, 2),
        health,
        queued("ep_breaker", 12),
    );

    let arrivals = setup.arrivals("ep_breaker");
    let times: Vec<u64> = arrivals.iter().map(|(at, _)| *at).collect();
    assert_eq!(&times[..4], [0, 0, 0, 0], "{times:?}");
    // Nothing between the fourth failure and the probe, one cooldown later.
    assert_eq!(times[4], 10_000, "{times:?}");
    assert!(times[5..].iter().all(|at| *at >= 10_000), "{times:?}");
    // The probe, the 7 after it, and the 4 retries an hour later.
    assert_eq!(arrivals.len(), 16, "{arrivals:?}");
    assert!(times[12..].iter().all(|at| *at >= 3_600_000), "{times:?}");
    assert_eq!(counters.breakers_opened.load(Ordering::Relaxed), 1);
    assert_eq!(counters.breakers_closed.load(Ordering::Relaxed), 1);

    // Every delivery that waited (behind the in-flight cap, then the open breaker) was
    // recorded as pending, so a restart would resume it; none was parked.
    let mut waited: Vec<_> = run
        .pending
        .iter()
        .filter(|(_, pending)| pending.attempt == 1)
        .map(|(_, pending)| pending.event_id.clone())
        .collect();
    waited.sort();
    waited.dedup();
    assert_eq!(waited.len(), 11, "{waited:?}");
    assert!(run
        .pending
        .iter()
        .all(|(_, pending)| pending.due_ms != PendingDelivery::PARKED));
}

/// An endpoint whose attempts fail without a success for `disable_after_ms` is disabled, and
/// the failed delivery's retry is parked instead of scheduled.
#[test]
fn endpoint_failing_too_long_is_disabled() {
    let setup = Setup::start(Arc::new(|_: &str, _: &str, _: u32| (500, None)));
    let health = HealthPolicy {
        disable_after_ms: 3_600_000,
        ..no_breaker()
    };

    let (run, counters) = setup.run(
        vec![setup.endpoint("ep_down")],
        schedule(600_000, 20),
        health,
        queued("ep_down", 1),
    );

    // Attempts at 0, 10, ..., 60 minutes; the one at 60 minutes disables the endpoint.
    let times: Vec<u64> = setup
        .arrivals("ep_down")
        .iter()
        .map(|(at, _)| *at)
        .collect();
    assert_eq!(
        times,
        (0..=6).map(|n| n * 600_000).collect::<Vec<_>>(),
        "attempts"
    );
    assert_eq!(counters.endpoints_disabled.load(Ordering::Relaxed), 1);
    let (_, disabled) = &run.disabled[0];
    assert_eq!(disabled.at_ms, T0_MS + 3_600_000);
    assert!(disabled.reason.contains("3600 s"), "{}", disabled.reason);
    let parked: Vec<_> = run
        .pending
        .iter()
        .filter(|(_, pending)| pending.is_parked())
        .collect();
    assert_eq!(parked.len(), 1);
    assert_eq!(
        parked[0].1.attempt, 8,
        "the retry that would have come next"
    );
}

/// Item 5 of the delivery contract: an endpoint that hangs on every request does not slow a
/// healthy one. The healthy endpoint, limited to 50 requests per second, must still deliver
/// its 50 events in about a second while the hanging one holds its in-flight places until
/// they time out (about 5 s in all, its timeouts halving its cap); the bound of 4 s is
/// generous against that second.
#[test]
fn hanging_endpoint_does_not_slow_a_healthy_one() {
    let runtime = runtime();
    let healthy = runtime.block_on(serve(axum::Router::new().route(
        "/{endpoint}",
        axum::routing::post(|| async { axum::http::StatusCode::OK }),
    )));
    let hanging = runtime.block_on(serve(axum::Router::new().route(
        "/{endpoint}",
        axum::routing::post(|| async {
            tokio::time::sleep(Duration::from_secs(30)).await;
            axum::http::StatusCode::OK
        }),
    )));

    let mut fast = endpoint("ep_fast", &format!("http://{healthy}/ep_fast"));
    fast.rate_limit = Some(RateLimit {
        max_requests: 5,
        window_ms: 100,
    });
    let mut stuck = endpoint("ep_stuck", &format!("http://{hanging}/ep_stuck"));
    stuck.timeout_ms = 1_000;
    stuck.max_in_flight = 4;

    let start_ms = WallClock.now_ms();
    let mut deliveries = Vec::new();
    for n in 0..50u64 {
        let endpoints: &[(&str, u64)] = if n < 8 {
            &[("ep_stuck", n), ("ep_fast", 1_000 + n)]
        } else {
            &[("ep_fast", 1_000 + n)]
        };
        for &(endpoint_id, offset) in endpoints {
            let mut delivery = delivery_with_offset(
                endpoint_id,
                &format!("evt_{endpoint_id}_{n}"),
                b"{}",
                offset,
            );
            delivery.ingested.read_at_ms = start_ms;
            deliveries.push((start_ms, delivery));
        }
    }
    let log = MemoryLog::of(deliveries.iter().map(|(_, delivery)| delivery));
    let context = DeliverContext {
        // Small enough that the hanging endpoint could take every place if it were allowed.
        max_in_flight_total: 8,
        retry: schedule(60_000, 0),
        health: no_breaker(),
        ..deliver_context(&runtime, vec![fast, stuck], Arc::new(WallClock))
    };

    let run = run_on_wall_clock(1, context, deliveries, log);

    let fast_finished: Vec<u64> = run
        .rows
        .iter()
        .map(|(_, row)| row)
        .filter(|row| row.endpoint_id.as_deref() == Some("ep_fast"))
        .filter(|row| row.outcome == "delivered")
        .map(|row| row.finished_at_ms - start_ms)
        .collect();
    assert_eq!(fast_finished.len(), 50);
    let last = fast_finished.iter().max().copied().unwrap_or_default();
    assert!(
        last < 4_000,
        "the healthy endpoint needed {last} ms for 50 events"
    );
    let stuck_rows = run
        .rows
        .iter()
        .filter(|(_, row)| row.endpoint_id.as_deref() == Some("ep_stuck"))
        .count();
    assert_eq!(
        stuck_rows, 8,
        "every hanging request timed out and was archived"
    );
}
