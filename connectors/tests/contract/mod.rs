//! The contract every [`Source`] must meet, as test functions over a [`ContractLog`]: a fresh,
//! empty log that can be appended to and opened for reading any number of times.
//!
//! `connectors/tests/source_contract.rs` runs it against the local log; the Fluvio live tests
//! in `pipeline/tests/fluvio_live.rs` run it against a topic of a real cluster. A reader learns
//! of new records only by reading again, so reads poll until a deadline.

#![allow(dead_code)]

use std::time::{Duration, Instant};

use hookflow_connectors::{ConnectorError, Source};
use hookflow_schemas::SourceRecord;

/// How long a test waits for records it appended to become readable.
const DEADLINE: Duration = Duration::from_secs(30);

/// A fresh, empty log under test.
pub trait ContractLog {
    /// Opens a new reader, as a restarted process would.
    fn open(&mut self) -> Box<dyn Source>;
    /// Appends (key, value) records and returns the (partition, offset) of each, in order.
    fn append(&mut self, records: &[(&[u8], &[u8])]) -> Vec<(u32, u64)>;
}

/// Reads `partition` from `from` until `want` records arrived or the deadline passed.
pub fn read_until(
    source: &mut dyn Source,
    partition: u32,
    from: u64,
    want: usize,
    batch: usize,
) -> Vec<SourceRecord> {
    let deadline = Instant::now() + DEADLINE;
    let mut records: Vec<SourceRecord> = Vec::new();
    let mut next = from;
    while records.len() < want && Instant::now() < deadline {
        let read = source
            .read(partition, next, batch.min(want - records.len()))
            .expect("read");
        if std::env::var_os("HOOKFLOW_CONTRACT_TRACE").is_some() {
            eprintln!(
                "read partition {partition} from {next}: {} records",
                read.len()
            );
        }
        match read.last() {
            Some(last) => next = last.offset + 1,
            None => std::thread::sleep(Duration::from_millis(20)),
        }
        records.extend(read);
    }
    records
}

/// A new log has partitions, each empty, with its end at 0.
pub fn empty_log(log: &mut dyn ContractLog) {
    let mut source = log.open();
    assert!(source.partitions() >= 1);
    for partition in 0..source.partitions() {
        assert_eq!(source.end_offset(partition).expect("end offset"), 0);
        assert!(source.read(partition, 0, 10).expect("read").is_empty());
    }
    let beyond = source.partitions();
    assert!(matches!(
        source.read(beyond, 0, 10),
        Err(ConnectorError::PartitionOutOfRange { .. })
    ));
}

/// Records of one key land in one partition at dense offsets; a read from an offset returns
/// the records from there, in order, at most `max_records` of them.
pub fn read_from_offset(log: &mut dyn ContractLog) {
    let values: Vec<String> = (0..10).map(|i| format!(r#"{{"n":{i}}}"#)).collect();
    let records: Vec<(&[u8], &[u8])> = values
        .iter()
        .map(|value| (b"tenant-a".as_slice(), value.as_bytes()))
        .collect();
    let positions = log.append(&records);
    let partition = positions[0].0;
    let first = positions[0].1;
    assert!(
        positions.iter().all(|(p, _)| *p == partition),
        "{positions:?}"
    );
    let offsets: Vec<u64> = positions.iter().map(|(_, o)| *o).collect();
    assert_eq!(offsets, (first..first + 10).collect::<Vec<_>>());

    let mut source = log.open();
    let read = read_until(source.as_mut(), partition, first + 4, 6, 100);
    assert_eq!(read.len(), 6);
    for (i, record) in read.iter().enumerate() {
        assert_eq!(record.partition, partition);
        assert_eq!(record.offset, first + 4 + i as u64);
        assert_eq!(record.value, values[4 + i].as_bytes());
    }
    let three = read_until(source.as_mut(), partition, first, 3, 3);
    assert_eq!(three.len(), 3);
    assert_eq!(three[2].offset, first + 2);
    assert!(source.end_offset(partition).expect("end") >= first + 10);
}

/// A reader opened again (a restart) resumes from the offset the first one checkpointed and
/// sees the records appended in between.
pub fn resume_from_checkpoint(log: &mut dyn ContractLog) {
    let first_batch: Vec<(&[u8], &[u8])> = (0..6)
        .map(|_| (b"t".as_slice(), b"one".as_slice()))
        .collect();
    let positions = log.append(&first_batch);
    let (partition, base) = positions[0];

    let checkpoint = {
        let mut source = log.open();
        let read = read_until(source.as_mut(), partition, base, 3, 3);
        assert_eq!(read.len(), 3);
        read[2].offset + 1
    };
    let later: Vec<(&[u8], &[u8])> = (0..2)
        .map(|_| (b"t".as_slice(), b"two".as_slice()))
        .collect();
    log.append(&later);

    let mut source = log.open();
    let read = read_until(source.as_mut(), partition, checkpoint, 5, 100);
    let offsets: Vec<u64> = read.iter().map(|r| r.offset).collect();
    assert_eq!(offsets, (base + 3..base + 8).collect::<Vec<_>>());
    assert_eq!(read[2].value, b"one");
    assert_eq!(read[3].value, b"two");
    assert_eq!(source.end_offset(partition).expect("end"), base + 8);
}

/// `fetch` returns the record at each position, in the order asked, and `RecordMissing` for a
/// position past the end.
pub fn batched_fetch(log: &mut dyn ContractLog) {
    let values: Vec<String> = (0..40).map(|i| format!("value-{i}")).collect();
    let keys = ["alpha", "beta", "gamma", "delta"];
    let records: Vec<(&[u8], &[u8])> = values
        .iter()
        .enumerate()
        .map(|(i, value)| (keys[i % keys.len()].as_bytes(), value.as_bytes()))
        .collect();
    let positions = log.append(&records);

    let mut source = log.open();
    // Wait until the last record is readable, so that fetch finds every one.
    let (last_partition, last_offset) = positions[positions.len() - 1];
    assert_eq!(
        read_until(source.as_mut(), last_partition, last_offset, 1, 1).len(),
        1
    );

    let mut asked: Vec<(u32, u64)> = positions.iter().rev().step_by(3).copied().collect();
    asked.push(positions[0]);
    let missing = (positions[0].0, 1_000_000);
    asked.push(missing);
    let fetched = source.fetch(&asked);
    assert_eq!(fetched.len(), asked.len());
    for (position, result) in asked.iter().zip(&fetched) {
        if *position == missing {
            assert!(
                matches!(result, Err(ConnectorError::RecordMissing { .. })),
                "{result:?}"
            );
            continue;
        }
        let record = result.as_ref().expect("fetched record");
        let index = positions
            .iter()
            .position(|p| p == position)
            .expect("asked for an appended position");
        assert_eq!((record.partition, record.offset), *position);
        assert_eq!(record.value, values[index].as_bytes());
    }
}

/// Thousands of records appended at once are all read back, in order, in bounded batches.
pub fn large_batch(log: &mut dyn ContractLog) {
    const COUNT: usize = 5000;
    let values: Vec<String> = (0..COUNT).map(|i| format!("{i:0>200}")).collect();
    let records: Vec<(&[u8], &[u8])> = values
        .iter()
        .map(|value| (b"bulk".as_slice(), value.as_bytes()))
        .collect();
    let positions = log.append(&records);
    let (partition, base) = positions[0];

    let mut source = log.open();
    let read = read_until(source.as_mut(), partition, base, COUNT, 1024);
    if std::env::var_os("HOOKFLOW_CONTRACT_TRACE").is_some() {
        let last = positions.last().copied();
        eprintln!(
            "appended up to {last:?}; end offset {:?}",
            source.end_offset(partition)
        );
    }
    assert_eq!(read.len(), COUNT);
    for (i, record) in read.iter().enumerate() {
        assert_eq!(record.offset, base + i as u64);
        assert_eq!(record.value, values[i].as_bytes());
    }
}

/// A record that is not a valid event is still a record: the source passes its bytes through.
pub fn malformed_record(log: &mut dyn ContractLog) {
    let bad: &[u8] = b"{not json\xff";
    let positions = log.append(&[(b"".as_slice(), bad), (b"".as_slice(), b"")]);
    let (partition, offset) = positions[0];
    let mut source = log.open();
    let read = read_until(source.as_mut(), partition, offset, 1, 10);
    assert_eq!(read.len(), 1);
    assert_eq!(read[0].value, bad);
}
