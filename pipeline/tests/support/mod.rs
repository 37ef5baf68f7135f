//! Helpers shared by this crate's integration tests: reading a Prometheus exposition, one HTTP
//! GET, and waiting for conditions and child processes.

pub mod exposition;
pub mod http;
pub mod process;
