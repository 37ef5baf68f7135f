//! The state store: what hookflow must remember across restarts, in one SQLite file beside
//! the local log (`<data_dir>/state/state.sqlite`, WAL, `synchronous=FULL`).
//!
//! Invariants, kept by the pipeline that writes here:
//!
//! * the checkpoint of a partition only moves forward, and every record below it is settled:
//!   each of its deliveries is in the journal (terminal) or in `pending`;
//! * a delivery is in `pending` or in the journal, never both: the batch that journals a
//!   delivery deletes its pending entry in the same transaction;
//! * a staged attempt row leaves staging only after the Parquet file holding it is complete;
//! * `first_seen` contains the first occurrence of each (tenant, event id) inside the dedup window;
//! * a parked delivery (its endpoint is disabled) is in `pending` with no due time, and
//!   `disabled_endpoints` names the endpoints disabled at run time (410 Gone, or failing for
//!   too long) until an operator enables them again;
//! * `endpoints` is the endpoint directory, kept only in the store of the process that serves
//!   the management API (process 0). It is the truth once written: a configuration file only
//!   inserts the endpoints whose id it lacks.
//!
//! ```text
//! meta        (key TEXT PK, value TEXT)                format_version = 3
//! checkpoint  (partition PK, next_offset)              next offset to read; all below settled
//! journal     (tenant, event_id, endpoint_id, generation PK, outcome, settled_at_ms)
//! pending     (partition, offset, endpoint_id, generation PK, attempt, due_ms or NULL when
//!              parked, entry JSON)
//! first_seen  (tenant, event_id PK, partition, offset, first_seen_ms)
//! decided     (partition, offset PK, outcome, settled_at_ms)   invalid and unrouted records
//! staged_rows (seq INTEGER PK AUTOINCREMENT, writer TEXT, row JSON)
//! disabled_endpoints (endpoint_id PK, disabled_at_ms, reason)
//! endpoints   (id PK, tenant, endpoint JSON, updated_at_ms)
//! ```
//!
//! Version 2 had no `endpoints` table; version 1 also kept `pending.due_ms` `NOT NULL` and had
//! no `disabled_endpoints`. Opening either migrates it.
//!
//! NOTE: an endpoint's signing secrets and any credentials in its URL or headers are stored in
//! plain text in `endpoints.endpoint`, protected only by the file's permissions. Encrypting
//! them at rest would take a key kept outside the data directory (a file or a KMS), an
//! envelope per row, and a way to rotate that key.
//!
//! Every connection may write; SQLite serialises the writers, and each [`StateStore::commit`]
//! is one transaction.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use hookflow_schemas::{AttemptRow, Endpoint, FirstSeen, Millis, Outcome, PendingDelivery};
use rusqlite::{params, Connection, OptionalExtension, Transaction, TransactionBehavior};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::local_log::{open_connection, sqlite_disk_bytes};
use crate::ConnectorError;

/// The on-disk format version of the state store.
pub const STATE_FORMAT_VERSION: i64 = 3;

/// An endpoint disabled at run time, as the state store records it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DisabledEndpoint {
    /// The endpoint's id.
    pub endpoint_id: String,
    /// When it was disabled (ms since epoch).
    pub disabled_at_ms: Millis,
    /// Why, for the operator: the status or the failure that disabled it.
    pub reason: String,
}

/// One journal entry: a delivery that reached its final outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalEntry {
    /// The endpoint delivered to.
    pub endpoint_id: String,
    /// The delivery's generation (0 for the original, more for resends and replays).
    pub generation: u32,
    /// `delivered`, `dead_lettered` or `expired`.
    pub outcome: String,
    /// When the outcome was journaled (ms since epoch).
    pub settled_at_ms: Millis,
}

/// The staged rows [`StateStore::staged_rows_matching`] reads.
#[derive(Debug, Clone, Copy)]
pub enum StagedFilter<'a> {
    /// The attempts of one event.
    Event {
        /// The event's tenant.
        tenant: &'a str,
        /// The event's id.
        event_id: &'a str,
    },
    /// The attempts of one endpoint finished at or after `since_ms`.
    Endpoint {
        /// The endpoint's id.
        endpoint_id: &'a str,
        /// The earliest finish time, in ms since the Unix epoch.
        since_ms: Millis,
    },
}

/// The store's record of one event, from [`StateStore::event_record`].
#[derive(Debug, Clone, Default)]
pub struct EventRecord {
    /// Its first occurrence, while inside the dedup window.
    pub first_seen: Option<FirstSeen>,
    /// Its settled deliveries.
    pub journal: Vec<JournalEntry>,
    /// Its deliveries waiting for a retry, or parked.
    pub pending: Vec<PendingDelivery>,
}

/// Everything one dataflow step must make durable at once.
#[derive(Debug, Clone, Default)]
pub struct DurableBatch {
    /// Attempt rows to stage for the archive. Rows with a final outcome and an endpoint also
    /// journal their delivery and delete its pending entry.
    pub rows: Vec<AttemptRow>,
    /// Deliveries stamped to a later time, inserted or updated.
    pub pending: Vec<PendingDelivery>,
    /// First occurrences admitted by dedup.
    pub first_seen: Vec<FirstSeen>,
    /// Endpoints the deliver operator disabled.
    pub disabled: Vec<DisabledEndpoint>,
}

impl DurableBatch {
    /// Returns whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
            && self.pending.is_empty()
            && self.first_seen.is_empty()
            && self.disabled.is_empty()
    }
}

/// A connection to the state store.
pub struct StateStore {
    connection: Connection,
    path: PathBuf,
}

impl StateStore {
    /// Opens (creating if needed) the state store under `data_dir`.
    ///
    /// # Errors
    ///
    /// Fails if the file cannot be created or opened, or holds another format version.
    pub fn open(data_dir: &Path) -> Result<Self, ConnectorError> {
        Self::open_dir(&data_dir.join("state"))
    }

    /// Opens (creating if needed) the state store `state.sqlite` in `dir`. A process of a
    /// cluster keeps its store in a directory of its own.
    ///
    /// # Errors
    ///
    /// Fails if the file cannot be created or opened, or holds another format version.
    pub fn open_dir(dir: &Path) -> Result<Self, ConnectorError> {
        let dir = dir.to_path_buf();
        std::fs::create_dir_all(&dir).map_err(|source| ConnectorError::Io {
            action: "create directory",
            path: dir.clone(),
            source,
        })?;
        let path = dir.join("state.sqlite");
        let mut connection = open_connection(&path)?;
        initialize(&mut connection, &path)?;
        Ok(StateStore { connection, path })
    }

    /// Returns the database file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn error(&self, action: &'static str) -> impl Fn(rusqlite::Error) -> ConnectorError + '_ {
        move |source| ConnectorError::Sqlite {
            action,
            path: self.path.clone(),
            source,
        }
    }

    /// Runs the query `sql` with `params` and collects what `map` returns for each row. `action`
    /// names the read in an error.
    fn read_all<T, C: FromIterator<T>>(
        &self,
        action: &'static str,
        sql: &str,
        params: impl rusqlite::Params,
        map: impl FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    ) -> Result<C, ConnectorError> {
        let mut statement = self
            .connection
            .prepare_cached(sql)
            .map_err(self.error(action))?;
        let rows = statement
            .query_map(params, map)
            .map_err(self.error(action))?;
        rows.collect::<Result<C, _>>().map_err(self.error(action))
    }

    /// Runs the query `sql`, whose one column is a JSON entry, and decodes every entry.
    /// `action` names the read and `what` the entry in an error.
    fn read_entries<T: DeserializeOwned>(
        &self,
        action: &'static str,
        what: &'static str,
        sql: &str,
        params: impl rusqlite::Params,
    ) -> Result<Vec<T>, ConnectorError> {
        let entries: Vec<String> = self.read_all(action, sql, params, |row| row.get(0))?;
        entries
            .iter()
            .map(|entry| decode_entry(&self.path, what, entry))
            .collect()
    }

    /// Runs `write` in one immediate transaction and commits it. `action` names the write in
    /// an error, and nothing is written when `write` fails.
    fn write<T>(
        &mut self,
        action: &'static str,
        write: impl FnOnce(&Transaction<'_>) -> rusqlite::Result<T>,
    ) -> Result<T, ConnectorError> {
        let error = |source| ConnectorError::Sqlite {
            action,
            path: self.path.clone(),
            source,
        };
        let transaction = self
            .connection
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(error)?;
        let value = write(&transaction).map_err(error)?;
        transaction.commit().map_err(error)?;
        Ok(value)
    }

    /// Reads the next offset to read of every partition with a checkpoint.
    ///
    /// # Errors
    ///
    /// Fails if the store cannot be read.
    pub fn checkpoint(&self) -> Result<HashMap<u32, u64>, ConnectorError> {
        self.read_all(
            "read the checkpoint",
            "SELECT partition, next_offset FROM checkpoint",
            [],
            |row| Ok((row.get::<_, u32>(0)?, row.get::<_, u64>(1)?)),
        )
    }

    /// Moves the checkpoint of each (partition, next offset) forward; an offset below the
    /// stored one is ignored.
    ///
    /// # Errors
    ///
    /// Fails if the store cannot be written; nothing is written then.
    pub fn advance_checkpoint(&mut self, offsets: &[(u32, u64)]) -> Result<(), ConnectorError> {
        self.write("advance the checkpoint", |transaction| {
            let mut statement = transaction.prepare_cached(
                "INSERT INTO checkpoint (partition, next_offset) VALUES (?1, ?2) \
                 ON CONFLICT (partition) DO UPDATE SET next_offset = max(next_offset, excluded.next_offset)",
            )?;
            for (partition, offset) in offsets {
                statement.execute(params![partition, offset])?;
            }
            Ok(())
        })
    }

    /// Writes `batch` in one transaction: stages its rows, journals the final ones and
    /// deletes their pending entries, upserts its pending deliveries and records its first
    /// occurrences.
    ///
    /// # Errors
    ///
    /// Fails if the store cannot be written; nothing is written then.
    pub fn commit(
        &mut self,
        writer: &str,
        batch: &DurableBatch,
        now_ms: Millis,
    ) -> Result<(), ConnectorError> {
        let path = self.path.clone();
        let error = move |source| ConnectorError::Sqlite {
            action: "write a batch",
            path: path.clone(),
            source,
        };
        let transaction = self
            .connection
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(&error)?;
        {
            let mut stage = transaction
                .prepare_cached("INSERT INTO staged_rows (writer, row) VALUES (?1, ?2)")
                .map_err(&error)?;
            let mut journal = transaction
                .prepare_cached(
                    "INSERT OR REPLACE INTO journal (tenant, event_id, endpoint_id, generation, outcome, settled_at_ms) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )
                .map_err(&error)?;
            let mut unpend = transaction
                .prepare_cached(
                    "DELETE FROM pending WHERE partition = ?1 AND offset = ?2 AND endpoint_id = ?3 AND generation = ?4",
                )
                .map_err(&error)?;
            let mut decide = transaction
                .prepare_cached(
                    "INSERT OR REPLACE INTO decided (partition, offset, outcome, settled_at_ms) VALUES (?1, ?2, ?3, ?4)",
                )
                .map_err(&error)?;
            for row in &batch.rows {
                if row.endpoint_id.is_none() {
                    decide
                        .execute(params![row.partition, row.offset, row.outcome, now_ms])
                        .map_err(&error)?;
                }
                let encoded = encode_entry(&self.path, "attempt row", row)?;
                stage.execute(params![writer, encoded]).map_err(&error)?;

                let terminal = row.outcome != Outcome::Failed.as_str();
                if let (true, Some(tenant), Some(event_id), Some(endpoint_id)) =
                    (terminal, &row.tenant, &row.event_id, &row.endpoint_id)
                {
                    journal
                        .execute(params![
                            tenant,
                            event_id,
                            endpoint_id,
                            row.generation,
                            row.outcome,
                            now_ms
                        ])
                        .map_err(&error)?;
                    unpend
                        .execute(params![
                            row.partition,
                            row.offset,
                            endpoint_id,
                            row.generation
                        ])
                        .map_err(&error)?;
                }
            }

            let mut pend = transaction
                .prepare_cached(
                    "INSERT INTO pending (partition, offset, endpoint_id, generation, attempt, due_ms, entry) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) \
                     ON CONFLICT (partition, offset, endpoint_id, generation) DO UPDATE SET \
                     attempt = excluded.attempt, due_ms = excluded.due_ms, entry = excluded.entry",
                )
                .map_err(&error)?;
            for pending in &batch.pending {
                let encoded = encode_entry(&self.path, "pending delivery", pending)?;
                let due_ms = (!pending.is_parked()).then_some(pending.due_ms);
                pend.execute(params![
                    pending.partition,
                    pending.offset,
                    pending.endpoint_id,
                    pending.generation,
                    pending.attempt,
                    due_ms,
                    encoded
                ])
                .map_err(&error)?;
            }

            let mut seen = transaction
                .prepare_cached(
                    "INSERT OR IGNORE INTO first_seen (tenant, event_id, partition, offset, first_seen_ms) \
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )
                .map_err(&error)?;
            for first in &batch.first_seen {
                seen.execute(params![
                    first.tenant,
                    first.event_id,
                    first.partition,
                    first.offset,
                    first.first_seen_ms
                ])
                .map_err(&error)?;
            }

            let mut disable = transaction
                .prepare_cached(
                    "INSERT OR IGNORE INTO disabled_endpoints (endpoint_id, disabled_at_ms, reason) \
                     VALUES (?1, ?2, ?3)",
                )
                .map_err(&error)?;
            for disabled in &batch.disabled {
                disable
                    .execute(params![
                        disabled.endpoint_id,
                        disabled.disabled_at_ms,
                        disabled.reason
                    ])
                    .map_err(&error)?;
            }
        }
        transaction.commit().map_err(&error)
    }

    /// Returns whether the journal contains the delivery of (tenant, event id) to the endpoint.
    ///
    /// # Errors
    ///
    /// Fails if the store cannot be read.
    pub fn is_journaled(
        &self,
        tenant: &str,
        event_id: &str,
        endpoint_id: &str,
        generation: u32,
    ) -> Result<bool, ConnectorError> {
        self.connection
            .prepare_cached(
                "SELECT 1 FROM journal WHERE tenant = ?1 AND event_id = ?2 AND endpoint_id = ?3 AND generation = ?4",
            )
            .and_then(|mut statement| {
                statement.query_row(params![tenant, event_id, endpoint_id, generation], |_| Ok(())).optional()
            })
            .map(|found| found.is_some())
            .map_err(self.error("read the journal"))
    }

    /// Returns whether a delivery of the record at (partition, offset) to the endpoint is
    /// pending.
    ///
    /// # Errors
    ///
    /// Fails if the store cannot be read.
    pub fn is_pending(
        &self,
        partition: u32,
        offset: u64,
        endpoint_id: &str,
        generation: u32,
    ) -> Result<bool, ConnectorError> {
        self.connection
            .prepare_cached(
                "SELECT 1 FROM pending WHERE partition = ?1 AND offset = ?2 AND endpoint_id = ?3 AND generation = ?4",
            )
            .and_then(|mut statement| {
                statement.query_row(params![partition, offset, endpoint_id, generation], |_| Ok(())).optional()
            })
            .map(|found| found.is_some())
            .map_err(self.error("read pending deliveries"))
    }

    /// Returns whether the record at (partition, offset) was decided without a delivery
    /// (invalid or unrouted).
    ///
    /// # Errors
    ///
    /// Fails if the store cannot be read.
    pub fn is_decided(&self, partition: u32, offset: u64) -> Result<bool, ConnectorError> {
        self.connection
            .prepare_cached("SELECT 1 FROM decided WHERE partition = ?1 AND offset = ?2")
            .and_then(|mut statement| {
                statement
                    .query_row(params![partition, offset], |_| Ok(()))
                    .optional()
            })
            .map(|found| found.is_some())
            .map_err(self.error("read decided records"))
    }

    /// Records the worker count of a single process the first time, and rejects another count
    /// later: each worker's staged rows and state belong to the worker index that wrote them.
    ///
    /// # Errors
    ///
    /// Fails if the store cannot be used, or was written with another worker count.
    pub fn ensure_workers(&mut self, workers: usize) -> Result<(), ConnectorError> {
        self.ensure_counts(workers, 1, 0)
    }

    /// Records the worker count per process, the process count and this process's index the
    /// first time, and rejects others later: the partitions and endpoints of this store belong
    /// to the workers of that process in a cluster of that size. A store written before the
    /// process count was recorded counts as process 0 of 1.
    ///
    /// # Errors
    ///
    /// Fails if the store cannot be used, or was written by another process or with other
    /// counts.
    pub fn ensure_counts(
        &mut self,
        workers: usize,
        processes: usize,
        process_index: usize,
    ) -> Result<(), ConnectorError> {
        if self.read_meta("workers")?.is_some() && self.read_meta("processes")?.is_none() {
            self.write_meta("processes", "1")?;
            self.write_meta("process_index", "0")?;
        }
        self.ensure_fixed(
            "processes",
            processes,
            "the process count the data directory was created with",
        )?;
        self.ensure_fixed(
            "process_index",
            process_index,
            "the index of the process that created this state store",
        )?;
        self.ensure_fixed(
            "workers",
            workers,
            "the worker count per process the data directory was created with",
        )
    }

    /// Records `value` under `key` in `meta` the first time, and rejects another value later.
    fn ensure_fixed(
        &mut self,
        key: &'static str,
        value: usize,
        expected: &'static str,
    ) -> Result<(), ConnectorError> {
        match self.read_meta(key)? {
            None => self.write_meta(key, &value.to_string()),
            Some(stored) if stored == value.to_string() => Ok(()),
            Some(stored) => Err(ConnectorError::InvalidOption {
                option: key,
                value: format!(
                    "{value} (the state store {} was written with {stored})",
                    self.path.display()
                ),
                expected,
            }),
        }
    }

    fn read_meta(&self, key: &str) -> Result<Option<String>, ConnectorError> {
        self.connection
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |row| {
                row.get(0)
            })
            .optional()
            .map_err(self.error("read the state store's metadata"))
    }

    fn write_meta(&self, key: &str, value: &str) -> Result<(), ConnectorError> {
        self.connection
            .execute(
                "INSERT INTO meta (key, value) VALUES (?1, ?2)",
                params![key, value],
            )
            .map(|_| ())
            .map_err(self.error("record the state store's metadata"))
    }

    /// The lowest offset each partition's pending deliveries still reference: the log must
    /// keep it for their payloads.
    ///
    /// # Errors
    ///
    /// Fails if the store cannot be read.
    pub fn oldest_pending_offsets(&self) -> Result<HashMap<u32, u64>, ConnectorError> {
        self.read_all(
            "read pending offsets",
            "SELECT partition, min(offset) FROM pending GROUP BY partition",
            [],
            |row| Ok((row.get::<_, u32>(0)?, row.get::<_, u64>(1)?)),
        )
    }

    /// Counts the pending deliveries.
    ///
    /// # Errors
    ///
    /// Fails if the store cannot be read.
    pub fn pending_count(&self) -> Result<u64, ConnectorError> {
        self.connection
            .query_row("SELECT count(*) FROM pending", [], |row| row.get(0))
            .map_err(self.error("count pending deliveries"))
    }

    /// Counts the pending deliveries and, among them, the parked ones, in one scan.
    ///
    /// # Errors
    ///
    /// Fails if the store cannot be read.
    pub fn pending_counts(&self) -> Result<(u64, u64), ConnectorError> {
        self.connection
            .query_row(
                "SELECT count(*), count(*) - count(due_ms) FROM pending",
                [],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .map_err(self.error("count pending deliveries"))
    }

    /// Counts the parked deliveries: pending without a due time, their endpoint disabled.
    ///
    /// # Errors
    ///
    /// Fails if the store cannot be read.
    pub fn parked_count(&self) -> Result<u64, ConnectorError> {
        self.connection
            .query_row(
                "SELECT count(*) FROM pending WHERE due_ms IS NULL",
                [],
                |row| row.get(0),
            )
            .map_err(self.error("count parked deliveries"))
    }

    /// Returns the earliest due time among the pending deliveries due at or before `now_ms`,
    /// and how many those are. Parked deliveries have no due time and do not count.
    ///
    /// # Errors
    ///
    /// Fails if the store cannot be read.
    // TODO: this scans `pending`. An index on `due_ms` would make it a lookup, at the cost
    // of a schema version and one more index write per re-stamped delivery.
    pub fn overdue(&self, now_ms: Millis) -> Result<(Option<Millis>, u64), ConnectorError> {
        self.connection
            .query_row(
                "SELECT min(due_ms), count(*) FROM pending WHERE due_ms IS NOT NULL AND due_ms <= ?1",
                params![now_ms],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .map_err(self.error("read overdue deliveries"))
    }

    /// Counts the parked deliveries of each endpoint that has any.
    ///
    /// # Errors
    ///
    /// Fails if the store cannot be read.
    pub fn parked_by_endpoint(&self) -> Result<HashMap<String, u64>, ConnectorError> {
        self.read_all(
            "count parked deliveries",
            "SELECT endpoint_id, count(*) FROM pending WHERE due_ms IS NULL GROUP BY endpoint_id",
            [],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
    }

    /// Reads the endpoints disabled at run time, by endpoint id.
    ///
    /// # Errors
    ///
    /// Fails if the store cannot be read.
    pub fn disabled_endpoints(&self) -> Result<Vec<DisabledEndpoint>, ConnectorError> {
        self.read_all(
            "read disabled endpoints",
            "SELECT endpoint_id, disabled_at_ms, reason FROM disabled_endpoints ORDER BY endpoint_id",
            [],
            |row| {
                Ok(DisabledEndpoint {
                    endpoint_id: row.get(0)?,
                    disabled_at_ms: row.get(1)?,
                    reason: row.get(2)?,
                })
            },
        )
    }

    /// Enables an endpoint disabled at run time, so that the next run resumes its parked
    /// deliveries. Returns whether it was disabled, and how many deliveries it has parked.
    ///
    /// # Errors
    ///
    /// Fails if the store cannot be written.
    pub fn enable_endpoint(&mut self, endpoint_id: &str) -> Result<(bool, u64), ConnectorError> {
        let removed = self
            .connection
            .execute(
                "DELETE FROM disabled_endpoints WHERE endpoint_id = ?1",
                params![endpoint_id],
            )
            .map_err(self.error("enable an endpoint"))?;
        let parked: u64 = self
            .connection
            .query_row(
                "SELECT count(*) FROM pending WHERE due_ms IS NULL AND endpoint_id = ?1",
                params![endpoint_id],
                |row| row.get(0),
            )
            .map_err(self.error("count parked deliveries"))?;
        Ok((removed > 0, parked))
    }

    /// Reads every endpoint of the directory, by id.
    ///
    /// # Errors
    ///
    /// Fails if the store cannot be read or an endpoint does not decode.
    pub fn endpoints(&self) -> Result<Vec<Endpoint>, ConnectorError> {
        self.read_entries(
            "read endpoints",
            "endpoint",
            "SELECT endpoint FROM endpoints ORDER BY id",
            [],
        )
    }

    /// Reads the endpoint `id` of the directory.
    ///
    /// # Errors
    ///
    /// Fails if the store cannot be read or the endpoint does not decode.
    pub fn endpoint(&self, id: &str) -> Result<Option<Endpoint>, ConnectorError> {
        let encoded: Option<String> = self
            .connection
            .query_row(
                "SELECT endpoint FROM endpoints WHERE id = ?1",
                params![id],
                |row| row.get(0),
            )
            .optional()
            .map_err(self.error("read an endpoint"))?;
        encoded
            .map(|endpoint| decode_entry(&self.path, "endpoint", &endpoint))
            .transpose()
    }

    /// Creates or replaces `endpoint` in the directory. Returns whether it was created.
    ///
    /// # Errors
    ///
    /// Fails if the store cannot be written.
    pub fn put_endpoint(
        &mut self,
        endpoint: &Endpoint,
        now_ms: Millis,
    ) -> Result<bool, ConnectorError> {
        let encoded = encode_entry(&self.path, "endpoint", endpoint)?;
        self.write("write an endpoint", |transaction| {
            let existed: bool = transaction.query_row(
                "SELECT EXISTS (SELECT 1 FROM endpoints WHERE id = ?1)",
                params![endpoint.id],
                |row| row.get(0),
            )?;
            transaction.execute(
                "INSERT INTO endpoints (id, tenant, endpoint, updated_at_ms) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (id) DO UPDATE SET tenant = excluded.tenant,
                     endpoint = excluded.endpoint, updated_at_ms = excluded.updated_at_ms",
                params![endpoint.id, endpoint.tenant, encoded, now_ms],
            )?;
            Ok(!existed)
        })
    }

    /// Deletes the endpoint `id` from the directory, with its run-time disable mark. Returns
    /// whether it existed. Its parked deliveries stay until the pipeline dead-letters them.
    ///
    /// # Errors
    ///
    /// Fails if the store cannot be written.
    pub fn delete_endpoint(&mut self, id: &str) -> Result<bool, ConnectorError> {
        self.write("delete an endpoint", |transaction| {
            let removed =
                transaction.execute("DELETE FROM endpoints WHERE id = ?1", params![id])?;
            transaction.execute(
                "DELETE FROM disabled_endpoints WHERE endpoint_id = ?1",
                params![id],
            )?;
            Ok(removed > 0)
        })
    }

    /// Inserts each of `endpoints` whose id the directory lacks, in one transaction, and leaves
    /// the others as stored. Returns the ids inserted.
    ///
    /// # Errors
    ///
    /// Fails if the store cannot be written.
    pub fn seed_endpoints(
        &mut self,
        endpoints: &[Endpoint],
        now_ms: Millis,
    ) -> Result<Vec<String>, ConnectorError> {
        let encoded = endpoints
            .iter()
            .map(|endpoint| encode_entry(&self.path, "endpoint", endpoint))
            .collect::<Result<Vec<_>, _>>()?;
        self.write("seed endpoints", |transaction| {
            let mut inserted = Vec::new();
            for (endpoint, encoded) in endpoints.iter().zip(encoded) {
                let changed = transaction.execute(
                    "INSERT OR IGNORE INTO endpoints (id, tenant, endpoint, updated_at_ms)
                     VALUES (?1, ?2, ?3, ?4)",
                    params![endpoint.id, endpoint.tenant, encoded, now_ms],
                )?;
                if changed > 0 {
                    inserted.push(endpoint.id.clone());
                }
            }
            Ok(inserted)
        })
    }

    /// Reads the deliveries of `endpoint_id` parked while it was disabled.
    ///
    /// # Errors
    ///
    /// Fails if the store cannot be read or an entry does not decode.
    pub fn parked_of(&self, endpoint_id: &str) -> Result<Vec<PendingDelivery>, ConnectorError> {
        self.read_entries(
            "read parked deliveries",
            "parked delivery",
            "SELECT entry FROM pending WHERE endpoint_id = ?1 AND due_ms IS NULL \
             ORDER BY partition, offset, generation",
            params![endpoint_id],
        )
    }

    /// Returns the size in bytes of the store's database file and its write-ahead log.
    pub fn disk_bytes(&self) -> u64 {
        sqlite_disk_bytes(&self.path)
    }

    /// Returns whether any delivery or record decision was ever recorded (journal, pending or
    /// decided records).
    ///
    /// # Errors
    ///
    /// Fails if the store cannot be read.
    pub fn has_settled_work(&self) -> Result<bool, ConnectorError> {
        self.connection
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM journal) OR EXISTS (SELECT 1 FROM pending) \
                 OR EXISTS (SELECT 1 FROM decided)",
                [],
                |row| row.get::<_, bool>(0),
            )
            .map_err(self.error("read the journal"))
    }

    /// Reads every pending delivery.
    ///
    /// # Errors
    ///
    /// Fails if the store cannot be read or an entry does not decode.
    pub fn pending(&self) -> Result<Vec<PendingDelivery>, ConnectorError> {
        self.read_entries(
            "read pending deliveries",
            "pending delivery",
            "SELECT entry FROM pending ORDER BY due_ms",
            [],
        )
    }

    /// Reads the store's record of one event: its first occurrence, the journal entries
    /// of its deliveries (every generation) and its pending deliveries, for the inspect API.
    ///
    /// # Errors
    ///
    /// Fails if the store cannot be read or a pending entry does not decode.
    pub fn event_record(
        &self,
        tenant: &str,
        event_id: &str,
    ) -> Result<EventRecord, ConnectorError> {
        let first_seen = self
            .connection
            .query_row(
                "SELECT partition, offset, first_seen_ms FROM first_seen WHERE tenant = ?1 AND event_id = ?2",
                params![tenant, event_id],
                |row| {
                    Ok(FirstSeen {
                        tenant: tenant.to_string(),
                        event_id: event_id.to_string(),
                        partition: row.get(0)?,
                        offset: row.get(1)?,
                        first_seen_ms: row.get(2)?,
                    })
                },
            )
            .optional()
            .map_err(self.error("read first occurrences"))?;
        let journal = self.read_all(
            "read the journal",
            "SELECT endpoint_id, generation, outcome, settled_at_ms FROM journal \
             WHERE tenant = ?1 AND event_id = ?2 ORDER BY generation, endpoint_id",
            params![tenant, event_id],
            |row| {
                Ok(JournalEntry {
                    endpoint_id: row.get(0)?,
                    generation: row.get(1)?,
                    outcome: row.get(2)?,
                    settled_at_ms: row.get(3)?,
                })
            },
        )?;
        // Pending deliveries are keyed by record position, so the first occurrence and the
        // replay records of later generations are found through their entries.
        let pending = self
            .pending()?
            .into_iter()
            .filter(|entry| entry.tenant == tenant && entry.event_id == event_id)
            .collect();
        Ok(EventRecord {
            first_seen,
            journal,
            pending,
        })
    }

    /// Reads the first occurrences seen at or after `since_ms`.
    ///
    /// # Errors
    ///
    /// Fails if the store cannot be read.
    pub fn first_seen_since(&self, since_ms: Millis) -> Result<Vec<FirstSeen>, ConnectorError> {
        self.read_all(
            "read first occurrences",
            "SELECT tenant, event_id, partition, offset, first_seen_ms FROM first_seen \
             WHERE first_seen_ms >= ?1 ORDER BY first_seen_ms",
            params![since_ms],
            |row| {
                Ok(FirstSeen {
                    tenant: row.get(0)?,
                    event_id: row.get(1)?,
                    partition: row.get(2)?,
                    offset: row.get(3)?,
                    first_seen_ms: row.get(4)?,
                })
            },
        )
    }

    /// Reads up to `limit` staged rows of `writer` with a sequence number above `after_seq`,
    /// oldest first, with their sequence numbers. Sequence numbers start at 1, so an
    /// `after_seq` of 0 reads from the oldest.
    ///
    /// # Errors
    ///
    /// Fails if the store cannot be read or a row does not decode.
    pub fn staged_rows(
        &self,
        writer: &str,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<(u64, AttemptRow)>, ConnectorError> {
        let after_seq = i64::try_from(after_seq).unwrap_or(i64::MAX);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows: Vec<(u64, String)> = self.read_all(
            "read staged rows",
            "SELECT seq, row FROM staged_rows WHERE writer = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
            params![writer, after_seq, limit],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )?;
        rows.into_iter()
            .map(|(seq, row)| Ok((seq, decode_entry(&self.path, "staged attempt row", &row)?)))
            .collect()
    }

    /// Reads the staged rows (attempts not yet in a complete Parquet file) of one event, or of
    /// one endpoint finished at or after `since_ms`, for the inspect API. Staged rows are few:
    /// at most `archive.max_file_age_secs` of attempts.
    ///
    /// # Errors
    ///
    /// Fails if the store cannot be read or a row does not decode.
    pub fn staged_rows_matching(
        &self,
        filter: StagedFilter<'_>,
    ) -> Result<Vec<AttemptRow>, ConnectorError> {
        let (sql, first, second) = match filter {
            StagedFilter::Event { tenant, event_id } => (
                "SELECT row FROM staged_rows WHERE json_extract(row, '$.tenant') = ?1 \
                 AND json_extract(row, '$.event_id') = ?2 ORDER BY seq",
                rusqlite::types::Value::Text(tenant.to_string()),
                rusqlite::types::Value::Text(event_id.to_string()),
            ),
            StagedFilter::Endpoint {
                endpoint_id,
                since_ms,
            } => (
                "SELECT row FROM staged_rows WHERE json_extract(row, '$.endpoint_id') = ?1 \
                 AND json_extract(row, '$.finished_at_ms') >= ?2 ORDER BY seq",
                rusqlite::types::Value::Text(endpoint_id.to_string()),
                rusqlite::types::Value::Integer(i64::try_from(since_ms).unwrap_or(i64::MAX)),
            ),
        };
        self.read_entries(
            "read staged rows",
            "staged attempt row",
            sql,
            params![first, second],
        )
    }

    /// Counts the staged rows of `writer`. The count scans every staged row, so callers on a
    /// hot path keep their own.
    ///
    /// # Errors
    ///
    /// Fails if the store cannot be read.
    pub fn staged_count(&self, writer: &str) -> Result<u64, ConnectorError> {
        self.connection
            .query_row(
                "SELECT count(*) FROM staged_rows WHERE writer = ?1",
                params![writer],
                |row| row.get(0),
            )
            .map_err(self.error("count staged rows"))
    }

    /// Removes `writer`'s staged rows with sequence numbers from `first` to `last`, once the
    /// archive file holding them is complete.
    ///
    /// # Errors
    ///
    /// Fails if the store cannot be written.
    pub fn unstage(&mut self, writer: &str, first: u64, last: u64) -> Result<(), ConnectorError> {
        self.connection
            .execute(
                "DELETE FROM staged_rows WHERE writer = ?1 AND seq BETWEEN ?2 AND ?3",
                params![writer, first, last],
            )
            .map(|_| ())
            .map_err(self.error("remove archived rows from staging"))
    }

    /// Forgets journal entries settled before `journal_before_ms` and first occurrences seen
    /// before `first_seen_before_ms`.
    ///
    /// # Errors
    ///
    /// Fails if the store cannot be written.
    pub fn prune(
        &mut self,
        journal_before_ms: Millis,
        first_seen_before_ms: Millis,
    ) -> Result<(), ConnectorError> {
        self.connection
            .execute(
                "DELETE FROM journal WHERE settled_at_ms < ?1",
                params![journal_before_ms],
            )
            .and_then(|_| {
                self.connection.execute(
                    "DELETE FROM decided WHERE settled_at_ms < ?1",
                    params![journal_before_ms],
                )
            })
            .and_then(|_| {
                self.connection.execute(
                    "DELETE FROM first_seen WHERE first_seen_ms < ?1",
                    params![first_seen_before_ms],
                )
            })
            .map(|_| ())
            .map_err(self.error("prune the journal and first occurrences"))
    }
}

/// Encodes `value` as the JSON of an entry column. `what` names it in an error.
fn encode_entry<T: Serialize + ?Sized>(
    path: &Path,
    what: &'static str,
    value: &T,
) -> Result<String, ConnectorError> {
    serde_json::to_string(value).map_err(|e| ConnectorError::CorruptState {
        path: path.to_path_buf(),
        what,
        detail: e.to_string(),
    })
}

/// Decodes an entry column of the store at `path`. `what` names it in an error.
fn decode_entry<T: DeserializeOwned>(
    path: &Path,
    what: &'static str,
    encoded: &str,
) -> Result<T, ConnectorError> {
    serde_json::from_str(encoded).map_err(|e| ConnectorError::CorruptState {
        path: path.to_path_buf(),
        what,
        detail: e.to_string(),
    })
}

fn initialize(connection: &mut Connection, path: &Path) -> Result<(), ConnectorError> {
    let error = |action| {
        move |source| ConnectorError::Sqlite {
            action,
            path: path.to_path_buf(),
            source,
        }
    };
    let transaction = connection
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(error("create the state tables"))?;
    transaction
        .execute_batch(
            "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS checkpoint (partition INTEGER PRIMARY KEY, next_offset INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS journal (
                 tenant TEXT NOT NULL, event_id TEXT NOT NULL, endpoint_id TEXT NOT NULL,
                 generation INTEGER NOT NULL, outcome TEXT NOT NULL, settled_at_ms INTEGER NOT NULL,
                 PRIMARY KEY (tenant, event_id, endpoint_id, generation));
             CREATE INDEX IF NOT EXISTS journal_settled ON journal (settled_at_ms);
             CREATE TABLE IF NOT EXISTS pending (
                 partition INTEGER NOT NULL, offset INTEGER NOT NULL, endpoint_id TEXT NOT NULL,
                 generation INTEGER NOT NULL, attempt INTEGER NOT NULL, due_ms INTEGER,
                 entry TEXT NOT NULL,
                 PRIMARY KEY (partition, offset, endpoint_id, generation));
             CREATE TABLE IF NOT EXISTS disabled_endpoints (
                 endpoint_id TEXT PRIMARY KEY, disabled_at_ms INTEGER NOT NULL, reason TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS first_seen (
                 tenant TEXT NOT NULL, event_id TEXT NOT NULL, partition INTEGER NOT NULL,
                 offset INTEGER NOT NULL, first_seen_ms INTEGER NOT NULL,
                 PRIMARY KEY (tenant, event_id));
             CREATE INDEX IF NOT EXISTS first_seen_time ON first_seen (first_seen_ms);
             CREATE TABLE IF NOT EXISTS decided (
                 partition INTEGER NOT NULL, offset INTEGER NOT NULL, outcome TEXT NOT NULL,
                 settled_at_ms INTEGER NOT NULL, PRIMARY KEY (partition, offset));
             CREATE TABLE IF NOT EXISTS staged_rows (
                 seq INTEGER PRIMARY KEY AUTOINCREMENT, writer TEXT NOT NULL, row TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS endpoints (
                 id TEXT PRIMARY KEY, tenant TEXT NOT NULL, endpoint TEXT NOT NULL,
                 updated_at_ms INTEGER NOT NULL);",
        )
        .map_err(error("create the state tables"))?;
    let version: Option<String> = transaction
        .query_row(
            "SELECT value FROM meta WHERE key = 'format_version'",
            [],
            |row| row.get(0),
        )
        .optional()
        .map_err(error("read the format version"))?;
    match version {
        None => {
            transaction
                .execute(
                    "INSERT INTO meta (key, value) VALUES ('format_version', ?1)",
                    params![STATE_FORMAT_VERSION.to_string()],
                )
                .map_err(error("write the format version"))?;
        }
        Some(found) => {
            let found: i64 = found.parse().unwrap_or(-1);
            if found == 1 {
                // Version 1 kept `pending.due_ms` NOT NULL, which parked deliveries need to
                // leave empty. SQLite cannot drop a constraint, so the table is copied.
                transaction
                    .execute_batch(
                        "CREATE TABLE pending_v2 (
                             partition INTEGER NOT NULL, offset INTEGER NOT NULL,
                             endpoint_id TEXT NOT NULL, generation INTEGER NOT NULL,
                             attempt INTEGER NOT NULL, due_ms INTEGER, entry TEXT NOT NULL,
                             PRIMARY KEY (partition, offset, endpoint_id, generation));
                         INSERT INTO pending_v2 SELECT partition, offset, endpoint_id, generation,
                             attempt, due_ms, entry FROM pending;
                         DROP TABLE pending;
                         ALTER TABLE pending_v2 RENAME TO pending;",
                    )
                    .map_err(error("migrate the state store from format 1"))?;
            }
            if found == 1 || found == 2 {
                // Version 3 only adds the `endpoints` table, created above; it starts empty,
                // so the next start seeds it from the configuration.
                transaction
                    .execute(
                        "UPDATE meta SET value = ?1 WHERE key = 'format_version'",
                        params![STATE_FORMAT_VERSION.to_string()],
                    )
                    .map_err(error("migrate the state store to format 3"))?;
            } else if found != STATE_FORMAT_VERSION {
                return Err(ConnectorError::UnsupportedStateVersion {
                    path: path.to_path_buf(),
                    found,
                    supported: STATE_FORMAT_VERSION,
                });
            }
        }
    }
    // Reading one endpoint's parked deliveries (enabling or deleting it while running) must
    // not scan every pending delivery.
    transaction
        .execute_batch(
            "CREATE INDEX IF NOT EXISTS pending_parked ON pending (endpoint_id) WHERE due_ms IS NULL;",
        )
        .map_err(error("create the state tables"))?;
    transaction
        .commit()
        .map_err(error("create the state tables"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(event_id: &str, endpoint_id: &str, outcome: Outcome, offset: u64) -> AttemptRow {
        AttemptRow {
            event_id: Some(event_id.into()),
            tenant: Some("acme".into()),
            endpoint_id: Some(endpoint_id.into()),
            offset,
            attempt: 1,
            outcome: outcome.as_str().into(),
            ..AttemptRow::default()
        }
    }

    fn pending(offset: u64, endpoint_id: &str, due_ms: Millis) -> PendingDelivery {
        PendingDelivery {
            partition: 0,
            offset,
            endpoint_id: endpoint_id.into(),
            generation: 0,
            attempt: 2,
            due_ms,
            tenant: "acme".into(),
            event_id: format!("evt_{offset}"),
            event_type: "t".into(),
            created_at: "2026-12-04T10:00:00Z".into(),
            read_at_ms: 5,
            appended_at_ms: Some(4),
            replay_id: None,
        }
    }

    #[test]
    fn overdue_skips_future_and_parked() -> Result<(), ConnectorError> {
        let dir = tempfile::tempdir().map_err(|source| ConnectorError::Io {
            action: "create",
            path: PathBuf::new(),
            source,
        })?;
        let mut store = StateStore::open(dir.path())?;
        assert_eq!(store.overdue(1_000)?, (None, 0));

        let batch = DurableBatch {
            pending: vec![
                pending(1, "ep", 400),
                pending(2, "ep", 700),
                pending(3, "ep", 5_000),
                pending(4, "ep", PendingDelivery::PARKED),
            ],
            ..DurableBatch::default()
        };
        store.commit("w0", &batch, 1)?;
        assert_eq!(store.overdue(1_000)?, (Some(400), 2));
        assert_eq!(store.overdue(399)?, (None, 0));
        Ok(())
    }

    #[test]
    fn journal_replaces_pending() -> Result<(), ConnectorError> {
        let dir = tempfile::tempdir().map_err(|source| ConnectorError::Io {
            action: "create",
            path: PathBuf::new(),
            source,
        })?;
        let mut store = StateStore::open(dir.path())?;
        let batch = DurableBatch {
            pending: vec![pending(7, "ep", 100)],
            ..DurableBatch::default()
        };
        store.commit("w0", &batch, 1)?;
        assert!(store.is_pending(0, 7, "ep", 0)?);
        assert_eq!(store.pending()?, vec![pending(7, "ep", 100)]);

        let batch = DurableBatch {
            rows: vec![row("evt_7", "ep", Outcome::Delivered, 7)],
            ..DurableBatch::default()
        };
        store.commit("w0", &batch, 2)?;
        assert!(
            !store.is_pending(0, 7, "ep", 0)?,
            "a journaled delivery is no longer pending"
        );
        assert!(store.is_journaled("acme", "evt_7", "ep", 0)?);
        assert_eq!(store.staged_count("w0")?, 1);
        Ok(())
    }

    #[test]
    fn failed_rows_are_not_journaled() -> Result<(), ConnectorError> {
        let dir = tempfile::tempdir().map_err(|source| ConnectorError::Io {
            action: "create",
            path: PathBuf::new(),
            source,
        })?;
        let mut store = StateStore::open(dir.path())?;
        let batch = DurableBatch {
            rows: vec![row("evt_1", "ep", Outcome::Failed, 1)],
            pending: vec![pending(1, "ep", 500)],
            ..DurableBatch::default()
        };
        store.commit("w0", &batch, 1)?;
        assert!(!store.is_journaled("acme", "evt_1", "ep", 0)?);
        assert!(store.is_pending(0, 1, "ep", 0)?);
        Ok(())
    }

    #[test]
    fn checkpoint_only_moves_forward() -> Result<(), ConnectorError> {
        let dir = tempfile::tempdir().map_err(|source| ConnectorError::Io {
            action: "create",
            path: PathBuf::new(),
            source,
        })?;
        let mut store = StateStore::open(dir.path())?;
        store.advance_checkpoint(&[(0, 10), (1, 3)])?;
        store.advance_checkpoint(&[(0, 4)])?;
        let checkpoint = store.checkpoint()?;
        assert_eq!(checkpoint.get(&0), Some(&10));
        assert_eq!(checkpoint.get(&1), Some(&3));
        drop(store);
        assert_eq!(
            StateStore::open(dir.path())?.checkpoint()?.get(&0),
            Some(&10),
            "survives reopening"
        );
        Ok(())
    }

    #[test]
    fn staging_round_trip() -> Result<(), ConnectorError> {
        let dir = tempfile::tempdir().map_err(|source| ConnectorError::Io {
            action: "create",
            path: PathBuf::new(),
            source,
        })?;
        let mut store = StateStore::open(dir.path())?;
        let rows: Vec<AttemptRow> = (0..5)
            .map(|n| row(&format!("e{n}"), "ep", Outcome::Delivered, n))
            .collect();
        store.commit(
            "w0",
            &DurableBatch {
                rows: rows.clone(),
                ..DurableBatch::default()
            },
            1,
        )?;
        store.commit(
            "w1",
            &DurableBatch {
                rows: rows[..1].to_vec(),
                ..DurableBatch::default()
            },
            1,
        )?;
        let staged = store.staged_rows("w0", 0, 100)?;
        let after_first = store.staged_rows("w0", staged[0].0, 1)?;
        assert_eq!(
            after_first,
            vec![staged[1].clone()],
            "a page starts after `after_seq`"
        );
        assert_eq!(
            staged.iter().map(|(_, r)| r.clone()).collect::<Vec<_>>(),
            rows
        );
        let (first, last) = (staged[0].0, staged[2].0);
        store.unstage("w0", first, last)?;
        assert_eq!(store.staged_count("w0")?, 2);
        assert_eq!(store.staged_count("w1")?, 1, "another writer's rows stay");
        Ok(())
    }

    #[test]
    fn counts_are_fixed() -> Result<(), ConnectorError> {
        let dir = tempfile::tempdir().map_err(|source| ConnectorError::Io {
            action: "create",
            path: PathBuf::new(),
            source,
        })?;
        let process_dir = dir.path().join("process-1");
        let mut store = StateStore::open_dir(&process_dir)?;
        store.ensure_counts(2, 2, 1)?;
        drop(store);

        let mut store = StateStore::open_dir(&process_dir)?;
        store.ensure_counts(2, 2, 1)?;
        let workers = store
            .ensure_counts(4, 2, 1)
            .expect_err("4 workers, written by 2");
        assert!(
            workers.to_string().contains("invalid workers 4"),
            "{workers}"
        );
        assert!(workers.to_string().contains("written with 2"), "{workers}");
        let processes = store
            .ensure_counts(2, 3, 1)
            .expect_err("3 processes, written by 2");
        assert!(
            processes.to_string().contains("invalid processes 3"),
            "{processes}"
        );
        let index = store
            .ensure_counts(2, 2, 0)
            .expect_err("process 0's store is another");
        assert!(
            index.to_string().contains("invalid process_index 0"),
            "{index}"
        );

        // A store from before the process count was recorded belongs to a single process.
        let mut legacy = StateStore::open(dir.path())?;
        legacy.write_meta("workers", "1")?;
        let error = legacy
            .ensure_counts(1, 2, 0)
            .expect_err("written by a single process");
        assert!(error.to_string().contains("written with 1"), "{error}");
        legacy.ensure_workers(1)?;
        Ok(())
    }

    #[test]
    fn newer_format_is_refused() -> Result<(), ConnectorError> {
        let dir = tempfile::tempdir().map_err(|source| ConnectorError::Io {
            action: "create",
            path: PathBuf::new(),
            source,
        })?;
        let store = StateStore::open(dir.path())?;
        store
            .connection
            .execute(
                "UPDATE meta SET value = '4' WHERE key = 'format_version'",
                [],
            )
            .map_err(store.error("test update"))?;
        drop(store);
        let Err(error) = StateStore::open(dir.path()) else {
            panic!("a newer format must be refused");
        };
        assert!(error.to_string().contains("format version 4"), "{error}");
        Ok(())
    }

    fn temp_dir() -> Result<tempfile::TempDir, ConnectorError> {
        tempfile::tempdir().map_err(|source| ConnectorError::Io {
            action: "create",
            path: PathBuf::new(),
            source,
        })
    }

    #[test]
    fn parked_delivery_has_no_due_time() -> Result<(), ConnectorError> {
        let dir = temp_dir()?;
        let mut store = StateStore::open(dir.path())?;
        let parked = pending(3, "ep", PendingDelivery::PARKED);
        let batch = DurableBatch {
            pending: vec![pending(2, "ep", 100), parked.clone()],
            disabled: vec![DisabledEndpoint {
                endpoint_id: "ep".into(),
                disabled_at_ms: 50,
                reason: "410 Gone".into(),
            }],
            ..DurableBatch::default()
        };
        store.commit("w0", &batch, 60)?;

        let null_due: i64 = store
            .connection
            .query_row(
                "SELECT count(*) FROM pending WHERE due_ms IS NULL AND offset = 3",
                [],
                |row| row.get(0),
            )
            .map_err(store.error("test read"))?;
        assert_eq!(
            null_due, 1,
            "a parked delivery is stored without a due time"
        );
        assert_eq!(store.parked_count()?, 1);
        assert_eq!(store.parked_by_endpoint()?.get("ep"), Some(&1));
        assert_eq!(store.pending_count()?, 2);
        assert_eq!(store.pending_counts()?, (2, 1));
        assert!(store.pending()?.contains(&parked));
        assert_eq!(
            store.oldest_pending_offsets()?.get(&0),
            Some(&2),
            "parked deliveries keep their records in the log"
        );

        let disabled = store.disabled_endpoints()?;
        assert_eq!(disabled.len(), 1);
        assert_eq!(disabled[0].reason, "410 Gone");
        assert_eq!(store.enable_endpoint("ep")?, (true, 1));
        assert!(store.disabled_endpoints()?.is_empty());
        assert_eq!(store.enable_endpoint("ep")?, (false, 1));
        Ok(())
    }

    #[test]
    fn format_1_is_migrated() -> Result<(), ConnectorError> {
        let dir = temp_dir()?;
        let store = StateStore::open(dir.path())?;
        store
            .connection
            .execute_batch(
                "DROP TABLE pending; DROP TABLE disabled_endpoints;
                 CREATE TABLE pending (
                     partition INTEGER NOT NULL, offset INTEGER NOT NULL, endpoint_id TEXT NOT NULL,
                     generation INTEGER NOT NULL, attempt INTEGER NOT NULL, due_ms INTEGER NOT NULL,
                     entry TEXT NOT NULL, PRIMARY KEY (partition, offset, endpoint_id, generation));
                 UPDATE meta SET value = '1' WHERE key = 'format_version';",
            )
            .map_err(store.error("test downgrade"))?;
        let old = pending(1, "ep", 100);
        let entry = encode_entry(&PathBuf::new(), "test", &old)?;
        store
            .connection
            .execute(
                "INSERT INTO pending VALUES (0, 1, 'ep', 0, 2, 100, ?1)",
                params![entry],
            )
            .map_err(store.error("test insert"))?;
        drop(store);

        let mut store = StateStore::open(dir.path())?;
        assert_eq!(store.pending()?, vec![old]);
        let batch = DurableBatch {
            pending: vec![pending(4, "ep", PendingDelivery::PARKED)],
            ..DurableBatch::default()
        };
        store.commit("w0", &batch, 60)?;
        assert_eq!(store.parked_count()?, 1);
        drop(store);
        // Reopening a migrated store finds the current version.
        StateStore::open(dir.path())?;
        Ok(())
    }

    fn endpoint(id: &str, url: &str) -> Endpoint {
        Endpoint {
            id: id.to_string(),
            tenant: "acme".to_string(),
            url: url.to_string(),
            event_types: vec![hookflow_schemas::EventTypePattern::parse("*").expect("pattern")],
            secrets: vec![hookflow_schemas::SigningSecret::new("whsec_c2VjcmV0")],
            headers: std::collections::BTreeMap::new(),
            timeout_ms: 1000,
            connect_timeout_ms: 500,
            max_in_flight: 4,
            enabled: true,
            rate_limit: None,
        }
    }

    #[test]
    fn endpoints_round_trip() -> Result<(), ConnectorError> {
        let dir = temp_dir()?;
        let mut store = StateStore::open(dir.path())?;
        let first = endpoint("ep1", "http://127.0.0.1:1/a");
        assert!(store.put_endpoint(&first, 10)?, "first write creates");
        let mut changed = first.clone();
        changed.url = "http://127.0.0.1:1/b".to_string();
        assert!(!store.put_endpoint(&changed, 20)?, "second write updates");
        drop(store);

        let mut store = StateStore::open(dir.path())?;
        assert_eq!(store.endpoint("ep1")?, Some(changed.clone()));
        assert_eq!(store.endpoints()?, vec![changed]);
        assert!(store.delete_endpoint("ep1")?);
        assert!(!store.delete_endpoint("ep1")?);
        assert_eq!(store.endpoint("ep1")?, None);
        Ok(())
    }

    #[test]
    fn seeding_keeps_stored_endpoints() -> Result<(), ConnectorError> {
        let dir = temp_dir()?;
        let mut store = StateStore::open(dir.path())?;
        let stored = endpoint("ep1", "http://127.0.0.1:1/stored");
        store.put_endpoint(&stored, 10)?;
        let from_config = vec![
            endpoint("ep1", "http://127.0.0.1:1/config"),
            endpoint("ep2", "http://127.0.0.1:1/new"),
        ];
        assert_eq!(
            store.seed_endpoints(&from_config, 20)?,
            vec!["ep2".to_string()]
        );
        assert_eq!(store.endpoint("ep1")?, Some(stored));
        assert_eq!(store.endpoint("ep2")?, Some(from_config[1].clone()));
        assert!(store.seed_endpoints(&from_config, 30)?.is_empty());
        Ok(())
    }

    #[test]
    fn parked_of_reads_one_endpoint() -> Result<(), ConnectorError> {
        let dir = temp_dir()?;
        let mut store = StateStore::open(dir.path())?;
        let batch = DurableBatch {
            pending: vec![
                pending(1, "ep", PendingDelivery::PARKED),
                pending(2, "ep", 500),
                pending(3, "other", PendingDelivery::PARKED),
            ],
            ..DurableBatch::default()
        };
        store.commit("w0", &batch, 60)?;
        let parked = store.parked_of("ep")?;
        assert_eq!(parked.len(), 1);
        assert_eq!(parked[0].offset, 1);
        Ok(())
    }

    #[test]
    fn format_2_is_migrated() -> Result<(), ConnectorError> {
        let dir = temp_dir()?;
        let store = StateStore::open(dir.path())?;
        store
            .connection
            .execute_batch(
                "DROP TABLE endpoints; UPDATE meta SET value = '2' WHERE key = 'format_version';",
            )
            .map_err(store.error("test downgrade"))?;
        drop(store);

        let mut store = StateStore::open(dir.path())?;
        assert!(store.endpoints()?.is_empty());
        store.put_endpoint(&endpoint("ep1", "http://127.0.0.1:1/a"), 1)?;
        let version = store.read_meta("format_version")?;
        assert_eq!(version.as_deref(), Some("3"));
        Ok(())
    }
}
