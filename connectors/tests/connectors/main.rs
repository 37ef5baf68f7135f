//! Integration tests of hookflow-connectors against real SQLite and Parquet files in temporary
//! directories, one module per connector.

mod archive;
mod local_log;

/// The result of a test that stops at its first failed I/O step.
type TestResult = Result<(), Box<dyn std::error::Error>>;
