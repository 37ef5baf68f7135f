//! The attempt archive: [`AttemptRow`]s written as zstd-compressed Parquet files, Hive-style
//! partitioned by the UTC day each attempt finished.
//!
//! [`ArchiveWriter::append`] takes attempt rows and writes them through parquet's
//! `ArrowWriter` into one open file per `date=` partition. A file is completed when it reaches
//! [`ArchiveOptions::max_rows_per_file`] or about [`ArchiveOptions::max_file_bytes`], when
//! [`ArchiveWriter::roll_due`] finds it older than [`ArchiveOptions::max_file_age_ms`], or on
//! [`ArchiveWriter::close`]. Those calls return the paths of the files they completed. The writer
//! keeps the open files, a file sequence number and two counters. [`read_attempts`] reads the
//! completed files back into rows.
//!
//! The pipeline's archiver writes rows from the state store's staging table instead, as ranges:
//! [`ArchiveWriter::begin_staged`], a page of rows at a time through
//! [`ArchiveWriter::write_staged_page`], then [`ArchiveWriter::finish_staged`], which names each
//! partition's file after the range (`attempts-<prefix>-s<first>-<last>.parquet`).
//!
//! # Invariants
//!
//! * Every `*.parquet` file in the archive is complete. An open file has a hidden temporary
//!   name in its final directory. Completing it writes the footer, syncs the file, renames it
//!   and syncs the directory, so DuckDB, pyarrow or polars never see a partial file.
//! * File names never repeat. The prefix identifies the writer, the run id is the writer's
//!   start time in ms, and the sequence number counts the files of that run from 1.
//! * A row lands in the `date=` directory of its `finished_at` (UTC).
//! * Every file uses zstd and carries the attempt schema's metadata, including
//!   `hookflow.attempt_schema_version`, in its Parquet key-value metadata.
//!
//! # On-disk layout
//!
//! ```text
//! <dir>/
//!   date=2024-05-01/
//!     attempts-w0-1714521600000-000001.parquet       complete
//!     attempts-w1-1714521600004-000001.parquet       complete, another writer
//!     .attempts-w0-1714521600000-000002.parquet.tmp  open: hidden and without a footer
//!   date=2024-05-02/
//!     attempts-w0-1714521600000-000003.parquet
//! ```
//!
//! The columns are those of [`attempt_schema`], one row per [`AttemptRow`].

use std::collections::btree_map::Entry;
use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};

use arrow::array::RecordBatch;
use hookflow_schemas::{attempt_schema, attempts_to_record_batch, AttemptRow, Millis};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use tracing::{error, info, warn};

use crate::ConnectorError;

mod read;

pub use read::{list_archive_files, read_attempts};

/// The zstd level of archive files. Level 3 is zstd's own default.
const ZSTD_LEVEL: i32 = 3;

/// Options of [`ArchiveWriter::new`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveOptions {
    /// Root directory of the archive. The writer creates it and its `date=` directories.
    pub dir: PathBuf,
    /// Name part that identifies this writer, such as `w0` for timely worker 0. ASCII letters,
    /// digits and `_` only. Writers that share a directory need distinct prefixes.
    pub file_prefix: String,
    /// Maximum number of rows in one file, at least 1. Default 200,000.
    pub max_rows_per_file: usize,
    /// Size in bytes at which a file is completed, at least 1, default 64 MiB. The size is the
    /// bytes written plus parquet's estimate of the buffered row group, so a file can end up
    /// larger by up to one append's rows and the footer.
    pub max_file_bytes: u64,
    /// Age in ms at which [`ArchiveWriter::roll_due`] completes a file, counted from the append
    /// that opened it. Default 60,000.
    pub max_file_age_ms: u64,
    /// Maximum number of rows in one Parquet row group, at least 1, default 65,536. The writer
    /// keeps the open row group of each file in memory.
    pub max_rows_per_row_group: usize,
}

impl ArchiveOptions {
    /// Returns options for a writer with `file_prefix` in `dir`, with default limits.
    pub fn new(dir: impl Into<PathBuf>, file_prefix: impl Into<String>) -> Self {
        Self {
            dir: dir.into(),
            file_prefix: file_prefix.into(),
            max_rows_per_file: 200_000,
            max_file_bytes: 64 * 1024 * 1024,
            max_file_age_ms: 60_000,
            max_rows_per_row_group: 65_536,
        }
    }

    fn validate(&self) -> Result<(), ConnectorError> {
        let prefix_is_valid = !self.file_prefix.is_empty()
            && self
                .file_prefix
                .bytes()
                .all(|byte| byte.is_ascii_alphanumeric() || byte == b'_');
        if !prefix_is_valid {
            return Err(ConnectorError::InvalidOption {
                option: "file_prefix",
                value: format!("{:?}", self.file_prefix),
                expected: "one or more ASCII letters, digits or underscores",
            });
        }
        let positive = [
            ("max_rows_per_file", self.max_rows_per_file as u64),
            ("max_file_bytes", self.max_file_bytes),
            ("max_rows_per_row_group", self.max_rows_per_row_group as u64),
        ];
        for (option, value) in positive {
            if value == 0 {
                return Err(ConnectorError::InvalidOption {
                    option,
                    value: value.to_string(),
                    expected: "a value of at least 1",
                });
            }
        }
        Ok(())
    }
}

/// A Parquet file of the archive that is still being written.
struct OpenFile {
    writer: ArrowWriter<File>,
    temp_path: PathBuf,
    final_path: PathBuf,
    opened_at_ms: Millis,
    rows: usize,
}

impl OpenFile {
    /// Returns the bytes written so far plus the estimated size of the buffered row group.
    fn estimated_bytes(&self) -> u64 {
        let bytes = self.writer.bytes_written() + self.writer.in_progress_size();
        u64::try_from(bytes).unwrap_or(u64::MAX)
    }
}

/// A range of staged rows on its way into complete files, one per `date=` partition, from
/// [`ArchiveWriter::begin_staged`]. Its files keep hidden temporary names until
/// [`ArchiveWriter::finish_staged`] names them after the range.
pub struct StagedFiles {
    first_seq: u64,
    last_seq: u64,
    files: BTreeMap<String, OpenFile>,
}

impl StagedFiles {
    /// Returns the sequence number of the range's first row.
    pub fn first_seq(&self) -> u64 {
        self.first_seq
    }
}

/// Writes attempt rows to the archive, keeping one open file per `date=` partition.
///
/// One writer per prefix and directory: a new writer deletes the temporary files that earlier
/// runs with its prefix left behind.
///
/// # Examples
///
/// ```
/// use hookflow_connectors::{read_attempts, ArchiveOptions, ArchiveWriter};
/// use hookflow_schemas::AttemptRow;
///
/// let dir = tempfile::tempdir()?;
/// let now_ms = 1_714_521_600_000;
/// let mut writer = ArchiveWriter::new(ArchiveOptions::new(dir.path(), "w0"), now_ms)?;
/// let row = AttemptRow {
///     event_id: Some("evt_1".into()),
///     outcome: "delivered".into(),
///     finished_at_ms: now_ms,
///     ..AttemptRow::default()
/// };
/// writer.append(&[row.clone()], now_ms)?;
/// assert!(read_attempts(dir.path())?.is_empty(), "an open file is not visible");
///
/// let completed = writer.close()?;
/// assert_eq!(completed.len(), 1);
/// assert!(completed[0].ends_with("date=2024-05-01/attempts-w0-1714521600000-000001.parquet"));
/// assert_eq!(read_attempts(dir.path())?, vec![row]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct ArchiveWriter {
    options: ArchiveOptions,
    /// The writer's start time in ms, part of every file name.
    run_id: Millis,
    properties: WriterProperties,
    /// Files not yet completed, keyed by their `date=` value (`YYYY-MM-DD`).
    open_files: BTreeMap<String, OpenFile>,
    /// The sequence number of the next file this writer opens.
    next_sequence: u64,
    rows_written: u64,
    files_completed: u64,
}

impl ArchiveWriter {
    /// Creates a writer, with `now_ms` as its run id, and creates the archive directory.
    ///
    /// Temporary files that an earlier run with the same prefix left behind are deleted,
    /// because they have no footer and cannot be read.
    ///
    /// # Errors
    ///
    /// Fails if an option is invalid, or if the directory cannot be created or scanned.
    pub fn new(options: ArchiveOptions, now_ms: Millis) -> Result<Self, ConnectorError> {
        options.validate()?;
        create_dir_durably(&options.dir)?;
        remove_stale_temp_files(&options.dir, &options.file_prefix)?;

        let metadata = attempt_schema()
            .metadata()
            .iter()
            .map(|(key, value)| KeyValue::new(key.clone(), value.clone()))
            .collect();
        let zstd_level =
            ZstdLevel::try_new(ZSTD_LEVEL).map_err(|source| ConnectorError::Parquet {
                action: "configure zstd compression for archive",
                path: options.dir.clone(),
                source,
            })?;
        let properties = WriterProperties::builder()
            .set_compression(Compression::ZSTD(zstd_level))
            .set_max_row_group_row_count(Some(options.max_rows_per_row_group))
            .set_key_value_metadata(Some(metadata))
            .build();

        Ok(Self {
            options,
            run_id: now_ms,
            properties,
            open_files: BTreeMap::new(),
            next_sequence: 1,
            rows_written: 0,
            files_completed: 0,
        })
    }

    /// Writes `rows` to the open file of each row's `date=` partition, opening files as needed,
    /// and completes every file that reaches the row or size limit.
    ///
    /// Rows keep their order within a partition. The rows are not readable until their file is
    /// completed, by a later append, [`roll_due`](Self::roll_due) or [`close`](Self::close).
    ///
    /// # Errors
    ///
    /// Fails before writing anything if a row has a time the archive cannot store (before
    /// 1970, after year 9999, or above `i64::MAX` ms). Fails if a file cannot be written. The
    /// file that failed is abandoned then, and none of its rows, including those of earlier
    /// appends, reach the archive. A file that fails to complete is abandoned the same way.
    /// Files completed before the failure stay complete.
    pub fn append(&mut self, rows: &[AttemptRow], now_ms: Millis) -> Result<(), ConnectorError> {
        let mut dates = Vec::with_capacity(rows.len());
        for row in rows {
            check_times(row)?;
            dates.push(date_partition(row)?);
        }

        // Most appends contain rows of one day, which need no copy.
        if dates.windows(2).all(|pair| pair[0] == pair[1]) {
            if let Some(date) = dates.first() {
                self.write_partition(date, rows, now_ms)?;
            }
            return Ok(());
        }
        let mut by_date: BTreeMap<&str, Vec<AttemptRow>> = BTreeMap::new();
        for (row, date) in rows.iter().zip(&dates) {
            by_date.entry(date.as_str()).or_default().push(row.clone());
        }
        for (date, rows) in by_date {
            self.write_partition(date, &rows, now_ms)?;
        }
        Ok(())
    }

    /// Completes every open file opened at least [`ArchiveOptions::max_file_age_ms`] before
    /// `now_ms` and returns the completed paths.
    ///
    /// # Errors
    ///
    /// Fails if a file cannot be completed, and that file's rows do not reach the archive.
    /// Files completed before the failure stay complete but are not returned.
    pub fn roll_due(&mut self, now_ms: Millis) -> Result<Vec<PathBuf>, ConnectorError> {
        let due: Vec<String> = self
            .open_files
            .iter()
            .filter(|(_, file)| {
                now_ms.saturating_sub(file.opened_at_ms) >= self.options.max_file_age_ms
            })
            .map(|(date, _)| date.clone())
            .collect();
        self.complete_all(&due)
    }

    /// Completes every open file and returns the completed paths.
    ///
    /// Calling it again returns an empty vector. The writer stays usable: a later append opens
    /// new files.
    ///
    /// # Errors
    ///
    /// Fails if a file cannot be completed, and that file's rows do not reach the archive.
    /// Files completed before the failure stay complete but are not returned.
    pub fn close(&mut self) -> Result<Vec<PathBuf>, ConnectorError> {
        let dates: Vec<String> = self.open_files.keys().cloned().collect();
        self.complete_all(&dates)
    }

    /// Returns the number of rows in files that are open or completed. Rows of a file that
    /// failed to be written or completed are not counted.
    pub fn rows_written(&self) -> u64 {
        self.rows_written
    }

    /// Returns the number of files completed so far.
    pub fn files_completed(&self) -> u64 {
        self.files_completed
    }

    /// Writes staged rows with sequence numbers `first_seq` to `last_seq` as complete files in
    /// one call: [`begin_staged`](Self::begin_staged), one page, and
    /// [`finish_staged`](Self::finish_staged).
    ///
    /// # Errors
    ///
    /// As [`write_staged_page`](Self::write_staged_page) and
    /// [`finish_staged`](Self::finish_staged).
    pub fn write_staged(
        &mut self,
        first_seq: u64,
        last_seq: u64,
        rows: &[AttemptRow],
        now_ms: Millis,
    ) -> Result<Vec<PathBuf>, ConnectorError> {
        let mut staged = self.begin_staged(first_seq);
        self.write_staged_page(&mut staged, rows, last_seq, now_ms)?;
        self.finish_staged(staged)
    }

    /// Starts writing the staged rows from sequence number `first_seq` as one range of files,
    /// one per `date=` partition. The caller writes pages with
    /// [`write_staged_page`](Self::write_staged_page), so that only one page of rows is in
    /// memory at a time, and ends with [`finish_staged`](Self::finish_staged).
    pub fn begin_staged(&self, first_seq: u64) -> StagedFiles {
        StagedFiles {
            first_seq,
            last_seq: first_seq,
            files: BTreeMap::new(),
        }
    }

    /// Writes the next page of `staged`: `rows`, in staging order, the last of which has the
    /// sequence number `last_seq`.
    ///
    /// # Errors
    ///
    /// Fails if a row has a time the archive cannot store or a file cannot be written. Every
    /// open file of the range is deleted then. The rows are still staged, so a new range from
    /// the same first row writes them again.
    pub fn write_staged_page(
        &mut self,
        staged: &mut StagedFiles,
        rows: &[AttemptRow],
        last_seq: u64,
        now_ms: Millis,
    ) -> Result<(), ConnectorError> {
        let result = self.write_page(staged, rows, now_ms);
        match &result {
            Ok(()) => staged.last_seq = last_seq,
            Err(_) => {
                let files = std::mem::take(&mut staged.files);
                remove_staged_temp_files(files.into_values().map(|file| file.temp_path));
            }
        }
        result
    }

    fn write_page(
        &mut self,
        staged: &mut StagedFiles,
        rows: &[AttemptRow],
        now_ms: Millis,
    ) -> Result<(), ConnectorError> {
        let mut by_date: BTreeMap<String, Vec<&AttemptRow>> = BTreeMap::new();
        for row in rows {
            check_times(row)?;
            by_date.entry(date_partition(row)?).or_default().push(row);
        }

        for (date, rows) in by_date {
            let file = match staged.files.entry(date) {
                Entry::Occupied(entry) => entry.into_mut(),
                Entry::Vacant(entry) => {
                    let dir = self.options.dir.join(format!("date={}", entry.key()));
                    // The final name needs the range's end, so it is set when the range ends.
                    let name = staged_open_name(&self.options.file_prefix, staged.first_seq);
                    remove_if_present(&dir.join(format!(".{name}.tmp")))?;
                    entry.insert(create_file(&dir, &name, &self.properties, now_ms)?)
                }
            };
            let rows: Vec<AttemptRow> = rows.into_iter().cloned().collect();
            for chunk in rows.chunks(self.options.max_rows_per_row_group.max(1)) {
                write_rows(file, chunk)?;
            }
        }
        Ok(())
    }

    /// Completes the files of `staged`, names them after its range
    /// (`attempts-<prefix>-s<first>-<last>.parquet`) and returns their paths.
    ///
    /// Writing the same range again replaces those files, so redoing a write that a crash
    /// interrupted before the rows left staging never doubles them.
    ///
    /// # Errors
    ///
    /// Fails if a file cannot be completed. The files of the range completed before the
    /// failure stay in place, the others are deleted.
    pub fn finish_staged(&mut self, staged: StagedFiles) -> Result<Vec<PathBuf>, ConnectorError> {
        let name = staged_file_name(&self.options.file_prefix, staged.first_seq, staged.last_seq);
        let mut remaining = staged.files.into_iter();
        let mut completed = Vec::new();
        while let Some((_, mut file)) = remaining.next() {
            let rows = file.rows;
            let temp_path = file.temp_path.clone();
            if let Some(dir) = temp_path.parent() {
                file.final_path = dir.join(&name);
            }
            match complete_file(file) {
                Ok(path) => {
                    completed.push(path);
                    self.rows_written += rows as u64;
                    self.files_completed += 1;
                }
                Err(err) => {
                    let rest = remaining.map(|(_, file)| file.temp_path);
                    remove_staged_temp_files(std::iter::once(temp_path).chain(rest));
                    return Err(err);
                }
            }
        }
        Ok(completed)
    }

    /// Writes rows of one `date=` partition, splitting them over files at the row limit.
    fn write_partition(
        &mut self,
        date: &str,
        rows: &[AttemptRow],
        now_ms: Millis,
    ) -> Result<(), ConnectorError> {
        let max_rows = self.options.max_rows_per_file;
        let max_bytes = self.options.max_file_bytes;
        let mut remaining = rows;
        while !remaining.is_empty() {
            let file = self.open_file(date, now_ms)?;
            // An open file always has room, because it is completed when it reaches `max_rows`.
            let room = max_rows.saturating_sub(file.rows).max(1);
            let (chunk, rest) = remaining.split_at(room.min(remaining.len()));

            let write_result = write_rows(file, chunk);
            let is_full = file.rows >= max_rows || file.estimated_bytes() >= max_bytes;
            if let Err(err) = write_result {
                self.abandon(date, &err);
                return Err(err);
            }
            self.rows_written += chunk.len() as u64;

            if is_full {
                self.complete(date)?;
            }
            remaining = rest;
        }
        Ok(())
    }

    /// Returns the open file of `date`, opening a new one under a temporary name if there is
    /// none.
    fn open_file(&mut self, date: &str, now_ms: Millis) -> Result<&mut OpenFile, ConnectorError> {
        match self.open_files.entry(date.to_string()) {
            Entry::Occupied(entry) => Ok(entry.into_mut()),
            Entry::Vacant(entry) => {
                let dir = self.options.dir.join(format!("date={date}"));
                let name = format!(
                    "attempts-{}-{}-{:06}.parquet",
                    self.options.file_prefix, self.run_id, self.next_sequence
                );
                let file = create_file(&dir, &name, &self.properties, now_ms)?;
                self.next_sequence += 1;
                Ok(entry.insert(file))
            }
        }
    }

    fn complete_all(&mut self, dates: &[String]) -> Result<Vec<PathBuf>, ConnectorError> {
        let mut completed = Vec::with_capacity(dates.len());
        for date in dates {
            completed.extend(self.complete(date)?);
        }
        Ok(completed)
    }

    /// Completes the open file of `date`, if there is one, and returns its final path.
    ///
    /// If completing fails, the file is abandoned as in [`abandon`](Self::abandon).
    fn complete(&mut self, date: &str) -> Result<Option<PathBuf>, ConnectorError> {
        let Some(open) = self.open_files.remove(date) else {
            return Ok(None);
        };
        let temp_path = open.temp_path.clone();
        let rows = open.rows;

        match complete_file(open) {
            Ok(path) => {
                self.files_completed += 1;
                Ok(Some(path))
            }
            Err(err) => {
                self.discard(&temp_path, rows, &err);
                Err(err)
            }
        }
    }

    /// Drops the open file of `date` after a failed write.
    fn abandon(&mut self, date: &str, err: &ConnectorError) {
        if let Some(open) = self.open_files.remove(date) {
            self.discard(&open.temp_path, open.rows, err);
        }
    }

    /// Logs the loss of a file's rows, removes them from [`rows_written`](Self::rows_written)
    /// and deletes the temporary file if it is still there.
    fn discard(&mut self, temp_path: &Path, rows: usize, err: &ConnectorError) {
        self.rows_written = self.rows_written.saturating_sub(rows as u64);
        error!(
            path = %temp_path.display(),
            rows,
            error = %err,
            "Abandoned an archive file after a failed write. Its rows are not archived."
        );
        match fs::remove_file(temp_path) {
            Ok(()) => {}
            Err(remove_err) if remove_err.kind() == std::io::ErrorKind::NotFound => {}
            Err(remove_err) => warn!(
                path = %temp_path.display(),
                error = %remove_err,
                "Failed to delete an abandoned archive file."
            ),
        }
    }
}

impl Drop for ArchiveWriter {
    fn drop(&mut self) {
        for open in self.open_files.values() {
            warn!(
                path = %open.temp_path.display(),
                rows = open.rows,
                "Archive writer dropped before close, so its open file stays incomplete and hidden."
            );
        }
    }
}

impl std::fmt::Debug for ArchiveWriter {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("ArchiveWriter")
            .field("options", &self.options)
            .field("run_id", &self.run_id)
            .field("open_files", &self.open_files.keys().collect::<Vec<_>>())
            .field("next_sequence", &self.next_sequence)
            .field("rows_written", &self.rows_written)
            .field("files_completed", &self.files_completed)
            .finish()
    }
}

/// The file name of staged rows `first_seq` to `last_seq` written by `prefix`.
fn staged_file_name(prefix: &str, first_seq: u64, last_seq: u64) -> String {
    format!("attempts-{prefix}-s{first_seq:012}-{last_seq:012}.parquet")
}

/// Returns the name a range of staged rows from `first_seq` is opened under, before its end
/// is known. The open file is hidden as `.<name>.tmp`.
fn staged_open_name(prefix: &str, first_seq: u64) -> String {
    format!("attempts-{prefix}-s{first_seq:012}.parquet")
}

/// Deletes the temporary files of a staged range whose write failed. The caller reports the
/// failure: the rows stay staged, and the next flush writes them again.
fn remove_staged_temp_files(paths: impl Iterator<Item = PathBuf>) {
    for path in paths {
        if let Err(err) = remove_if_present(&path) {
            warn!(path = %path.display(), error = %err, "Failed to delete an unfinished archive file.");
        }
    }
}

/// Deletes the file at `path` if there is one.
fn remove_if_present(path: &Path) -> Result<(), ConnectorError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(source) if source.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(ConnectorError::Io {
            action: "remove stale temporary archive file",
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// The staged-row ranges of the completed files `prefix` wrote under `dir`, from their names.
///
/// # Errors
///
/// Fails if the directory cannot be listed.
pub fn staged_ranges(dir: &Path, prefix: &str) -> Result<Vec<(u64, u64)>, ConnectorError> {
    let start = format!("attempts-{prefix}-s");
    let mut ranges = Vec::new();
    for file in read::list_archive_files(dir)? {
        let Some(name) = file.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some(range) = name
            .strip_prefix(&start)
            .and_then(|r| r.strip_suffix(".parquet"))
        else {
            continue;
        };
        let mut bounds = range.split('-').map(str::parse::<u64>);
        if let (Some(Ok(first)), Some(Ok(last)), None) =
            (bounds.next(), bounds.next(), bounds.next())
        {
            ranges.push((first, last));
        }
    }
    ranges.sort_unstable();
    ranges.dedup();
    Ok(ranges)
}

/// Creates the hidden temporary file `.<name>.tmp` in `dir` and starts a Parquet file in it.
fn create_file(
    dir: &Path,
    name: &str,
    properties: &WriterProperties,
    now_ms: Millis,
) -> Result<OpenFile, ConnectorError> {
    create_dir_durably(dir)?;
    let final_path = dir.join(name);
    let temp_path = dir.join(format!(".{name}.tmp"));

    // `create_new` fails rather than truncate the file of another writer that has the same
    // prefix and start time.
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&temp_path)
        .map_err(|source| ConnectorError::Io {
            action: "create archive file",
            path: temp_path.clone(),
            source,
        })?;
    let writer = ArrowWriter::try_new(file, attempt_schema(), Some(properties.clone())).map_err(
        |source| ConnectorError::Parquet {
            action: "start parquet file",
            path: temp_path.clone(),
            source,
        },
    )?;
    Ok(OpenFile {
        writer,
        temp_path,
        final_path,
        opened_at_ms: now_ms,
        rows: 0,
    })
}

/// Writes the footer of `open`, syncs the file, renames it to its final name, syncs the
/// directory and returns the final path.
fn complete_file(open: OpenFile) -> Result<PathBuf, ConnectorError> {
    let file = open
        .writer
        .into_inner()
        .map_err(|source| ConnectorError::Parquet {
            action: "finish parquet file",
            path: open.temp_path.clone(),
            source,
        })?;
    file.sync_all().map_err(|source| ConnectorError::Io {
        action: "sync archive file",
        path: open.temp_path.clone(),
        source,
    })?;
    drop(file);

    fs::rename(&open.temp_path, &open.final_path).map_err(|source| ConnectorError::Io {
        action: "rename the temporary archive file to",
        path: open.final_path.clone(),
        source,
    })?;
    if let Some(dir) = open.final_path.parent() {
        sync_dir(dir)?;
    }

    info!(path = %open.final_path.display(), rows = open.rows, "Completed an archive file.");
    Ok(open.final_path)
}

/// Encodes `rows` as one record batch and writes it to `file`.
fn write_rows(file: &mut OpenFile, rows: &[AttemptRow]) -> Result<(), ConnectorError> {
    let batch: RecordBatch =
        attempts_to_record_batch(rows).map_err(|source| ConnectorError::Arrow {
            action: "build a record batch for",
            path: file.temp_path.clone(),
            source,
        })?;
    file.writer
        .write(&batch)
        .map_err(|source| ConnectorError::Parquet {
            action: "write parquet file",
            path: file.temp_path.clone(),
            source,
        })?;
    file.rows += rows.len();
    Ok(())
}

/// Checks that every time of `row` fits the archive's signed millisecond timestamps.
fn check_times(row: &AttemptRow) -> Result<(), ConnectorError> {
    let times = [
        ("ingested_at", row.ingested_at_ms),
        ("due_at", Some(row.due_at_ms)),
        ("started_at", row.started_at_ms),
        ("finished_at", Some(row.finished_at_ms)),
        ("next_attempt_at", row.next_attempt_at_ms),
    ];
    for (column, value_ms) in times {
        if let Some(value_ms) = value_ms {
            if i64::try_from(value_ms).is_err() {
                return Err(ConnectorError::TimeOutOfRange {
                    event_id: row.event_id.clone(),
                    column,
                    value_ms,
                });
            }
        }
    }
    Ok(())
}

/// Returns the `date=` value of `row`: the UTC day of its finished time as `YYYY-MM-DD`.
fn date_partition(row: &AttemptRow) -> Result<String, ConnectorError> {
    let out_of_range = || ConnectorError::TimeOutOfRange {
        event_id: row.event_id.clone(),
        column: "finished_at",
        value_ms: row.finished_at_ms,
    };
    let seconds = i64::try_from(row.finished_at_ms / 1000).map_err(|_| out_of_range())?;
    let date = time::OffsetDateTime::from_unix_timestamp(seconds)
        .map_err(|_| out_of_range())?
        .date();
    if date.year() > 9999 {
        return Err(out_of_range());
    }
    Ok(format!(
        "{:04}-{:02}-{:02}",
        date.year(),
        u8::from(date.month()),
        date.day()
    ))
}

/// Creates `dir` and its missing parents, syncing the parent of each directory created so
/// that the new entries survive a crash.
fn create_dir_durably(dir: &Path) -> Result<(), ConnectorError> {
    let mut missing = Vec::new();
    let mut current = dir;
    while !current.is_dir() {
        missing.push(current);
        match current.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => current = parent,
            _ => break,
        }
    }
    if missing.is_empty() {
        return Ok(());
    }

    fs::create_dir_all(dir).map_err(|source| ConnectorError::Io {
        action: "create directory",
        path: dir.to_path_buf(),
        source,
    })?;
    for created in missing.iter().rev() {
        let parent = created
            .parent()
            .filter(|parent| !parent.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        sync_dir(parent)?;
    }
    Ok(())
}

/// Syncs a directory, so that entries created or renamed in it survive a crash.
fn sync_dir(dir: &Path) -> Result<(), ConnectorError> {
    File::open(dir)
        .and_then(|handle| handle.sync_all())
        .map_err(|source| ConnectorError::Io {
            action: "sync directory",
            path: dir.to_path_buf(),
            source,
        })
}

/// Deletes the temporary files with `prefix` in the `date=` directories of `dir`.
fn remove_stale_temp_files(dir: &Path, prefix: &str) -> Result<(), ConnectorError> {
    let scan_error = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ConnectorError::Io {
            action: "scan archive directory",
            path,
            source,
        }
    };
    let temp_start = format!(".attempts-{prefix}-");

    for entry in fs::read_dir(dir).map_err(scan_error(dir))? {
        let entry = entry.map_err(scan_error(dir))?;
        let is_partition = entry.file_name().to_string_lossy().starts_with("date=")
            && entry
                .file_type()
                .map_err(scan_error(&entry.path()))?
                .is_dir();
        if !is_partition {
            continue;
        }
        let partition = entry.path();
        for file in fs::read_dir(&partition).map_err(scan_error(&partition))? {
            let file = file.map_err(scan_error(&partition))?;
            let name = file.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(&temp_start) && name.ends_with(".parquet.tmp") {
                let path = file.path();
                fs::remove_file(&path).map_err(|source| ConnectorError::Io {
                    action: "delete stale temporary archive file",
                    path: path.clone(),
                    source,
                })?;
                warn!(path = %path.display(), "Deleted an incomplete archive file that an earlier run left behind.");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finished_at(ms: Millis) -> AttemptRow {
        AttemptRow {
            finished_at_ms: ms,
            ..AttemptRow::default()
        }
    }

    #[test]
    fn date_partition_uses_utc_day_of_finished_time() -> Result<(), ConnectorError> {
        assert_eq!(date_partition(&finished_at(0))?, "1970-01-01");
        assert_eq!(
            date_partition(&finished_at(1_714_521_599_999))?,
            "2024-04-30"
        );
        assert_eq!(
            date_partition(&finished_at(1_714_521_600_000))?,
            "2024-05-01"
        );
        assert_eq!(
            date_partition(&finished_at(253_402_300_799_999))?,
            "9999-12-31"
        );
        Ok(())
    }

    #[test]
    fn date_partition_rejects_years_after_9999() {
        let result = date_partition(&finished_at(253_402_300_800_000));
        assert!(matches!(
            result,
            Err(ConnectorError::TimeOutOfRange {
                column: "finished_at",
                ..
            })
        ));
    }

    #[test]
    fn check_times_rejects_values_above_i64_max() {
        let row = AttemptRow {
            started_at_ms: Some(u64::MAX),
            ..AttemptRow::default()
        };
        let result = check_times(&row);
        assert!(matches!(
            result,
            Err(ConnectorError::TimeOutOfRange {
                column: "started_at",
                ..
            })
        ));
    }

    #[test]
    fn options_reject_prefix_with_separator() {
        let options = ArchiveOptions::new("/tmp/archive", "w0/../x");
        assert!(matches!(
            options.validate(),
            Err(ConnectorError::InvalidOption {
                option: "file_prefix",
                ..
            })
        ));
    }

    #[test]
    fn options_reject_zero_limits() {
        let mut options = ArchiveOptions::new("/tmp/archive", "w0");
        options.max_rows_per_file = 0;
        assert!(matches!(
            options.validate(),
            Err(ConnectorError::InvalidOption {
                option: "max_rows_per_file",
                ..
            })
        ));
    }
}
