//! The stop signal: how a signal handler or a failing operator asks the dataflow to stop.
//!
//! Setting it wakes every operator that registered with it, on whatever worker thread, so an
//! operator waiting hours for its next scheduled delivery still notices a stop at once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use timely::scheduling::SyncActivator;

/// A shared flag that wakes its watchers when set.
#[derive(Default)]
pub struct StopSignal {
    stopped: AtomicBool,
    watchers: Mutex<Vec<Arc<SyncActivator>>>,
}

impl StopSignal {
    /// Creates an unset signal.
    pub fn new() -> Self {
        StopSignal::default()
    }

    /// Sets the signal and wakes every watcher.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        let watchers = self.watchers.lock().unwrap_or_else(|e| e.into_inner());
        for watcher in watchers.iter() {
            // Fails only once the watcher's worker is gone.
            let _ = watcher.activate();
        }
    }

    /// Returns whether the signal is set.
    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }

    /// Registers an operator to wake when the signal is set.
    pub fn watch(&self, activator: Arc<SyncActivator>) {
        self.watchers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(activator);
    }
}

impl std::fmt::Debug for StopSignal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StopSignal")
            .field("stopped", &self.is_stopped())
            .finish_non_exhaustive()
    }
}
