//! The retry schedule: when a failed delivery is attempted again, and when it is given up.
//!
//! A pure function of the failed attempt's number, the time it failed and a seed, so that
//! every worker count and every rerun decides the same. The seed comes from the delivery's
//! (tenant, event id, endpoint id, generation, attempt), which spreads the retries of many
//! deliveries that failed together without making any one of them random.

use hookflow_schemas::{fnv1a_extend, Delivery, Millis, FNV1A_OFFSET};

/// The default delays between attempts, close to Stripe's three days: 5 s, 5 min, 30 min,
/// 2 h, 5 h, 10 h, 14 h, 20 h and 24 h; ten attempts in all.
pub const DEFAULT_SCHEDULE_MS: [u64; 9] = [
    5_000,
    5 * 60_000,
    30 * 60_000,
    2 * 3_600_000,
    5 * 3_600_000,
    10 * 3_600_000,
    14 * 3_600_000,
    20 * 3_600_000,
    24 * 3_600_000,
];

/// When to retry and when to stop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Delay before attempt `n + 2` after attempt `n + 1` failed; one entry per retry.
    pub schedule_ms: Vec<u64>,
    /// Each delay is moved by up to this percentage of itself, either way. At most 100.
    pub jitter_percent: u8,
    /// Events first read longer ago than this are dead-lettered as expired instead of
    /// attempted, in ms.
    pub max_event_age_ms: u64,
    /// Retries given to a delivery that a 4xx status other than 408, 410 and 429 refused; a
    /// delivery refused so on attempt `client_error_retries + 1` or later is dead-lettered.
    pub client_error_retries: u32,
    /// The earliest a retry may come after a 429 or a timeout without a valid `Retry-After`,
    /// in ms: the schedule's next step is raised to this, so that an overloaded endpoint is
    /// not asked again within seconds.
    pub penalty_floor_ms: u64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            schedule_ms: DEFAULT_SCHEDULE_MS.to_vec(),
            jitter_percent: 10,
            // The schedule adds up to about 75 hours; a day's margin covers jitter and queues.
            max_event_age_ms: 4 * 24 * 3_600_000,
            client_error_retries: 3,
            penalty_floor_ms: 60_000,
        }
    }
}

impl RetryPolicy {
    /// The time of the next attempt after attempt number `failed_attempt` (counting from 1)
    /// failed at `now_ms`, or `None` when the schedule is exhausted.
    ///
    /// The result is always at least `now_ms + 1`.
    pub fn next_attempt_at(
        &self,
        failed_attempt: u32,
        now_ms: Millis,
        seed: u64,
    ) -> Option<Millis> {
        let index = usize::try_from(failed_attempt.checked_sub(1)?).ok()?;
        let delay = *self.schedule_ms.get(index)?;
        let jittered = jitter(delay, self.jitter_percent.min(100), seed);
        Some(now_ms.saturating_add(jittered.max(1)))
    }

    /// Returns whether a delivery whose attempt number `attempt` got a `client_error` response
    /// has used up its retries for such responses.
    pub fn client_errors_exhausted(&self, attempt: u32) -> bool {
        attempt > self.client_error_retries
    }

    /// The most attempts a delivery gets.
    pub fn max_attempts(&self) -> u32 {
        u32::try_from(self.schedule_ms.len())
            .unwrap_or(u32::MAX)
            .saturating_add(1)
    }
}

/// Moves `delay` by a seeded amount in `[-percent, +percent]` of itself.
fn jitter(delay: u64, percent: u8, seed: u64) -> u64 {
    if percent == 0 || delay == 0 {
        return delay;
    }
    let span = delay / 100 * u64::from(percent) + delay % 100 * u64::from(percent) / 100;
    // A uniform draw in [0, 2 * span] from the seed, then shifted to [-span, +span].
    let draw = splitmix64(seed) % (2 * span + 1);
    (delay - span).saturating_add(draw)
}

/// The jitter seed of `delivery`'s attempt number `attempt`.
pub fn jitter_seed(delivery: &Delivery, attempt: u32) -> u64 {
    let event = &delivery.ingested.event;
    let mut hash = FNV1A_OFFSET;
    for part in [
        event.tenant.as_bytes(),
        event.id.as_bytes(),
        delivery.endpoint_id.as_bytes(),
    ] {
        hash = fnv1a_extend(hash, part);
        // A separator byte that UTF-8 text never contains keeps ("ab","c") apart from ("a","bc").
        hash = fnv1a_extend(hash, &[0xff]);
    }
    hash = fnv1a_extend(hash, &delivery.generation.to_le_bytes());
    fnv1a_extend(hash, &attempt.to_le_bytes())
}

/// Mixes a 64-bit value into a well-distributed one (Steele, Lea and Flood's SplitMix64).
fn splitmix64(value: u64) -> u64 {
    let mut z = value.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_table_without_jitter() {
        let policy = RetryPolicy {
            jitter_percent: 0,
            ..RetryPolicy::default()
        };
        let cases = [
            (1, Some(5_000)),
            (2, Some(300_000)),
            (3, Some(1_800_000)),
            (9, Some(86_400_000)),
            (10, None),
            (0, None),
        ];
        for (failed_attempt, delay) in cases {
            let next = policy.next_attempt_at(failed_attempt, 1_000, 42);
            assert_eq!(
                next,
                delay.map(|d| 1_000 + d),
                "after attempt {failed_attempt}"
            );
        }
        assert_eq!(policy.max_attempts(), 10);
    }

    #[test]
    fn jitter_stays_within_bounds_and_varies() {
        let policy = RetryPolicy::default();
        let mut seen = std::collections::BTreeSet::new();
        for seed in 0..1_000u64 {
            let next = policy.next_attempt_at(1, 0, seed).expect("a retry");
            assert!((4_500..=5_500).contains(&next), "{next} outside 5 s ± 10%");
            seen.insert(next);
        }
        assert!(
            seen.len() > 100,
            "jitter should spread retries: {} values",
            seen.len()
        );
    }

    #[test]
    fn jitter_is_deterministic() {
        let policy = RetryPolicy::default();
        assert_eq!(
            policy.next_attempt_at(3, 7, 99),
            policy.next_attempt_at(3, 7, 99)
        );
    }

    #[test]
    fn tiny_delays_still_move_forward() {
        let policy = RetryPolicy {
            schedule_ms: vec![0, 1],
            jitter_percent: 100,
            max_event_age_ms: 10,
            ..RetryPolicy::default()
        };
        for seed in 0..100 {
            assert!(policy.next_attempt_at(1, 50, seed).expect("retry") >= 51);
            assert!(policy.next_attempt_at(2, 50, seed).expect("retry") >= 51);
        }
    }
}
