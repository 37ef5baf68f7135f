//! The clock: the only source of "now" for the operators, and the owner of waiting.
//!
//! Production uses [`WallClock`]: an operator that must run again at a later time asks the
//! clock, which schedules a timely activation after the real delay. Tests and simulations use
//! [`VirtualClock`]: its time moves only when the test advances it, and advancing wakes every
//! operator whose requested time has come, so a schedule spanning days runs in milliseconds
//! and the same way every time. HTTP request timeouts still run on tokio's real timer.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hookflow_schemas::Millis;
use timely::scheduling::{Activator, SyncActivator};

/// A source of the current time, in milliseconds since the Unix epoch (UTC), that also
/// schedules operators to run at a later time.
///
/// The trait is object-safe, and operators hold it as `Arc<dyn Clock>`.
pub trait Clock: Send + Sync + 'static {
    /// Returns the current time in milliseconds since the Unix epoch.
    fn now_ms(&self) -> Millis;

    /// Schedules the operator behind `wakeup` to run at `at_ms` or soon after. A time that
    /// has passed schedules it at once. Only the earliest pending request per operator
    /// counts on a virtual clock; a wall clock may run it more often.
    fn wake_at(&self, at_ms: Millis, wakeup: &Wakeup);
}

/// The handles that schedule one operator: a local activator for the wall clock, and a
/// thread-safe one that a virtual clock keeps until the time comes.
pub struct Wakeup {
    id: u64,
    local: Activator,
    remote: Arc<SyncActivator>,
}

impl Wakeup {
    /// Creates the wakeup of the operator at `address` in `worker`.
    pub fn new(worker: &timely::worker::Worker, address: std::rc::Rc<[usize]>) -> Self {
        static NEXT_ID: AtomicU64 = AtomicU64::new(0);
        Wakeup {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            remote: Arc::new(worker.sync_activator_for(address.to_vec())),
            local: worker.activator_for(address),
        }
    }

    /// Schedules the operator at once.
    pub fn activate(&self) {
        self.local.activate();
    }

    /// The thread-safe activator, for tasks that complete on other threads.
    pub fn sync_activator(&self) -> Arc<SyncActivator> {
        Arc::clone(&self.remote)
    }
}

/// The system's wall clock.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WallClock;

impl Clock for WallClock {
    /// Returns the system time. A system clock set before 1970 reads as 0.
    fn now_ms(&self) -> Millis {
        match SystemTime::now().duration_since(UNIX_EPOCH) {
            Ok(elapsed) => Millis::try_from(elapsed.as_millis()).unwrap_or(Millis::MAX),
            Err(_) => 0,
        }
    }

    fn wake_at(&self, at_ms: Millis, wakeup: &Wakeup) {
        let delay = at_ms.saturating_sub(self.now_ms());
        wakeup.local.activate_after(Duration::from_millis(delay));
    }
}

/// A clock whose time moves only when [`VirtualClock::advance_to`] is called.
#[derive(Debug)]
pub struct VirtualClock {
    now_ms: AtomicU64,
    /// The earliest requested wake-up time of each waiting operator, by wakeup id.
    waiting: Mutex<HashMap<u64, (Millis, Arc<SyncActivator>)>>,
}

impl VirtualClock {
    /// Creates a clock reading `start_ms`.
    pub fn new(start_ms: Millis) -> Self {
        VirtualClock {
            now_ms: AtomicU64::new(start_ms),
            waiting: Mutex::new(HashMap::new()),
        }
    }

    /// Moves time forward to `to_ms` (never back) and wakes every operator whose requested
    /// time is at or before it.
    pub fn advance_to(&self, to_ms: Millis) {
        self.now_ms.fetch_max(to_ms, Ordering::SeqCst);
        let now = self.now_ms.load(Ordering::SeqCst);

        let mut due = Vec::new();
        {
            let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
            waiting.retain(|_, (at_ms, activator)| {
                if *at_ms <= now {
                    due.push(Arc::clone(activator));
                    false
                } else {
                    true
                }
            });
        }
        for activator in due {
            // Fails only once the worker is gone, when there is nothing left to wake.
            let _ = activator.activate();
        }
    }

    /// The earliest time an operator asked to be woken at, if any.
    pub fn next_wakeup(&self) -> Option<Millis> {
        let waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        waiting.values().map(|(at_ms, _)| *at_ms).min()
    }
}

impl Clock for VirtualClock {
    fn now_ms(&self) -> Millis {
        self.now_ms.load(Ordering::SeqCst)
    }

    fn wake_at(&self, at_ms: Millis, wakeup: &Wakeup) {
        if at_ms <= self.now_ms() {
            wakeup.local.activate();
            return;
        }
        let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        let entry = waiting
            .entry(wakeup.id)
            .or_insert((at_ms, Arc::clone(&wakeup.remote)));
        entry.0 = entry.0.min(at_ms);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wall_clock_reads_after_2024() {
        let clock: &dyn Clock = &WallClock;
        assert!(
            clock.now_ms() > 1_704_067_200_000,
            "the wall clock reads before 2024-01-01"
        );
    }

    #[test]
    fn virtual_clock_moves_only_forward() {
        let clock = VirtualClock::new(1_000);
        assert_eq!(clock.now_ms(), 1_000);
        clock.advance_to(5_000);
        clock.advance_to(2_000);
        assert_eq!(clock.now_ms(), 5_000);
        assert_eq!(clock.next_wakeup(), None);
    }
}
