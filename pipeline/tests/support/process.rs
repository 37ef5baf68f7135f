//! Waiting in tests: for a condition with a time limit, and for a `hookflow run` child process
//! to stop after SIGTERM.

// Each includer uses a part of this file.
#![allow(dead_code)]

use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

/// How long a child process may take to stop after SIGTERM.
const STOP_LIMIT: Duration = Duration::from_secs(20);

/// Checks `done` every 50 ms until it holds or `limit` has passed, and returns its last result.
pub fn wait_for(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    done()
}

/// Sends SIGTERM to `child` and returns its exit status. The test fails, after killing the
/// child, when it has not exited within 20 s.
pub fn terminate(child: &mut Child) -> ExitStatus {
    let pid = child.id().to_string();
    let sent = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("running kill -TERM");
    assert!(sent.success(), "kill -TERM {pid} failed");

    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("waiting for hookflow") {
            return status;
        }
        if start.elapsed() > STOP_LIMIT {
            let _ = child.kill();
            panic!("hookflow run did not stop within {STOP_LIMIT:?} of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
