//! The durable side of the dataflow: the sink that writes to the state store, the archiver
//! that moves staged rows into Parquet files, the filter that keeps a restart from repeating
//! settled work, and the source of deliveries restored from `pending`.
//!
//! The sink holds the capabilities of what it has not yet written, so the probe after it
//! passes a time only once everything at that time is durable: that probe drives the
//! settled-offset checkpoint. A failed write is retried with backoff, and meanwhile the
//! frontier, and with it the checkpoint, stays where it was.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hookflow_connectors::DisabledEndpoint;
use hookflow_connectors::{staged_ranges, ArchiveWriter, ConnectorError, DurableBatch, StateStore};
use hookflow_operators::clock::Clock;
use hookflow_operators::deliver::endpoint_hash;
use hookflow_schemas::{AttemptRow, Delivery, FirstSeen, Millis, PendingDelivery};
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::{Exchange, Pipeline};
use timely::dataflow::operators::generic::operator::source;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::Capability;
use timely::dataflow::{Scope, Stream};

use crate::metrics::{EndpointCache, Metrics};

/// A record for the durable sink.
// Rows are the largest and most frequent variant; boxing them would allocate per attempt.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Durable {
    /// An attempt row to stage for the archive (and journal, when final).
    Row(AttemptRow),
    /// A delivery waiting for a later time.
    Pending(PendingDelivery),
    /// A first occurrence admitted by dedup.
    FirstSeen(FirstSeen),
    /// An endpoint disabled at run time.
    EndpointDisabled(DisabledEndpoint),
}

/// The first and longest wait between retries of a failed write, in ms.
const WRITE_RETRY_MS: (u64, u64) = (100, 5_000);

/// The limits at which the archiver completes a file.
#[derive(Debug, Clone)]
pub struct ArchivePolicy {
    /// The archive writer's prefix, which is also the staging writer name.
    pub prefix: String,
    /// Staged rows that complete a file.
    pub max_rows_per_file: usize,
    /// Age of the oldest staged row that completes a file, in ms.
    pub max_file_age_ms: u64,
    /// Estimated uncompressed bytes that complete a file.
    pub max_file_bytes: u64,
}

/// State shared between the durable sink and the worker loop.
pub struct Archiver {
    /// The worker's state store connection.
    pub store: Rc<RefCell<StateStore>>,
    /// The worker's archive writer.
    pub writer: ArchiveWriter,
    /// When files complete.
    pub policy: ArchivePolicy,
    /// The finish time of the oldest staged row (ms), from which its age counts. `None` when
    /// nothing is staged.
    oldest_staged_ms: Option<Millis>,
    /// Files completed by this run.
    pub files: Vec<PathBuf>,
    /// Attempt rows written to the state store by this run, by outcome.
    pub outcomes: std::collections::BTreeMap<String, u64>,
    /// Rows of this writer in staging, counted here because a SQL count scans every row.
    staged: u64,
    /// Staged rows read at a time while a file is written.
    page_rows: usize,
    /// Where completed files and their rows are counted.
    metrics: Arc<Metrics>,
}

impl Archiver {
    /// Creates the archiver, first removing from staging the rows of files that a crash
    /// completed before it could unstage them.
    ///
    /// # Errors
    ///
    /// Fails if the archive cannot be listed or the store written.
    pub fn new(
        store: Rc<RefCell<StateStore>>,
        writer: ArchiveWriter,
        archive_dir: &std::path::Path,
        policy: ArchivePolicy,
        metrics: Arc<Metrics>,
    ) -> Result<Self, ConnectorError> {
        for (first, last) in staged_ranges(archive_dir, &policy.prefix)? {
            store.borrow_mut().unstage(&policy.prefix, first, last)?;
        }
        let staged = store.borrow().staged_count(&policy.prefix)?;
        let oldest_staged_ms = oldest_staged(&store.borrow(), &policy.prefix, 0)?;
        Ok(Archiver {
            staged,
            page_rows: STAGED_PAGE_ROWS,
            store,
            writer,
            policy,
            oldest_staged_ms,
            files: Vec::new(),
            outcomes: std::collections::BTreeMap::new(),
            metrics,
        })
    }

    /// Moves staged rows into complete Parquet files when a file's worth is staged, when the
    /// oldest has waited `max_file_age_ms`, or always with `force`.
    ///
    /// # Errors
    ///
    /// Fails if the store cannot be read or written or a file cannot be completed; the rows
    /// stay staged and are written again by the next flush.
    pub fn flush(&mut self, now_ms: Millis, force: bool) -> Result<(), ConnectorError> {
        let due = force
            || self
                .oldest_staged_ms
                .is_some_and(|oldest| now_ms.saturating_sub(oldest) >= self.policy.max_file_age_ms);
        let max_rows = self.policy.max_rows_per_file.max(1);
        loop {
            let staged = self.staged;
            let full = staged >= max_rows as u64;
            if staged == 0 || !(due || full) {
                break;
            }
            let Some(file) = self.write_file(max_rows, now_ms)? else {
                break;
            };
            if !due && file.rows < max_rows && !file.bytes_full {
                break;
            }
        }
        Ok(())
    }

    /// Counts `rows`, just written to staging, and starts the age of the oldest staged row
    /// when they are the first.
    pub fn staged_added(&mut self, rows: &[AttemptRow]) {
        if self.staged == 0 {
            self.oldest_staged_ms = rows.iter().map(|row| row.finished_at_ms).min();
        }
        self.staged += rows.len() as u64;
    }

    /// Writes the oldest staged rows, up to `max_rows` or about `max_file_bytes`, as one range
    /// of complete files, and unstages them. Rows are read a page at a time, so memory
    /// contains one page and the row groups being encoded, not the whole file.
    fn write_file(
        &mut self,
        max_rows: usize,
        now_ms: Millis,
    ) -> Result<Option<WrittenFile>, ConnectorError> {
        let page_rows = self.page_rows.clamp(1, max_rows);
        let mut files = None;
        let mut after_seq = 0;
        let mut rows = 0;
        let mut bytes = 0u64;
        let mut bytes_full = false;

        while rows < max_rows && !bytes_full {
            let limit = page_rows.min(max_rows - rows);
            let page = self
                .store
                .borrow()
                .staged_rows(&self.policy.prefix, after_seq, limit)?;
            let Some((first_seq, _)) = page.first() else {
                break;
            };
            let files = files.get_or_insert_with(|| self.writer.begin_staged(*first_seq));
            let fetched = page.len();

            // A file takes rows until the next would pass the byte limit, and at least one.
            let mut within = 0;
            for (_, row) in &page {
                let size = estimated_bytes(row);
                if rows + within > 0 && bytes + size > self.policy.max_file_bytes {
                    bytes_full = true;
                    break;
                }
                bytes += size;
                within += 1;
            }
            let Some((last_seq, _)) = within.checked_sub(1).and_then(|last| page.get(last)) else {
                break;
            };
            after_seq = *last_seq;
            let page: Vec<AttemptRow> = page.into_iter().take(within).map(|(_, row)| row).collect();
            self.writer
                .write_staged_page(files, &page, after_seq, now_ms)?;
            rows += within;

            if fetched < limit {
                break;
            }
        }

        let Some(files) = files else {
            return Ok(None);
        };
        let first_seq = files.first_seq();
        let completed = self.writer.finish_staged(files)?;
        self.store
            .borrow_mut()
            .unstage(&self.policy.prefix, first_seq, after_seq)?;
        self.staged = self.staged.saturating_sub(rows as u64);
        self.oldest_staged_ms = if self.staged == 0 {
            None
        } else {
            oldest_staged(&self.store.borrow(), &self.policy.prefix, after_seq)?
        };
        self.metrics
            .archive_rows_written
            .fetch_add(rows as u64, Ordering::Relaxed);
        self.metrics
            .archive_files_written
            .fetch_add(completed.len() as u64, Ordering::Relaxed);
        self.files.extend(completed);
        Ok(Some(WrittenFile { rows, bytes_full }))
    }
}

/// Returns the finish time of `writer`'s oldest staged row after sequence number `after_seq`.
fn oldest_staged(
    store: &StateStore,
    writer: &str,
    after_seq: u64,
) -> Result<Option<Millis>, ConnectorError> {
    let next = store.staged_rows(writer, after_seq, 1)?;
    Ok(next.first().map(|(_, row)| row.finished_at_ms))
}

/// Rows read from staging at a time while writing a file.
const STAGED_PAGE_ROWS: usize = 4_096;

/// The size of a file range that [`Archiver::write_file`] wrote.
struct WrittenFile {
    rows: usize,
    /// Whether the byte limit ended the file.
    bytes_full: bool,
}

/// Estimates a row's uncompressed size: its text plus a fixed share for the other columns.
fn estimated_bytes(row: &AttemptRow) -> u64 {
    let text = [
        &row.event_id,
        &row.tenant,
        &row.endpoint_id,
        &row.event_type,
        &row.url,
        &row.error_message,
        &row.response_snippet,
        &row.body_sha256,
    ]
    .iter()
    .map(|field| field.as_ref().map_or(0, |text| text.len()))
    .sum::<usize>();
    (text + row.outcome.len() + 96) as u64
}

/// Writes `records` to the state store, one transaction per activation, and moves staged
/// rows into Parquet files as they accumulate. Its output carries no data: a probe on it
/// shows which times are durable.
pub fn persist<'scope>(
    records: Stream<'scope, u64, Vec<Durable>>,
    archiver: Rc<RefCell<Archiver>>,
    clock: Arc<dyn Clock>,
    unsynced_results: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
) -> Stream<'scope, u64, Vec<()>> {
    let scope = records.scope();
    records.unary_frontier::<CapacityContainerBuilder<Vec<()>>, _, _, _>(Pipeline, "Persist", move |_capability, info| {
        let activator = scope.activator_for(info.address);
        // Records received and not yet written, with the capabilities that keep their times
        // from completing.
        let mut batch = DurableBatch::default();
        let mut held: Vec<Capability<u64>> = Vec::new();
        let mut retry_ms = WRITE_RETRY_MS.0;
        let mut failing = false;
        // After a failed archive flush: when to try again, and the wait after that.
        let mut archive_retry_at: Millis = 0;
        let mut archive_retry_ms = WRITE_RETRY_MS.0;
        // This worker's handles on the per-endpoint counters, so counting takes no lock.
        let mut endpoint_stats = EndpointCache::new();

        move |(input, _frontier), output| {
            input.for_each_stamp(|capability, containers| {
                if let Some(retained) = capability.retain_least(output.output_index()) {
                    held.push(retained);
                }
                for record in containers.flat_map(|container| container.drain(..)) {
                    match record {
                        Durable::Row(row) => batch.rows.push(row),
                        Durable::Pending(pending) => batch.pending.push(pending),
                        Durable::FirstSeen(first) => batch.first_seen.push(first),
                        Durable::EndpointDisabled(disabled) => batch.disabled.push(disabled),
                    }
                }
            });

            let now = clock.now_ms();
            let mut archiver = archiver.borrow_mut();
            if !batch.is_empty() {
                let prefix = archiver.policy.prefix.clone();
                let written = archiver.store.borrow_mut().commit(&prefix, &batch, now);
                match written {
                    Ok(()) => {
                        metrics.record_rows(&batch.rows, &mut endpoint_stats);
                        for row in &batch.rows {
                            *archiver.outcomes.entry(row.outcome.clone()).or_default() += 1;
                        }
                        archiver.staged_added(&batch.rows);
                        let attempts = batch.rows.iter().filter(|row| row.started_at_ms.is_some()).count();
                        unsynced_results.fetch_sub(attempts.min(unsynced_results.load(Ordering::SeqCst)), Ordering::SeqCst);
                        batch = DurableBatch::default();
                        if failing {
                            tracing::info!("State store writes succeed again.");
                            failing = false;
                        }
                        retry_ms = WRITE_RETRY_MS.0;
                    }
                    Err(error) => {
                        tracing::error!(
                            error = %format!("{error:#}"),
                            path = %archiver.store.borrow().path().display(),
                            retry_in_ms = retry_ms,
                            "Writing to the state store failed; holding the checkpoint and retrying."
                        );
                        failing = true;
                        activator.activate_after(Duration::from_millis(retry_ms));
                        retry_ms = (retry_ms * 2).min(WRITE_RETRY_MS.1);
                        return;
                    }
                }
            }
            held.clear();

            if now >= archive_retry_at {
                match archiver.flush(now, false) {
                    Ok(()) => archive_retry_ms = WRITE_RETRY_MS.0,
                    Err(error) => {
                        tracing::error!(
                            error = %format!("{error:#}"),
                            retry_in_ms = archive_retry_ms,
                            "Completing an archive file failed; the rows stay staged and are retried."
                        );
                        archive_retry_at = now.saturating_add(archive_retry_ms);
                        archive_retry_ms = (archive_retry_ms * 2).min(WRITE_RETRY_MS.1 * 12);
                    }
                }
            }
            // Wake up now and then so that staged rows of an idle pipeline still reach a file.
            activator.activate_after(Duration::from_millis(archiver.policy.max_file_age_ms.clamp(100, 60_000)));
        }
    })
}

/// Where a restart must check the journal before delivering again: for each partition, the
/// log end when the run started. Records below it may have been handled by an earlier run.
pub type ResumeBounds = HashMap<u32, u64>;

/// Drops the deliveries of re-read records that an earlier run settled (journaled) or left
/// pending (they are restored from `pending` instead).
///
/// The deliveries are first exchanged to the worker that owns their endpoint, the same
/// exchange the deliver operator makes. That worker's process wrote the delivery's journal and
/// pending entries, so only its state store contains them.
pub fn skip_settled_deliveries<'scope>(
    deliveries: Stream<'scope, u64, Vec<Delivery>>,
    store: Rc<RefCell<StateStore>>,
    bounds: ResumeBounds,
) -> Stream<'scope, u64, Vec<Delivery>> {
    let exchange = Exchange::new(|delivery: &Delivery| endpoint_hash(&delivery.endpoint_id));
    deliveries.unary(exchange, "SkipSettled", move |_capability, _info| {
        move |input, output| {
            input.for_each_stamp(|capability, containers| {
                let mut session = output.session(&capability);
                for delivery in containers.flat_map(|container| container.drain(..)) {
                    let ingested = &delivery.ingested;
                    let below = bounds
                        .get(&ingested.partition)
                        .is_some_and(|end| ingested.offset < *end);
                    if below && already_handled(&store.borrow(), &delivery) {
                        continue;
                    }
                    session.give(delivery);
                }
            });
        }
    })
}

fn already_handled(store: &StateStore, delivery: &Delivery) -> bool {
    let event = &delivery.ingested.event;
    let journaled = store.is_journaled(
        &event.tenant,
        &event.id,
        &delivery.endpoint_id,
        delivery.generation,
    );
    let pending = store.is_pending(
        delivery.ingested.partition,
        delivery.ingested.offset,
        &delivery.endpoint_id,
        delivery.generation,
    );
    match (journaled, pending) {
        (Ok(journaled), Ok(pending)) => journaled || pending,
        (Err(error), _) | (_, Err(error)) => {
            // Delivering again is the safe side of at-least-once.
            tracing::error!(error = %format!("{error:#}"), "Cannot read the journal; delivering the re-read event again.");
            false
        }
    }
}

/// Drops rows of re-read records that an earlier run already decided without a delivery
/// (invalid or unrouted).
pub fn skip_decided_rows<'scope>(
    rows: Stream<'scope, u64, Vec<AttemptRow>>,
    store: Rc<RefCell<StateStore>>,
    bounds: ResumeBounds,
) -> Stream<'scope, u64, Vec<AttemptRow>> {
    rows.unary(Pipeline, "SkipDecided", move |_capability, _info| {
        move |input, output| {
            input.for_each_stamp(|capability, containers| {
                let mut session = output.session(&capability);
                for row in containers.flat_map(|container| container.drain(..)) {
                    let below = bounds
                        .get(&row.partition)
                        .is_some_and(|end| row.offset < *end);
                    if below
                        && store
                            .borrow()
                            .is_decided(row.partition, row.offset)
                            .unwrap_or(false)
                    {
                        continue;
                    }
                    session.give(row);
                }
            });
        }
    })
}

/// Emits the deliveries pending from earlier runs, each at its due time or now if that has
/// passed; a parked one (its endpoint enabled again since) is due now. Only the worker given
/// a non-empty `pending` emits: the first worker of each process, with its process's store.
/// The deliver operator's exchange takes each to the worker that owns its endpoint, a worker
/// of the same process, since that worker's process wrote it.
pub fn restore_pending<'scope>(
    scope: Scope<'scope, u64>,
    pending: Vec<PendingDelivery>,
    now_ms: Millis,
) -> Stream<'scope, u64, Vec<Delivery>> {
    let emit = !pending.is_empty();
    source(scope, "RestorePending", move |capability, _info| {
        let mut capability = Some(capability);
        let mut pending = Some(pending);
        move |output| {
            let (Some(capability), Some(pending)) = (capability.take(), pending.take()) else {
                return;
            };
            if !emit {
                return;
            }
            if !pending.is_empty() {
                tracing::info!(deliveries = pending.len(), "Resuming pending deliveries.");
            }
            for entry in pending {
                let time = if entry.is_parked() {
                    now_ms
                } else {
                    entry.due_ms.max(now_ms)
                };
                let delayed = capability.delayed(&time);
                output.session(&delayed).give(entry.to_delivery());
            }
        }
    })
}

/// The result of one maintenance pass.
#[derive(Debug, Clone, Default)]
pub struct Maintenance {
    /// Log records deleted past their retention.
    pub truncated: usize,
    /// The reason the log was not truncated in this pass, if it was given but not truncated.
    pub truncation_skipped: Option<String>,
    /// Bytes of the local log on disk (0 when no log was given).
    pub log_bytes: u64,
    /// Bytes of this process's state store on disk.
    pub state_bytes: u64,
    /// Deliveries pending in this process's state store.
    pub pending: u64,
}

/// Truncates `log`, when given, past `retention_ms`, never at or above a partition's
/// checkpoint nor the oldest offset a pending delivery references; and prunes journal and
/// first-occurrence entries of `store` older than `keep_state_ms`.
///
/// The checkpoints and pending deliveries are read from `store` and from the stores in
/// `other_stores`, the state directories of the other processes of a cluster: a partition's
/// checkpoint lives in its owner's store, and its pending deliveries in the stores of the
/// endpoints' owners. When one of those stores does not exist here (its process runs on
/// another machine, or has not started yet) the log is left as it is.
///
/// # Errors
///
/// Fails if the log or a store cannot be read or written; nothing is lost then, only kept
/// longer.
#[allow(clippy::too_many_arguments)]
pub fn maintain(
    log: Option<&mut hookflow_connectors::LocalLog>,
    store: &mut StateStore,
    other_stores: &[PathBuf],
    retention_ms: u64,
    keep_state_ms: u64,
    dedup_window_ms: u64,
    now_ms: Millis,
) -> Result<Maintenance, ConnectorError> {
    let mut done = Maintenance::default();
    if let Some(log) = log {
        match truncation_bounds(store, other_stores)? {
            Ok(bounds) => {
                let cutoff = now_ms.saturating_sub(retention_ms);
                for partition in 0..log.partitions() {
                    let below = bounds.get(&partition).copied().unwrap_or(0);
                    done.truncated += log.truncate(partition, below, cutoff)?;
                }
            }
            Err(reason) => done.truncation_skipped = Some(reason),
        }
        done.log_bytes = log.disk_bytes();
    }
    store.prune(
        now_ms.saturating_sub(keep_state_ms),
        now_ms.saturating_sub(dedup_window_ms),
    )?;
    done.state_bytes = store.disk_bytes();
    done.pending = store.pending_count()?;
    Ok(done)
}

/// Returns, per partition, the offset below which the log may be truncated: the least of its
/// checkpoint and the oldest offset any store's pending deliveries reference. A partition
/// with no checkpoint is absent, so nothing of it is truncated. The inner `Err` is the reason
/// no bound can be given.
fn truncation_bounds(
    store: &StateStore,
    other_stores: &[PathBuf],
) -> Result<Result<HashMap<u32, u64>, String>, ConnectorError> {
    let mut others = Vec::new();
    for dir in other_stores {
        if !dir.join("state.sqlite").exists() {
            return Ok(Err(format!("no state store in {}", dir.display())));
        }
        others.push(StateStore::open_dir(dir)?);
    }
    let mut checkpoint = HashMap::new();
    let mut oldest_pending: HashMap<u32, u64> = HashMap::new();
    for store in std::iter::once(store).chain(others.iter()) {
        for (partition, next) in store.checkpoint()? {
            let entry = checkpoint.entry(partition).or_insert(next);
            *entry = (*entry).max(next);
        }
        for (partition, oldest) in store.oldest_pending_offsets()? {
            let entry = oldest_pending.entry(partition).or_insert(oldest);
            *entry = (*entry).min(oldest);
        }
    }
    for (partition, oldest) in oldest_pending {
        if let Some(settled) = checkpoint.get_mut(&partition) {
            *settled = (*settled).min(oldest);
        }
    }
    Ok(Ok(checkpoint))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hookflow_connectors::{read_attempts, ArchiveOptions};

    /// 2024-05-01T00:00:00Z, in ms.
    const NOW_MS: Millis = 1_714_521_600_000;

    /// Returns an archiver of a new store and archive under `dir` with `max_rows` per file,
    /// reading `page_rows` staged rows at a time.
    fn archiver(dir: &std::path::Path, max_rows: usize, page_rows: usize) -> Archiver {
        let store = Rc::new(RefCell::new(StateStore::open(dir).expect("state store")));
        let archive_dir = dir.join("archive");
        let writer = ArchiveWriter::new(ArchiveOptions::new(&archive_dir, "w0"), NOW_MS)
            .expect("archive writer");
        let policy = ArchivePolicy {
            prefix: "w0".to_string(),
            max_rows_per_file: max_rows,
            max_file_age_ms: 60_000,
            max_file_bytes: 64 * 1024 * 1024,
        };
        let metrics = Arc::new(Metrics::new(10, 1, 1_000));
        let mut archiver =
            Archiver::new(store, writer, &archive_dir, policy, metrics).expect("archiver");
        archiver.page_rows = page_rows;
        archiver
    }

    /// Stages rows `from..to` as the durable sink does, and returns them.
    fn stage(archiver: &mut Archiver, from: usize, to: usize) -> Vec<AttemptRow> {
        stage_at(archiver, from, to, NOW_MS)
    }

    /// Stages rows `from..to` finished at `finished_at_ms`, and returns them.
    fn stage_at(
        archiver: &mut Archiver,
        from: usize,
        to: usize,
        finished_at_ms: Millis,
    ) -> Vec<AttemptRow> {
        let rows: Vec<AttemptRow> = (from..to)
            .map(|n| AttemptRow {
                tenant: Some("acme".to_string()),
                event_id: Some(format!("evt_{n:03}")),
                endpoint_id: Some("ep".to_string()),
                outcome: "failed".to_string(),
                finished_at_ms,
                ..AttemptRow::default()
            })
            .collect();
        let batch = DurableBatch {
            rows: rows.clone(),
            ..DurableBatch::default()
        };
        archiver
            .store
            .borrow_mut()
            .commit("w0", &batch, NOW_MS)
            .expect("commit");
        archiver.staged_added(&rows);
        rows
    }

    fn archived(archiver: &Archiver) -> Vec<AttemptRow> {
        let dir = archiver.files[0]
            .parent()
            .and_then(std::path::Path::parent)
            .expect("the archive directory");
        let mut rows = read_attempts(dir).expect("read the archive");
        rows.sort_by(|a, b| a.event_id.cmp(&b.event_id));
        rows
    }

    #[test]
    fn file_written_over_many_pages() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut archiver = archiver(dir.path(), 10, 3);
        let rows = stage(&mut archiver, 0, 10);

        archiver.flush(NOW_MS, false).expect("flush");

        assert_eq!(
            archiver.files.len(),
            1,
            "ten rows in pages of three make one file"
        );
        assert!(archiver.files[0].ends_with("attempts-w0-s000000000001-000000000010.parquet"));
        assert_eq!(archived(&archiver), rows);
        assert_eq!(archiver.staged, 0);
        assert_eq!(
            archiver.store.borrow().staged_count("w0").expect("count"),
            0
        );
    }

    #[test]
    fn full_file_leaves_rest_until_due() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut archiver = archiver(dir.path(), 4, 3);
        let mut rows = stage(&mut archiver, 0, 6);

        archiver.flush(NOW_MS, false).expect("flush");
        assert_eq!(archiver.files.len(), 1, "one full file of four rows");
        assert_eq!(archiver.staged, 2);

        rows.extend(stage(&mut archiver, 6, 7));
        archiver.flush(NOW_MS + 1, false).expect("flush");
        assert_eq!(
            archiver.files.len(),
            1,
            "three staged rows wait for their age"
        );

        archiver.flush(NOW_MS + 2, true).expect("flush");
        assert_eq!(archiver.files.len(), 2);
        assert_eq!(archived(&archiver), rows);
        assert_eq!(archiver.staged, 0);
    }

    #[test]
    fn age_counts_from_oldest_staged_row() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut archiver = archiver(dir.path(), 4, 3);
        let age = archiver.policy.max_file_age_ms;
        let mut rows = stage_at(&mut archiver, 0, 2, NOW_MS);
        rows.extend(stage_at(&mut archiver, 2, 6, NOW_MS + age - 1));

        archiver.flush(NOW_MS + age - 1, false).expect("flush");
        assert_eq!(
            archiver.files.len(),
            1,
            "one full file of the four oldest rows"
        );

        archiver.flush(NOW_MS + age, false).expect("flush");
        assert_eq!(
            archiver.files.len(),
            1,
            "the two rows left are 1 ms old, not a whole age"
        );

        archiver.flush(NOW_MS + 2 * age - 1, false).expect("flush");
        assert_eq!(
            archiver.files.len(),
            2,
            "the rows left have waited a whole age"
        );
        assert_eq!(archived(&archiver), rows);
    }
}
