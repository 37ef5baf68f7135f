//! The local log: appends and reads on real SQLite files, across connections, threads and
//! processes.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use hookflow_connectors::{ConnectorError, LocalLog, LocalLogOptions, Source};
use hookflow_schemas::SourceRecord;

use crate::TestResult;

const NOW_MS: u64 = 1_714_521_600_000;

/// Tenants used as keys. With 4 partitions they cover partitions 1, 2 and 3.
const TENANTS: [&str; 6] = ["acme", "globex", "initech", "umbrella", "hooli", "tenant-a"];

/// Environment variable that makes `child_writer_process` append to the log in this directory.
const CHILD_LOG_DIR: &str = "HOOKFLOW_TEST_CHILD_LOG_DIR";

/// Records the child writer process appends.
const CHILD_RECORDS: usize = 1_000;

/// Maximum time a concurrent test waits for its writer before it fails.
const DEADLINE: Duration = Duration::from_secs(120);

fn open(dir: &Path, partitions: u32) -> Result<LocalLog, ConnectorError> {
    LocalLog::open(dir, &LocalLogOptions { partitions })
}

/// Reads every record of `partition` from offset 0, in pages of 7 records.
fn read_all(log: &mut LocalLog, partition: u32) -> Result<Vec<SourceRecord>, ConnectorError> {
    let mut records = Vec::new();
    loop {
        let page = log.read(partition, records.len() as u64, 7)?;
        if page.is_empty() {
            return Ok(records);
        }
        records.extend(page);
    }
}

/// A xorshift generator, so that batch sizes and keys vary but every run is the same.
struct Xorshift(u64);

impl Xorshift {
    fn below(&mut self, bound: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % bound as u64) as usize
    }
}

/// Polls every partition of `reader` once from `next_offsets`, checks that offsets continue
/// without gaps, and records what it read in `seen`.
fn poll_once(
    reader: &mut LocalLog,
    next_offsets: &mut [u64],
    seen: &mut BTreeMap<(u32, u64), Vec<u8>>,
) -> Result<usize, ConnectorError> {
    let mut read = 0;
    for partition in 0..reader.partitions() {
        let next = &mut next_offsets[partition as usize];
        for record in reader.read(partition, *next, 64)? {
            assert_eq!(record.partition, partition);
            assert_eq!(
                record.offset, *next,
                "partition {partition} skipped or repeated an offset"
            );
            *next += 1;
            read += 1;
            let previous = seen.insert((partition, record.offset), record.value);
            assert!(
                previous.is_none(),
                "read ({partition}, {}) twice",
                record.offset
            );
        }
    }
    Ok(read)
}

#[test]
fn append_then_read_round_trip() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut log = open(dir.path(), 4)?;

    let positions = log.append(
        &[
            (b"acme", br#"{"id":"1"}"#),
            (b"globex", br#"{"id":"2"}"#),
            (b"acme", b""),
        ],
        NOW_MS,
    )?;

    let acme = log.partition_for_key(b"acme");
    let globex = log.partition_for_key(b"globex");
    assert_ne!(acme, globex, "the test needs two partitions");
    assert_eq!(positions, vec![(acme, 0), (globex, 0), (acme, 1)]);

    let records = log.read(acme, 0, 10)?;
    assert_eq!(
        records,
        vec![
            SourceRecord {
                partition: acme,
                offset: 0,
                appended_at_ms: Some(NOW_MS),
                value: br#"{"id":"1"}"#.to_vec(),
            },
            SourceRecord {
                partition: acme,
                offset: 1,
                appended_at_ms: Some(NOW_MS),
                value: Vec::new(),
            },
        ]
    );
    assert_eq!(log.read(globex, 0, 10)?[0].value, br#"{"id":"2"}"#.to_vec());
    Ok(())
}

#[test]
fn read_honors_offset_and_limit() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut log = open(dir.path(), 1)?;
    let values: Vec<Vec<u8>> = (0..10).map(|i| format!("v{i}").into_bytes()).collect();
    let records: Vec<(&[u8], &[u8])> = values
        .iter()
        .map(|v| (&b"acme"[..], v.as_slice()))
        .collect();
    log.append(&records, NOW_MS)?;

    let page = log.read(0, 4, 3)?;
    let offsets: Vec<u64> = page.iter().map(|record| record.offset).collect();
    assert_eq!(offsets, vec![4, 5, 6]);
    assert_eq!(page[0].value, b"v4".to_vec());
    assert!(log.read(0, 10, 3)?.is_empty());
    assert!(log.read(0, u64::MAX, 3)?.is_empty());
    assert!(log.read(0, 0, 0)?.is_empty());
    assert_eq!(log.end_offset(0)?, 10);
    Ok(())
}

#[test]
fn read_rejects_unknown_partition() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut log = open(dir.path(), 4)?;

    let read = log.read(4, 0, 1);
    assert!(matches!(
        read,
        Err(ConnectorError::PartitionOutOfRange {
            partition: 4,
            partitions: 4
        })
    ));
    let end = log.end_offset(7);
    assert!(matches!(
        end,
        Err(ConnectorError::PartitionOutOfRange {
            partition: 7,
            partitions: 4
        })
    ));
    Ok(())
}

#[test]
fn offsets_dense_per_partition() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut log = open(dir.path(), 4)?;
    let mut random = Xorshift(7);

    let mut appended: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
    for batch in 0..20 {
        let records: Vec<(&[u8], &[u8])> = (0..1 + random.below(30))
            .map(|_| (TENANTS[random.below(TENANTS.len())].as_bytes(), &b"{}"[..]))
            .collect();
        let positions = log.append(&records, NOW_MS + batch)?;
        assert_eq!(positions.len(), records.len());
        for ((key, _), (partition, offset)) in records.iter().zip(positions) {
            assert_eq!(partition, log.partition_for_key(key));
            appended.entry(partition).or_default().push(offset);
        }
    }

    for partition in 0..4 {
        let offsets = appended.get(&partition).cloned().unwrap_or_default();
        let expected: Vec<u64> = (0..offsets.len() as u64).collect();
        assert_eq!(offsets, expected, "offsets of partition {partition}");
        let read: Vec<u64> = read_all(&mut log, partition)?
            .iter()
            .map(|record| record.offset)
            .collect();
        assert_eq!(read, expected, "offsets read from partition {partition}");
        assert_eq!(log.end_offset(partition)?, expected.len() as u64);
    }
    Ok(())
}

#[test]
fn partition_for_key_is_stable() -> TestResult {
    let dir = tempfile::tempdir()?;
    let four = open(&dir.path().join("four"), 4)?;
    let eight = open(&dir.path().join("eight"), 8)?;

    // 64-bit FNV-1a of "acme" is 0x0724d383f4f6de0f.
    assert_eq!(four.partition_for_key(b"acme"), 3);
    assert_eq!(eight.partition_for_key(b"acme"), 7);
    assert_eq!(four.partition_for_key(b"globex"), 2);
    assert_eq!(hookflow_connectors::partition_for_key(b"tenant-a", 4), 3);
    for tenant in TENANTS {
        assert_eq!(
            four.partition_for_key(tenant.as_bytes()),
            four.partition_for_key(tenant.as_bytes())
        );
    }
    Ok(())
}

#[test]
fn same_key_goes_to_same_partition() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut log = open(dir.path(), 4)?;
    let records: Vec<(&[u8], &[u8])> = (0..50).map(|_| (&b"acme"[..], &b"{}"[..])).collect();

    let positions = log.append(&records, NOW_MS)?;

    assert!(positions.iter().all(|(partition, _)| *partition == 3));
    assert_eq!(log.end_offset(3)?, 50);
    for partition in [0, 1, 2] {
        assert_eq!(log.end_offset(partition)?, 0, "partition {partition}");
    }
    Ok(())
}

#[test]
fn partition_count_fixed_at_creation() -> TestResult {
    let dir = tempfile::tempdir()?;
    drop(open(dir.path(), 4)?);

    let mut reopened = open(dir.path(), 8)?;
    assert_eq!(reopened.partitions(), 4);
    assert_eq!(reopened.partition_for_key(b"acme"), 3);
    let positions = reopened.append(&[(b"acme", b"{}")], NOW_MS)?;
    assert_eq!(positions, vec![(3, 0)]);
    assert!(reopened.end_offset(4).is_err());

    assert_eq!(open(dir.path(), 1)?.partitions(), 4);
    Ok(())
}

#[test]
fn zero_partitions_rejected() {
    let Ok(dir) = tempfile::tempdir() else {
        panic!("cannot create a temporary directory");
    };
    let result = open(dir.path(), 0);
    assert!(matches!(
        result,
        Err(ConnectorError::InvalidOption {
            option: "partitions",
            ..
        })
    ));
}

#[test]
fn concurrent_open_creates_log_once() -> TestResult {
    let dir = tempfile::tempdir()?;
    let requested = [2_u32, 3, 4, 5, 6, 7, 8, 9];
    let barrier = Arc::new(Barrier::new(requested.len()));

    let openers: Vec<_> = requested
        .into_iter()
        .map(|partitions| {
            let dir = dir.path().to_path_buf();
            let barrier = Arc::clone(&barrier);
            thread::spawn(move || {
                barrier.wait();
                open(&dir, partitions).map(|log| log.partitions())
            })
        })
        .collect();
    let mut counts = Vec::new();
    for opener in openers {
        let Ok(result) = opener.join() else {
            panic!("an opener thread panicked");
        };
        counts.push(result?);
    }

    assert!(
        requested.contains(&counts[0]),
        "count {} was never requested",
        counts[0]
    );
    assert!(
        counts.iter().all(|count| *count == counts[0]),
        "counts differ: {counts:?}"
    );
    Ok(())
}

#[test]
fn unknown_format_version_rejected() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = open(dir.path(), 4)?.path().to_path_buf();
    let raw = rusqlite::Connection::open(&path)?;
    raw.execute(
        "UPDATE meta SET value = 99 WHERE key = 'format_version'",
        [],
    )?;
    drop(raw);

    let Err(err) = open(dir.path(), 4) else {
        panic!("a log with format version 99 was opened");
    };

    assert!(matches!(
        err,
        ConnectorError::UnsupportedLogVersion {
            found: 99,
            supported: 1,
            ..
        }
    ));
    let message = err.to_string();
    assert!(
        message.contains(&path.display().to_string()),
        "message: {message}"
    );
    assert!(message.contains("99"), "message: {message}");
    Ok(())
}

#[test]
fn database_lives_in_log_directory() -> TestResult {
    let dir = tempfile::tempdir()?;
    let data_dir = dir.path().join("data");

    let log = open(&data_dir, 4)?;

    assert_eq!(log.path(), data_dir.join("log").join("events.sqlite"));
    assert!(log.path().is_file());
    Ok(())
}

#[test]
fn append_is_all_or_nothing() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut log = open(dir.path(), 4)?;
    // A trigger on a second connection makes the third insert of the batch fail.
    let raw = rusqlite::Connection::open(log.path())?;
    raw.execute_batch(
        "CREATE TRIGGER reject_poison BEFORE INSERT ON records WHEN NEW.value = CAST('poison' AS BLOB)
         BEGIN SELECT RAISE(ABORT, 'poison record'); END;",
    )?;

    let result = log.append(
        &[(b"acme", b"one"), (b"globex", b"two"), (b"acme", b"poison")],
        NOW_MS,
    );

    assert!(
        matches!(result, Err(ConnectorError::Sqlite { .. })),
        "result: {result:?}"
    );
    for partition in 0..4 {
        assert_eq!(
            log.end_offset(partition)?,
            0,
            "end offset of partition {partition}"
        );
        assert!(
            log.read(partition, 0, 10)?.is_empty(),
            "records of partition {partition}"
        );
    }

    raw.execute_batch("DROP TRIGGER reject_poison")?;
    let positions = log.append(&[(b"acme", b"one")], NOW_MS)?;
    assert_eq!(positions, vec![(3, 0)]);
    Ok(())
}

#[test]
fn reader_never_sees_partial_append() -> TestResult {
    const BATCH: usize = 25;
    const BATCHES: usize = 80;
    let dir = tempfile::tempdir()?;
    let mut reader = open(dir.path(), 4)?;
    let mut writer = open(dir.path(), 4)?;
    let partition = reader.partition_for_key(b"acme");

    let appender = thread::spawn(move || -> Result<(), ConnectorError> {
        let records: Vec<(&[u8], &[u8])> = (0..BATCH).map(|_| (&b"acme"[..], &b"{}"[..])).collect();
        for batch in 0..BATCHES {
            writer.append(&records, NOW_MS + batch as u64)?;
        }
        Ok(())
    });

    let started = Instant::now();
    let mut observed = Vec::new();
    loop {
        let finished = appender.is_finished();
        let end = reader.end_offset(partition)?;
        observed.push(end);
        assert_eq!(
            end % BATCH as u64,
            0,
            "the reader saw {end} records, part of an append"
        );
        let read = read_all(&mut reader, partition)?.len() as u64;
        assert_eq!(
            read % BATCH as u64,
            0,
            "the reader read {read} records, part of an append"
        );
        if finished {
            break;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "the writer did not finish in time"
        );
    }

    let Ok(result) = appender.join() else {
        panic!("the writer thread panicked");
    };
    result?;
    assert_eq!(observed.last(), Some(&((BATCH * BATCHES) as u64)));
    Ok(())
}

/// A writer thread appends batches of random size and keys while a reader on its own
/// connection polls. The reader must see exactly the records the writer's appends placed,
/// each once, at the offsets the appends returned.
#[test]
fn concurrent_reader_sees_every_record_once() -> TestResult {
    const RECORDS: usize = 3_000;
    let dir = tempfile::tempdir()?;
    let mut reader = open(dir.path(), 4)?;
    let mut writer = open(dir.path(), 4)?;
    let start = Arc::new(Barrier::new(2));

    let writer_start = Arc::clone(&start);
    let appender = thread::spawn(
        move || -> Result<BTreeMap<(u32, u64), Vec<u8>>, ConnectorError> {
            let mut random = Xorshift(42);
            let mut placed = BTreeMap::new();
            let mut sequence = 0;
            writer_start.wait();
            while sequence < RECORDS {
                let size = (1 + random.below(40)).min(RECORDS - sequence);
                let batch: Vec<(String, Vec<u8>)> = (sequence..sequence + size)
                    .map(|seq| {
                        let tenant = TENANTS[random.below(TENANTS.len())];
                        (tenant.to_string(), format!("{tenant}:{seq}").into_bytes())
                    })
                    .collect();
                let records: Vec<(&[u8], &[u8])> = batch
                    .iter()
                    .map(|(key, value)| (key.as_bytes(), value.as_slice()))
                    .collect();
                let positions = writer.append(&records, NOW_MS + sequence as u64)?;
                for (position, (_, value)) in positions.into_iter().zip(batch) {
                    placed.insert(position, value);
                }
                sequence += size;
            }
            Ok(placed)
        },
    );

    let mut next_offsets = vec![0; 4];
    let mut seen = BTreeMap::new();
    let started = Instant::now();
    start.wait();
    loop {
        let finished = appender.is_finished();
        poll_once(&mut reader, &mut next_offsets, &mut seen)?;
        if finished && poll_once(&mut reader, &mut next_offsets, &mut seen)? == 0 {
            break;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "the writer did not finish in time"
        );
    }
    let Ok(placed) = appender.join() else {
        panic!("the writer thread panicked");
    };
    let placed = placed?;

    assert_eq!(placed.len(), RECORDS);
    assert_eq!(seen.len(), RECORDS);
    assert_eq!(seen, placed);
    for partition in 0..4 {
        assert_eq!(
            reader.end_offset(partition)?,
            next_offsets[partition as usize]
        );
    }
    // Within a partition, the records of each tenant keep the writer's order.
    let mut last_sequence: BTreeMap<String, usize> = BTreeMap::new();
    for value in seen.values() {
        let text = String::from_utf8_lossy(value);
        let Some((tenant, sequence)) = text.split_once(':') else {
            panic!("unexpected value {text}");
        };
        let sequence: usize = sequence.parse()?;
        if let Some(previous) = last_sequence.insert(tenant.to_string(), sequence) {
            assert!(
                previous < sequence,
                "{tenant}: {sequence} was read after {previous}"
            );
        }
    }
    Ok(())
}

/// Runs as the writer process of `child_process_appends_are_read`, which starts this test
/// binary again with `CHILD_LOG_DIR` set. Without the variable it does nothing.
#[test]
#[ignore = "started as a separate process by child_process_appends_are_read"]
fn child_writer_process() -> TestResult {
    let Some(dir) = std::env::var_os(CHILD_LOG_DIR) else {
        return Ok(());
    };
    let mut log = open(Path::new(&dir), 4)?;
    let mut sequence = 0;
    while sequence < CHILD_RECORDS {
        let batch: Vec<(&str, Vec<u8>)> = (sequence..sequence + 10)
            .map(|seq| {
                let tenant = TENANTS[seq % 3];
                (tenant, format!("{tenant}:{seq}").into_bytes())
            })
            .collect();
        let records: Vec<(&[u8], &[u8])> = batch
            .iter()
            .map(|(key, value)| (key.as_bytes(), value.as_slice()))
            .collect();
        log.append(&records, NOW_MS + sequence as u64)?;
        sequence += 10;
    }
    Ok(())
}

#[test]
fn child_process_appends_are_read() -> TestResult {
    let dir = tempfile::tempdir()?;
    // The child starts before this process opens the log, so both may try to create it.
    let mut child = Command::new(std::env::current_exe()?)
        .args([
            "--exact",
            "local_log::child_writer_process",
            "--ignored",
            "--test-threads=1",
        ])
        .env(CHILD_LOG_DIR, dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()?;
    let mut reader = open(dir.path(), 4)?;

    let mut next_offsets = vec![0; 4];
    let mut seen = BTreeMap::new();
    let started = Instant::now();
    let status = loop {
        let exited = child.try_wait()?;
        poll_once(&mut reader, &mut next_offsets, &mut seen)?;
        if let Some(status) = exited {
            // The writer is done: read on until a poll finds nothing new, however far behind
            // a loaded machine left the reader.
            while poll_once(&mut reader, &mut next_offsets, &mut seen)? > 0 {}
            break status;
        }
        if started.elapsed() > DEADLINE {
            child.kill()?;
            panic!("the writer process did not finish in time");
        }
        thread::sleep(Duration::from_millis(1));
    };

    assert!(status.success(), "the writer process failed: {status}");
    assert_eq!(seen.len(), CHILD_RECORDS);
    let mut expected_next: BTreeMap<&str, usize> = BTreeMap::new();
    for ((partition, _), value) in &seen {
        let text = String::from_utf8_lossy(value);
        let Some((tenant, sequence)) = text.split_once(':') else {
            panic!("unexpected value {text}");
        };
        let Some(tenant) = TENANTS.iter().find(|known| **known == tenant) else {
            panic!("unknown tenant {tenant}");
        };
        assert_eq!(*partition, reader.partition_for_key(tenant.as_bytes()));
        let sequence: usize = sequence.parse()?;
        let next = expected_next
            .entry(tenant)
            .or_insert(TENANTS.iter().position(|t| t == tenant).unwrap_or(0));
        assert_eq!(sequence, *next, "records of {tenant} out of order");
        *next += 3;
    }
    Ok(())
}

#[test]
fn reopen_keeps_records() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut log = open(dir.path(), 4)?;
    let keys: Vec<String> = (0..100)
        .map(|i| TENANTS[i % TENANTS.len()].to_string())
        .collect();
    let values: Vec<Vec<u8>> = (0..100)
        .map(|i| format!("value {i}").into_bytes())
        .collect();
    let records: Vec<(&[u8], &[u8])> = keys
        .iter()
        .zip(&values)
        .map(|(key, value)| (key.as_bytes(), value.as_slice()))
        .collect();
    log.append(&records, NOW_MS)?;
    let before: Vec<Vec<SourceRecord>> = (0..4)
        .map(|partition| read_all(&mut log, partition))
        .collect::<Result<_, _>>()?;
    drop(log);

    let mut reopened = open(dir.path(), 4)?;

    for partition in 0..4 {
        assert_eq!(
            read_all(&mut reopened, partition)?,
            before[partition as usize]
        );
        assert_eq!(
            reopened.end_offset(partition)?,
            before[partition as usize].len() as u64
        );
    }
    let total: usize = before.iter().map(Vec::len).sum();
    assert_eq!(total, 100);
    let acme = reopened.partition_for_key(b"acme");
    let positions = reopened.append(&[(b"acme", b"after reopen")], NOW_MS)?;
    assert_eq!(positions, vec![(acme, before[acme as usize].len() as u64)]);
    Ok(())
}
