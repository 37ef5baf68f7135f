//! Endpoint alerts: the failure ratio of each endpoint over a sliding window, computed
//! incrementally with differential dataflow, and the transitions an operator must hear of.
//!
//! In: [`EndpointSignal`]s, stamped with the dataflow time they were made at: one per HTTP
//! attempt (failed or not), one per breaker opening and one per endpoint disabled. Out:
//! [`EndpointAlert`]s, each at the time of its transition.
//!
//! Each attempt enters a differential collection keyed by (endpoint id, tenant) twice: at its
//! finished time with the difference `(1, failed)` and at finished time + `window_ms` with
//! `(-1, -failed)`. The difference is a pair (attempts, failures), so one `count` per key
//! contains both numbers of the window ending at every time, and changes only where an
//! attempt enters or leaves the window. The retraction takes effect once the dataflow's frontier
//! passes it, which the pipeline's inputs move forward with the clock.
//!
//! The counts are exchanged by [`endpoint_hash`], so the worker that owns an endpoint's
//! deliveries also owns its alert state: whether the endpoint is failing, and since when.
//! State per endpoint: one [`EndpointStatus`] and the time of its last breaker alert, kept
//! for the life of the run.
//!
//! # Contract
//!
//! * An endpoint becomes failing when its window holds at least `min_attempts` attempts and
//!   at least `failing_percent` of them failed. It recovers when, failing, its window holds
//!   at least one attempt and fewer than `recovered_percent` of them failed. Between the two
//!   thresholds it keeps its state, so a ratio near one threshold does not flap.
//! * An empty window (no attempts, for example while the breaker is open or the endpoint
//!   is disabled) keeps the state: no attempt is no evidence of recovery.
//! * A breaker opening yields at most one alert per endpoint per `window_ms`; a disabling
//!   yields one alert.
//! * Times the frontier passes are assessed in time order. When the input ends, times after
//!   the clock's "now" are dropped: they are retractions of a window that never came to pass.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use differential_dataflow::AsCollection;
use hookflow_schemas::Millis;
use serde::{Deserialize, Serialize};
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::{Exchange, Pipeline};
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::{Capability, Concat, OkErr};
use timely::dataflow::Stream;

use crate::clock::Clock;
use crate::deliver::endpoint_hash;

/// The thresholds of the failure ratio, and its window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AlertPolicy {
    /// Length of the sliding window, in ms. At least 1.
    pub window_ms: u64,
    /// Attempts the window must hold before the endpoint can become failing. At least 1.
    pub min_attempts: u64,
    /// Percentage of failed attempts, 1 to 100, at or above which the endpoint is failing.
    pub failing_percent: u8,
    /// Percentage of failed attempts, 1 to `failing_percent`, below which a failing endpoint
    /// has recovered.
    pub recovered_percent: u8,
}

impl Default for AlertPolicy {
    fn default() -> Self {
        AlertPolicy {
            window_ms: 300_000,
            min_attempts: 10,
            failing_percent: 50,
            recovered_percent: 10,
        }
    }
}

/// An input of the alerts: something that happened to an endpoint.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum EndpointSignal {
    /// One HTTP attempt finished.
    Attempt {
        /// The endpoint's id.
        endpoint_id: String,
        /// The endpoint's tenant.
        tenant: String,
        /// The attempt did not deliver.
        failed: bool,
        /// When the attempt finished, in ms.
        finished_at_ms: Millis,
    },
    /// The endpoint's circuit breaker opened.
    BreakerOpened {
        /// The endpoint's id.
        endpoint_id: String,
        /// The endpoint's tenant.
        tenant: String,
        /// When it opened, in ms.
        at_ms: Millis,
        /// When its probe may start, in ms.
        until_ms: Millis,
        /// Failed attempts in the breaker window that opened it.
        failures: u32,
        /// Attempts in that window.
        attempts: u32,
    },
    /// The endpoint was disabled; its deliveries are parked.
    Disabled {
        /// The endpoint's id.
        endpoint_id: String,
        /// The endpoint's tenant.
        tenant: String,
        /// When it was disabled, in ms.
        at_ms: Millis,
        /// The rule that disabled it.
        reason: String,
    },
}

impl EndpointSignal {
    /// Returns the id of the endpoint the signal is about.
    pub fn endpoint_id(&self) -> &str {
        match self {
            EndpointSignal::Attempt { endpoint_id, .. }
            | EndpointSignal::BreakerOpened { endpoint_id, .. }
            | EndpointSignal::Disabled { endpoint_id, .. } => endpoint_id,
        }
    }
}

/// The transitions that make an alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum AlertKind {
    /// The failure ratio crossed `failing_percent`.
    Failing,
    /// The failure ratio fell below `recovered_percent`.
    Recovered,
    /// The circuit breaker opened.
    BreakerOpened,
    /// The endpoint was disabled.
    Disabled,
}

impl AlertKind {
    /// Returns the event type of the operational event.
    pub fn event_type(self) -> &'static str {
        match self {
            AlertKind::Failing => "endpoint.failing",
            AlertKind::Recovered => "endpoint.recovered",
            AlertKind::BreakerOpened => "endpoint.breaker_opened",
            AlertKind::Disabled => "endpoint.disabled",
        }
    }
}

/// One transition of one endpoint.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct EndpointAlert {
    /// The transition.
    pub kind: AlertKind,
    /// The endpoint's id.
    pub endpoint_id: String,
    /// The endpoint's tenant.
    pub tenant: String,
    /// When the transition happened, in ms.
    pub at_ms: Millis,
    /// Attempts in the window ending at `at_ms` (for a breaker, in the breaker's window).
    pub attempts: u64,
    /// Failed attempts among `attempts`.
    pub failures: u64,
    /// The window's length, in ms.
    pub window_ms: u64,
    /// When the endpoint began failing: `at_ms` for `Failing`, the earlier transition for
    /// `Recovered`.
    pub since_ms: Millis,
    /// The rule that disabled the endpoint, or the wait before its breaker's probe.
    pub reason: Option<String>,
}

impl EndpointAlert {
    /// Returns the start of the `window_ms`-long bucket that contains `at_ms`. Two alerts of
    /// one kind and endpoint in one bucket share it, which gives the operational event a
    /// stable id.
    pub fn bucket_start_ms(&self) -> Millis {
        let window = self.window_ms.max(1);
        self.at_ms - self.at_ms % window
    }

    /// Returns the percentage of failed attempts, or 0 without attempts.
    pub fn failure_percent(&self) -> f64 {
        if self.attempts == 0 {
            return 0.0;
        }
        // Counts stay far below 2^52, so the conversion is exact.
        self.failures as f64 * 100.0 / self.attempts as f64
    }
}

/// Whether an endpoint is failing, as the alerts judge it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum EndpointStatus {
    /// Not failing (the start state).
    #[default]
    Healthy,
    /// Failing since the time given, in ms.
    Failing {
        /// When the endpoint became failing.
        since_ms: Millis,
    },
}

/// Returns the endpoint's status after its window came to hold `attempts` attempts of which
/// `failures` failed, at `now_ms`, given its status before.
pub fn assess(
    policy: &AlertPolicy,
    status: EndpointStatus,
    attempts: u64,
    failures: u64,
    now_ms: Millis,
) -> EndpointStatus {
    // Compared as integers: failures / attempts >= percent / 100.
    let at_least =
        |percent: u8| u128::from(failures) * 100 >= u128::from(attempts) * u128::from(percent);
    match status {
        EndpointStatus::Healthy
            if attempts >= policy.min_attempts.max(1) && at_least(policy.failing_percent) =>
        {
            EndpointStatus::Failing { since_ms: now_ms }
        }
        EndpointStatus::Failing { .. } if attempts > 0 && !at_least(policy.recovered_percent) => {
            EndpointStatus::Healthy
        }
        unchanged => unchanged,
    }
}

/// An endpoint's key in the window: (endpoint id, tenant).
type EndpointKey = (String, String);

/// One update of the window collection: the key, its time, and (attempts, failures).
type WindowUpdate = (EndpointKey, u64, (i64, i64));

/// The window counts of one key at one time: (key, (attempts, failures)).
type WindowCount = (EndpointKey, (i64, i64));

/// Count changes waiting for the frontier, by time, with a capability at that time.
type CountStash = BTreeMap<u64, (Capability<u64>, Vec<(WindowCount, isize)>)>;

/// Turns endpoint signals into alerts.
pub trait EndpointAlerts<'scope> {
    /// Computes each endpoint's failure ratio over `policy.window_ms` and returns the
    /// transitions described in the module documentation. `clock` is read only when the
    /// input ends.
    fn endpoint_alerts(
        self,
        policy: AlertPolicy,
        clock: Arc<dyn Clock>,
    ) -> Stream<'scope, u64, Vec<EndpointAlert>>;
}

impl<'scope> EndpointAlerts<'scope> for Stream<'scope, u64, Vec<EndpointSignal>> {
    fn endpoint_alerts(
        self,
        policy: AlertPolicy,
        clock: Arc<dyn Clock>,
    ) -> Stream<'scope, u64, Vec<EndpointAlert>> {
        let (attempts, events) = self.ok_err(|signal| match signal {
            EndpointSignal::Attempt { .. } => Ok(signal),
            other => Err(other),
        });
        let counts = window_updates(attempts, policy.window_ms)
            .as_collection()
            .count()
            .inner;
        let ratio_alerts = ratio_transitions(counts, policy, clock);
        let event_alerts = event_transitions(events, policy.window_ms);
        ratio_alerts.concat(event_alerts)
    }
}

/// Turns each attempt into its insertion into the window and its retraction from it.
fn window_updates<'scope>(
    attempts: Stream<'scope, u64, Vec<EndpointSignal>>,
    window_ms: u64,
) -> Stream<'scope, u64, Vec<WindowUpdate>> {
    let window_ms = window_ms.max(1);
    attempts.unary(Pipeline, "AlertWindow", move |_capability, _info| {
        move |input, output| {
            input.for_each_stamp(|capability, containers| {
                let time = capability.least().copied().unwrap_or_default();
                let mut session = output.session(&capability);
                for signal in containers.flat_map(|container| container.drain(..)) {
                    let EndpointSignal::Attempt {
                        endpoint_id,
                        tenant,
                        failed,
                        finished_at_ms,
                    } = signal
                    else {
                        continue;
                    };
                    // Differential accepts an update at any time at or after its stamp.
                    let entered = finished_at_ms.max(time);
                    let failed = i64::from(failed);
                    let key = (endpoint_id, tenant);
                    session.give((key.clone(), entered, (1, failed)));
                    session.give((key, entered.saturating_add(window_ms), (-1, -failed)));
                }
            });
        }
    })
}

/// Replays the counts of each endpoint in time order through [`assess`], on the endpoint's
/// worker, and emits the status changes.
fn ratio_transitions<'scope>(
    counts: Stream<'scope, u64, Vec<(WindowCount, u64, isize)>>,
    policy: AlertPolicy,
    clock: Arc<dyn Clock>,
) -> Stream<'scope, u64, Vec<EndpointAlert>> {
    let exchange =
        Exchange::new(|update: &(WindowCount, u64, isize)| endpoint_hash(&(update.0).0 .0));
    counts.unary_frontier::<CapacityContainerBuilder<Vec<EndpointAlert>>, _, _, _>(
        exchange,
        "AlertRatio",
        move |_capability, _info| {
            // Count changes not yet assessed, by their time, with a capability at that time.
            let mut stash: CountStash = BTreeMap::new();
            // Each endpoint's status, kept by the worker that owns the endpoint.
            let mut statuses: HashMap<String, EndpointStatus> = HashMap::new();

            move |(input, frontier), output| {
                input.for_each_stamp(|capability, containers| {
                    for (data, time, diff) in containers.flat_map(|container| container.drain(..)) {
                        let (_, changes) = stash.entry(time).or_insert_with(|| {
                            (capability.delayed(&time, output.output_index()), Vec::new())
                        });
                        changes.push((data, diff));
                    }
                });

                let ended = frontier.is_empty();
                let now = if ended { clock.now_ms() } else { Millis::MAX };
                while let Some(entry) = stash.first_entry() {
                    let time = *entry.key();
                    if frontier.less_equal(&time) {
                        break;
                    }
                    let (capability, changes) = entry.remove();
                    if ended && time > now {
                        stash.clear();
                        break;
                    }
                    let mut session = output.session(&capability);
                    for (key, attempts, failures) in counts_at(changes) {
                        let before = statuses.get(&key.0).copied().unwrap_or_default();
                        let after = assess(&policy, before, attempts, failures, time);
                        if after == before {
                            continue;
                        }
                        let (kind, since_ms) = match (before, after) {
                            (_, EndpointStatus::Failing { since_ms }) => {
                                (AlertKind::Failing, since_ms)
                            }
                            (EndpointStatus::Failing { since_ms }, _) => {
                                (AlertKind::Recovered, since_ms)
                            }
                            _ => continue,
                        };
                        statuses.insert(key.0.clone(), after);
                        session.give(EndpointAlert {
                            kind,
                            endpoint_id: key.0,
                            tenant: key.1,
                            at_ms: time,
                            attempts,
                            failures,
                            window_ms: policy.window_ms,
                            since_ms,
                            reason: None,
                        });
                    }
                }
            }
        },
    )
}

/// Returns, for every key changed at one time, its counts after the change: the value that
/// the change inserted, or zeros when it only retracted one (the window became empty).
fn counts_at(changes: Vec<(WindowCount, isize)>) -> Vec<((String, String), u64, u64)> {
    let mut latest: BTreeMap<(String, String), (i64, i64)> = BTreeMap::new();
    for ((key, counts), diff) in changes {
        if diff > 0 {
            latest.insert(key, counts);
        } else {
            latest.entry(key).or_insert((0, 0));
        }
    }
    latest
        .into_iter()
        .map(|(key, (attempts, failures))| {
            let attempts = u64::try_from(attempts).unwrap_or(0);
            let failures = u64::try_from(failures).unwrap_or(0);
            (key, attempts, failures)
        })
        .collect()
}

/// Turns breaker openings and disablings into alerts on the endpoint's worker, keeping at
/// most one breaker alert per endpoint per `window_ms`.
fn event_transitions<'scope>(
    events: Stream<'scope, u64, Vec<EndpointSignal>>,
    window_ms: u64,
) -> Stream<'scope, u64, Vec<EndpointAlert>> {
    let exchange = Exchange::new(|signal: &EndpointSignal| endpoint_hash(signal.endpoint_id()));
    events.unary(exchange, "AlertEvents", move |_capability, _info| {
        // When each endpoint's breaker was last alerted on, in ms.
        let mut breaker_alerted: HashMap<String, Millis> = HashMap::new();
        move |input, output| {
            input.for_each_stamp(|capability, containers| {
                let mut session = output.session(&capability);
                for signal in containers.flat_map(|container| container.drain(..)) {
                    match signal {
                        EndpointSignal::BreakerOpened {
                            endpoint_id,
                            tenant,
                            at_ms,
                            until_ms,
                            failures,
                            attempts,
                        } => {
                            let quiet = breaker_alerted
                                .get(&endpoint_id)
                                .is_some_and(|last| at_ms < last.saturating_add(window_ms));
                            if quiet {
                                continue;
                            }
                            breaker_alerted.insert(endpoint_id.clone(), at_ms);
                            session.give(EndpointAlert {
                                kind: AlertKind::BreakerOpened,
                                endpoint_id,
                                tenant,
                                at_ms,
                                attempts: u64::from(attempts),
                                failures: u64::from(failures),
                                window_ms,
                                since_ms: at_ms,
                                reason: Some(format!(
                                    "circuit breaker open; probe in {} ms",
                                    until_ms.saturating_sub(at_ms)
                                )),
                            });
                        }
                        EndpointSignal::Disabled {
                            endpoint_id,
                            tenant,
                            at_ms,
                            reason,
                        } => session.give(EndpointAlert {
                            kind: AlertKind::Disabled,
                            endpoint_id,
                            tenant,
                            at_ms,
                            attempts: 0,
                            failures: 0,
                            window_ms,
                            since_ms: at_ms,
                            reason: Some(reason),
                        }),
                        EndpointSignal::Attempt { .. } => {}
                    }
                }
            });
        }
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use timely::dataflow::operators::{Input, Inspect, Probe};

    use super::*;
    use crate::clock::VirtualClock;

    const POLICY: AlertPolicy = AlertPolicy {
        window_ms: 1_000,
        min_attempts: 4,
        failing_percent: 50,
        recovered_percent: 20,
    };

    #[test]
    fn assess_table() {
        let failing = EndpointStatus::Failing { since_ms: 5 };
        let healthy = EndpointStatus::Healthy;
        // (status before, attempts, failures, status after)
        let cases = [
            (healthy, 0, 0, healthy),
            (healthy, 3, 3, healthy),
            (healthy, 4, 1, healthy),
            (healthy, 4, 2, EndpointStatus::Failing { since_ms: 9 }),
            (healthy, 10, 10, EndpointStatus::Failing { since_ms: 9 }),
            (failing, 0, 0, failing),
            (failing, 10, 3, failing),
            (failing, 10, 2, failing),
            (failing, 10, 1, healthy),
            (failing, 1, 0, healthy),
            (failing, 1, 1, failing),
        ];
        for (before, attempts, failures, expected) in cases {
            assert_eq!(
                assess(&POLICY, before, attempts, failures, 9),
                expected,
                "{before:?} with {failures} of {attempts} failed"
            );
        }
    }

    fn attempt(endpoint_id: &str, failed: bool, at_ms: Millis) -> EndpointSignal {
        EndpointSignal::Attempt {
            endpoint_id: endpoint_id.to_string(),
            tenant: "acme".to_string(),
            failed,
            finished_at_ms: at_ms,
        }
    }

    /// Feeds `(time, signal)` in time order into a one-worker dataflow, advancing its input
    /// to each time and finally to `end_ms`, and returns the alerts.
    fn run(signals: Vec<(u64, EndpointSignal)>, end_ms: u64) -> Vec<EndpointAlert> {
        let alerts = Arc::new(Mutex::new(Vec::new()));
        let seen = alerts.clone();
        let clock = Arc::new(VirtualClock::new(end_ms));
        timely::execute_directly(move |worker| {
            let (mut input, probe) = worker.dataflow::<u64, _, _>(|scope| {
                let (input, stream) = scope.new_input::<Vec<EndpointSignal>>();
                let (probe, _) = stream
                    .endpoint_alerts(POLICY, clock)
                    .inspect(move |alert| seen.lock().expect("alerts lock").push(alert.clone()))
                    .probe();
                (input, probe)
            });
            for (time, signal) in signals {
                input.advance_to(time);
                input.send(signal);
            }
            input.advance_to(end_ms);
            while probe.less_than(&end_ms) {
                worker.step();
            }
        });
        let mut alerts = alerts.lock().expect("alerts lock").clone();
        alerts.sort_by_key(|alert| (alert.at_ms, alert.kind));
        alerts
    }

    #[test]
    fn failing_then_recovered_in_sliding_window() {
        let mut signals = Vec::new();
        // Four failures: failing at the fourth (4 of 4).
        for at in [100, 200, 300, 400] {
            signals.push((at, attempt("ep", true, at)));
        }
        // Three successes: 4 of 7 failed, still failing.
        for at in [700, 800, 900] {
            signals.push((at, attempt("ep", false, at)));
        }
        let alerts = run(signals, 5_000);

        let kinds: Vec<(AlertKind, u64)> = alerts.iter().map(|a| (a.kind, a.at_ms)).collect();
        // The failures leave the window at 1100 to 1400: 3 of 6, 2 of 5, 1 of 4 (25 %, not
        // below 20 %), then 0 of 3 at 1400.
        assert_eq!(
            kinds,
            [(AlertKind::Failing, 400), (AlertKind::Recovered, 1_400)]
        );
        let failing = &alerts[0];
        assert_eq!((failing.attempts, failing.failures), (4, 4));
        assert_eq!(failing.tenant, "acme");
        assert_eq!(failing.since_ms, 400);
        let recovered = &alerts[1];
        assert_eq!((recovered.attempts, recovered.failures), (3, 0));
        assert_eq!(
            recovered.since_ms, 400,
            "recovered names when failing began"
        );
    }

    #[test]
    fn hysteresis_keeps_state_between_thresholds() {
        let mut signals = Vec::new();
        for at in [100, 110, 120, 130] {
            signals.push((at, attempt("ep", true, at)));
        }
        // 4 of 12 failed (33 %), between the thresholds: still failing.
        for at in (200..=270).step_by(10) {
            signals.push((at, attempt("ep", false, at)));
        }
        // Up to 1115 the failures leaving the window give 3 of 11 and 2 of 10: exactly 20 %
        // is not below the recovery threshold.
        let alerts = run(signals, 1_115);
        let kinds: Vec<AlertKind> = alerts.iter().map(|a| a.kind).collect();
        assert_eq!(kinds, [AlertKind::Failing], "no flap between thresholds");
    }

    #[test]
    fn empty_window_does_not_recover() {
        let signals = [100, 200, 300, 400]
            .into_iter()
            .map(|at| (at, attempt("ep", true, at)))
            .collect();
        let alerts = run(signals, 10_000);
        let kinds: Vec<AlertKind> = alerts.iter().map(|a| a.kind).collect();
        assert_eq!(kinds, [AlertKind::Failing]);
    }

    #[test]
    fn too_few_attempts_never_fail() {
        let signals = [100, 200, 300]
            .into_iter()
            .map(|at| (at, attempt("ep", true, at)))
            .chain([(1_500, attempt("ep", true, 1_500))])
            .collect();
        // Three failures, then one more after the first three left the window: never four
        // in one window.
        assert!(run(signals, 5_000).is_empty());
    }

    #[test]
    fn endpoints_are_counted_apart() {
        let mut signals = Vec::new();
        for at in [100, 200, 300, 400] {
            signals.push((at, attempt("bad", true, at)));
            signals.push((at, attempt("good", false, at)));
        }
        let alerts = run(signals, 900);
        assert_eq!(alerts.len(), 1);
        assert_eq!(alerts[0].endpoint_id, "bad");
        assert_eq!(alerts[0].kind, AlertKind::Failing);
    }

    #[test]
    fn breaker_alerts_once_per_window() {
        let opened = |at_ms| EndpointSignal::BreakerOpened {
            endpoint_id: "ep".to_string(),
            tenant: "acme".to_string(),
            at_ms,
            until_ms: at_ms + 50,
            failures: 5,
            attempts: 6,
        };
        let disabled = EndpointSignal::Disabled {
            endpoint_id: "ep".to_string(),
            tenant: "acme".to_string(),
            at_ms: 2_500,
            reason: "410 Gone".to_string(),
        };
        let signals = vec![
            (100, opened(100)),
            (600, opened(600)),
            (1_100, opened(1_100)),
            (2_500, disabled),
        ];
        let alerts = run(signals, 3_000);
        let kinds: Vec<(AlertKind, u64)> = alerts.iter().map(|a| (a.kind, a.at_ms)).collect();
        assert_eq!(
            kinds,
            [
                (AlertKind::BreakerOpened, 100),
                (AlertKind::BreakerOpened, 1_100),
                (AlertKind::Disabled, 2_500)
            ]
        );
        assert_eq!(alerts[2].reason.as_deref(), Some("410 Gone"));
        assert_eq!((alerts[0].attempts, alerts[0].failures), (6, 5));
    }

    #[test]
    fn retractions_after_now_are_dropped_at_end() {
        let mut signals: Vec<(u64, EndpointSignal)> = [100, 200, 300, 400]
            .into_iter()
            .map(|at| (at, attempt("ep", true, at)))
            .collect();
        signals.push((900, attempt("ep", false, 900)));
        // The input ends at 1000 while the clock reads 1000: the failures would leave the
        // window at 1100..1400 and recover the endpoint, but that time never came.
        let alerts = run_closed(signals, 1_000);
        let kinds: Vec<AlertKind> = alerts.iter().map(|a| a.kind).collect();
        assert_eq!(kinds, [AlertKind::Failing]);
    }

    /// Computes the transitions of the same attempts the plain way: at every time an attempt
    /// enters or leaves a window, count that endpoint's window from scratch and assess it.
    fn model(
        attempts: &[(String, bool, u64)],
        end_ms: u64,
    ) -> Vec<(AlertKind, String, u64, u64, u64)> {
        let mut endpoints: Vec<&String> = attempts.iter().map(|(id, _, _)| id).collect();
        endpoints.sort();
        endpoints.dedup();
        let mut transitions = Vec::new();
        for endpoint_id in endpoints {
            let own: Vec<(bool, u64)> = attempts
                .iter()
                .filter(|(id, _, _)| id == endpoint_id)
                .map(|(_, failed, at)| (*failed, *at))
                .collect();
            let mut times: Vec<u64> = own
                .iter()
                .flat_map(|(_, at)| [*at, at + POLICY.window_ms])
                .filter(|time| *time <= end_ms)
                .collect();
            times.sort_unstable();
            times.dedup();
            let mut status = EndpointStatus::Healthy;
            for time in times {
                let inside = own
                    .iter()
                    .filter(|(_, at)| *at <= time && time < at + POLICY.window_ms);
                let (count, failed) = inside.fold((0, 0), |(count, failed), (is_failed, _)| {
                    (count + 1, failed + u64::from(*is_failed))
                });
                let after = assess(&POLICY, status, count, failed, time);
                if after != status {
                    let kind = match after {
                        EndpointStatus::Failing { .. } => AlertKind::Failing,
                        EndpointStatus::Healthy => AlertKind::Recovered,
                    };
                    transitions.push((kind, endpoint_id.clone(), time, count, failed));
                    status = after;
                }
            }
        }
        transitions.sort_by_key(|(kind, id, time, _, _)| (*time, id.clone(), *kind));
        transitions
    }

    #[test]
    fn window_matches_model_on_random_input() {
        for seed in 1..=20u64 {
            // A 64-bit linear congruential generator: enough to vary the input per seed.
            let mut state = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            let mut next = move |bound: u64| {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                (state >> 33) % bound
            };
            let mut attempts: Vec<(String, bool, u64)> = Vec::new();
            let mut at = 0;
            for _ in 0..120 {
                at += next(80);
                let endpoint_id = format!("ep{}", next(3));
                // Each endpoint fails in phases, so it crosses both thresholds.
                let failing_phase = (at / 1_500) % 2 == 0;
                let failed = next(100) < if failing_phase { 80 } else { 5 };
                attempts.push((endpoint_id, failed, at));
            }
            let end_ms = at + 3 * POLICY.window_ms;
            let signals = attempts
                .iter()
                .map(|(id, failed, at)| (*at, attempt(id, *failed, *at)))
                .collect();

            let mut actual: Vec<(AlertKind, String, u64, u64, u64)> = run(signals, end_ms)
                .into_iter()
                .map(|alert| {
                    (
                        alert.kind,
                        alert.endpoint_id,
                        alert.at_ms,
                        alert.attempts,
                        alert.failures,
                    )
                })
                .collect();
            actual.sort_by_key(|(kind, id, time, _, _)| (*time, id.clone(), *kind));
            let expected = model(&attempts, end_ms);
            assert!(!expected.is_empty(), "seed {seed} crosses no threshold");
            assert_eq!(actual, expected, "seed {seed}");
        }
    }

    /// Like [`run`], but closes the input at `now_ms` instead of advancing it.
    fn run_closed(signals: Vec<(u64, EndpointSignal)>, now_ms: u64) -> Vec<EndpointAlert> {
        let alerts = Arc::new(Mutex::new(Vec::new()));
        let seen = alerts.clone();
        let clock = Arc::new(VirtualClock::new(now_ms));
        timely::execute_directly(move |worker| {
            let mut input = worker.dataflow::<u64, _, _>(|scope| {
                let (input, stream) = scope.new_input::<Vec<EndpointSignal>>();
                stream
                    .endpoint_alerts(POLICY, clock)
                    .inspect(move |alert| seen.lock().expect("alerts lock").push(alert.clone()));
                input
            });
            for (time, signal) in signals {
                input.advance_to(time);
                input.send(signal);
            }
            drop(input);
            while worker.step() {}
        });
        let alerts = alerts.lock().expect("alerts lock").clone();
        alerts
    }
}
