//! The source contract (`tests/contract/mod.rs`) run against the local log.

mod contract;

use contract::ContractLog;
use hookflow_connectors::{LocalLog, LocalLogOptions, Source};

struct Local {
    dir: tempfile::TempDir,
    writer: LocalLog,
}

impl Local {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let writer = LocalLog::open(dir.path(), &LocalLogOptions::default()).expect("open log");
        Self { dir, writer }
    }
}

impl ContractLog for Local {
    fn open(&mut self) -> Box<dyn Source> {
        Box::new(LocalLog::open(self.dir.path(), &LocalLogOptions::default()).expect("open log"))
    }

    fn append(&mut self, records: &[(&[u8], &[u8])]) -> Vec<(u32, u64)> {
        self.writer.append(records, 1).expect("append")
    }
}

#[test]
fn local_empty_log() {
    contract::empty_log(&mut Local::new());
}

#[test]
fn local_read_from_offset() {
    contract::read_from_offset(&mut Local::new());
}

#[test]
fn local_resume_from_checkpoint() {
    contract::resume_from_checkpoint(&mut Local::new());
}

#[test]
fn local_batched_fetch() {
    contract::batched_fetch(&mut Local::new());
}

#[test]
fn local_large_batch() {
    contract::large_batch(&mut Local::new());
}

#[test]
fn local_malformed_record() {
    contract::malformed_record(&mut Local::new());
}
