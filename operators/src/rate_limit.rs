//! The fixed-window rate limit of one endpoint: which window each delivery may start in.
//!
//! Windows are aligned to multiples of the window length since the Unix epoch. A delivery
//! reserves a start slot once, when it reaches the deliver operator: the first window, from
//! its due time on, with budget left. A request counts in the window it actually starts in;
//! when the in-flight cap delays a start past its reserved window, the reservation moves to
//! the window of the start, or to a later one when that window is full.
//!
//! State: reservations per window from the current window on. Windows that have ended are
//! pruned.

use std::collections::BTreeMap;

use hookflow_schemas::{Millis, RateLimit};

/// The reservations of one endpoint.
#[derive(Debug, Clone)]
pub struct WindowLimiter {
    limit: RateLimit,
    /// Reserved or started requests by window start.
    reserved: BTreeMap<Millis, u32>,
    /// Every window before this one is full (or ended), so searches start here.
    first_open: Millis,
}

/// Whether a reserved delivery may start now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartDecision {
    /// Start the request now.
    Start,
    /// The current window is full: wait until this time, which is reserved for it.
    WaitUntil(Millis),
}

impl WindowLimiter {
    /// Creates a limiter with no reservations. A zero limit or window counts as 1.
    pub fn new(limit: RateLimit) -> Self {
        let limit = RateLimit {
            max_requests: limit.max_requests.max(1),
            window_ms: limit.window_ms.max(1),
        };
        WindowLimiter {
            limit,
            reserved: BTreeMap::new(),
            first_open: 0,
        }
    }

    /// The limit enforced.
    pub fn limit(&self) -> RateLimit {
        self.limit
    }

    fn window_of(&self, time_ms: Millis) -> Millis {
        time_ms - time_ms % self.limit.window_ms
    }

    /// Reserves the earliest slot at or after `due_ms` and returns its time: `due_ms` itself
    /// when its window has budget left, otherwise the start of the first window that has.
    pub fn reserve(&mut self, due_ms: Millis) -> Millis {
        let mut window = self.window_of(due_ms).max(self.first_open);
        loop {
            let count = self.reserved.entry(window).or_insert(0);
            if *count < self.limit.max_requests {
                *count += 1;
                return due_ms.max(window);
            }
            if window == self.first_open {
                self.first_open = window + self.limit.window_ms;
            }
            window += self.limit.window_ms;
        }
    }

    /// Decides whether a delivery holding the slot reserved at `slot_ms` may start at `now_ms`,
    /// moving its reservation to the window of `now_ms` when that differs.
    pub fn start(&mut self, slot_ms: Millis, now_ms: Millis) -> StartDecision {
        let reserved_window = self.window_of(slot_ms);
        let current_window = self.window_of(now_ms);
        if reserved_window == current_window {
            return StartDecision::Start;
        }

        if let Some(count) = self.reserved.get_mut(&reserved_window) {
            *count = count.saturating_sub(1);
        }
        let slot = self.reserve(now_ms);
        if slot <= now_ms {
            StartDecision::Start
        } else {
            StartDecision::WaitUntil(slot)
        }
    }

    /// Forgets the windows that ended before `now_ms`.
    pub fn prune(&mut self, now_ms: Millis) {
        let current = self.window_of(now_ms);
        self.reserved = self.reserved.split_off(&current);
        self.first_open = self.first_open.max(current);
    }

    /// Returns whether no reservation is left (every reserved delivery started and its
    /// window ended, or none was made).
    pub fn is_idle(&self) -> bool {
        self.reserved.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(max_requests: u32, window_ms: u64) -> WindowLimiter {
        WindowLimiter::new(RateLimit {
            max_requests,
            window_ms,
        })
    }

    #[test]
    fn reserve_fills_windows_in_order() {
        let mut limiter = limiter(2, 1_000);
        let slots: Vec<Millis> = (0..5).map(|_| limiter.reserve(10_250)).collect();
        assert_eq!(slots, [10_250, 10_250, 11_000, 11_000, 12_000]);
    }

    #[test]
    fn reserve_never_goes_before_due_time() {
        let mut limiter = limiter(1, 1_000);
        assert_eq!(limiter.reserve(500), 500);
        assert_eq!(
            limiter.reserve(5_700),
            5_700,
            "a later due time is not pulled earlier"
        );
        assert_eq!(limiter.reserve(100), 1_000, "window 0 is full");
    }

    #[test]
    fn start_in_reserved_window() {
        let mut limiter = limiter(1, 1_000);
        let slot = limiter.reserve(0);
        assert_eq!(limiter.start(slot, 999), StartDecision::Start);
    }

    #[test]
    fn late_start_moves_reservation() {
        let mut limiter = limiter(1, 1_000);
        let first = limiter.reserve(0);
        let second = limiter.reserve(0);
        assert_eq!(second, 1_000);
        // The first delivery was held past its window, and window 1 is already reserved by the
        // second: the first moves on to window 2 and the second keeps its slot.
        assert_eq!(limiter.start(first, 1_100), StartDecision::WaitUntil(2_000));
        assert_eq!(limiter.start(second, 1_200), StartDecision::Start);
        assert_eq!(limiter.start(2_000, 2_000), StartDecision::Start);
    }

    #[test]
    fn never_more_than_limit_per_window() {
        // Oracle: random due times and start delays never put more than the limit in a window.
        let mut limiter = limiter(3, 100);
        let mut starts: BTreeMap<Millis, u32> = BTreeMap::new();
        let mut state = 7u64;
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            state >> 33
        };
        for _ in 0..2_000 {
            let due = next() % 5_000;
            let mut slot = limiter.reserve(due);
            let mut now = slot + next() % 150;
            loop {
                match limiter.start(slot, now) {
                    StartDecision::Start => break,
                    StartDecision::WaitUntil(later) => {
                        slot = later;
                        now = later;
                    }
                }
            }
            *starts.entry(now - now % 100).or_default() += 1;
        }
        assert!(starts.values().all(|count| *count <= 3), "{starts:?}");
    }

    #[test]
    fn prune_drops_ended_windows() {
        let mut limiter = limiter(1, 100);
        limiter.reserve(0);
        limiter.reserve(0);
        limiter.prune(250);
        assert!(limiter.is_idle());
    }
}
