//! The clock: the source of "now" for the operators.
//!
//! Production uses [`WallClock`], and tests and simulations can substitute a virtual clock.
//! Every time an operator writes into a row comes from this trait. Request timeouts still
//! run on tokio's timer.

use std::time::{SystemTime, UNIX_EPOCH};

use hookflow_schemas::Millis;

/// A source of the current time, in milliseconds since the Unix epoch (UTC).
///
/// The trait is object-safe, and operators hold it as `Arc<dyn Clock>`.
pub trait Clock: Send + Sync + 'static {
    /// Returns the current time in milliseconds since the Unix epoch.
    fn now_ms(&self) -> Millis;
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
}
