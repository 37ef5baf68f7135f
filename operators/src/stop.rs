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

/// Calls `on_first` on the first SIGINT or SIGTERM, and exits the process with status 130 on
/// the second, so that an operator who asks twice is not kept waiting. The signals are
/// watched from a thread named `thread_name` with a runtime of its own.
///
/// # Errors
///
/// Fails if the thread or its runtime cannot start. A failure to register the handlers
/// themselves is logged, and the process then stops only on SIGKILL.
pub fn on_termination_signal(
    thread_name: &str,
    on_first: impl Fn() + Send + 'static,
) -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name(thread_name.to_string())
        .spawn(move || {
            runtime.block_on(async move {
                use tokio::signal::unix::{signal, SignalKind};
                let (Ok(mut interrupt), Ok(mut terminate)) = (
                    signal(SignalKind::interrupt()),
                    signal(SignalKind::terminate()),
                ) else {
                    tracing::error!(
                        "Cannot install signal handlers; stop the process with SIGKILL."
                    );
                    return;
                };
                for count in 1.. {
                    tokio::select! {
                        _ = interrupt.recv() => {}
                        _ = terminate.recv() => {}
                    }
                    if count == 1 {
                        on_first();
                    } else {
                        tracing::warn!("Second signal: exiting at once.");
                        std::process::exit(130);
                    }
                }
            });
        })?;
    Ok(())
}
