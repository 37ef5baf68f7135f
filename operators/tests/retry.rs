//! Retry and rate-limit tests of the deliver operator on a virtual clock, against real HTTP
//! receivers on 127.0.0.1 ephemeral ports.
//!
//! The dataflow is wired as the pipeline wires it: retries go round a feedback edge and read
//! their payloads back from an in-memory log. Virtual time does not move while a request is
//! in flight and jumps to the next wake-up an operator asked for once the worker is idle, so
//! a three-day schedule runs in well under a second. Every receiver is started by the test
//! that uses it and receives a bounded number of requests.

mod support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use hookflow_operators::clock::{Clock, VirtualClock};
use hookflow_operators::health::HealthPolicy;
use hookflow_operators::retry::{jitter_seed, RetryPolicy, DEFAULT_SCHEDULE_MS};
use hookflow_schemas::{AttemptRow, Delivery, Endpoint, Millis, RateLimit};

use support::dataflow::{run_on_virtual_clock, MemoryLog, Run, VIRTUAL_START_MS};
use support::*;

/// A virtual clock, a tokio runtime and a scripted receiver that reads the clock.
struct Setup {
    runtime: tokio::runtime::Runtime,
    clock: Arc<VirtualClock>,
    receiver: ScriptedReceiver,
}

impl Setup {
    /// Starts the virtual clock at `start_ms` and a receiver that responds with the status
    /// `script` returns.
    fn start(start_ms: Millis, script: Arc<Script>) -> Self {
        let runtime = runtime();
        let clock = Arc::new(VirtualClock::new(start_ms));
        let shared: Arc<dyn Clock> = Arc::clone(&clock) as Arc<dyn Clock>;
        let receiver = ScriptedReceiver::start(&runtime, shared, script);
        Setup {
            runtime,
            clock,
            receiver,
        }
    }

    /// Creates an endpoint `endpoint_id` on this setup's receiver.
    fn endpoint(&self, endpoint_id: &str) -> Endpoint {
        endpoint(endpoint_id, &self.receiver.url(endpoint_id))
    }

    /// Runs `deliveries` through the deliver operator with `retry`, reading payloads back
    /// from a log that contains every delivery's payload.
    fn run(
        &self,
        endpoints: Vec<Endpoint>,
        retry: RetryPolicy,
        deliveries: Vec<(u64, Delivery)>,
    ) -> Run {
        let log = MemoryLog::of(deliveries.iter().map(|(_, delivery)| delivery));
        self.run_with_log(endpoints, retry, deliveries, log)
    }

    fn run_with_log(
        &self,
        endpoints: Vec<Endpoint>,
        retry: RetryPolicy,
        deliveries: Vec<(u64, Delivery)>,
        log: MemoryLog,
    ) -> Run {
        let clock: Arc<dyn Clock> = Arc::clone(&self.clock) as Arc<dyn Clock>;
        let mut context = deliver_context(&self.runtime, endpoints, clock);
        context.retry = retry;
        context.health = schedule_only();
        run_on_virtual_clock(Arc::clone(&self.clock), context, deliveries, log)
    }
}

/// A health policy whose breaker never opens, so that these tests see the retry schedule
/// alone; `tests/health.rs` tests the breaker.
fn schedule_only() -> HealthPolicy {
    HealthPolicy {
        breaker_min_requests: u32::MAX,
        ..HealthPolicy::default()
    }
}

/// Asserts that no row came out at a timestamp before the time it records as due.
fn assert_rows_not_early(run: &Run) {
    for (time, row) in &run.rows {
        assert!(
            *time >= row.due_at_ms,
            "the row of attempt {} of {:?} came out at {time}, before its due time {}",
            row.attempt,
            row.event_id,
            row.due_at_ms
        );
    }
}

#[test]
fn default_schedule_runs_ten_attempts() {
    let setup = Setup::start(VIRTUAL_START_MS, Arc::new(|_: &str, _: &str, _: u32| 500));
    let payload = "{\"amount\": 1200,\n \"note\":\"é ✓ \\u00e9\", \"n\": 12345678901234567890}";
    let delivery = delivery_with_offset("ep_down", "evt_down", payload.as_bytes(), 7);
    let deliveries = vec![(VIRTUAL_START_MS, delivery)];
    let log = MemoryLog::of(deliveries.iter().map(|(_, delivery)| delivery));

    let run = setup.run_with_log(
        vec![setup.endpoint("ep_down")],
        RetryPolicy::default(),
        deliveries,
        log.clone(),
    );

    let rows = run.rows_of("ep_down", "evt_down");
    assert_eq!(rows.len(), 10, "rows: {rows:#?}");
    assert_eq!(run.rows.len(), 10, "rows of other deliveries appeared");
    let attempts: Vec<u32> = rows.iter().map(|row| row.attempt).collect();
    assert_eq!(attempts, (1..=10).collect::<Vec<u32>>());
    for row in &rows[..9] {
        assert_eq!(row.outcome, "failed", "attempt {}", row.attempt);
        assert!(
            row.next_attempt_at_ms.is_some(),
            "attempt {} has no next attempt time",
            row.attempt
        );
    }
    let last = &rows[9];
    assert_eq!(last.outcome, "dead_lettered");
    assert_eq!(last.next_attempt_at_ms, None);
    let message = last.error_message.as_deref().unwrap_or_default();
    assert!(message.contains("gave up after 10 attempts"), "{message}");
    for row in &rows {
        assert_eq!(row.http_status, Some(500), "attempt {}", row.attempt);
        assert_eq!(row.error_kind.as_deref(), Some("http_status"));
    }

    assert_eq!(rows[0].started_at_ms, Some(VIRTUAL_START_MS));
    assert_eq!(rows[0].due_at_ms, VIRTUAL_START_MS);
    for (index, pair) in rows.windows(2).enumerate() {
        let (previous, next) = (&pair[0], &pair[1]);
        let next_attempt_at = previous.next_attempt_at_ms.expect("a next attempt time");
        assert_eq!(
            next.started_at_ms,
            Some(next_attempt_at),
            "attempt {} did not start at its next attempt time",
            next.attempt
        );
        assert_eq!(next.due_at_ms, next_attempt_at, "attempt {}", next.attempt);
        // With a 10% jitter each delay moves by at most a tenth of its schedule step, either
        // way. Every default step is a multiple of 100 ms, so that bound is exact.
        let started_at = previous.started_at_ms.expect("a start time");
        let gap = next_attempt_at - started_at;
        let step = DEFAULT_SCHEDULE_MS[index];
        assert!(
            gap.abs_diff(step) <= step / 10,
            "the delay before attempt {} is {gap} ms, outside {step} ms ± 10%",
            next.attempt
        );
    }
    assert_rows_not_early(&run);

    assert_eq!(run.retries.len(), 9, "one retry per failed attempt");
    for ((stamp, retry), row) in run.retries.iter().zip(&rows) {
        assert_eq!(retry.attempt, row.attempt + 1);
        assert!(
            !retry.has_payload(),
            "retry {} carries its payload",
            retry.attempt
        );
        let next_attempt_at = row.next_attempt_at_ms.expect("a next attempt time");
        assert_eq!(
            *stamp,
            next_attempt_at - 1,
            "retry {} is not stamped one ms before its attempt",
            retry.attempt
        );
    }
    assert_eq!(log.fetched(), vec![(3, 7); 9], "one read-back per retry");
    for (_, retry) in &run.retries {
        let row = &rows[usize::try_from(retry.attempt).expect("small") - 2];
        let recorded = run.pending.iter().any(|(_, pending)| {
            pending.attempt == retry.attempt && Some(pending.due_ms) == row.next_attempt_at_ms
        });
        assert!(
            recorded,
            "retry {} was not recorded as pending at its next attempt time",
            retry.attempt
        );
    }

    let arrivals = setup.receiver.arrivals();
    assert_eq!(arrivals.len(), 10);
    let timestamps: HashSet<u64> = arrivals.iter().map(|a| a.webhook_timestamp).collect();
    assert_eq!(
        timestamps.len(),
        10,
        "a webhook-timestamp repeats: {timestamps:?}"
    );
    for (arrival, row) in arrivals.iter().zip(&rows) {
        assert_eq!(
            arrival.webhook_id, "evt_down",
            "attempt {}",
            arrival.attempt
        );
        assert_eq!(arrival.attempt, row.attempt);
        let started_at = row.started_at_ms.expect("a start time");
        assert_eq!(
            arrival.webhook_timestamp,
            started_at / 1000,
            "attempt {}",
            row.attempt
        );
        assert_eq!(arrival.clock_ms, started_at, "attempt {}", row.attempt);
        assert_eq!(
            arrival.body,
            payload.as_bytes(),
            "the body of attempt {} differs from the payload",
            arrival.attempt
        );
    }
    let span = rows[9].started_at_ms.expect("a start time") - VIRTUAL_START_MS;
    let schedule_total: u64 = DEFAULT_SCHEDULE_MS.iter().sum();
    assert!(
        span.abs_diff(schedule_total) <= schedule_total / 10,
        "the schedule spans {span} ms of virtual time, expected about {schedule_total} ms"
    );
}

#[test]
fn two_failures_then_delivered() {
    let script = |_: &str, _: &str, attempt: u32| if attempt <= 2 { 500 } else { 200 };
    let setup = Setup::start(VIRTUAL_START_MS, Arc::new(script));
    let delivery = delivery_with_offset("ep_flaky", "evt_flaky", br#"{"flaky":true}"#, 1);

    let run = setup.run(
        vec![setup.endpoint("ep_flaky")],
        RetryPolicy::default(),
        vec![(VIRTUAL_START_MS, delivery)],
    );

    let rows = run.rows_of("ep_flaky", "evt_flaky");
    let outcomes: Vec<&str> = rows.iter().map(|row| row.outcome.as_str()).collect();
    assert_eq!(outcomes, ["failed", "failed", "delivered"]);
    let attempts: Vec<u32> = rows.iter().map(|row| row.attempt).collect();
    assert_eq!(attempts, [1, 2, 3]);
    let statuses: Vec<Option<u16>> = rows.iter().map(|row| row.http_status).collect();
    assert_eq!(statuses, [Some(500), Some(500), Some(200)]);
    assert_eq!(rows[2].next_attempt_at_ms, None);
    assert_eq!(rows[2].error_kind, None);
    for pair in rows.windows(2) {
        assert_eq!(
            pair[1].started_at_ms, pair[0].next_attempt_at_ms,
            "attempt {} did not start at its next attempt time",
            pair[1].attempt
        );
    }
    assert_eq!(run.rows.len(), 3, "rows of other deliveries appeared");
    assert_eq!(run.retries.len(), 2);
    assert_rows_not_early(&run);

    let arrivals = setup.receiver.arrivals();
    let statuses: Vec<u16> = arrivals.iter().map(|a| a.status).collect();
    assert_eq!(statuses, [500, 500, 200]);
}

#[test]
fn nothing_sent_before_due() {
    let script = |_: &str, event_id: &str, attempt: u32| {
        if event_id.starts_with("evt_flaky") && attempt <= 2 {
            503
        } else {
            204
        }
    };
    let setup = Setup::start(VIRTUAL_START_MS, Arc::new(script));
    let mut narrow = setup.endpoint("ep_narrow");
    narrow.max_in_flight = 1;
    let endpoints = vec![setup.endpoint("ep_wide"), narrow];
    let retry = RetryPolicy {
        schedule_ms: vec![1_000, 10_000, 250],
        jitter_percent: 30,
        ..RetryPolicy::default()
    };
    let due_in_ms = [0, 0, 1, 999, 2_500, 7_000, 60_000];
    let mut deliveries = Vec::new();
    for (index, due_in) in due_in_ms.iter().enumerate() {
        let offset = index as u64;
        let kind = if index % 2 == 0 { "flaky" } else { "fine" };
        for endpoint_id in ["ep_wide", "ep_narrow"] {
            let event_id = format!("evt_{kind}_{index}");
            let delivery = delivery_with_offset(endpoint_id, &event_id, b"{\"n\":1}", offset);
            deliveries.push((VIRTUAL_START_MS + due_in, delivery));
        }
    }
    let expected_requests = deliveries
        .iter()
        .map(|(_, d)| {
            if d.ingested.event.id.starts_with("evt_flaky") {
                3
            } else {
                1
            }
        })
        .sum::<usize>();

    let run = setup.run(endpoints, retry, deliveries.clone());

    let arrivals = setup.receiver.arrivals();
    assert_eq!(arrivals.len(), expected_requests, "requests received");
    for (first_due, delivery) in &deliveries {
        let endpoint_id = delivery.endpoint_id.as_str();
        let event_id = delivery.ingested.event.id.as_str();
        let rows = run.rows_of(endpoint_id, event_id);
        for arrival in setup.receiver.arrivals_of(endpoint_id, event_id) {
            let due = match arrival.attempt {
                1 => *first_due,
                attempt => {
                    let index = usize::try_from(attempt).expect("small attempt number") - 2;
                    rows[index].next_attempt_at_ms.expect("a next attempt time")
                }
            };
            assert!(
                arrival.clock_ms >= due,
                "attempt {} of {event_id} to {endpoint_id} arrived at {}, before its due time {due}",
                arrival.attempt,
                arrival.clock_ms
            );
            assert!(
                arrival.webhook_timestamp >= due / 1000,
                "attempt {} of {event_id} to {endpoint_id} is signed at {} s, before its due \
                 time {due} ms",
                arrival.attempt,
                arrival.webhook_timestamp
            );
        }
        let last = rows.last().expect("at least one row");
        assert_eq!(last.outcome, "delivered", "{event_id} to {endpoint_id}");
    }
    assert_rows_not_early(&run);
}

#[test]
fn rate_limit_spreads_over_windows() {
    const MAX_REQUESTS: u32 = 3;
    const WINDOW_MS: u64 = 1_000;
    const LIMITED: usize = 20;
    const OPEN: usize = 10;

    // Start a quarter into a window, so that the first window is only partly left.
    let start_ms = VIRTUAL_START_MS + 250;
    let setup = Setup::start(start_ms, Arc::new(|_: &str, _: &str, _: u32| 200));
    let mut limited = setup.endpoint("ep_limited");
    limited.rate_limit = Some(RateLimit {
        max_requests: MAX_REQUESTS,
        window_ms: WINDOW_MS,
    });
    limited.max_in_flight = 2;
    let open = setup.endpoint("ep_open");
    let mut deliveries = Vec::new();
    for index in 0..LIMITED {
        let event_id = format!("evt_limited_{index}");
        let delivery = delivery_with_offset("ep_limited", &event_id, b"{}", index as u64);
        deliveries.push((start_ms, delivery));
    }
    for index in 0..OPEN {
        let event_id = format!("evt_open_{index}");
        let delivery = delivery_with_offset("ep_open", &event_id, b"{}", 100 + index as u64);
        deliveries.push((start_ms, delivery));
    }

    let run = setup.run(vec![limited, open], RetryPolicy::default(), deliveries);

    let first_window = start_ms - start_ms % WINDOW_MS;
    let window_of = |clock_ms: Millis| (clock_ms - first_window) / WINDOW_MS;
    let arrivals = setup.receiver.arrivals();
    let mut per_window: BTreeMap<u64, u32> = BTreeMap::new();
    let mut limited_ids = HashSet::new();
    for arrival in arrivals.iter().filter(|a| a.endpoint_id == "ep_limited") {
        assert!(
            arrival.clock_ms >= start_ms,
            "{} arrived before it was due",
            arrival.webhook_id
        );
        *per_window.entry(window_of(arrival.clock_ms)).or_default() += 1;
        limited_ids.insert(arrival.webhook_id.clone());
    }
    assert_eq!(limited_ids.len(), LIMITED, "limited deliveries received");
    for (window, count) in &per_window {
        assert!(
            *count <= MAX_REQUESTS,
            "window {window} received {count} requests, over the limit of {MAX_REQUESTS}: \
             {per_window:?}"
        );
    }
    // 20 requests at 3 per window need 7 windows; the limit delays without wasting any.
    let windows_needed = (LIMITED as u64).div_ceil(u64::from(MAX_REQUESTS));
    let last_window = per_window.keys().last().copied();
    assert_eq!(last_window, Some(windows_needed - 1), "{per_window:?}");

    let open_arrivals: Vec<_> = arrivals
        .iter()
        .filter(|a| a.endpoint_id == "ep_open")
        .collect();
    assert_eq!(open_arrivals.len(), OPEN, "unlimited deliveries received");
    for arrival in open_arrivals {
        assert_eq!(
            arrival.clock_ms, start_ms,
            "{} to the unlimited endpoint waited",
            arrival.webhook_id
        );
    }

    assert_eq!(run.rows.len(), LIMITED + OPEN, "one row per delivery");
    for (_, row) in &run.rows {
        assert_eq!(row.outcome, "delivered", "{:?}", row.event_id);
    }
    assert_rows_not_early(&run);
}

#[test]
fn missing_payload_dead_letters_retry() {
    let script = |_: &str, _: &str, attempt: u32| if attempt == 1 { 500 } else { 200 };
    let setup = Setup::start(VIRTUAL_START_MS, Arc::new(script));
    let mut endpoint = setup.endpoint("ep_single");
    endpoint.max_in_flight = 1;
    let retry = RetryPolicy {
        schedule_ms: vec![1_000],
        jitter_percent: 0,
        ..RetryPolicy::default()
    };
    let unreadable = delivery_with_offset("ep_single", "evt_unreadable", b"{\"unreadable\":1}", 1);
    let readable = delivery_with_offset("ep_single", "evt_readable", b"{\"readable\":1}", 2);
    let deliveries = vec![(VIRTUAL_START_MS, unreadable), (VIRTUAL_START_MS, readable)];
    let log = MemoryLog::of(deliveries.iter().map(|(_, delivery)| delivery)).without(3, 1);

    let run = setup.run_with_log(vec![endpoint], retry, deliveries, log);

    let unreadable_rows = run.rows_of("ep_single", "evt_unreadable");
    assert_eq!(unreadable_rows.len(), 2, "{unreadable_rows:#?}");
    let dead = unreadable_rows
        .iter()
        .find(|row| row.outcome == "dead_lettered")
        .expect("a dead-letter row");
    assert_eq!(dead.error_kind.as_deref(), Some("payload_expired"));
    assert_eq!(dead.attempt, 0, "no request was made");
    assert_eq!(dead.started_at_ms, None);
    let failed = &unreadable_rows[1];
    assert_eq!((failed.attempt, failed.outcome.as_str()), (1, "failed"));
    assert_eq!(
        setup
            .receiver
            .arrivals_of("ep_single", "evt_unreadable")
            .len(),
        1
    );

    let readable_rows = run.rows_of("ep_single", "evt_readable");
    let outcomes: Vec<&str> = readable_rows
        .iter()
        .map(|row| row.outcome.as_str())
        .collect();
    assert_eq!(outcomes, ["failed", "delivered"]);
    let readable_arrivals = setup.receiver.arrivals_of("ep_single", "evt_readable");
    assert_eq!(readable_arrivals.len(), 2);
    assert_eq!(readable_arrivals[1].body, b"{\"readable\":1}");
    assert_rows_not_early(&run);
}

/// A retry dead-lettered for a missing payload frees its in-flight place at once, not at the
/// operator's next refresh.
#[test]
fn freed_place_starts_next_retry() {
    let script = |_: &str, _: &str, attempt: u32| if attempt == 1 { 500 } else { 200 };
    let setup = Setup::start(VIRTUAL_START_MS, Arc::new(script));
    let mut endpoint = setup.endpoint("ep_single");
    endpoint.max_in_flight = 1;
    let retry = RetryPolicy {
        schedule_ms: vec![1_000],
        jitter_percent: 0,
        ..RetryPolicy::default()
    };
    let unreadable = delivery_with_offset("ep_single", "evt_unreadable", b"{\"unreadable\":1}", 1);
    let readable = delivery_with_offset("ep_single", "evt_readable", b"{\"readable\":1}", 2);
    let deliveries = vec![(VIRTUAL_START_MS, unreadable), (VIRTUAL_START_MS, readable)];
    let log = MemoryLog::of(deliveries.iter().map(|(_, delivery)| delivery)).without(3, 1);

    let run = setup.run_with_log(vec![endpoint], retry, deliveries, log);

    let readable_rows = run.rows_of("ep_single", "evt_readable");
    assert_eq!(readable_rows.len(), 2, "{readable_rows:#?}");
    // Both retries are due at once; the first is dead-lettered without a request, which
    // frees the endpoint's only in-flight place for the second.
    assert_eq!(
        readable_rows[1].started_at_ms, readable_rows[0].next_attempt_at_ms,
        "the retry of evt_readable did not start when due"
    );
}

/// A small deterministic generator (SplitMix64), so that each seed gives the same case.
struct Generator(u64);

impl Generator {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Returns a value in `low..=high`.
    fn between(&mut self, low: u64, high: u64) -> u64 {
        low + self.next() % (high - low + 1)
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        let index = usize::try_from(self.next() % items.len() as u64).expect("small index");
        &items[index]
    }
}

/// The status of each attempt, by (endpoint id, event id).
type Statuses = HashMap<(String, String), Vec<u16>>;

/// A random workload: endpoints, deliveries, each delivery's statuses and a retry policy.
struct Case {
    endpoints: Vec<Endpoint>,
    deliveries: Vec<(u64, Delivery)>,
    statuses: Statuses,
    retry: RetryPolicy,
    max_in_flight_total: usize,
}

/// One row reduced to what the model predicts: event id, endpoint id, attempt, outcome,
/// due time and next attempt time.
type Expected = (String, String, u32, String, Millis, Option<Millis>);

const ENDPOINT_IDS: [&str; 3] = ["ep_0", "ep_1", "ep_2"];

/// Generates the case of `seed`, with endpoint URLs on `receiver`.
fn generate_case(seed: u64, receiver: &ScriptedReceiver) -> Case {
    let mut random = Generator(seed);

    let steps = random.between(1, 4);
    let schedule_ms = (0..steps)
        .map(|_| {
            if random.next().is_multiple_of(2) {
                random.between(1, 20)
            } else {
                random.between(50, 3_000)
            }
        })
        .collect();
    let retry = RetryPolicy {
        schedule_ms,
        jitter_percent: u8::try_from(random.between(0, 50)).expect("at most 50"),
        max_event_age_ms: 30 * 24 * 3_600_000,
        ..RetryPolicy::default()
    };
    let max_attempts = retry.max_attempts();

    let endpoints = ENDPOINT_IDS
        .iter()
        .map(|id| {
            let mut endpoint = endpoint(id, &receiver.url(id));
            endpoint.max_in_flight = usize::try_from(random.between(1, 3)).expect("small");
            endpoint
        })
        .collect();

    let mut deliveries = Vec::new();
    let mut statuses = HashMap::new();
    let mut event_index = 0u64;
    while deliveries.len() < 20 {
        let event_id = format!("evt_{seed}_{event_index}");
        let payload = format!("{{\"seed\":{seed},\"event\":{event_index}}}");
        let due = VIRTUAL_START_MS + random.between(0, 5_000);
        let first = random.between(0, 2);
        let count = random.between(1, 2);
        for k in 0..count {
            let endpoint_id = ENDPOINT_IDS[usize::try_from((first + k) % 3).expect("small")];
            let delivery =
                delivery_with_offset(endpoint_id, &event_id, payload.as_bytes(), event_index);
            // Fail `failures` times, then succeed; `max_attempts` failures exhaust the schedule.
            let failures = random.between(0, u64::from(max_attempts));
            let mut script: Vec<u16> = (0..failures)
                .map(|_| *random.pick(&[500, 502, 503]))
                .collect();
            script.push(*random.pick(&[200, 201, 204]));
            statuses.insert((endpoint_id.to_string(), event_id.clone()), script);
            deliveries.push((due, delivery));
        }
        event_index += 1;
    }
    deliveries.sort_by_key(|(due, _)| *due);

    Case {
        endpoints,
        deliveries,
        statuses,
        retry,
        max_in_flight_total: usize::try_from(random.between(1, 4)).expect("small"),
    }
}

/// Predicts every attempt row of `case`: each attempt starts when it is due, 2xx delivers,
/// any other status fails and is retried at `RetryPolicy::next_attempt_at` of its start
/// time, and the last attempt the schedule allows is dead-lettered.
fn model(case: &Case) -> Vec<Expected> {
    let mut expected = Vec::new();
    for (first_due, delivery) in &case.deliveries {
        let endpoint_id = delivery.endpoint_id.clone();
        let event_id = delivery.ingested.event.id.clone();
        let script = &case.statuses[&(endpoint_id.clone(), event_id.clone())];
        let mut due = *first_due;
        for attempt in 1.. {
            let status = script[usize::try_from(attempt - 1).expect("small")];
            let row = |outcome: &str, next: Option<Millis>| {
                (
                    event_id.clone(),
                    endpoint_id.clone(),
                    attempt,
                    outcome.to_string(),
                    due,
                    next,
                )
            };
            if (200..300).contains(&status) {
                expected.push(row("delivered", None));
                break;
            }
            let seed = jitter_seed(delivery, attempt);
            match case.retry.next_attempt_at(attempt, due, seed) {
                Some(next) => {
                    expected.push(row("failed", Some(next)));
                    due = next;
                }
                None => {
                    expected.push(row("dead_lettered", None));
                    break;
                }
            }
        }
    }
    expected.sort();
    expected
}

fn reduce(row: &AttemptRow) -> Expected {
    (
        row.event_id.clone().unwrap_or_default(),
        row.endpoint_id.clone().unwrap_or_default(),
        row.attempt,
        row.outcome.clone(),
        row.due_at_ms,
        row.next_attempt_at_ms,
    )
}

#[test]
fn random_cases_match_model() {
    for seed in [1, 2, 3, 4, 5, 6] {
        // The script is known only after the receiver's address is, so it is filled in later.
        let statuses: Arc<std::sync::OnceLock<Statuses>> = Arc::default();
        let served = Arc::clone(&statuses);
        let script = move |endpoint_id: &str, event_id: &str, attempt: u32| {
            let script = served.get().and_then(|statuses| {
                statuses.get(&(endpoint_id.to_string(), event_id.to_string()))
            });
            let index = usize::try_from(attempt).expect("small") - 1;
            // 418 is in no script, so an unscripted request shows up as a mismatch.
            script
                .and_then(|script| script.get(index).copied())
                .unwrap_or(418)
        };
        let setup = Setup::start(VIRTUAL_START_MS, Arc::new(script));
        let case = generate_case(seed, &setup.receiver);
        statuses
            .set(case.statuses.clone())
            .expect("the statuses are set once");

        let clock: Arc<dyn Clock> = Arc::clone(&setup.clock) as Arc<dyn Clock>;
        let mut context = deliver_context(&setup.runtime, case.endpoints.clone(), clock);
        context.health = schedule_only();
        context.retry = case.retry.clone();
        context.max_in_flight_total = case.max_in_flight_total;
        let log = MemoryLog::of(case.deliveries.iter().map(|(_, delivery)| delivery));
        let run = run_on_virtual_clock(
            Arc::clone(&setup.clock),
            context,
            case.deliveries.clone(),
            log,
        );

        let expected = model(&case);
        let mut actual: Vec<Expected> = run.rows.iter().map(|(_, row)| reduce(row)).collect();
        actual.sort();
        assert_eq!(
            actual, expected,
            "seed {seed}: the rows differ from the model (policy {:?})",
            case.retry
        );
        for (_, row) in &run.rows {
            assert_eq!(
                row.started_at_ms,
                Some(row.due_at_ms),
                "seed {seed}: attempt {} of {:?} to {:?} did not start when due",
                row.attempt,
                row.event_id,
                row.endpoint_id
            );
        }
        assert_eq!(
            setup.receiver.arrivals().len(),
            expected.len(),
            "seed {seed}: requests received"
        );
        assert_rows_not_early(&run);
    }
}
