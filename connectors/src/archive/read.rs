//! Reading the attempt archive back: lists the completed Parquet files under a directory and
//! decodes every column of their rows into [`AttemptRow`]s.
//!
//! Files are read in path order, which is day order because of the `date=YYYY-MM-DD`
//! directories, and rows in file order. Hidden files, including the temporary files of open
//! archive files, are skipped. Nothing is cached between calls.

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use arrow::array::{
    Array, BooleanArray, RecordBatch, StringArray, TimestampMillisecondArray, UInt16Array,
    UInt32Array, UInt64Array,
};
use arrow::datatypes::SchemaRef;
use hookflow_schemas::{attempt_schema, AttemptRow};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::ConnectorError;

/// Returns the completed archive files under `dir`, searched recursively, in path order.
///
/// A completed file is a file whose name ends in `.parquet`. Names that start with `.` or `_`
/// are skipped, as pyarrow and Spark skip them, and so are directories with such names.
/// Symbolic links to directories are not followed.
///
/// # Errors
///
/// Fails if `dir` or a directory below it cannot be read.
pub fn list_archive_files(dir: &Path) -> Result<Vec<PathBuf>, ConnectorError> {
    let mut files = Vec::new();
    collect_parquet_files(dir, &mut files)?;
    files.sort();
    Ok(files)
}

/// Reads the rows of every completed archive file under `dir`, files in path order and rows in
/// file order.
///
/// See [`list_archive_files`] for which files are read. Every column of the attempt schema
/// must be present with its type, except `response_lossy`, which version 2 added and which
/// reads as null from older files. Columns the schema does not know are ignored.
///
/// # Errors
///
/// Fails if `dir` cannot be listed or a file cannot be read. Fails, naming the file and the
/// column, if a column is missing, has another type, contains a null where the row requires
/// a value, or contains a time before 1970.
pub fn read_attempts(dir: &Path) -> Result<Vec<AttemptRow>, ConnectorError> {
    let schema = attempt_schema();
    let mut rows = Vec::new();
    for path in list_archive_files(dir)? {
        read_file(&path, &schema, &mut rows)?;
    }
    Ok(rows)
}

fn collect_parquet_files(dir: &Path, files: &mut Vec<PathBuf>) -> Result<(), ConnectorError> {
    let read_error = |source| ConnectorError::Io {
        action: "list archive directory",
        path: dir.to_path_buf(),
        source,
    };

    for entry in fs::read_dir(dir).map_err(read_error)? {
        let entry = entry.map_err(read_error)?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') || name.starts_with('_') {
            continue;
        }
        let path = entry.path();
        let file_type = entry.file_type().map_err(read_error)?;
        if file_type.is_dir() {
            collect_parquet_files(&path, files)?;
        } else if name.ends_with(".parquet") && path.is_file() {
            files.push(path);
        }
    }
    Ok(())
}

/// Decodes every row of the Parquet file at `path` and appends them to `rows`.
fn read_file(
    path: &Path,
    schema: &SchemaRef,
    rows: &mut Vec<AttemptRow>,
) -> Result<(), ConnectorError> {
    let parquet_error = |action| {
        move |source| ConnectorError::Parquet {
            action,
            path: path.to_path_buf(),
            source,
        }
    };

    let file = File::open(path).map_err(|source| ConnectorError::Io {
        action: "open archive file",
        path: path.to_path_buf(),
        source,
    })?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(parquet_error("read the footer of parquet file"))?
        .build()
        .map_err(parquet_error("start reading parquet file"))?;

    let mut first_row = 0;
    for batch in reader {
        let batch = batch.map_err(|source| ConnectorError::Arrow {
            action: "read a record batch from",
            path: path.to_path_buf(),
            source,
        })?;
        let columns = BatchColumns {
            path,
            schema,
            batch: &batch,
            first_row,
        };
        columns.decode(rows)?;
        first_row += batch.num_rows();
    }
    Ok(())
}

/// One record batch of an archive file, with the file path and row index that its errors name.
struct BatchColumns<'a> {
    path: &'a Path,
    schema: &'a SchemaRef,
    batch: &'a RecordBatch,
    /// The index in the file of the batch's first row.
    first_row: usize,
}

impl<'a> BatchColumns<'a> {
    /// Decodes every row of the batch and appends them to `rows`.
    fn decode(&self, rows: &mut Vec<AttemptRow>) -> Result<(), ConnectorError> {
        let event_id = self.column::<StringArray>("event_id")?;
        let tenant = self.column::<StringArray>("tenant")?;
        let endpoint_id = self.column::<StringArray>("endpoint_id")?;
        let event_type = self.column::<StringArray>("event_type")?;
        let generation = self.column::<UInt32Array>("generation")?;
        let replay_id = self.column::<StringArray>("replay_id")?;
        let attempt = self.column::<UInt32Array>("attempt")?;
        let partition = self.column::<UInt32Array>("partition")?;
        let offset = self.column::<UInt64Array>("offset")?;
        let url = self.column::<StringArray>("url")?;
        let ingested_at = self.column::<TimestampMillisecondArray>("ingested_at")?;
        let due_at = self.column::<TimestampMillisecondArray>("due_at")?;
        let started_at = self.column::<TimestampMillisecondArray>("started_at")?;
        let finished_at = self.column::<TimestampMillisecondArray>("finished_at")?;
        let latency_ms = self.column::<UInt64Array>("latency_ms")?;
        let outcome = self.column::<StringArray>("outcome")?;
        let http_status = self.column::<UInt16Array>("http_status")?;
        let error_kind = self.column::<StringArray>("error_kind")?;
        let error_message = self.column::<StringArray>("error_message")?;
        let response_snippet = self.column::<StringArray>("response_snippet")?;
        let response_truncated = self.column::<BooleanArray>("response_truncated")?;
        let body_sha256 = self.column::<StringArray>("body_sha256")?;
        let next_attempt_at = self.column::<TimestampMillisecondArray>("next_attempt_at")?;
        let retry_after = self.column::<StringArray>("retry_after")?;
        let location = self.column::<StringArray>("location")?;
        // Added in schema version 2; null in files of version 1.
        let response_lossy = self.optional_column::<BooleanArray>("response_lossy")?;

        rows.reserve(self.batch.num_rows());
        for row in 0..self.batch.num_rows() {
            rows.push(AttemptRow {
                event_id: optional_string(event_id, row),
                tenant: optional_string(tenant, row),
                endpoint_id: optional_string(endpoint_id, row),
                event_type: optional_string(event_type, row),
                generation: self.required("generation", row, optional_value(generation, row))?,
                replay_id: optional_string(replay_id, row),
                attempt: self.required("attempt", row, optional_value(attempt, row))?,
                partition: self.required("partition", row, optional_value(partition, row))?,
                offset: self.required("offset", row, optional_value(offset, row))?,
                url: optional_string(url, row),
                ingested_at_ms: self.time("ingested_at", ingested_at, row)?,
                due_at_ms: self.required("due_at", row, self.time("due_at", due_at, row)?)?,
                started_at_ms: self.time("started_at", started_at, row)?,
                finished_at_ms: self.required(
                    "finished_at",
                    row,
                    self.time("finished_at", finished_at, row)?,
                )?,
                latency_ms: optional_value(latency_ms, row),
                outcome: self.required("outcome", row, optional_string(outcome, row))?,
                http_status: optional_value(http_status, row),
                error_kind: optional_string(error_kind, row),
                error_message: optional_string(error_message, row),
                response_snippet: optional_string(response_snippet, row),
                response_truncated: response_truncated
                    .is_valid(row)
                    .then(|| response_truncated.value(row)),
                body_sha256: optional_string(body_sha256, row),
                next_attempt_at_ms: self.time("next_attempt_at", next_attempt_at, row)?,
                retry_after: optional_string(retry_after, row),
                location: optional_string(location, row),
                response_lossy: response_lossy
                    .filter(|column| column.is_valid(row))
                    .map(|column| column.value(row)),
            });
        }
        Ok(())
    }

    /// Returns the column `name` like [`Self::column`], or `None` when a file written before
    /// the column was added lacks it.
    fn optional_column<T: Array + 'static>(
        &self,
        name: &'static str,
    ) -> Result<Option<&'a T>, ConnectorError> {
        if self.batch.column_by_name(name).is_none() {
            return Ok(None);
        }
        self.column(name).map(Some)
    }

    /// Returns the column `name`, checked against its type in the attempt schema.
    fn column<T: Array + 'static>(&self, name: &'static str) -> Result<&'a T, ConnectorError> {
        let problem = |problem: String| ConnectorError::InvalidArchiveColumn {
            path: self.path.to_path_buf(),
            column: name,
            problem,
        };

        let expected = self
            .schema
            .field_with_name(name)
            .map_err(|_| problem("is not in the attempt schema of this build".to_string()))?
            .data_type();
        let column = self
            .batch
            .column_by_name(name)
            .ok_or_else(|| problem("is missing".to_string()))?;
        if column.data_type() != expected {
            return Err(problem(format!(
                "has type {}, expected {expected}",
                column.data_type()
            )));
        }
        column
            .as_any()
            .downcast_ref::<T>()
            .ok_or_else(|| problem(format!("cannot be read as {expected}")))
    }

    /// Returns the value of a column that the attempt schema declares non-nullable.
    fn required<T>(
        &self,
        column: &'static str,
        row: usize,
        value: Option<T>,
    ) -> Result<T, ConnectorError> {
        value.ok_or_else(|| ConnectorError::InvalidArchiveColumn {
            path: self.path.to_path_buf(),
            column,
            problem: format!(
                "is null in row {}, but an attempt row requires a value",
                self.first_row + row
            ),
        })
    }

    /// Returns a timestamp in ms since the Unix epoch, rejecting times before 1970.
    fn time(
        &self,
        column: &'static str,
        array: &TimestampMillisecondArray,
        row: usize,
    ) -> Result<Option<u64>, ConnectorError> {
        let Some(value) = optional_value(array, row) else {
            return Ok(None);
        };
        u64::try_from(value)
            .map(Some)
            .map_err(|_| ConnectorError::InvalidArchiveColumn {
                path: self.path.to_path_buf(),
                column,
                problem: format!(
                    "contains {value} ms in row {}, a time before 1970",
                    self.first_row + row
                ),
            })
    }
}

fn optional_string(array: &StringArray, row: usize) -> Option<String> {
    array.is_valid(row).then(|| array.value(row).to_string())
}

fn optional_value<T: arrow::datatypes::ArrowPrimitiveType>(
    array: &arrow::array::PrimitiveArray<T>,
    row: usize,
) -> Option<T::Native> {
    array.is_valid(row).then(|| array.value(row))
}
