//! The embedded local log: the default event source, a durable, partitioned, append-only log
//! of records in one SQLite database under the data directory.
//!
//! [`LocalLog::append`] takes (key, value) pairs, places each in the partition of its key (the
//! tenant) and returns the (partition, offset) it got. [`Source::read`] returns the records of
//! one partition from an offset on. Each [`LocalLog`] is one SQLite connection, so one process
//! can append while another process, or other connections in the same process, read. A reader
//! learns of new records only by reading again (polling): SQLite offers no cross-process
//! notification. A `LocalLog` keeps no state besides its connection, its cached statements and
//! the partition count.
//!
//! # Invariants
//!
//! * The format version and the partition count are written once, by the connection that
//!   creates the log, and never change afterwards. So is the log id, by the first connection
//!   that finds none.
//! * Within a partition, offsets start at 0 and are dense. `partition_heads.next_offset` is the
//!   offset the next record of the partition gets, and it never decreases, so deleting old
//!   records would never lead to an offset being reused.
//! * An append is one `BEGIN IMMEDIATE` transaction: it computes its offsets while it holds the
//!   write lock, and readers see all of its records or none of them.
//! * An append that returned `Ok` is on disk: the database runs in WAL mode with
//!   `synchronous=FULL`, which syncs the WAL at every commit.
//! * A record's partition is [`partition_for_key`] of its key, a function of the key bytes and
//!   the partition count only.
//!
//! # On-disk layout
//!
//! ```text
//! <data_dir>/log/events.sqlite          the database (plus -wal and -shm files while in use)
//!
//! meta             key TEXT PRIMARY KEY, value INTEGER NOT NULL       WITHOUT ROWID
//!                  ('format_version', 1), ('partitions', N), ('log_id', random)
//! partition_heads  partition INTEGER PRIMARY KEY, next_offset INTEGER NOT NULL
//!                  one row per partition 0..N
//! records          partition INTEGER NOT NULL, offset INTEGER NOT NULL,
//!                  key BLOB NOT NULL, value BLOB NOT NULL, appended_at_ms INTEGER NOT NULL,
//!                  PRIMARY KEY (partition, offset)
//! ```
//!
//! `records` keeps its rowid because payloads can be far larger than the 1/20 of a page that
//! SQLite recommends for rows of a `WITHOUT ROWID` table. Appends add rows in increasing rowid
//! order, and reads use the primary key index.

use std::collections::btree_map::Entry;
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hookflow_schemas::{Millis, SourceRecord};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use crate::{ConnectorError, Source};

/// The on-disk format version this build reads and writes.
pub const FORMAT_VERSION: i64 = 1;

/// The partition count of a new log unless [`LocalLogOptions`] sets another.
pub const DEFAULT_PARTITIONS: u32 = 4;

/// The largest partition count a log can be created with.
pub const MAX_PARTITIONS: u32 = 65_536;

/// How long a statement waits for another connection's lock before it fails with `SQLITE_BUSY`.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The database file's path relative to the data directory.
const DATABASE_PATH: [&str; 2] = ["log", "events.sqlite"];

const CREATE_TABLES: &str = r#"
CREATE TABLE meta (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE partition_heads (
    "partition" INTEGER PRIMARY KEY,
    next_offset INTEGER NOT NULL
);
CREATE TABLE records (
    "partition" INTEGER NOT NULL,
    "offset" INTEGER NOT NULL,
    key BLOB NOT NULL,
    value BLOB NOT NULL,
    appended_at_ms INTEGER NOT NULL,
    PRIMARY KEY ("partition", "offset")
);
"#;

const SELECT_HEAD: &str = r#"SELECT next_offset FROM partition_heads WHERE "partition" = ?1"#;

const UPDATE_HEAD: &str = r#"UPDATE partition_heads SET next_offset = ?2 WHERE "partition" = ?1"#;

const INSERT_RECORD: &str = r#"INSERT INTO records ("partition", "offset", key, value, appended_at_ms)
VALUES (?1, ?2, ?3, ?4, ?5)"#;

const SELECT_RECORDS: &str = r#"SELECT "offset", value, appended_at_ms FROM records
WHERE "partition" = ?1 AND "offset" >= ?2
ORDER BY "offset"
LIMIT ?3"#;

/// Options of [`LocalLog::open`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LocalLogOptions {
    /// Number of partitions of a new log, from 1 to [`MAX_PARTITIONS`]. Default 4. An existing
    /// log keeps the count it was created with.
    pub partitions: u32,
}

impl Default for LocalLogOptions {
    fn default() -> Self {
        Self {
            partitions: DEFAULT_PARTITIONS,
        }
    }
}

/// One connection to the local log under a data directory.
///
/// Open one `LocalLog` per thread that reads or appends. Connections in any number of
/// processes on the same machine may use the log at once. Appends are serialized by SQLite's
/// write lock. In WAL mode, a read does not wait for an append in progress.
#[derive(Debug)]
pub struct LocalLog {
    connection: Connection,
    path: PathBuf,
    partitions: u32,
    log_id: i64,
}

impl LocalLog {
    /// Opens the log under `data_dir`, creating the directory and the log if they do not exist.
    ///
    /// A new log gets `options.partitions` partitions. An existing log keeps the count it was
    /// created with, and a different requested count is logged and ignored.
    ///
    /// # Errors
    ///
    /// Fails if
    /// * `options.partitions` is outside 1 to [`MAX_PARTITIONS`],
    /// * the directory or the database cannot be created or opened,
    /// * another connection keeps the write lock for more than 5 s,
    /// * SQLite cannot use WAL mode on the file system,
    /// * or the log has another format version or inconsistent metadata.
    pub fn open(data_dir: &Path, options: &LocalLogOptions) -> Result<Self, ConnectorError> {
        if options.partitions == 0 || options.partitions > MAX_PARTITIONS {
            return Err(ConnectorError::InvalidOption {
                option: "partitions",
                value: options.partitions.to_string(),
                expected: "a partition count from 1 to 65536",
            });
        }

        let path = DATABASE_PATH
            .iter()
            .fold(data_dir.to_path_buf(), |path, part| path.join(part));
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).map_err(|source| ConnectorError::Io {
                action: "create directory",
                path: dir.to_path_buf(),
                source,
            })?;
        }

        let mut connection = open_connection(&path)?;
        let (partitions, log_id) = initialize(&mut connection, &path, options.partitions)?;
        if partitions != options.partitions {
            warn!(
                path = %path.display(),
                stored_partitions = partitions,
                requested_partitions = options.partitions,
                "Ignored the requested partition count, because the local log keeps the count it was created with."
            );
        }
        Ok(Self {
            connection,
            path,
            partitions,
            log_id,
        })
    }

    /// Returns the identity of this log: a random number drawn when the log was created (or
    /// first opened by a version that records it). Two processes that see the same id read
    /// the same log.
    pub fn log_id(&self) -> i64 {
        self.log_id
    }

    /// Returns the path of the SQLite database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Returns the number of partitions, fixed when the log was created.
    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    /// Returns the partition that records with this key go to. See [`partition_for_key`].
    pub fn partition_for_key(&self, key: &[u8]) -> u32 {
        partition_for_key(key, self.partitions)
    }

    /// Deletes the records of `partition` below offset `below` that were appended before
    /// `appended_before_ms`, and returns how many were deleted. Offsets are never reused:
    /// the partition's next offset is kept apart from its records.
    ///
    /// # Errors
    ///
    /// Fails if the partition does not exist or the database cannot be written.
    pub fn truncate(
        &mut self,
        partition: u32,
        below: u64,
        appended_before_ms: Millis,
    ) -> Result<usize, ConnectorError> {
        self.check_partition(partition)?;
        let below = i64::try_from(below).unwrap_or(i64::MAX);
        let before = i64::try_from(appended_before_ms).unwrap_or(i64::MAX);
        self.connection
            .execute(
                r#"DELETE FROM records WHERE "partition" = ?1 AND "offset" < ?2 AND appended_at_ms < ?3"#,
                params![partition, below, before],
            )
            .map_err(|source| ConnectorError::Sqlite {
                action: "truncate records",
                path: self.path.clone(),
                source,
            })
    }

    /// The size in bytes of the log's database file and its write-ahead log.
    pub fn disk_bytes(&self) -> u64 {
        sqlite_disk_bytes(&self.path)
    }

    /// Appends all records in one transaction and returns the (partition, offset) of each, in
    /// input order.
    ///
    /// Each record goes to the partition of its key and gets the next offset there. Either
    /// every record is appended or none is. When this returns `Ok`, the records are on disk and
    /// visible to every reader.
    ///
    /// # Errors
    ///
    /// Fails if another connection holds the write lock for more than 5 s or the database
    /// cannot be written. Nothing of the batch is appended then.
    pub fn append(
        &mut self,
        records: &[(&[u8], &[u8])],
        now_ms: Millis,
    ) -> Result<Vec<(u32, u64)>, ConnectorError> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let appended_at_ms = i64::try_from(now_ms).unwrap_or(i64::MAX);
        let sqlite_error = |source| ConnectorError::Sqlite {
            action: "append records",
            path: self.path.clone(),
            source,
        };

        let transaction = self
            .connection
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sqlite_error)?;
        let mut positions = Vec::with_capacity(records.len());
        // The next offset of each partition this batch touches.
        let mut next_offsets: BTreeMap<u32, i64> = BTreeMap::new();
        {
            let mut select_head = transaction
                .prepare_cached(SELECT_HEAD)
                .map_err(sqlite_error)?;
            let mut insert = transaction
                .prepare_cached(INSERT_RECORD)
                .map_err(sqlite_error)?;
            for (key, value) in records {
                let partition = partition_for_key(key, self.partitions);
                let next_offset = match next_offsets.entry(partition) {
                    Entry::Occupied(entry) => entry.into_mut(),
                    Entry::Vacant(entry) => {
                        let head: i64 = select_head
                            .query_row([partition], |row| row.get(0))
                            .map_err(sqlite_error)?;
                        entry.insert(head)
                    }
                };
                let offset =
                    u64::try_from(*next_offset).map_err(|_| ConnectorError::CorruptLog {
                        path: self.path.clone(),
                        detail: format!(
                            "partition {partition} has negative next offset {next_offset}"
                        ),
                    })?;
                insert
                    .execute(params![partition, *next_offset, key, value, appended_at_ms])
                    .map_err(sqlite_error)?;
                *next_offset += 1;
                positions.push((partition, offset));
            }

            let mut update_head = transaction
                .prepare_cached(UPDATE_HEAD)
                .map_err(sqlite_error)?;
            for (partition, next_offset) in &next_offsets {
                update_head
                    .execute(params![partition, next_offset])
                    .map_err(sqlite_error)?;
            }
        }
        transaction.commit().map_err(sqlite_error)?;

        debug!(path = %self.path.display(), records = records.len(), "Appended records to the local log.");
        Ok(positions)
    }

    fn check_partition(&self, partition: u32) -> Result<(), ConnectorError> {
        if partition < self.partitions {
            Ok(())
        } else {
            Err(ConnectorError::PartitionOutOfRange {
                partition,
                partitions: self.partitions,
            })
        }
    }
}

impl Source for LocalLog {
    fn partitions(&self) -> u32 {
        self.partitions
    }

    fn read(
        &mut self,
        partition: u32,
        from_offset: u64,
        max_records: usize,
    ) -> Result<Vec<SourceRecord>, ConnectorError> {
        self.check_partition(partition)?;
        // SQLite integers are signed, so no record has an offset above i64::MAX.
        let Ok(from_offset) = i64::try_from(from_offset) else {
            return Ok(Vec::new());
        };
        if max_records == 0 {
            return Ok(Vec::new());
        }
        let limit = i64::try_from(max_records).unwrap_or(i64::MAX);
        let sqlite_error = |source| ConnectorError::Sqlite {
            action: "read records",
            path: self.path.clone(),
            source,
        };

        let mut select = self
            .connection
            .prepare_cached(SELECT_RECORDS)
            .map_err(sqlite_error)?;
        let rows = select
            .query_map(params![partition, from_offset, limit], |row| {
                Ok((
                    row.get::<_, i64>(0)?,
                    row.get::<_, Vec<u8>>(1)?,
                    row.get::<_, i64>(2)?,
                ))
            })
            .map_err(sqlite_error)?;
        let mut records = Vec::new();
        for row in rows {
            let (offset, value, appended_at_ms) = row.map_err(sqlite_error)?;
            let offset = u64::try_from(offset).map_err(|_| ConnectorError::CorruptLog {
                path: self.path.clone(),
                detail: format!("partition {partition} has a record at negative offset {offset}"),
            })?;
            records.push(SourceRecord {
                partition,
                offset,
                appended_at_ms: u64::try_from(appended_at_ms).ok(),
                value,
            });
        }
        Ok(records)
    }

    fn end_offset(&mut self, partition: u32) -> Result<u64, ConnectorError> {
        self.check_partition(partition)?;
        let head: i64 = self
            .connection
            .prepare_cached(SELECT_HEAD)
            .and_then(|mut select| select.query_row([partition], |row| row.get(0)))
            .map_err(|source| ConnectorError::Sqlite {
                action: "read the end offset",
                path: self.path.clone(),
                source,
            })?;
        u64::try_from(head).map_err(|_| ConnectorError::CorruptLog {
            path: self.path.clone(),
            detail: format!("partition {partition} has negative next offset {head}"),
        })
    }
}

/// Returns the partition of `key` among `partitions` partitions: the 64-bit FNV-1a hash of the
/// key bytes, modulo the partition count.
///
/// The result depends on nothing but the bytes and the count, so it is the same on every
/// platform and in every hookflow version. Changing it would move tenants between partitions of
/// existing logs.
///
/// # Panics
///
/// Panics if `partitions` is 0.
///
/// # Examples
///
/// ```
/// use hookflow_connectors::partition_for_key;
///
/// assert_eq!(partition_for_key(b"acme", 4), partition_for_key(b"acme", 4));
/// assert!(partition_for_key(b"acme", 4) < 4);
/// ```
pub fn partition_for_key(key: &[u8], partitions: u32) -> u32 {
    // The remainder is below `partitions`, so the cast loses nothing.
    (hookflow_schemas::fnv1a(key) % u64::from(partitions)) as u32
}

/// Returns the size in bytes of the SQLite database at `path` and its write-ahead log.
pub(crate) fn sqlite_disk_bytes(path: &Path) -> u64 {
    let wal = path.with_extension("sqlite-wal");
    [path, wal.as_path()]
        .iter()
        .filter_map(|path| fs::metadata(path).ok())
        .map(|metadata| metadata.len())
        .sum()
}

/// Opens a connection in WAL mode with a busy timeout and `synchronous=FULL`.
pub(crate) fn open_connection(path: &Path) -> Result<Connection, ConnectorError> {
    let sqlite_error = |action| {
        move |source| ConnectorError::Sqlite {
            action,
            path: path.to_path_buf(),
            source,
        }
    };

    let connection = Connection::open(path).map_err(sqlite_error("open the database"))?;
    connection
        .busy_timeout(BUSY_TIMEOUT)
        .map_err(sqlite_error("set the busy timeout"))?;

    // The journal mode is stored in the database file, so the first connection switches it and
    // later connections find it set.
    //
    // SQLite does not call the busy handler when the switch meets another connection's lock
    // (two processes opening a new log at once do), so this retries until the busy timeout.
    let deadline = Instant::now() + BUSY_TIMEOUT;
    let mode: String = loop {
        match connection.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0)) {
            Ok(mode) => break mode,
            Err(rusqlite::Error::SqliteFailure(failure, _))
                if failure.code == rusqlite::ErrorCode::DatabaseBusy
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(source) => return Err(sqlite_error("switch to WAL journal mode")(source)),
        }
    };
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(ConnectorError::WalUnavailable {
            path: path.to_path_buf(),
            mode,
        });
    }

    // Unlike the journal mode, `synchronous` is a setting of each connection.
    connection
        .pragma_update(None, "synchronous", "FULL")
        .map_err(sqlite_error("set synchronous=FULL"))?;
    Ok(connection)
}

/// Creates the tables of a new log, or checks the metadata of an existing one, and returns the
/// stored partition count and the log's id.
///
/// Runs in one `BEGIN IMMEDIATE` transaction, so when two processes open a new log at the same
/// time, one creates it and the other finds it created.
fn initialize(
    connection: &mut Connection,
    path: &Path,
    requested_partitions: u32,
) -> Result<(u32, i64), ConnectorError> {
    let sqlite_error = |source| ConnectorError::Sqlite {
        action: "initialize the log",
        path: path.to_path_buf(),
        source,
    };
    let corrupt = |detail: String| ConnectorError::CorruptLog {
        path: path.to_path_buf(),
        detail,
    };

    let transaction = connection
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(sqlite_error)?;
    let has_meta: bool = transaction
        .query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = 'meta')",
            [],
            |row| row.get(0),
        )
        .map_err(sqlite_error)?;

    if !has_meta {
        transaction
            .execute_batch(CREATE_TABLES)
            .map_err(sqlite_error)?;
        transaction
            .execute(
                "INSERT INTO meta (key, value) VALUES ('format_version', ?1), ('partitions', ?2)",
                params![FORMAT_VERSION, requested_partitions],
            )
            .map_err(sqlite_error)?;
        transaction
            .execute(
                r#"WITH RECURSIVE heads(p) AS (SELECT 0 UNION ALL SELECT p + 1 FROM heads WHERE p + 1 < ?1)
                INSERT INTO partition_heads ("partition", next_offset) SELECT p, 0 FROM heads"#,
                [requested_partitions],
            )
            .map_err(sqlite_error)?;
        let log_id = record_log_id(&transaction).map_err(sqlite_error)?;
        transaction.commit().map_err(sqlite_error)?;
        info!(
            path = %path.display(),
            partitions = requested_partitions,
            "Created the local log."
        );
        return Ok((requested_partitions, log_id));
    }

    let read_meta = |key: &str| -> Result<Option<i64>, ConnectorError> {
        transaction
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |row| {
                row.get(0)
            })
            .optional()
            .map_err(sqlite_error)
    };
    let version = read_meta("format_version")?
        .ok_or_else(|| corrupt("the meta table has no format_version".to_string()))?;
    if version != FORMAT_VERSION {
        return Err(ConnectorError::UnsupportedLogVersion {
            path: path.to_path_buf(),
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let stored = read_meta("partitions")?
        .ok_or_else(|| corrupt("the meta table has no partition count".to_string()))?;
    let partitions = u32::try_from(stored)
        .ok()
        .filter(|count| (1..=MAX_PARTITIONS).contains(count))
        .ok_or_else(|| {
            corrupt(format!(
                "stored partition count {stored} is outside 1 to {MAX_PARTITIONS}"
            ))
        })?;
    let heads: i64 = transaction
        .query_row("SELECT COUNT(*) FROM partition_heads", [], |row| row.get(0))
        .map_err(sqlite_error)?;
    if heads != i64::from(partitions) {
        return Err(corrupt(format!(
            "partition_heads has {heads} rows for {partitions} partitions"
        )));
    }
    let log_id = record_log_id(&transaction).map_err(sqlite_error)?;
    transaction.commit().map_err(sqlite_error)?;
    debug!(path = %path.display(), partitions, "Opened the local log.");
    Ok((partitions, log_id))
}

/// Returns the log's id, drawing and recording one first if the log has none: logs created
/// before the id existed get theirs on the first open.
fn record_log_id(transaction: &rusqlite::Transaction<'_>) -> Result<i64, rusqlite::Error> {
    let now_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos());
    let mut seed = now_ns.to_le_bytes().to_vec();
    seed.extend_from_slice(&std::process::id().to_le_bytes());
    // NOTE: time and process id make two logs' ids differ in practice, not by construction.
    let drawn = hookflow_schemas::fnv1a(&seed) as i64;
    transaction.execute(
        "INSERT OR IGNORE INTO meta (key, value) VALUES ('log_id', ?1)",
        [drawn],
    )?;
    transaction.query_row("SELECT value FROM meta WHERE key = 'log_id'", [], |row| {
        row.get(0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_for_key_is_hash_modulo_count() {
        assert_eq!(partition_for_key(b"foobar", 1), 0);
        assert_eq!(
            partition_for_key(b"a", 4),
            (0xaf63_dc4c_8601_ec8c_u64 % 4) as u32
        );
        assert_eq!(
            partition_for_key(b"a", 7),
            (0xaf63_dc4c_8601_ec8c_u64 % 7) as u32
        );
    }
}
