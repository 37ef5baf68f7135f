//! The attempt archive: Parquet files written by `ArchiveWriter`, read back by
//! `read_attempts` and by parquet's own reader.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{ArrayRef, Int64Array, RecordBatch};
use arrow::datatypes::{Field, Schema};
use hookflow_connectors::{
    list_archive_files, read_attempts, ArchiveOptions, ArchiveWriter, ConnectorError,
};
use hookflow_schemas::{
    attempt_schema, attempts_to_record_batch, AttemptRow, Outcome, ATTEMPT_SCHEMA_VERSION,
};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::metadata::{ParquetMetaData, ParquetMetaDataReader};

use crate::TestResult;

/// 2024-05-01T00:00:00Z in ms.
const DAY_ONE_MS: u64 = 1_714_521_600_000;
/// 2024-05-02T00:00:00Z in ms.
const DAY_TWO_MS: u64 = DAY_ONE_MS + 86_400_000;

/// Rows of five shapes: delivered with every column set, invalid with every optional column
/// null, failed with a retry, empty strings, and dead-lettered. Row `i` finished at
/// `day_ms + i`.
fn varied_rows(count: usize, day_ms: u64) -> Vec<AttemptRow> {
    (0..count)
        .map(|i| {
            let finished_at_ms = day_ms + i as u64;
            match i % 5 {
                0 => AttemptRow {
                    event_id: Some(format!("evt_{i}")),
                    tenant: Some("acme".into()),
                    endpoint_id: Some("ep_1".into()),
                    event_type: Some("invoice.paid".into()),
                    generation: u32::MAX,
                    replay_id: Some("replay-7".into()),
                    attempt: 1,
                    partition: 3,
                    offset: u64::MAX - i as u64,
                    url: Some("https://example.com/hooks".into()),
                    ingested_at_ms: Some(finished_at_ms - 50),
                    due_at_ms: finished_at_ms - 40,
                    started_at_ms: Some(finished_at_ms - 30),
                    finished_at_ms,
                    latency_ms: Some(30),
                    outcome: Outcome::Delivered.as_str().into(),
                    http_status: Some(200),
                    error_kind: None,
                    error_message: None,
                    response_snippet: Some("ok".into()),
                    response_truncated: Some(false),
                    body_sha256: Some("ab".repeat(32)),
                    next_attempt_at_ms: None,
                    retry_after: None,
                    location: None,
                    response_lossy: Some(true),
                },
                1 => AttemptRow {
                    offset: i as u64,
                    finished_at_ms,
                    outcome: Outcome::Invalid.as_str().into(),
                    error_kind: Some("invalid_json".into()),
                    ..AttemptRow::default()
                },
                2 => AttemptRow {
                    event_id: Some(format!("évènement-{i}")),
                    tenant: Some("株式会社".into()),
                    endpoint_id: Some("ep_🚀".into()),
                    attempt: 3,
                    due_at_ms: finished_at_ms - 1_000,
                    started_at_ms: Some(finished_at_ms - 900),
                    finished_at_ms,
                    latency_ms: Some(900),
                    outcome: Outcome::Failed.as_str().into(),
                    http_status: Some(503),
                    error_kind: Some("http_status".into()),
                    error_message: Some("service unavailable\nretry later".into()),
                    response_snippet: Some("サーバー 🔥 ".repeat(20)),
                    response_truncated: Some(true),
                    next_attempt_at_ms: Some(finished_at_ms + 120_000),
                    retry_after: Some("120".into()),
                    ..AttemptRow::default()
                },
                3 => AttemptRow {
                    event_id: Some(String::new()),
                    tenant: Some(String::new()),
                    error_message: Some(String::new()),
                    finished_at_ms,
                    outcome: Outcome::Unrouted.as_str().into(),
                    ..AttemptRow::default()
                },
                _ => AttemptRow {
                    event_id: Some(format!("evt_{i}")),
                    attempt: 8,
                    finished_at_ms,
                    outcome: Outcome::DeadLettered.as_str().into(),
                    http_status: Some(302),
                    error_kind: Some("redirect".into()),
                    location: Some("https://example.com/elsewhere".into()),
                    ..AttemptRow::default()
                },
            }
        })
        .collect()
}

fn options(dir: &Path) -> ArchiveOptions {
    ArchiveOptions::new(dir, "w0")
}

/// Returns the names of the entries of `dir`, sorted.
fn entry_names(dir: &Path) -> Result<Vec<String>, std::io::Error> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir)? {
        names.push(entry?.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

fn file_metadata(path: &Path) -> Result<ParquetMetaData, Box<dyn std::error::Error>> {
    let file = File::open(path)?;
    Ok(ParquetMetaDataReader::new().parse_and_finish(&file)?)
}

#[test]
fn round_trip_of_varied_rows_is_exact() -> TestResult {
    let dir = tempfile::tempdir()?;
    let rows = varied_rows(5_000, DAY_ONE_MS);
    let mut options = options(dir.path());
    options.max_rows_per_row_group = 1_000;
    let mut writer = ArchiveWriter::new(options, DAY_ONE_MS)?;

    for chunk in rows.chunks(700) {
        writer.append(chunk, DAY_ONE_MS)?;
    }
    let completed = writer.close()?;

    assert_eq!(completed.len(), 1);
    assert_eq!(writer.rows_written(), 5_000);
    assert_eq!(writer.files_completed(), 1);
    assert_eq!(file_metadata(&completed[0])?.num_row_groups(), 5);
    assert_eq!(read_attempts(dir.path())?, rows);
    Ok(())
}

#[test]
fn rows_split_by_finished_day() -> TestResult {
    let dir = tempfile::tempdir()?;
    let day_one = varied_rows(10, DAY_ONE_MS + 86_399_990);
    let day_two = varied_rows(10, DAY_TWO_MS);
    let interleaved: Vec<AttemptRow> = day_one
        .iter()
        .zip(&day_two)
        .flat_map(|(one, two)| [one.clone(), two.clone()])
        .collect();
    let mut writer = ArchiveWriter::new(options(dir.path()), DAY_ONE_MS)?;

    writer.append(&interleaved, DAY_ONE_MS)?;
    let completed = writer.close()?;

    assert_eq!(
        entry_names(dir.path())?,
        vec!["date=2024-05-01", "date=2024-05-02"]
    );
    assert_eq!(completed.len(), 2);
    assert_eq!(read_attempts(&dir.path().join("date=2024-05-01"))?, day_one);
    assert_eq!(read_attempts(&dir.path().join("date=2024-05-02"))?, day_two);
    let all: Vec<AttemptRow> = day_one.iter().chain(&day_two).cloned().collect();
    assert_eq!(read_attempts(dir.path())?, all);
    Ok(())
}

#[test]
fn rolling_by_row_count_splits_files() -> TestResult {
    let dir = tempfile::tempdir()?;
    let rows = varied_rows(350, DAY_ONE_MS);
    let mut options = options(dir.path());
    options.max_rows_per_file = 100;
    let mut writer = ArchiveWriter::new(options, DAY_ONE_MS)?;

    writer.append(&rows, DAY_ONE_MS)?;
    assert_eq!(
        writer.files_completed(),
        3,
        "full files are completed by the append"
    );
    let completed = writer.close()?;

    assert_eq!(completed.len(), 1);
    let files = list_archive_files(dir.path())?;
    let names: Vec<String> = files
        .iter()
        .filter_map(|path| path.file_name())
        .map(|name| name.to_string_lossy().into_owned())
        .collect();
    let expected_names: Vec<String> = (1..=4)
        .map(|sequence| format!("attempts-w0-{DAY_ONE_MS}-{sequence:06}.parquet"))
        .collect();
    assert_eq!(names, expected_names);
    let row_counts: Vec<i64> = files
        .iter()
        .map(|path| file_metadata(path).map(|metadata| metadata.file_metadata().num_rows()))
        .collect::<Result<_, _>>()?;
    assert_eq!(row_counts, vec![100, 100, 100, 50]);
    assert_eq!(read_attempts(dir.path())?, rows);
    Ok(())
}

#[test]
fn rolling_by_size_completes_large_files() -> TestResult {
    let dir = tempfile::tempdir()?;
    let rows = varied_rows(30, DAY_ONE_MS);
    let mut options = options(dir.path());
    options.max_file_bytes = 1;
    let mut writer = ArchiveWriter::new(options, DAY_ONE_MS)?;

    for chunk in rows.chunks(10) {
        writer.append(chunk, DAY_ONE_MS)?;
    }

    assert_eq!(writer.files_completed(), 3);
    assert!(writer.close()?.is_empty());
    assert_eq!(list_archive_files(dir.path())?.len(), 3);
    assert_eq!(read_attempts(dir.path())?, rows);
    Ok(())
}

#[test]
fn open_file_is_hidden_until_complete() -> TestResult {
    let dir = tempfile::tempdir()?;
    let rows = varied_rows(20, DAY_ONE_MS);
    let mut options = options(dir.path());
    options.max_file_age_ms = 60_000;
    let mut writer = ArchiveWriter::new(options, DAY_ONE_MS)?;
    let partition = dir.path().join("date=2024-05-01");

    writer.append(&rows, DAY_ONE_MS + 1_000)?;

    let temp_name = format!(".attempts-w0-{DAY_ONE_MS}-000001.parquet.tmp");
    assert_eq!(entry_names(&partition)?, vec![temp_name]);
    assert!(list_archive_files(dir.path())?.is_empty());
    assert!(read_attempts(dir.path())?.is_empty());

    assert!(
        writer.roll_due(DAY_ONE_MS + 60_999)?.is_empty(),
        "the file is not old enough yet"
    );
    let completed = writer.roll_due(DAY_ONE_MS + 61_000)?;

    let final_name = format!("attempts-w0-{DAY_ONE_MS}-000001.parquet");
    assert_eq!(completed, vec![partition.join(&final_name)]);
    assert_eq!(entry_names(&partition)?, vec![final_name]);
    assert_eq!(read_attempts(dir.path())?, rows);
    Ok(())
}

#[test]
fn close_is_idempotent() -> TestResult {
    let dir = tempfile::tempdir()?;
    let rows = varied_rows(5, DAY_ONE_MS);
    let mut writer = ArchiveWriter::new(options(dir.path()), DAY_ONE_MS)?;
    writer.append(&rows, DAY_ONE_MS)?;

    let first = writer.close()?;
    let second = writer.close()?;

    assert_eq!(first.len(), 1);
    assert!(second.is_empty());
    assert_eq!(writer.files_completed(), 1);
    assert_eq!(read_attempts(dir.path())?, rows);
    Ok(())
}

#[test]
fn file_metadata_carries_schema_version() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut writer = ArchiveWriter::new(options(dir.path()), DAY_ONE_MS)?;
    writer.append(&varied_rows(5, DAY_ONE_MS), DAY_ONE_MS)?;
    let completed = writer.close()?;

    let metadata = file_metadata(&completed[0])?;

    let key_values = metadata
        .file_metadata()
        .key_value_metadata()
        .cloned()
        .unwrap_or_default();
    let version = key_values
        .iter()
        .find(|key_value| key_value.key == "hookflow.attempt_schema_version")
        .and_then(|key_value| key_value.value.clone());
    assert_eq!(version, Some(ATTEMPT_SCHEMA_VERSION.to_string()));
    Ok(())
}

#[test]
fn files_are_zstd_compressed() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut options = options(dir.path());
    options.max_rows_per_row_group = 100;
    let mut writer = ArchiveWriter::new(options, DAY_ONE_MS)?;
    writer.append(&varied_rows(250, DAY_ONE_MS), DAY_ONE_MS)?;
    let completed = writer.close()?;

    let metadata = file_metadata(&completed[0])?;

    assert_eq!(metadata.num_row_groups(), 3);
    for row_group in metadata.row_groups() {
        assert_eq!(row_group.num_columns(), attempt_schema().fields().len());
        for column in row_group.columns() {
            assert!(
                matches!(column.compression(), Compression::ZSTD(_)),
                "column {} uses {:?}",
                column.column_path(),
                column.compression()
            );
        }
    }
    Ok(())
}

#[test]
fn restarted_writer_uses_new_file_names() -> TestResult {
    let dir = tempfile::tempdir()?;
    let first_rows = varied_rows(5, DAY_ONE_MS);
    let second_rows = varied_rows(5, DAY_ONE_MS + 100);

    let mut first = ArchiveWriter::new(options(dir.path()), DAY_ONE_MS)?;
    first.append(&first_rows, DAY_ONE_MS)?;
    let first_paths = first.close()?;
    drop(first);
    let mut second = ArchiveWriter::new(options(dir.path()), DAY_ONE_MS + 5_000)?;
    second.append(&second_rows, DAY_ONE_MS + 5_000)?;
    let second_paths = second.close()?;

    assert_ne!(first_paths, second_paths);
    assert_eq!(list_archive_files(dir.path())?.len(), 2);
    let all: Vec<AttemptRow> = first_rows.into_iter().chain(second_rows).collect();
    assert_eq!(read_attempts(dir.path())?, all);
    Ok(())
}

#[test]
fn new_writer_removes_own_stale_temp_files() -> TestResult {
    let dir = tempfile::tempdir()?;
    let partition = dir.path().join("date=2024-05-01");
    fs::create_dir_all(&partition)?;
    let own = partition.join(".attempts-w0-1714521000000-000001.parquet.tmp");
    let other = partition.join(".attempts-w1-1714521000000-000001.parquet.tmp");
    let unrelated = partition.join(".attempts-w0-1714521000000-000001.parquet.crc");
    for path in [&own, &other, &unrelated] {
        fs::write(path, b"PAR1 without footer")?;
    }

    let writer = ArchiveWriter::new(options(dir.path()), DAY_ONE_MS)?;

    assert!(
        !own.exists(),
        "the stale temporary file of w0 is still there"
    );
    assert!(other.exists(), "the temporary file of w1 was deleted");
    assert!(
        unrelated.exists(),
        "a file that is not a temporary archive file was deleted"
    );
    drop(writer);
    Ok(())
}

#[test]
fn failed_completion_discards_file() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut writer = ArchiveWriter::new(options(dir.path()), DAY_ONE_MS)?;
    writer.append(&varied_rows(5, DAY_ONE_MS), DAY_ONE_MS)?;
    // A directory with the file's final name makes the rename fail.
    let partition = dir.path().join("date=2024-05-01");
    let final_path = partition.join(format!("attempts-w0-{DAY_ONE_MS}-000001.parquet"));
    fs::create_dir(&final_path)?;

    let result = writer.close();

    let Err(ConnectorError::Io { path, .. }) = result else {
        panic!("closing onto a directory returned {result:?}");
    };
    assert_eq!(path, final_path);
    assert_eq!(writer.rows_written(), 0);
    assert_eq!(writer.files_completed(), 0);
    let names = entry_names(&partition)?;
    assert_eq!(
        names,
        vec![format!("attempts-w0-{DAY_ONE_MS}-000001.parquet")]
    );
    assert!(
        final_path.is_dir(),
        "the temporary file replaced the directory"
    );
    assert!(writer.close()?.is_empty());
    Ok(())
}

#[test]
fn append_rejects_time_after_year_9999() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut writer = ArchiveWriter::new(options(dir.path()), DAY_ONE_MS)?;
    let mut rows = varied_rows(3, DAY_ONE_MS);
    rows[2].finished_at_ms = 253_402_300_800_000;
    rows[2].event_id = Some("evt_far_future".into());

    let result = writer.append(&rows, DAY_ONE_MS);

    let Err(err) = result else {
        panic!("a row finished after year 9999 was accepted");
    };
    assert!(err.to_string().contains("evt_far_future"), "message: {err}");
    assert!(err.to_string().contains("finished_at"), "message: {err}");
    assert_eq!(writer.rows_written(), 0);
    assert!(writer.close()?.is_empty());
    assert!(list_archive_files(dir.path())?.is_empty());
    Ok(())
}

#[test]
fn invalid_file_prefix_rejected() -> TestResult {
    let dir = tempfile::tempdir()?;
    for prefix in ["", "w0/x", "w-0", "../w0"] {
        let result = ArchiveWriter::new(ArchiveOptions::new(dir.path(), prefix), DAY_ONE_MS);
        assert!(
            matches!(
                result,
                Err(ConnectorError::InvalidOption {
                    option: "file_prefix",
                    ..
                })
            ),
            "prefix {prefix:?} was accepted"
        );
    }
    Ok(())
}

/// Writes `batch` to `dir/name` with parquet's default settings.
fn write_foreign_file(
    dir: &Path,
    name: &str,
    batch: &RecordBatch,
) -> Result<PathBuf, Box<dyn std::error::Error>> {
    let path = dir.join(name);
    let mut writer = ArrowWriter::try_new(File::create(&path)?, batch.schema(), None)?;
    writer.write(batch)?;
    writer.close()?;
    Ok(path)
}

#[test]
fn read_names_file_with_missing_column() -> TestResult {
    let dir = tempfile::tempdir()?;
    let full = attempts_to_record_batch(&varied_rows(3, DAY_ONE_MS))?;
    let without_outcome = full.project(
        &(0..full.num_columns())
            .filter(|index| full.schema().field(*index).name() != "outcome")
            .collect::<Vec<_>>(),
    )?;
    let path = write_foreign_file(dir.path(), "no-outcome.parquet", &without_outcome)?;

    let Err(err) = read_attempts(dir.path()) else {
        panic!("a file without the outcome column was read");
    };

    let ConnectorError::InvalidArchiveColumn {
        path: reported,
        column,
        problem,
    } = &err
    else {
        panic!("unexpected error: {err}");
    };
    assert_eq!(reported, &path);
    assert_eq!(*column, "outcome");
    assert_eq!(problem, "is missing");
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "message: {err}"
    );
    Ok(())
}

/// A file of schema version 1 has no `response_lossy` column; its rows read with the flag
/// null and every other column intact.
#[test]
fn version_one_file_reads_lossy_as_null() -> TestResult {
    let dir = tempfile::tempdir()?;
    let rows = varied_rows(5, DAY_ONE_MS);
    let full = attempts_to_record_batch(&rows)?;
    let version_one = full.project(
        &(0..full.num_columns())
            .filter(|index| full.schema().field(*index).name() != "response_lossy")
            .collect::<Vec<_>>(),
    )?;
    write_foreign_file(dir.path(), "version-1.parquet", &version_one)?;

    let read = read_attempts(dir.path())?;

    assert!(rows.iter().any(|row| row.response_lossy.is_some()));
    let expected: Vec<AttemptRow> = rows
        .into_iter()
        .map(|row| AttemptRow {
            response_lossy: None,
            ..row
        })
        .collect();
    assert_eq!(read, expected);
    Ok(())
}

#[test]
fn read_names_file_with_wrong_column_type() -> TestResult {
    let dir = tempfile::tempdir()?;
    let full = attempts_to_record_batch(&varied_rows(3, DAY_ONE_MS))?;
    let schema = full.schema();
    let mut fields: Vec<Field> = schema
        .fields()
        .iter()
        .map(|field| field.as_ref().clone())
        .collect();
    let mut columns: Vec<ArrayRef> = full.columns().to_vec();
    let Some(index) = fields.iter().position(|field| field.name() == "generation") else {
        panic!("the attempt schema has no generation column");
    };
    fields[index] = Field::new("generation", arrow::datatypes::DataType::Int64, false);
    columns[index] = Arc::new(Int64Array::from(vec![0_i64, 1, 2]));
    let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)?;
    let path = write_foreign_file(dir.path(), "int64-generation.parquet", &batch)?;

    let Err(err) = read_attempts(dir.path()) else {
        panic!("a file with an Int64 generation column was read");
    };

    let ConnectorError::InvalidArchiveColumn {
        path: reported,
        column,
        problem,
    } = &err
    else {
        panic!("unexpected error: {err}");
    };
    assert_eq!(reported, &path);
    assert_eq!(*column, "generation");
    assert_eq!(problem, "has type Int64, expected UInt32");
    Ok(())
}

#[test]
fn read_of_missing_directory_names_it() {
    let Ok(dir) = tempfile::tempdir() else {
        panic!("cannot create a temporary directory");
    };
    let missing = dir.path().join("no-archive-here");

    let result = read_attempts(&missing);

    let Err(ConnectorError::Io { path, .. }) = result else {
        panic!("reading a missing directory returned {result:?}");
    };
    assert_eq!(path, missing);
}
