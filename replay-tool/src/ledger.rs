//! The replay ledger: the tool's own record of every replay run, in
//! `<data_dir>/replay/replays.sqlite` (WAL, `synchronous=FULL`).
//!
//! It is separate from the pipeline's state store so that replays can be planned and
//! appended while `hookflow run` holds the data directory's lock.
//!
//! ```text
//! meta   (key TEXT PK, value TEXT)                       format_version = 1
//! runs   (generation PK, replay_id, selection JSON, summary JSON, items,
//!         created_at_ms, finished_at_ms NULL until every item is appended)
//! items  (generation, seq PK, item JSON, status, appended_partition, appended_offset)
//!         status: planned | appended | payload_gone
//! ```
//!
//! # Invariants
//!
//! * Generations are unique across runs; a forced rerun of a replay id gets a new one.
//! * A run's items are written with the run, in one transaction, so a resumed run sends the
//!   plan it started with even if the archive has changed since.
//! * An item is marked `appended` only after the log append of its record returned. A crash
//!   in between leaves it `planned`, so the resumed run appends it again. The pipeline's
//!   dedup drops that second copy, because it has the same (tenant, id, replay id,
//!   generation).

use std::path::{Path, PathBuf};

use hookflow_schemas::Millis;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use serde::Serialize;

use crate::select::{PlanItem, PlanSummary, Selection};
use crate::{ReplayError, Result};

const FORMAT_VERSION: &str = "1";

/// The status of a planned item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ItemStatus {
    /// Not yet appended.
    Planned,
    /// Appended to the log.
    Appended,
    /// Skipped: its original record left the log between planning and appending.
    PayloadGone,
}

impl ItemStatus {
    fn as_str(self) -> &'static str {
        match self {
            ItemStatus::Planned => "planned",
            ItemStatus::Appended => "appended",
            ItemStatus::PayloadGone => "payload_gone",
        }
    }
}

/// A new status for one item: (sequence number, status, the (partition, offset) its record
/// was appended at).
pub type ItemMark = (u64, ItemStatus, Option<(u32, u64)>);

/// One run of a replay as the ledger keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Run {
    /// The replay id.
    pub replay_id: String,
    /// The run's delivery generation.
    pub generation: u32,
    /// Events planned.
    pub items: u64,
    /// Events appended so far.
    pub appended: u64,
    /// Events skipped because their record left the log.
    pub payload_gone: u64,
    /// When the run was created (ms).
    pub created_at_ms: Millis,
    /// When its last item was appended (ms), if it has finished.
    pub finished_at_ms: Option<Millis>,
    /// The selection, as stored.
    pub selection: Selection,
}

/// A connection to the ledger.
pub struct Ledger {
    connection: Connection,
    path: PathBuf,
}

impl Ledger {
    /// Returns whether `data_dir` has a ledger, without creating one.
    pub fn exists(data_dir: &Path) -> bool {
        data_dir.join("replay").join("replays.sqlite").is_file()
    }

    /// Opens the ledger under `data_dir`, creating it if needed.
    ///
    /// # Errors
    ///
    /// Fails if the file cannot be created or opened, or has another format version.
    pub fn open(data_dir: &Path) -> Result<Self> {
        let dir = data_dir.join("replay");
        std::fs::create_dir_all(&dir).map_err(|source| ReplayError::Io {
            action: "create directory",
            path: dir.clone(),
            source,
        })?;
        let path = dir.join("replays.sqlite");
        let error = |action| {
            let path = path.clone();
            move |source| ReplayError::Ledger {
                path,
                action,
                source,
            }
        };

        let connection = Connection::open(&path).map_err(error("open the database"))?;
        connection
            .busy_timeout(std::time::Duration::from_secs(5))
            .map_err(error("set the busy timeout"))?;
        connection
            .query_row("PRAGMA journal_mode = WAL", [], |_| Ok(()))
            .map_err(error("switch to WAL"))?;
        connection
            .pragma_update(None, "synchronous", "FULL")
            .map_err(error("set synchronous=FULL"))?;

        connection
            .execute_batch(
                "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
                 CREATE TABLE IF NOT EXISTS runs (
                     generation INTEGER PRIMARY KEY, replay_id TEXT NOT NULL,
                     selection TEXT NOT NULL, summary TEXT NOT NULL, items INTEGER NOT NULL,
                     created_at_ms INTEGER NOT NULL, finished_at_ms INTEGER);
                 CREATE INDEX IF NOT EXISTS runs_by_id ON runs (replay_id);
                 CREATE TABLE IF NOT EXISTS items (
                     generation INTEGER NOT NULL, seq INTEGER NOT NULL, item TEXT NOT NULL,
                     status TEXT NOT NULL, appended_partition INTEGER, appended_offset INTEGER,
                     PRIMARY KEY (generation, seq));
                 INSERT OR IGNORE INTO meta (key, value) VALUES ('format_version', '1');",
            )
            .map_err(error("create the ledger tables"))?;

        let version: String = connection
            .query_row(
                "SELECT value FROM meta WHERE key = 'format_version'",
                [],
                |row| row.get(0),
            )
            .map_err(error("read the format version"))?;
        if version != FORMAT_VERSION {
            return Err(ReplayError::Invalid(format!(
                "replay ledger {} has format version {version}, but this build reads only \
                 version {FORMAT_VERSION}",
                path.display()
            )));
        }
        Ok(Ledger { connection, path })
    }

    fn error(&self, action: &'static str) -> impl Fn(rusqlite::Error) -> ReplayError + '_ {
        move |source| ReplayError::Ledger {
            path: self.path.clone(),
            action,
            source,
        }
    }

    /// Returns the highest generation of any run, or 0.
    ///
    /// # Errors
    ///
    /// Fails if the ledger cannot be read.
    pub fn max_generation(&self) -> Result<u32> {
        self.connection
            .query_row("SELECT coalesce(max(generation), 0) FROM runs", [], |row| {
                row.get(0)
            })
            .map_err(self.error("read the runs"))
    }

    /// Returns the generation a new run takes: one above every run in the ledger and above
    /// `seen`, the highest generation the selection found in the archive.
    ///
    /// # Errors
    ///
    /// Fails if the ledger cannot be read.
    pub fn next_generation(&self, seen: u32) -> Result<u32> {
        Ok(self.max_generation()?.max(seen) + 1)
    }

    /// Returns every run, oldest first; with `replay_id`, only that replay's.
    ///
    /// # Errors
    ///
    /// Fails if the ledger cannot be read or a stored selection does not decode.
    pub fn runs(&self, replay_id: Option<&str>) -> Result<Vec<Run>> {
        let mut statement = self
            .connection
            .prepare(
                "SELECT r.replay_id, r.generation, r.items, r.created_at_ms, r.finished_at_ms, r.selection,
                        (SELECT count(*) FROM items i WHERE i.generation = r.generation AND i.status = 'appended'),
                        (SELECT count(*) FROM items i WHERE i.generation = r.generation AND i.status = 'payload_gone')
                 FROM runs r WHERE ?1 IS NULL OR r.replay_id = ?1 ORDER BY r.generation",
            )
            .map_err(self.error("read the runs"))?;
        let rows = statement
            .query_map(params![replay_id], |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    row.get::<_, u32>(1)?,
                    row.get::<_, u64>(2)?,
                    row.get::<_, u64>(3)?,
                    row.get::<_, Option<u64>>(4)?,
                    row.get::<_, String>(5)?,
                    row.get::<_, u64>(6)?,
                    row.get::<_, u64>(7)?,
                ))
            })
            .map_err(self.error("read the runs"))?
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(self.error("read the runs"))?;
        rows.into_iter()
            .map(
                |(replay_id, generation, items, created, finished, selection, appended, gone)| {
                    Ok(Run {
                        selection: serde_json::from_str(&selection).map_err(|e| {
                            ReplayError::Invalid(format!(
                                "replay ledger {}: run {generation} has an unreadable selection: {e}",
                                self.path.display()
                            ))
                        })?,
                        replay_id,
                        generation,
                        items,
                        appended,
                        payload_gone: gone,
                        created_at_ms: created,
                        finished_at_ms: finished,
                    })
                },
            )
            .collect()
    }

    /// Records a new run with its items, all planned, in one transaction.
    ///
    /// # Errors
    ///
    /// Fails if the ledger cannot be written (nothing is written then) or the generation is
    /// taken.
    pub fn create_run(
        &mut self,
        replay_id: &str,
        generation: u32,
        selection: &Selection,
        summary: &PlanSummary,
        items: &[PlanItem],
        now_ms: Millis,
    ) -> Result<()> {
        let path = self.path.clone();
        let error = move |source| ReplayError::Ledger {
            path: path.clone(),
            action: "record the run",
            source,
        };
        let transaction = self
            .connection
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(&error)?;
        transaction
            .execute(
                "INSERT INTO runs (generation, replay_id, selection, summary, items, created_at_ms) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    generation,
                    replay_id,
                    to_json(selection),
                    to_json(summary),
                    items.len() as u64,
                    now_ms
                ],
            )
            .map_err(&error)?;
        {
            let mut insert = transaction
                .prepare(
                    "INSERT INTO items (generation, seq, item, status) VALUES (?1, ?2, ?3, 'planned')",
                )
                .map_err(&error)?;
            for (seq, item) in items.iter().enumerate() {
                insert
                    .execute(params![generation, seq as u64, to_json(item)])
                    .map_err(&error)?;
            }
        }
        transaction.commit().map_err(&error)
    }

    /// Returns the items of run `generation` not yet appended, in plan order, with their
    /// sequence numbers.
    ///
    /// # Errors
    ///
    /// Fails if the ledger cannot be read or an item does not decode.
    pub fn planned_items(&self, generation: u32) -> Result<Vec<(u64, PlanItem)>> {
        let mut statement = self
            .connection
            .prepare("SELECT seq, item FROM items WHERE generation = ?1 AND status = 'planned' ORDER BY seq")
            .map_err(self.error("read the items"))?;
        let rows = statement
            .query_map(params![generation], |row| {
                Ok((row.get::<_, u64>(0)?, row.get::<_, String>(1)?))
            })
            .map_err(self.error("read the items"))?
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(self.error("read the items"))?;
        rows.into_iter()
            .map(|(seq, item)| {
                serde_json::from_str(&item)
                    .map(|item| (seq, item))
                    .map_err(|e| {
                        ReplayError::Invalid(format!(
                            "replay ledger {}: item {seq} of run {generation} is unreadable: {e}",
                            self.path.display()
                        ))
                    })
            })
            .collect()
    }

    /// Sets the status of items of run `generation`, with the log position each was appended
    /// at, in one transaction.
    ///
    /// # Errors
    ///
    /// Fails if the ledger cannot be written; nothing is written then.
    pub fn mark(&mut self, generation: u32, marks: &[ItemMark]) -> Result<()> {
        let path = self.path.clone();
        let error = move |source| ReplayError::Ledger {
            path: path.clone(),
            action: "record progress",
            source,
        };
        let transaction = self
            .connection
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(&error)?;
        {
            let mut update = transaction
                .prepare(
                    "UPDATE items SET status = ?3, appended_partition = ?4, appended_offset = ?5 \
                     WHERE generation = ?1 AND seq = ?2",
                )
                .map_err(&error)?;
            for (seq, status, position) in marks {
                update
                    .execute(params![
                        generation,
                        seq,
                        status.as_str(),
                        position.map(|p| p.0),
                        position.map(|p| p.1)
                    ])
                    .map_err(&error)?;
            }
        }
        transaction.commit().map_err(&error)
    }

    /// Marks run `generation` finished at `now_ms`.
    ///
    /// # Errors
    ///
    /// Fails if the ledger cannot be written.
    pub fn finish(&mut self, generation: u32, now_ms: Millis) -> Result<()> {
        self.connection
            .execute(
                "UPDATE runs SET finished_at_ms = ?2 WHERE generation = ?1",
                params![generation, now_ms],
            )
            .map(|_| ())
            .map_err(self.error("record the end of the run"))
    }

    /// Returns the ledger file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Returns the run with `generation`, if any.
    ///
    /// # Errors
    ///
    /// Fails if the ledger cannot be read.
    pub fn run(&self, generation: u32) -> Result<Option<Run>> {
        let id: Option<String> = self
            .connection
            .query_row(
                "SELECT replay_id FROM runs WHERE generation = ?1",
                params![generation],
                |row| row.get(0),
            )
            .optional()
            .map_err(self.error("read the runs"))?;
        let Some(id) = id else { return Ok(None) };
        Ok(self
            .runs(Some(&id))?
            .into_iter()
            .find(|run| run.generation == generation))
    }
}

/// Encodes a value the ledger stores. The stored types are structs of strings, numbers and
/// maps with string keys, which always serialize.
fn to_json<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(n: u64) -> PlanItem {
        PlanItem {
            tenant: "acme".into(),
            event_id: format!("evt_{n}"),
            event_type: "t".into(),
            partition: 0,
            offset: n,
            ingested_at_ms: Some(n),
            endpoints: vec!["ep".into()],
            body_sha256: None,
        }
    }

    #[test]
    fn ledger_tracks_progress() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|source| ReplayError::Io {
            action: "create",
            path: PathBuf::new(),
            source,
        })?;
        let mut ledger = Ledger::open(dir.path())?;
        assert_eq!(ledger.max_generation()?, 0);
        let items: Vec<PlanItem> = (0..5).map(item).collect();
        ledger.create_run(
            "rp",
            1,
            &Selection::default(),
            &PlanSummary::default(),
            &items,
            10,
        )?;
        ledger.mark(
            1,
            &[
                (0, ItemStatus::Appended, Some((0, 100))),
                (1, ItemStatus::PayloadGone, None),
            ],
        )?;
        drop(ledger);

        let mut ledger = Ledger::open(dir.path())?;
        let planned = ledger.planned_items(1)?;
        assert_eq!(
            planned.iter().map(|(seq, _)| *seq).collect::<Vec<_>>(),
            [2, 3, 4]
        );
        assert_eq!(planned[0].1, items[2]);
        let runs = ledger.runs(Some("rp"))?;
        assert_eq!(runs.len(), 1);
        assert_eq!((runs[0].appended, runs[0].payload_gone), (1, 1));
        assert_eq!(runs[0].finished_at_ms, None);
        ledger.finish(1, 20)?;
        assert_eq!(ledger.run(1)?.and_then(|run| run.finished_at_ms), Some(20));
        assert_eq!(ledger.max_generation()?, 1);
        assert!(
            ledger
                .create_run(
                    "rp",
                    1,
                    &Selection::default(),
                    &PlanSummary::default(),
                    &items,
                    30
                )
                .is_err(),
            "a generation is never reused"
        );
        Ok(())
    }
}
