//! Storage and I/O at the edges of the hookflow pipeline: the sources events are read from and
//! the archive attempt rows are written to.
//!
//! * [`source`] defines [`Source`], a partitioned log of raw records read by offset.
//! * [`local_log`] is the default source: an append-only log in one SQLite file under the data
//!   directory, written by `hookflow publish` while `hookflow run` reads it.
//! * [`fluvio`] reads a topic of a Fluvio cluster through the official client.
//! * [`archive`] writes [`AttemptRow`](hookflow_schemas::AttemptRow)s to zstd-compressed Parquet
//!   files partitioned by day, and reads them back.
//!
//! No type here depends on timely. Callers pass the current time in (`now_ms`) and decide when to
//! poll, append, roll and close. Every fallible call returns [`ConnectorError`].

#![warn(missing_docs)]

use std::path::PathBuf;

pub mod archive;
pub mod fluvio;
pub mod local_log;
pub mod source;
pub mod state;

pub use archive::{
    list_archive_files, read_attempts, staged_ranges, ArchiveOptions, ArchiveWriter, StagedFiles,
};
pub use fluvio::{FluvioOptions, FluvioSource};
pub use local_log::{partition_for_key, LocalLog, LocalLogOptions};
pub use source::{Source, SourceStatus};
pub use state::{
    DisabledEndpoint, DurableBatch, EventRecord, JournalEntry, StagedFilter, StateStore,
    STATE_FORMAT_VERSION,
};

impl ConnectorError {
    /// Returns whether the error is an outage of a remote source that may end by itself
    /// (Fluvio unreachable), as opposed to a fault of the data or the configuration.
    pub fn is_transient(&self) -> bool {
        matches!(self, ConnectorError::Fluvio { .. })
    }
}

/// The error type of every fallible operation in this crate.
///
/// The message names the failed action and the path or value involved. The underlying I/O,
/// SQLite, Parquet or Arrow error is the error's [`source`](std::error::Error::source), so print
/// the whole chain (for example with `anyhow`'s `{:#}`) to see the cause.
#[derive(Debug, thiserror::Error)]
pub enum ConnectorError {
    /// A file system operation failed.
    #[error("failed to {action} {}", path.display())]
    Io {
        /// The operation, phrased to precede the path ("create directory").
        action: &'static str,
        /// The file or directory the operation was applied to.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },

    /// A SQLite statement on the local log failed.
    #[error("failed to {action} in local log {}", path.display())]
    Sqlite {
        /// The operation, phrased to precede "in local log" ("append records").
        action: &'static str,
        /// The SQLite database file.
        path: PathBuf,
        /// The SQLite error.
        #[source]
        source: rusqlite::Error,
    },

    /// The local log was created by a hookflow build with another on-disk format.
    #[error(
        "local log {} has format version {found}, but this build reads only version {supported}; \
         run a hookflow build that matches the log or choose another data directory",
        path.display()
    )]
    UnsupportedLogVersion {
        /// The SQLite database file.
        path: PathBuf,
        /// The version stored in the log.
        found: i64,
        /// The version this build reads and writes.
        supported: i64,
    },

    /// SQLite would not switch the local log to write-ahead logging, so concurrent readers and
    /// writers are not safe.
    #[error(
        "local log {} cannot use WAL journal mode (sqlite kept mode {mode:?}); \
         put the data directory on a local file system",
        path.display()
    )]
    WalUnavailable {
        /// The SQLite database file.
        path: PathBuf,
        /// The journal mode SQLite reported instead of `wal`.
        mode: String,
    },

    /// The state store was written by a hookflow build with another on-disk format.
    #[error(
        "state store {} has format version {found}, but this build reads only version {supported}; \
         run a hookflow build that matches it or choose another data directory",
        path.display()
    )]
    UnsupportedStateVersion {
        /// The SQLite database file.
        path: PathBuf,
        /// The version stored.
        found: i64,
        /// The version this build reads and writes.
        supported: i64,
    },

    /// A state-store value could not be encoded or decoded.
    #[error("state store {} holds an unreadable {what}: {detail}", path.display())]
    CorruptState {
        /// The SQLite database file.
        path: PathBuf,
        /// What was being read.
        what: &'static str,
        /// The decoder's message.
        detail: String,
    },

    /// The local log's tables hold values that its invariants rule out.
    #[error("local log {} is corrupt: {detail}", path.display())]
    CorruptLog {
        /// The SQLite database file.
        path: PathBuf,
        /// Description of the inconsistency, with the offending value.
        detail: String,
    },

    /// A partition number at or above the source's partition count.
    #[error("partition {partition} does not exist: the source has {partitions} partitions, numbered from 0")]
    PartitionOutOfRange {
        /// The partition requested.
        partition: u32,
        /// The source's partition count.
        partitions: u32,
    },

    /// A request to a Fluvio cluster failed.
    #[error("Fluvio at {endpoint}: cannot {action}: {detail}")]
    Fluvio {
        /// What was tried.
        action: &'static str,
        /// The SC address.
        endpoint: String,
        /// The client's error.
        detail: String,
    },

    /// A record asked for by position does not exist (it was never written or was removed).
    #[error("partition {partition} has no record at offset {offset}")]
    RecordMissing {
        /// The partition.
        partition: u32,
        /// The offset.
        offset: u64,
    },

    /// An option value outside its limits.
    #[error("invalid {option} {value}: {expected}")]
    InvalidOption {
        /// The option's name as the caller spells it (`partitions`, `file_prefix`).
        option: &'static str,
        /// The rejected value, formatted.
        value: String,
        /// The accepted values.
        expected: &'static str,
    },

    /// An attempt row has a time that the archive cannot store.
    #[error(
        "attempt row of event {event_id:?} has {column} = {value_ms} ms, \
         outside the archive's range (1970-01-01 to 9999-12-31 UTC)"
    )]
    TimeOutOfRange {
        /// The event id of the row, if it has one.
        event_id: Option<String>,
        /// The archive column of the time.
        column: &'static str,
        /// The rejected value in milliseconds since the Unix epoch.
        value_ms: u64,
    },

    /// Writing or reading a Parquet file failed.
    #[error("failed to {action} {}", path.display())]
    Parquet {
        /// The operation, phrased to precede the path ("write parquet file").
        action: &'static str,
        /// The Parquet file.
        path: PathBuf,
        /// The Parquet error.
        #[source]
        source: parquet::errors::ParquetError,
    },

    /// Building or decoding an Arrow record batch of an archive file failed.
    #[error("failed to {action} {}", path.display())]
    Arrow {
        /// The operation, phrased to precede the path ("read a record batch from").
        action: &'static str,
        /// The Parquet file the batch belongs to.
        path: PathBuf,
        /// The Arrow error.
        #[source]
        source: arrow::error::ArrowError,
    },

    /// An archive file lacks a column of the attempt schema, stores it with another type, or
    /// contains a value that does not fit an attempt row.
    #[error("archive file {} is not a readable attempt file: column {column} {problem}", path.display())]
    InvalidArchiveColumn {
        /// The Parquet file.
        path: PathBuf,
        /// The column's name.
        column: &'static str,
        /// Description of the problem, with the offending type or row ("is missing").
        problem: String,
    },
}
