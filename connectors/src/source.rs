//! The [`Source`] trait: a partitioned, append-only log of raw records that the pipeline reads
//! by (partition, offset).
//!
//! A source takes a partition and a start offset and returns the records from there in offset
//! order, as [`SourceRecord`]s. It keeps no read position: the caller stores the next offset of
//! each partition (the pipeline keeps it in its checkpoint) and polls for records past it.
//!
//! [`SourceStatus`] is the up/down state a source's readers report, shared with whatever shows
//! the pipeline's health.

use hookflow_schemas::SourceRecord;

use crate::ConnectorError;

/// A partitioned log of raw records, read by offset.
///
/// Implemented by [`LocalLog`](crate::LocalLog) and [`FluvioSource`](crate::FluvioSource). Nothing here assumes that the records were
/// appended by the same process: a reader learns of new records only by reading again.
///
/// # Contract
///
/// * Partitions are numbered `0..partitions()`, and the count does not change while the source
///   is open.
/// * Within a partition, offsets start at 0 and increase by 1 per record. A record never moves
///   and its value never changes.
/// * [`read`](Source::read) returns records in offset order, starting at the first record at or
///   after `from_offset`, and returns an empty vector when there is none yet.
/// * Every record that `read` returns has an offset below the value that a later call to
///   [`end_offset`](Source::end_offset) returns.
pub trait Source: Send {
    /// Returns the number of partitions.
    fn partitions(&self) -> u32;

    /// Reads up to `max_records` records of `partition`, starting at `from_offset`, in offset
    /// order.
    ///
    /// # Errors
    ///
    /// Fails if `partition` is not below [`partitions`](Source::partitions) or the source cannot
    /// be read.
    fn read(
        &mut self,
        partition: u32,
        from_offset: u64,
        max_records: usize,
    ) -> Result<Vec<SourceRecord>, ConnectorError>;

    /// Returns the log end of `partition`: the offset the next appended record will get.
    ///
    /// # Errors
    ///
    /// Fails if `partition` is not below [`partitions`](Source::partitions) or the source cannot
    /// be read.
    fn end_offset(&mut self, partition: u32) -> Result<u64, ConnectorError>;

    /// Reads the records at `positions` (partition, offset), for example the payloads of due
    /// retries, and returns one result per position, in order. A source that can read many
    /// records in one request overrides this; the default reads them one by one.
    ///
    /// A position whose record does not exist gives [`ConnectorError::RecordMissing`].
    fn fetch(&mut self, positions: &[(u32, u64)]) -> Vec<Result<SourceRecord, ConnectorError>> {
        positions
            .iter()
            .map(|&(partition, offset)| {
                self.read(partition, offset, 1)?
                    .into_iter()
                    .find(|record| record.offset == offset)
                    .ok_or(ConnectorError::RecordMissing { partition, offset })
            })
            .collect()
    }

    /// Tells the source that every record of each partition below the given next offset is
    /// settled (the checkpoint has moved past it). A source with its own record of consumer
    /// progress mirrors it there; the default does nothing. Nothing depends on it succeeding.
    fn settled(&mut self, _offsets: &[(u32, u64)]) {}
}

/// Whether the source can be read right now, shared between the reader and the health checks.
///
/// The reader marks it up after every successful read or end-offset query and down, with the
/// error, when one fails. It starts up: a source that cannot be opened stops the pipeline
/// before anything reads this.
#[derive(Debug)]
pub struct SourceStatus {
    up: std::sync::atomic::AtomicBool,
    last_error: std::sync::Mutex<Option<String>>,
}

impl Default for SourceStatus {
    fn default() -> Self {
        SourceStatus {
            up: std::sync::atomic::AtomicBool::new(true),
            last_error: std::sync::Mutex::new(None),
        }
    }
}

impl SourceStatus {
    /// Returns a new status, up, to share between readers and health checks.
    pub fn new() -> std::sync::Arc<Self> {
        std::sync::Arc::new(Self::default())
    }

    /// Records a successful read. Cheap: one atomic store when the source was already up.
    pub fn mark_up(&self) {
        self.up.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Records a failed read and its error.
    pub fn mark_down(&self, error: impl std::fmt::Display) {
        if let Ok(mut last) = self.last_error.lock() {
            *last = Some(error.to_string());
        }
        self.up.store(false, std::sync::atomic::Ordering::Relaxed);
    }

    /// Returns whether the last read succeeded.
    pub fn is_up(&self) -> bool {
        self.up.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Returns the error of the last failed read, kept after the source is up again.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|last| last.clone())
    }
}
