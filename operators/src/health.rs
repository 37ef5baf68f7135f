//! Endpoint health: the circuit breaker, the `Retry-After` pause, the overload budget and the
//! failing-too-long rule of one endpoint.
//!
//! In: the signal of each finished attempt ([`Signal`]), a valid `Retry-After`, and "now". Out:
//! whether the endpoint may start a request now ([`Admission`]), how many times its budget
//! is halved, and the transitions an operator must hear of ([`Transition`]). State: the
//! breaker, the attempts counted in the current breaker window, the pause, the halvings in
//! force and when the endpoint began failing without a success since.
//!
//! Everything here is pure and takes "now" from its caller, so a virtual clock drives it in
//! tests. The deliver operator keeps one [`EndpointHealth`] per endpoint it owns.
//!
//! # Rules
//!
//! * **Breaker.** Attempts are counted in fixed windows of `breaker_window_ms`. When a window
//!   holds at least `breaker_min_requests` attempts and `breaker_failure_percent` of them
//!   failed, the breaker opens for `breaker_cooldown_ms`. After the cooldown one probe may
//!   start: its success closes the breaker, its failure opens it again for twice the last
//!   cooldown, up to `breaker_max_cooldown_ms`.
//! * **Pause.** A valid `Retry-After` pauses the whole endpoint until the time it names,
//!   already clamped by the caller.
//! * **Overload.** A 429 or a timeout without a valid `Retry-After` halves the endpoint's
//!   budget once more (see [`EndpointHealth::budget_shift`]). Each run of successes as long as
//!   the budget in force restores one halving.
//! * **Disable.** An endpoint that answers 410 Gone, or whose attempts have failed without a
//!   success for `disable_after_ms`, is disabled.
//! * 429 answers count neither as failures nor as successes for the breaker and the disable
//!   rule: the receiver is up and asks to slow down, which the pause and the halved budget do.
//!   Attempts that never reached the endpoint (a refused address) count for nothing.

use hookflow_schemas::Millis;

/// Halvings beyond this no longer change a budget of any practical size.
const MAX_BUDGET_SHIFT: u32 = 16;

/// The health rules of every endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthPolicy {
    /// Length of the fixed windows the breaker counts attempts in, in ms. Default 60 s.
    pub breaker_window_ms: u64,
    /// Attempts a window must hold before its failures can open the breaker. Default 10.
    pub breaker_min_requests: u32,
    /// Percentage of failed attempts in a window that opens the breaker. Default 50.
    pub breaker_failure_percent: u8,
    /// How long the breaker stays open before the first probe, in ms. Default 30 s.
    pub breaker_cooldown_ms: u64,
    /// The maximum cooldown, however many probes failed, in ms. Default 10 min.
    pub breaker_max_cooldown_ms: u64,
    /// An endpoint failing without a success for this long is disabled, in ms. Default 5 days.
    pub disable_after_ms: u64,
    /// The minimum pause a `Retry-After` causes, in ms. Shorter values are raised to it.
    /// Default 1 s.
    pub retry_after_min_ms: u64,
    /// The maximum pause a `Retry-After` causes, in ms. Longer values are capped. Default 1 h.
    pub retry_after_max_ms: u64,
}

impl Default for HealthPolicy {
    fn default() -> Self {
        HealthPolicy {
            breaker_window_ms: 60_000,
            breaker_min_requests: 10,
            breaker_failure_percent: 50,
            breaker_cooldown_ms: 30_000,
            breaker_max_cooldown_ms: 600_000,
            disable_after_ms: 5 * 24 * 3_600_000,
            retry_after_min_ms: 1_000,
            retry_after_max_ms: 3_600_000,
        }
    }
}

/// The signal a finished attempt gives about its endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// A 2xx response.
    Delivered,
    /// A failure that counts against the endpoint: 5xx, other 4xx, a redirect, a timeout, a
    /// connection that failed or broke.
    Failed,
    /// A 429 response.
    Throttled,
    /// A 410 response: the receiver requests that nothing more be sent to it.
    Gone,
    /// The request never reached the endpoint (refused address, unusable request).
    NotContacted,
}

/// Whether an endpoint may start a request now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Start it.
    Start,
    /// Start it as the breaker's probe: the only request until its result is known.
    Probe,
    /// Start nothing before this time (a pause, or an open breaker's cooldown).
    HoldUntil(Millis),
    /// Start nothing until the probe in flight has finished.
    AwaitProbe,
}

/// A change of an endpoint's state that the operator logs, counts and acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    /// The breaker opened (or opened again after a failed probe) until `until_ms`.
    BreakerOpened {
        /// When the next probe may start.
        until_ms: Millis,
        /// Failed attempts in the window that opened it (1 for a failed probe).
        failures: u32,
        /// Attempts in that window.
        attempts: u32,
    },
    /// A probe succeeded and the breaker closed.
    BreakerClosed,
    /// The endpoint must be disabled, for the reason given.
    Disable {
        /// For the operator: which rule disabled it.
        reason: String,
    },
}

/// The state of a circuit breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Breaker {
    Closed,
    Open { until_ms: Millis, cooldown_ms: u64 },
    HalfOpen { cooldown_ms: u64, probing: bool },
}

/// The health of one endpoint. See the module documentation for the rules.
#[derive(Debug, Clone)]
pub struct EndpointHealth {
    breaker: Breaker,
    window_start_ms: Millis,
    attempts: u32,
    failures: u32,
    paused_until_ms: Millis,
    budget_shift: u32,
    successes_since_shift: u32,
    failing_since_ms: Option<Millis>,
}

impl Default for EndpointHealth {
    fn default() -> Self {
        EndpointHealth {
            breaker: Breaker::Closed,
            window_start_ms: 0,
            attempts: 0,
            failures: 0,
            paused_until_ms: 0,
            budget_shift: 0,
            successes_since_shift: 0,
            failing_since_ms: None,
        }
    }
}

impl EndpointHealth {
    /// Decides whether the endpoint may start a request at `now_ms`. Granting a
    /// [`Admission::Probe`] marks the probe as in flight.
    pub fn admit(&mut self, now_ms: Millis) -> Admission {
        if self.paused_until_ms > now_ms {
            return Admission::HoldUntil(self.paused_until_ms);
        }
        match self.breaker {
            Breaker::Closed => Admission::Start,
            Breaker::Open { until_ms, .. } if now_ms < until_ms => Admission::HoldUntil(until_ms),
            Breaker::Open { cooldown_ms, .. } => {
                self.breaker = Breaker::HalfOpen {
                    cooldown_ms,
                    probing: true,
                };
                Admission::Probe
            }
            Breaker::HalfOpen { probing: true, .. } => Admission::AwaitProbe,
            Breaker::HalfOpen { cooldown_ms, .. } => {
                self.breaker = Breaker::HalfOpen {
                    cooldown_ms,
                    probing: true,
                };
                Admission::Probe
            }
        }
    }

    /// Returns whether a probe is in flight, before whose result nothing else starts.
    pub fn awaiting_probe(&self) -> bool {
        matches!(self.breaker, Breaker::HalfOpen { probing: true, .. })
    }

    /// Returns the time before which the endpoint starts nothing, if that is after `now_ms`.
    pub fn held_until(&self, now_ms: Millis) -> Option<Millis> {
        let breaker_until = match self.breaker {
            Breaker::Open { until_ms, .. } => until_ms,
            _ => 0,
        };
        let until = self.paused_until_ms.max(breaker_until);
        (until > now_ms).then_some(until)
    }

    /// Pauses the endpoint until `until_ms`, as a valid `Retry-After` asked. A pause never
    /// shortens one already in force.
    pub fn pause_until(&mut self, until_ms: Millis) {
        self.paused_until_ms = self.paused_until_ms.max(until_ms);
    }

    /// Halves the endpoint's budget once more, after a 429 or a timeout without a valid
    /// `Retry-After`.
    pub fn overloaded(&mut self) {
        self.budget_shift = (self.budget_shift + 1).min(MAX_BUDGET_SHIFT);
        self.successes_since_shift = 0;
    }

    /// Returns how many times the endpoint's budget is halved. Its rate limit then allows
    /// `max(1, max_requests >> shift)` per window, or, without a rate limit, its in-flight cap
    /// is `max(1, max_in_flight >> shift)`.
    pub fn budget_shift(&self) -> u32 {
        self.budget_shift
    }

    /// Records the signal of an attempt that finished at `now_ms`. `budget` is the endpoint's
    /// budget in force (requests per window, or in flight): that many successes in a row
    /// restore one halving. Returns the transition it caused, if any.
    pub fn record(
        &mut self,
        signal: Signal,
        now_ms: Millis,
        budget: u32,
        policy: &HealthPolicy,
    ) -> Option<Transition> {
        match signal {
            Signal::NotContacted | Signal::Throttled => {
                if let Breaker::HalfOpen { cooldown_ms, .. } = self.breaker {
                    // The probe learned nothing; the next admission sends another.
                    self.breaker = Breaker::HalfOpen {
                        cooldown_ms,
                        probing: false,
                    };
                }
                None
            }
            Signal::Gone => Some(Transition::Disable {
                reason: "the endpoint answered 410 Gone".to_string(),
            }),
            Signal::Delivered => {
                self.count(false, now_ms, policy);
                self.failing_since_ms = None;
                if self.budget_shift > 0 {
                    self.successes_since_shift += 1;
                    if self.successes_since_shift >= budget.max(1) {
                        self.budget_shift -= 1;
                        self.successes_since_shift = 0;
                    }
                }
                match self.breaker {
                    Breaker::HalfOpen { .. } => {
                        self.breaker = Breaker::Closed;
                        self.reset_window(now_ms);
                        Some(Transition::BreakerClosed)
                    }
                    _ => None,
                }
            }
            Signal::Failed => {
                self.count(true, now_ms, policy);
                let since = *self.failing_since_ms.get_or_insert(now_ms);
                if now_ms.saturating_sub(since) >= policy.disable_after_ms {
                    return Some(Transition::Disable {
                        reason: format!(
                            "every attempt failed for {} s, the most allowed is {} s",
                            now_ms.saturating_sub(since) / 1000,
                            policy.disable_after_ms / 1000
                        ),
                    });
                }
                self.trip(now_ms, policy)
            }
        }
    }

    /// Opens the breaker when a failure calls for it.
    fn trip(&mut self, now_ms: Millis, policy: &HealthPolicy) -> Option<Transition> {
        match self.breaker {
            Breaker::HalfOpen { cooldown_ms, .. } => {
                let cooldown_ms = cooldown_ms
                    .saturating_mul(2)
                    .min(policy.breaker_max_cooldown_ms)
                    .max(1);
                let until_ms = now_ms.saturating_add(cooldown_ms);
                self.breaker = Breaker::Open {
                    until_ms,
                    cooldown_ms,
                };
                Some(Transition::BreakerOpened {
                    until_ms,
                    failures: 1,
                    attempts: 1,
                })
            }
            Breaker::Open { .. } => None,
            Breaker::Closed => {
                let enough = self.attempts >= policy.breaker_min_requests.max(1);
                let percent = u64::from(self.failures) * 100;
                let threshold =
                    u64::from(self.attempts) * u64::from(policy.breaker_failure_percent);
                if !enough || percent < threshold {
                    return None;
                }
                let cooldown_ms = policy.breaker_cooldown_ms.max(1);
                let until_ms = now_ms.saturating_add(cooldown_ms);
                let transition = Transition::BreakerOpened {
                    until_ms,
                    failures: self.failures,
                    attempts: self.attempts,
                };
                self.breaker = Breaker::Open {
                    until_ms,
                    cooldown_ms,
                };
                self.reset_window(now_ms);
                Some(transition)
            }
        }
    }

    /// Counts an attempt in the breaker's current window, starting a new window first when
    /// the current one has ended.
    fn count(&mut self, failed: bool, now_ms: Millis, policy: &HealthPolicy) {
        if now_ms
            >= self
                .window_start_ms
                .saturating_add(policy.breaker_window_ms.max(1))
        {
            self.reset_window(now_ms);
        }
        self.attempts += 1;
        self.failures += u32::from(failed);
    }

    fn reset_window(&mut self, now_ms: Millis) {
        self.window_start_ms = now_ms;
        self.attempts = 0;
        self.failures = 0;
    }

    /// Returns whether the state equals a fresh one, once `now_ms` has passed its pause and
    /// window, so that the operator may forget it.
    pub fn is_settled(&self, now_ms: Millis, policy: &HealthPolicy) -> bool {
        self.breaker == Breaker::Closed
            && self.paused_until_ms <= now_ms
            && self.budget_shift == 0
            && self.failing_since_ms.is_none()
            && now_ms
                >= self
                    .window_start_ms
                    .saturating_add(policy.breaker_window_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> HealthPolicy {
        HealthPolicy {
            breaker_window_ms: 10_000,
            breaker_min_requests: 4,
            breaker_failure_percent: 50,
            breaker_cooldown_ms: 1_000,
            breaker_max_cooldown_ms: 3_000,
            disable_after_ms: 100_000,
            ..HealthPolicy::default()
        }
    }

    #[test]
    fn breaker_opens_at_ratio_with_minimum_count() {
        let policy = policy();
        let mut health = EndpointHealth::default();
        // Three failures are below the minimum count of four.
        for now in [1, 2, 3] {
            assert_eq!(health.record(Signal::Failed, now, 1, &policy), None);
        }
        let opened = health.record(Signal::Delivered, 4, 1, &policy);
        assert_eq!(opened, None, "3 of 4 failed, but a success cannot open it");
        let opened = health.record(Signal::Failed, 5, 1, &policy);
        assert_eq!(
            opened,
            Some(Transition::BreakerOpened {
                until_ms: 1_005,
                failures: 4,
                attempts: 5
            })
        );
        assert_eq!(health.admit(6), Admission::HoldUntil(1_005));
        assert_eq!(health.held_until(6), Some(1_005));
    }

    #[test]
    fn ratio_below_threshold_keeps_breaker_closed() {
        let policy = policy();
        let mut health = EndpointHealth::default();
        for now in 0..20 {
            let signal = if now % 3 == 2 {
                Signal::Failed
            } else {
                Signal::Delivered
            };
            assert_eq!(health.record(signal, now, 1, &policy), None, "at {now}");
        }
        assert_eq!(health.admit(21), Admission::Start);
    }

    #[test]
    fn old_window_does_not_count() {
        let policy = policy();
        let mut health = EndpointHealth::default();
        for now in [1, 2, 3] {
            health.record(Signal::Failed, now, 1, &policy);
        }
        // The window of 10 s ended: the fourth failure starts a new one.
        assert_eq!(health.record(Signal::Failed, 20_000, 1, &policy), None);
        assert_eq!(health.admit(20_001), Admission::Start);
    }

    #[test]
    fn probe_after_cooldown_closes_or_reopens() {
        let policy = policy();
        let mut health = EndpointHealth::default();
        for now in 0..4 {
            health.record(Signal::Failed, now, 1, &policy);
        }
        assert_eq!(health.admit(500), Admission::HoldUntil(1_003));
        assert_eq!(health.admit(1_003), Admission::Probe);
        assert_eq!(
            health.admit(1_004),
            Admission::AwaitProbe,
            "one probe at a time"
        );

        // A failed probe doubles the cooldown.
        let reopened = health.record(Signal::Failed, 1_100, 1, &policy);
        assert_eq!(
            reopened,
            Some(Transition::BreakerOpened {
                until_ms: 3_100,
                failures: 1,
                attempts: 1
            })
        );
        assert_eq!(health.admit(3_100), Admission::Probe);
        // ... up to the maximum.
        health.record(Signal::Failed, 3_200, 1, &policy);
        assert_eq!(health.admit(3_201), Admission::HoldUntil(6_200));

        assert_eq!(health.admit(6_200), Admission::Probe);
        assert_eq!(
            health.record(Signal::Delivered, 6_300, 1, &policy),
            Some(Transition::BreakerClosed)
        );
        assert_eq!(health.admit(6_301), Admission::Start);
    }

    #[test]
    fn throttled_probe_is_not_a_verdict() {
        let policy = policy();
        let mut health = EndpointHealth::default();
        for now in 0..4 {
            health.record(Signal::Failed, now, 1, &policy);
        }
        assert_eq!(health.admit(2_000), Admission::Probe);
        assert_eq!(health.record(Signal::Throttled, 2_001, 1, &policy), None);
        assert_eq!(health.admit(2_002), Admission::Probe);
    }

    #[test]
    fn pause_holds_and_never_shortens() {
        let mut health = EndpointHealth::default();
        health.pause_until(5_000);
        health.pause_until(3_000);
        assert_eq!(health.admit(1_000), Admission::HoldUntil(5_000));
        assert_eq!(health.admit(5_000), Admission::Start);
    }

    #[test]
    fn budget_halves_and_is_restored_step_by_step() {
        let policy = policy();
        let mut health = EndpointHealth::default();
        health.overloaded();
        health.overloaded();
        assert_eq!(health.budget_shift(), 2);

        // With a budget of 2 in force, two successes restore one halving.
        health.record(Signal::Delivered, 1, 2, &policy);
        assert_eq!(health.budget_shift(), 2);
        health.record(Signal::Delivered, 2, 2, &policy);
        assert_eq!(health.budget_shift(), 1);

        // A new overload starts the count again.
        health.record(Signal::Delivered, 3, 5, &policy);
        health.overloaded();
        assert_eq!(health.budget_shift(), 2);
        for now in 4..9 {
            health.record(Signal::Delivered, now, 5, &policy);
        }
        assert_eq!(health.budget_shift(), 1);
        for now in 9..14 {
            health.record(Signal::Delivered, now, 5, &policy);
        }
        assert_eq!(health.budget_shift(), 0);
    }

    #[test]
    fn throttled_answers_neither_fail_nor_disable() {
        let policy = policy();
        let mut health = EndpointHealth::default();
        for now in (0..200_000).step_by(1_000) {
            assert_eq!(health.record(Signal::Throttled, now, 1, &policy), None);
        }
        assert_eq!(health.admit(200_000), Admission::Start);
    }

    #[test]
    fn failing_too_long_disables() {
        let policy = HealthPolicy {
            breaker_min_requests: 1_000,
            ..policy()
        };
        let mut health = EndpointHealth::default();
        assert_eq!(health.record(Signal::Failed, 1_000, 1, &policy), None);
        assert_eq!(health.record(Signal::Failed, 50_000, 1, &policy), None);
        // A success restarts the clock.
        health.record(Signal::Delivered, 60_000, 1, &policy);
        assert_eq!(health.record(Signal::Failed, 100_000, 1, &policy), None);
        assert_eq!(health.record(Signal::Failed, 199_999, 1, &policy), None);
        let Some(Transition::Disable { reason }) =
            health.record(Signal::Failed, 200_000, 1, &policy)
        else {
            panic!("100 s of failures must disable the endpoint");
        };
        assert!(reason.contains("100 s"), "{reason}");
    }

    #[test]
    fn gone_disables_at_once() {
        let mut health = EndpointHealth::default();
        let transition = health.record(Signal::Gone, 1, 1, &policy());
        assert!(matches!(transition, Some(Transition::Disable { .. })));
    }

    #[test]
    fn settled_state_can_be_forgotten() {
        let policy = policy();
        let mut health = EndpointHealth::default();
        health.record(Signal::Delivered, 1, 1, &policy);
        assert!(!health.is_settled(2, &policy), "its window is still open");
        assert!(health.is_settled(10_001, &policy));
        health.record(Signal::Failed, 20_000, 1, &policy);
        assert!(!health.is_settled(40_000, &policy), "it is failing");
    }
}
