//! hookflow-replay: selects events from the Parquet attempt archive and republishes them as
//! new delivery generations, and computes per-endpoint statistics over the archive.
//!
//! In: the archive (`<data>/archive/date=…/*.parquet`), the local log that still holds every
//! event's original bytes for `local_log.retention_secs`, and the endpoints of the config
//! file. Out: replay records appended to the log, which the running pipeline delivers through
//! its normal path; a dry-run summary; statistics as a table or JSON.
//!
//! * [`scan`] reads the archive with filters pushed down: `date=` directories, row-group
//!   statistics and a column projection.
//! * [`select`] turns a [`Selection`](select::Selection) into a [`Plan`](select::Plan): which
//!   events go to which endpoints, with the payload of each checked against the archive.
//! * [`ledger`] is the tool's own SQLite file (`<data>/replay/replays.sqlite`): replay id →
//!   generation, plan and progress, so a replay resumes where it stopped and is not run twice
//!   by mistake.
//! * [`republish`] appends the plan's replay records at a chosen rate with progress output.
//! * [`stats`] computes the per-endpoint figures of `hookflow stats`.
//! * [`cli`] holds the command-line arguments and entry points that both `hookflow replay` /
//!   `hookflow stats` and the `hookflow-replay` binary use.
//!
//! State: only the ledger. The archive and the log are read, and the log is appended to.

#![warn(missing_docs)]

use std::path::PathBuf;

pub mod cli;
pub mod config;
pub mod ledger;
pub mod republish;
pub mod scan;
pub mod select;
pub mod stats;
pub mod timespec;

/// The error type of the replay library.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The local log, the state store or the archive failed.
    #[error(transparent)]
    Connector(#[from] hookflow_connectors::ConnectorError),

    /// A Parquet file of the archive could not be read.
    #[error("cannot read archive file {}", path.display())]
    Parquet {
        /// The file.
        path: PathBuf,
        /// The Parquet error.
        #[source]
        source: parquet::errors::ParquetError,
    },

    /// A record batch of an archive file could not be decoded.
    #[error("cannot decode archive file {}: {detail}", path.display())]
    Archive {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the column.
        detail: String,
    },

    /// The ledger could not be read or written.
    #[error("replay ledger {}: cannot {action}", path.display())]
    Ledger {
        /// The ledger file.
        path: PathBuf,
        /// What failed, phrased to follow "cannot".
        action: &'static str,
        /// The SQLite error.
        #[source]
        source: rusqlite::Error,
    },

    /// A file could not be read or created.
    #[error("cannot {action} {}", path.display())]
    Io {
        /// What failed, phrased to precede the path.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },

    /// An argument or a config value cannot be used.
    #[error("{0}")]
    Invalid(String),
}

/// Shorthand for results of this crate.
pub type Result<T, E = ReplayError> = std::result::Result<T, E>;
