//! The place of this process in a hookflow cluster: P processes of W timely workers each,
//! joined by timely's own TCP communication into one computation of P × W workers.
//!
//! In: the process count, this process's index and the address of every process (one
//! `host:port` per line of a hosts file). Out: the timely configuration, the paths of this
//! process's state store and lock, and the ownership rules every part of the pipeline uses:
//!
//! * worker `w` (0 ≤ w < P × W) runs in process `w / W`;
//! * source partition `p` belongs to worker `p % (P × W)`;
//! * an endpoint belongs to worker `endpoint_hash(id) % (P × W)`;
//! * each process keeps its own state store, for the partitions and endpoints its workers own;
//! * process 0 serves the management API ([`Cluster::serves_management_api`]).
//!
//! Because ownership follows from the counts, the counts are fixed for a data directory: every
//! state store records the worker and process counts and rejects a run with others.
//!
//! After timely connects the processes, [`agree`] has every process share what it found in its
//! data directory, so that a process that must not start stops the whole cluster with a
//! message, instead of leaving the others waiting for it.

use std::path::{Path, PathBuf};

use hookflow_operators::deliver::endpoint_hash;
use serde::{Deserialize, Serialize};
use timely::dataflow::operators::probe::Handle as ProbeHandle;
use timely::dataflow::operators::vec::Broadcast;
use timely::dataflow::operators::{Input, Inspect, Probe};
use timely::dataflow::InputHandle;

/// The largest process count a cluster may have.
pub const MAX_PROCESSES: usize = 256;

/// An invalid cluster description, or a data directory that does not fit it.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The process count or index is out of range.
    #[error("invalid process index {index}: a cluster of {processes} process(es) has indexes 0 to {}", processes.saturating_sub(1))]
    InvalidIndex {
        /// The requested index.
        index: usize,
        /// The process count.
        processes: usize,
    },
    /// The process count is out of range.
    #[error("invalid process count {0}: must be between 1 and {MAX_PROCESSES}")]
    InvalidCount(usize),
    /// The hosts file cannot be read.
    #[error("cannot read the hosts file {path}: {source}")]
    HostsUnreadable {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A line of the hosts file is not `host:port`.
    #[error("invalid line {line} of the hosts file {path}: `{text}` is not host:port")]
    HostsLine {
        /// The file.
        path: PathBuf,
        /// The line number, from 1.
        line: usize,
        /// The line as written.
        text: String,
    },
    /// The hosts file names another number of processes.
    #[error("the hosts file {path} lists {found} address(es), but the cluster has {processes} process(es); list one host:port per process")]
    HostsCount {
        /// The file.
        path: PathBuf,
        /// Addresses found.
        found: usize,
        /// The process count.
        processes: usize,
    },
    /// The data directory was run with another process count.
    #[error("data directory {data_dir} was run as {found}; it cannot run as {requested} (the state is divided by process, and no rebalance exists)")]
    LayoutMismatch {
        /// The data directory.
        data_dir: PathBuf,
        /// The state the directory contains, in words.
        found: String,
        /// The cluster of this run, in words.
        requested: String,
    },
}

/// The cluster this process belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    /// Processes in the cluster, at least 1.
    processes: usize,
    /// This process's index, below `processes`.
    process_index: usize,
    /// `host:port` of every process, in index order; empty for a single process.
    addresses: Vec<String>,
}

impl Default for Cluster {
    /// Returns a single process, which needs no addresses.
    fn default() -> Self {
        Cluster {
            processes: 1,
            process_index: 0,
            addresses: Vec::new(),
        }
    }
}

impl Cluster {
    /// Describes process `process_index` of a cluster whose processes listen at `addresses`
    /// (one per process, in index order).
    ///
    /// # Errors
    ///
    /// Fails if the count is 0 or above [`MAX_PROCESSES`], the index is not below it, or
    /// a cluster of more than one process does not have one address per process.
    pub fn new(process_index: usize, addresses: Vec<String>) -> Result<Cluster, ClusterError> {
        let processes = addresses.len();
        if processes == 0 || processes > MAX_PROCESSES {
            return Err(ClusterError::InvalidCount(processes));
        }
        if process_index >= processes {
            return Err(ClusterError::InvalidIndex {
                index: process_index,
                processes,
            });
        }
        Ok(Cluster {
            processes,
            process_index,
            addresses,
        })
    }

    /// Returns the number of processes.
    pub fn processes(&self) -> usize {
        self.processes
    }

    /// Returns this process's index.
    pub fn process_index(&self) -> usize {
        self.process_index
    }

    /// Returns whether this is a cluster of more than one process.
    pub fn is_multi_process(&self) -> bool {
        self.processes > 1
    }

    /// Returns whether this process serves the management API and feeds endpoint changes into
    /// the dataflow: process 0, and only it, so that each change enters the dataflow once.
    pub fn serves_management_api(&self) -> bool {
        self.process_index == 0
    }

    /// Returns the index of this process's first worker, given `workers` per process.
    pub fn first_worker(&self, workers: usize) -> usize {
        self.process_index * workers
    }

    /// Returns the process whose state store keeps `endpoint_id`'s journal, pending and parked
    /// deliveries and its disabled flag: the process of the worker the deliver operator's
    /// exchange sends the endpoint to, given `workers` per process.
    pub fn process_owning_endpoint(&self, endpoint_id: &str, workers: usize) -> usize {
        let peers = (self.processes * workers.max(1)) as u64;
        let worker = endpoint_hash(endpoint_id) % peers;
        worker as usize / workers.max(1)
    }

    /// Builds the timely configuration for `workers` worker threads in this process.
    pub fn timely_config(&self, workers: usize) -> timely::Config {
        if !self.is_multi_process() {
            return timely::Config::process(workers);
        }
        timely::Config {
            communication: timely::CommunicationConfig::Cluster {
                threads: workers,
                process: self.process_index,
                addresses: self.addresses.clone(),
                report: false,
                zerocopy: false,
            },
            worker: timely::WorkerConfig::default(),
        }
    }

    /// Returns the directory of this process's state store: `<data_dir>/state` for a single
    /// process, `<data_dir>/state/process-<I>` for process I of a cluster.
    pub fn state_dir(&self, data_dir: &Path) -> PathBuf {
        let state = data_dir.join("state");
        if self.is_multi_process() {
            state.join(format!("process-{}", self.process_index))
        } else {
            state
        }
    }

    /// Returns the state directories of the other processes, as they would be under this data
    /// directory when every process runs on this machine.
    pub fn other_state_dirs(&self, data_dir: &Path) -> Vec<PathBuf> {
        (0..self.processes)
            .filter(|index| *index != self.process_index)
            .map(|index| data_dir.join("state").join(format!("process-{index}")))
            .collect()
    }

    /// Returns the file whose lock keeps a second run of this process off the data directory.
    pub fn lock_path(&self, data_dir: &Path) -> PathBuf {
        if self.is_multi_process() {
            data_dir.join(format!("hookflow-process-{}.lock", self.process_index))
        } else {
            data_dir.join("hookflow.lock")
        }
    }

    /// Checks that the data directory contains no state of another process count: a single
    /// process rejects a directory with per-process stores, and a cluster process rejects one
    /// with the single-process store. A changed count between clusters is caught by the
    /// counts each store records.
    ///
    /// # Errors
    ///
    /// Fails with [`ClusterError::LayoutMismatch`] naming what the directory holds.
    pub fn check_layout(&self, data_dir: &Path) -> Result<(), ClusterError> {
        let state = data_dir.join("state");
        let mismatch = |found: String| ClusterError::LayoutMismatch {
            data_dir: data_dir.to_path_buf(),
            found,
            requested: self.describe(),
        };
        if self.is_multi_process() {
            if state.join("state.sqlite").exists() {
                return Err(mismatch(
                    "a single process (it has state/state.sqlite)".to_string(),
                ));
            }
            return Ok(());
        }
        let process_dirs = std::fs::read_dir(&state)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .filter(|entry| entry.file_name().to_string_lossy().starts_with("process-"))
                    .count()
            })
            .unwrap_or(0);
        if process_dirs > 0 {
            return Err(mismatch(format!(
                "a cluster (it has {process_dirs} state/process-<I> store(s))"
            )));
        }
        Ok(())
    }

    /// Describes the cluster in words, for messages.
    pub fn describe(&self) -> String {
        if self.is_multi_process() {
            format!(
                "process {} of a cluster of {} processes",
                self.process_index, self.processes
            )
        } else {
            "a single process".to_string()
        }
    }
}

/// Reads a hosts file: one `host:port` per process, in process-index order. Blank lines and
/// lines starting with `#` are skipped.
///
/// # Errors
///
/// Fails if the file cannot be read, a line is not `host:port`, or the file does not list
/// exactly `processes` addresses.
pub fn read_hosts(path: &Path, processes: usize) -> Result<Vec<String>, ClusterError> {
    let text = std::fs::read_to_string(path).map_err(|source| ClusterError::HostsUnreadable {
        path: path.to_path_buf(),
        source,
    })?;
    let mut addresses = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let valid = line
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        if !valid || line.contains(char::is_whitespace) {
            return Err(ClusterError::HostsLine {
                path: path.to_path_buf(),
                line: number + 1,
                text: line.to_string(),
            });
        }
        addresses.push(line.to_string());
    }
    if addresses.len() != processes {
        return Err(ClusterError::HostsCount {
            path: path.to_path_buf(),
            found: addresses.len(),
            processes,
        });
    }
    Ok(addresses)
}

/// The state of one process's part of the data directory, shared with every other process
/// before the pipeline starts.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Readiness {
    /// The process's index.
    pub process_index: usize,
    /// Partitions of the local log the process opened.
    pub partitions: u32,
    /// The id of the local log the process opened.
    pub log_id: i64,
    /// The reason the process cannot start, if it cannot.
    pub problem: Option<String>,
}

/// Shares `local` with every process of the cluster and returns every process's readiness,
/// in process order. Every worker calls it; the first worker of each process sends.
///
/// It is a dataflow of its own, run to completion before the pipeline is built, so every
/// process makes the same start-or-stop decision from the same facts.
pub fn agree(
    worker: &mut timely::worker::Worker,
    workers_per_process: usize,
    local: Readiness,
) -> Vec<Readiness> {
    let received = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
    let mut input = InputHandle::new();
    let probe = ProbeHandle::new();
    let sink = received.clone();
    worker.dataflow::<u64, _, _>(|scope| {
        scope
            .input_from(&mut input)
            .container::<Vec<Readiness>>()
            .broadcast()
            .inspect(move |readiness| sink.borrow_mut().push(readiness.clone()))
            .probe_with(&probe);
    });
    if worker.index().is_multiple_of(workers_per_process.max(1)) {
        input.send(local);
    }
    input.close();
    while !probe.done() {
        worker.step();
    }
    let mut all = received.take();
    all.sort();
    all
}

/// Turns every process's readiness into one decision: `Ok` when every process may start and
/// all opened the same log, otherwise the reasons, naming the processes. A problem hides a
/// log mismatch, since a process that cannot start may not have opened its log.
///
/// # Errors
///
/// Returns the reasons, joined into one message.
pub fn decide(all: &[Readiness]) -> Result<(), String> {
    let mut reasons: Vec<String> = all
        .iter()
        .filter_map(|readiness| {
            readiness
                .problem
                .as_ref()
                .map(|problem| format!("process {}: {problem}", readiness.process_index))
        })
        .collect();
    if reasons.is_empty() {
        if let Some(first) = all.first() {
            for other in all.iter().filter(|r| r.log_id != first.log_id) {
                reasons.push(format!(
                    "process {} opened another local log than process {} (log id {} of {} partitions, not {} of {}); \
                     the local log is one file on one machine, which every process must read: run the processes \
                     on one machine with one data directory, or use a source every machine can read",
                    other.process_index,
                    first.process_index,
                    other.log_id,
                    other.partitions,
                    first.log_id,
                    first.partitions
                ));
            }
        }
    }
    if reasons.is_empty() {
        Ok(())
    } else {
        Err(reasons.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_file_lines() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("hosts");
        std::fs::write(&path, "# the cluster\n127.0.0.1:7000\n\n  10.0.0.2:7001 \n")
            .expect("write");
        let addresses = read_hosts(&path, 2).expect("valid hosts file");
        assert_eq!(addresses, vec!["127.0.0.1:7000", "10.0.0.2:7001"]);

        let count = read_hosts(&path, 3).expect_err("three processes, two lines");
        assert!(count.to_string().contains("lists 2 address(es)"), "{count}");

        std::fs::write(&path, "127.0.0.1:7000\n127.0.0.1\n").expect("write");
        let line = read_hosts(&path, 2).expect_err("no port");
        assert!(line.to_string().contains("line 2"), "{line}");

        std::fs::write(&path, "127.0.0.1:70000\n").expect("write");
        assert!(read_hosts(&path, 1).is_err(), "port out of range");
    }

    #[test]
    fn index_must_be_below_count() {
        let addresses = vec!["127.0.0.1:1".to_string(), "127.0.0.1:2".to_string()];
        let error = Cluster::new(2, addresses.clone()).expect_err("index 2 of 2");
        assert!(error.to_string().contains("indexes 0 to 1"), "{error}");
        let cluster = Cluster::new(1, addresses).expect("index 1 of 2");
        assert!(!cluster.serves_management_api());
        assert_eq!(cluster.first_worker(3), 3);
        assert!(Cluster::default().serves_management_api());
    }

    #[test]
    fn endpoint_owner_matches_exchange() {
        let cluster = Cluster::new(0, vec!["127.0.0.1:1".into(), "127.0.0.1:2".into()])
            .expect("process 0 of 2");
        let mut owners = [0usize; 2];
        for n in 0..64 {
            let id = format!("ep_{n}");
            let owner = cluster.process_owning_endpoint(&id, 3);
            // timely's exchange sends a record to worker `hash % peers` (6 peers here).
            assert_eq!(owner, (endpoint_hash(&id) % 6) as usize / 3, "{id}");
            owners[owner] += 1;
        }
        assert!(
            owners.iter().all(|count| *count > 0),
            "both processes own endpoints: {owners:?}"
        );
        assert_eq!(Cluster::default().process_owning_endpoint("ep_1", 4), 0);
    }

    #[test]
    fn layout_change_is_rejected() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let single = Cluster::default();
        let member = Cluster::new(1, vec!["127.0.0.1:1".into(), "127.0.0.1:2".into()])
            .expect("process 1 of 2");
        assert_eq!(
            member.state_dir(dir.path()),
            dir.path().join("state/process-1")
        );
        assert_eq!(single.state_dir(dir.path()), dir.path().join("state"));

        std::fs::create_dir_all(member.state_dir(dir.path())).expect("create");
        let error = single
            .check_layout(dir.path())
            .expect_err("cluster state present");
        assert!(
            error.to_string().contains("was run as a cluster"),
            "{error}"
        );
        member.check_layout(dir.path()).expect("same layout");

        std::fs::write(dir.path().join("state/state.sqlite"), b"").expect("write");
        let error = member
            .check_layout(dir.path())
            .expect_err("single-process store present");
        assert!(
            error.to_string().contains("was run as a single process"),
            "{error}"
        );
    }

    #[test]
    fn problem_names_process() {
        let ready = |index, log_id, problem: Option<&str>| Readiness {
            process_index: index,
            partitions: 4,
            log_id,
            problem: problem.map(str::to_string),
        };
        assert_eq!(decide(&[ready(0, 7, None), ready(1, 7, None)]), Ok(()));
        let rejected = decide(&[ready(0, 7, None), ready(1, 0, Some("the store is locked"))])
            .expect_err("process 1 cannot start");
        assert_eq!(rejected, "process 1: the store is locked");
        let mismatch = decide(&[ready(0, 7, None), ready(1, 9, None)]).expect_err("two logs");
        assert!(
            mismatch.contains("process 1 opened another local log than process 0"),
            "{mismatch}"
        );
    }
}
