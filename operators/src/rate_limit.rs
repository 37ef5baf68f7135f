//! The fixed-window rate limit of one endpoint: which window each delivery may start in.
//!
//! Windows are aligned to multiples of the window length since the Unix epoch. A delivery
//! reserves a start slot once, when it reaches the deliver operator: the first window, from
//! its due time on, with budget left. A request counts in the window it actually starts in;
//! when the in-flight cap delays a start past its reserved window, the reservation moves to
//! the window of the start, or to a later one when that window is full.
//!
//! An overloaded endpoint (see the `health` module) gets its budget halved: reservations made
//! while a halving is in force count against the smaller budget, and a delivery reserved
//! before it starts in its window only while the requests started there are within the
//! smaller budget; otherwise it takes the first later slot, so a queued backlog slows down
//! too.
//!
//! State: reservations per window from the current window on, and the halvings in force.
//! Windows that have ended are pruned.

use std::collections::BTreeMap;

use hookflow_schemas::{Millis, RateLimit};

/// The reservations of one endpoint.
#[derive(Debug, Clone)]
pub struct WindowLimiter {
    limit: RateLimit,
    /// Reserved or started requests by window start.
    reserved: BTreeMap<Millis, u32>,
    /// Started requests by window start, for the windows where any started.
    started: BTreeMap<Millis, u32>,
    /// Every window before this one is full (or ended), so searches start here.
    first_open: Millis,
    /// How many times the budget is halved.
    budget_shift: u32,
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
            started: BTreeMap::new(),
            first_open: 0,
            budget_shift: 0,
        }
    }

    /// Sets how many times the budget is halved; the budget never drops below 1.
    pub fn set_budget_shift(&mut self, shift: u32) {
        if shift < self.budget_shift {
            // A larger budget may fit more into windows already marked full.
            self.first_open = 0;
        }
        self.budget_shift = shift;
    }

    /// Returns the requests allowed per window with the halvings in force.
    pub fn budget(&self) -> u32 {
        self.limit
            .max_requests
            .checked_shr(self.budget_shift)
            .unwrap_or(0)
            .max(1)
    }

    /// The limit enforced.
    pub fn limit(&self) -> RateLimit {
        self.limit
    }

    fn window_of(&self, time_ms: Millis) -> Millis {
        time_ms - time_ms % self.limit.window_ms
    }

    /// Returns the end of the window that contains `time_ms`.
    pub fn window_end(&self, time_ms: Millis) -> Millis {
        self.window_of(time_ms) + self.limit.window_ms
    }

    /// Reserves the earliest slot at or after `due_ms` and returns its time: `due_ms` itself
    /// when its window has budget left, otherwise the start of the first window that has.
    pub fn reserve(&mut self, due_ms: Millis) -> Millis {
        let budget = self.budget();
        let mut window = self.window_of(due_ms).max(self.first_open);
        loop {
            let count = self.reserved.entry(window).or_insert(0);
            if *count < budget {
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
    /// moving its reservation to the first slot from `now_ms` on when its own window has
    /// passed, or when the window's started requests already fill a budget halved since.
    pub fn start(&mut self, slot_ms: Millis, now_ms: Millis) -> StartDecision {
        let reserved_window = self.window_of(slot_ms);
        let current_window = self.window_of(now_ms);
        let started = self.started.get(&current_window).copied().unwrap_or(0);
        if reserved_window == current_window && started < self.budget() {
            *self.started.entry(current_window).or_insert(0) += 1;
            return StartDecision::Start;
        }

        if let Some(count) = self.reserved.get_mut(&reserved_window) {
            *count = count.saturating_sub(1);
        }
        // The window's reservations include its starts, so a slot found in it leaves room
        // for one more start within the budget.
        let slot = self.reserve(now_ms);
        if slot <= now_ms {
            *self.started.entry(current_window).or_insert(0) += 1;
            StartDecision::Start
        } else {
            StartDecision::WaitUntil(slot)
        }
    }

    /// Forgets the windows that ended before `now_ms`.
    pub fn prune(&mut self, now_ms: Millis) {
        let current = self.window_of(now_ms);
        self.reserved = self.reserved.split_off(&current);
        self.started = self.started.split_off(&current);
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

    #[test]
    fn halved_budget_applies_to_new_reservations() {
        let mut limiter = limiter(8, 100);
        for _ in 0..3 {
            assert_eq!(limiter.reserve(0), 0);
        }
        limiter.set_budget_shift(2);
        assert_eq!(limiter.budget(), 2);
        // The window already contains 3 of the halved budget's 2, so the next slot is a window
        // later.
        assert_eq!(limiter.reserve(0), 100);
        assert_eq!(limiter.reserve(0), 100);
        assert_eq!(limiter.reserve(0), 200);

        limiter.set_budget_shift(40);
        assert_eq!(limiter.budget(), 1, "the budget never drops below 1");

        limiter.set_budget_shift(0);
        assert_eq!(limiter.budget(), 8);
        assert_eq!(
            limiter.reserve(0),
            0,
            "a restored budget refills the first window"
        );
    }

    #[test]
    fn halving_slows_a_backlog_reserved_before_it() {
        let mut limiter = limiter(4, 100);
        let slots: Vec<Millis> = (0..8).map(|_| limiter.reserve(0)).collect();
        assert_eq!(slots, [0, 0, 0, 0, 100, 100, 100, 100]);
        assert_eq!(limiter.start(0, 0), StartDecision::Start);

        limiter.set_budget_shift(2);
        // One start fills the halved budget of 1: the rest of window 0 moves on.
        assert_eq!(limiter.start(0, 1), StartDecision::WaitUntil(200));
        assert_eq!(limiter.start(100, 100), StartDecision::Start);
        // Window 200 already contains the delivery moved there.
        assert_eq!(limiter.start(100, 101), StartDecision::WaitUntil(300));
        assert_eq!(limiter.start(200, 200), StartDecision::Start);
        assert_eq!(limiter.start(300, 300), StartDecision::Start);
        assert_eq!(limiter.start(100, 301), StartDecision::WaitUntil(400));
    }
}
