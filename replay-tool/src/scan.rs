//! Reads the attempt archive with filters pushed down, so that a day's slice of a large
//! archive reads that day's row groups and not the rest.
//!
//! Three levels prune before any row is decoded:
//!
//! 1. `date=YYYY-MM-DD` directories outside the requested dates are not opened.
//! 2. Row groups whose column statistics (min/max in the Parquet footer) rule out every row
//!    are skipped; the caller decides with a predicate over [`RowGroupBounds`].
//! 3. Only the requested columns are decoded (a projection).
//!
//! What remains is decoded into Arrow record batches for the caller, which applies the exact
//! row filters. [`ScanStats`] counts what was skipped and read.

use std::fs::File;
use std::path::{Path, PathBuf};

use arrow::array::{
    Array, RecordBatch, StringArray, TimestampMillisecondArray, UInt32Array, UInt64Array,
};
use hookflow_connectors::list_archive_files;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;
use parquet::file::metadata::RowGroupMetaData;
use parquet::file::statistics::Statistics;
use serde::{Deserialize, Serialize};

use crate::{ReplayError, Result};

/// Counts of the files and row groups one scan opened, skipped and read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScanStats {
    /// Completed archive files found.
    pub files: usize,
    /// Files not opened because their `date=` directory is outside the requested dates.
    pub files_skipped_by_date: usize,
    /// Row groups in the files that were opened.
    pub row_groups: usize,
    /// Row groups decoded; the others were ruled out by their statistics.
    pub row_groups_read: usize,
    /// Rows decoded.
    pub rows_read: u64,
    /// Bytes of every archive file found.
    pub bytes_total: u64,
    /// Compressed bytes of the decoded column chunks (projection and row groups applied).
    pub bytes_read: u64,
}

/// The min/max statistics of one row group, by column name.
pub struct RowGroupBounds<'a> {
    metadata: &'a RowGroupMetaData,
}

impl RowGroupBounds<'_> {
    fn statistics(&self, column: &str) -> Option<&Statistics> {
        self.metadata
            .columns()
            .iter()
            .find(|chunk| chunk.column_path().string() == column)
            .and_then(|chunk| chunk.statistics())
    }

    /// Returns the (min, max) of an integer or timestamp column, when the footer has them.
    /// 32-bit columns of the attempt schema are unsigned, and are read as such.
    pub fn int_range(&self, column: &str) -> Option<(i64, i64)> {
        match self.statistics(column)? {
            Statistics::Int64(values) => Some((*values.min_opt()?, *values.max_opt()?)),
            Statistics::Int32(values) => Some((
                i64::from(*values.min_opt()? as u32),
                i64::from(*values.max_opt()? as u32),
            )),
            _ => None,
        }
    }

    /// Returns the (min, max) bytes of a string column, when the footer has them. Truncated
    /// statistics still bound the values: a truncated min is a prefix of the true min, and
    /// a truncated max is rounded up.
    pub fn bytes_range(&self, column: &str) -> Option<(&[u8], &[u8])> {
        let statistics = self.statistics(column)?;
        match statistics {
            Statistics::ByteArray(_) | Statistics::FixedLenByteArray(_) => {
                Some((statistics.min_bytes_opt()?, statistics.max_bytes_opt()?))
            }
            _ => None,
        }
    }

    /// Returns whether the string column may hold `value`: false only when the statistics
    /// prove it does not.
    pub fn may_contain(&self, column: &str, value: &str) -> bool {
        self.bytes_range(column)
            .is_none_or(|(min, max)| min <= value.as_bytes() && value.as_bytes() <= max)
    }

    /// Returns the number of rows in the row group.
    pub fn rows(&self) -> i64 {
        self.metadata.num_rows()
    }
}

/// The columns and dates of the archive to read.
#[derive(Debug, Clone, Default)]
pub struct ScanOptions<'a> {
    /// The columns to decode.
    pub columns: &'a [&'a str],
    /// Skip `date=` directories before this `YYYY-MM-DD`.
    pub first_date: Option<String>,
    /// Skip `date=` directories after this `YYYY-MM-DD`.
    pub last_date: Option<String>,
}

/// Reads every completed file under `dir` that `options` and `keep_row_group` do not rule
/// out, calling `on_batch` with each decoded batch and its file.
///
/// # Errors
///
/// Fails if the directory cannot be listed, a file cannot be read, or `on_batch` fails.
pub fn scan_archive(
    dir: &Path,
    options: &ScanOptions<'_>,
    keep_row_group: &dyn Fn(&RowGroupBounds<'_>) -> bool,
    on_batch: &mut dyn FnMut(&RecordBatch, &Path) -> Result<()>,
) -> Result<ScanStats> {
    let mut stats = ScanStats::default();
    if !dir.exists() {
        return Ok(stats);
    }
    for path in list_archive_files(dir)? {
        stats.files += 1;
        stats.bytes_total += std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        if !date_in_range(&path, options) {
            stats.files_skipped_by_date += 1;
            continue;
        }
        scan_file(&path, options, keep_row_group, on_batch, &mut stats)?;
    }
    Ok(stats)
}

/// Returns whether the file's `date=` directory, if it has one, is within the options' dates.
fn date_in_range(path: &Path, options: &ScanOptions<'_>) -> bool {
    let Some(date) = path
        .parent()
        .and_then(|dir| dir.file_name())
        .and_then(|name| name.to_str())
        .and_then(|name| name.strip_prefix("date="))
    else {
        return true;
    };
    let after_first = options
        .first_date
        .as_deref()
        .is_none_or(|first| date >= first);
    let before_last = options.last_date.as_deref().is_none_or(|last| date <= last);
    after_first && before_last
}

fn scan_file(
    path: &Path,
    options: &ScanOptions<'_>,
    keep_row_group: &dyn Fn(&RowGroupBounds<'_>) -> bool,
    on_batch: &mut dyn FnMut(&RecordBatch, &Path) -> Result<()>,
    stats: &mut ScanStats,
) -> Result<()> {
    let parquet_error = |source| ReplayError::Parquet {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(|source| ReplayError::Io {
        action: "open archive file",
        path: path.to_path_buf(),
        source,
    })?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(parquet_error)?;

    let metadata = builder.metadata().clone();
    let mut selected = Vec::new();
    for (index, row_group) in metadata.row_groups().iter().enumerate() {
        stats.row_groups += 1;
        if keep_row_group(&RowGroupBounds {
            metadata: row_group,
        }) {
            selected.push(index);
            stats.bytes_read += row_group
                .columns()
                .iter()
                .filter(|chunk| {
                    options
                        .columns
                        .contains(&chunk.column_path().string().as_str())
                })
                .map(|chunk| u64::try_from(chunk.compressed_size()).unwrap_or(0))
                .sum::<u64>();
        }
    }
    if selected.is_empty() {
        return Ok(());
    }
    stats.row_groups_read += selected.len();

    let mask = ProjectionMask::columns(builder.parquet_schema(), options.columns.iter().copied());
    let reader = builder
        .with_row_groups(selected)
        .with_projection(mask)
        .build()
        .map_err(parquet_error)?;
    for batch in reader {
        let batch = batch.map_err(|e| ReplayError::Archive {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
        stats.rows_read += batch.num_rows() as u64;
        on_batch(&batch, path)?;
    }
    Ok(())
}

/// Typed access to the columns of a decoded batch, with errors that name file and column.
pub struct Columns<'a> {
    batch: &'a RecordBatch,
    path: PathBuf,
}

impl<'a> Columns<'a> {
    /// Wraps `batch`, read from `path`.
    pub fn new(batch: &'a RecordBatch, path: &Path) -> Self {
        Columns {
            batch,
            path: path.to_path_buf(),
        }
    }

    fn column<T: Array + 'static>(&self, name: &str) -> Result<&'a T> {
        let column = self
            .batch
            .column_by_name(name)
            .ok_or_else(|| ReplayError::Archive {
                path: self.path.clone(),
                detail: format!("column {name} is missing"),
            })?;
        column
            .as_any()
            .downcast_ref::<T>()
            .ok_or_else(|| ReplayError::Archive {
                path: self.path.clone(),
                detail: format!("column {name} has type {}", column.data_type()),
            })
    }

    /// Returns the string column `name`.
    ///
    /// # Errors
    ///
    /// Fails if it is missing or not a string column.
    pub fn strings(&self, name: &str) -> Result<&'a StringArray> {
        self.column(name)
    }

    /// Returns the timestamp (ms) column `name`.
    ///
    /// # Errors
    ///
    /// Fails if it is missing or has another type.
    pub fn times(&self, name: &str) -> Result<&'a TimestampMillisecondArray> {
        self.column(name)
    }

    /// Returns the `uint32` column `name`.
    ///
    /// # Errors
    ///
    /// Fails if it is missing or has another type.
    pub fn u32s(&self, name: &str) -> Result<&'a UInt32Array> {
        self.column(name)
    }

    /// Returns the `uint16` column `name`.
    ///
    /// # Errors
    ///
    /// Fails if it is missing or has another type.
    pub fn u16s(&self, name: &str) -> Result<&'a arrow::array::UInt16Array> {
        self.column(name)
    }

    /// Returns the `uint64` column `name`.
    ///
    /// # Errors
    ///
    /// Fails if it is missing or has another type.
    pub fn u64s(&self, name: &str) -> Result<&'a UInt64Array> {
        self.column(name)
    }
}

/// Returns the string at `row`, or none when null.
pub fn text(array: &StringArray, row: usize) -> Option<&str> {
    array.is_valid(row).then(|| array.value(row))
}

/// Returns the value at `row`, or none when null.
pub fn value<T: arrow::datatypes::ArrowPrimitiveType>(
    array: &arrow::array::PrimitiveArray<T>,
    row: usize,
) -> Option<T::Native> {
    array.is_valid(row).then(|| array.value(row))
}
