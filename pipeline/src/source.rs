//! The source operator: reads this worker's partitions of a [`Source`] into the dataflow and
//! advances the settled-offset checkpoint.
//!
//! Out: raw records, each at the time the source read it (ms). Partition `p` belongs to
//! worker `p % peers`; a worker that owns none still advances its capability, so the frontier
//! moves on every worker. Reading starts at the checkpoint of each partition.
//!
//! State: the next offset of each owned partition, and the batches sent but not yet past the
//! probe placed after the durable writes, each with its time and the offsets it reached. A
//! batch whose time the probe has passed is settled: every delivery of its records is
//! journaled or durably pending, so the checkpoint moves past it. Reading pauses while more
//! than `max_read_ahead` records are in the dataflow. The capability is dropped when the
//! pipeline stops, or, with `until_idle`, once a poll finds every owned partition at its end.
//! After each checkpoint write the source is told the offsets written ([`Source::settled`]),
//! so that a Fluvio consumer's offset follows the checkpoint.
//!
//! NOTE: a delivery parked as pending behind a slow endpoint leaves the dataflow's count, so
//! `max_read_ahead` does not bound the deliver operator's in-memory backlog; counting parked
//! deliveries against it, or keeping them only in the state store, would.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hookflow_connectors::{ConnectorError, Source, StateStore};
use hookflow_operators::clock::Clock;
use hookflow_operators::stop::StopSignal;
use hookflow_schemas::SourceRecord;
use timely::dataflow::operators::generic::operator::source;
use timely::dataflow::operators::probe::Handle as ProbeHandle;
use timely::dataflow::{Scope, Stream};

use crate::metrics::Metrics;

/// Settings of the source operator.
#[derive(Debug, Clone)]
pub struct SourceOptions {
    /// How long to wait before polling again after a poll found nothing.
    pub poll_interval: Duration,
    /// Records per partition per read.
    pub batch_records: usize,
    /// Records sent but not yet past the probe before reading pauses.
    pub max_read_ahead: usize,
    /// Stop once every owned partition is read to its end.
    pub until_idle: bool,
    /// How often, at most, the checkpoint is written.
    pub checkpoint_interval: Duration,
}

/// Batches read and not yet settled, and the offsets settled but not yet checkpointed.
#[derive(Debug, Default)]
pub struct SourceProgress {
    /// (time, partition, next offset after the batch), in time order.
    in_dataflow: VecDeque<(u64, u32, u64)>,
    /// Records in `in_dataflow`.
    outstanding: usize,
    /// The settled next offset of each partition, not yet written.
    settled: HashMap<u32, u64>,
    /// The metrics that receive the settled offsets and the read counts.
    pub metrics: Arc<Metrics>,
}

impl SourceProgress {
    /// Moves the batches the probe has passed into `settled`.
    fn settle(&mut self, probe: &ProbeHandle<u64>, batch_sizes: &mut VecDeque<usize>) {
        while let Some((time, partition, next)) = self.in_dataflow.front().copied() {
            if probe.less_equal(&time) {
                break;
            }
            self.in_dataflow.pop_front();
            if let Some(size) = batch_sizes.pop_front() {
                self.outstanding = self.outstanding.saturating_sub(size);
            }
            let entry = self.settled.entry(partition).or_insert(next);
            *entry = (*entry).max(next);
        }
    }

    /// Creates the progress of a source that counts into `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        SourceProgress {
            metrics,
            ..SourceProgress::default()
        }
    }

    /// Returns the number of records read and not yet settled.
    pub fn outstanding(&self) -> usize {
        self.outstanding
    }

    /// Writes the settled offsets to the checkpoint and returns the (partition, next offset)
    /// pairs written. With `all_done`, every batch read counts as settled (the dataflow has
    /// completed).
    ///
    /// # Errors
    ///
    /// Fails if the store cannot be written; the offsets stay to be written next time.
    pub fn write_checkpoint(
        &mut self,
        store: &mut StateStore,
        probe: &ProbeHandle<u64>,
        all_done: bool,
    ) -> Result<Vec<(u32, u64)>, ConnectorError> {
        if all_done {
            for (_, partition, next) in self.in_dataflow.drain(..) {
                let entry = self.settled.entry(partition).or_insert(next);
                *entry = (*entry).max(next);
            }
            self.outstanding = 0;
        } else {
            let mut sizes = VecDeque::new();
            self.settle(probe, &mut sizes);
        }
        if self.settled.is_empty() {
            return Ok(Vec::new());
        }
        let offsets: Vec<(u32, u64)> = self.settled.iter().map(|(p, o)| (*p, *o)).collect();
        store.advance_checkpoint(&offsets)?;
        for (partition, offset) in &offsets {
            if let Some(gauges) = self.metrics.partition(*partition) {
                gauges.settled.fetch_max(*offset, Ordering::Relaxed);
            }
        }
        self.settled.clear();
        Ok(offsets)
    }
}

/// Shared state between the source operator and the worker loop.
#[derive(Debug, Clone, Default)]
pub struct SourceControl {
    /// Set by a signal handler or a failure: stop reading and drain.
    pub stop: Arc<StopSignal>,
    /// Set by the operator once it has dropped its capability.
    pub finished: Rc<Cell<bool>>,
    /// Set when reading failed; the pipeline stops and reports it.
    pub failed: Rc<Cell<bool>>,
    /// Read progress, for the checkpoint.
    pub progress: Rc<RefCell<SourceProgress>>,
}

/// Builds the source operator for this worker, reading each owned partition from its
/// offset in `start` (0 when absent).
#[allow(clippy::too_many_arguments)]
pub fn read_source<'scope>(
    scope: Scope<'scope, u64>,
    mut log: Box<dyn Source>,
    start: HashMap<u32, u64>,
    store: Rc<RefCell<StateStore>>,
    clock: Arc<dyn Clock>,
    options: SourceOptions,
    probe: ProbeHandle<u64>,
    control: SourceControl,
) -> Stream<'scope, u64, Vec<SourceRecord>> {
    let (index, peers) = (scope.index(), scope.peers());
    let owned: Vec<u32> = (0..log.partitions())
        .filter(|p| *p as usize % peers == index)
        .collect();

    source(scope, "Source", move |capability, info| {
        let activator = scope.activator_for(info.address);
        let mut capability = Some(capability);
        // Next offset to read, per owned partition.
        let mut next: Vec<(u32, u64)> = owned
            .iter()
            .map(|p| (*p, start.get(p).copied().unwrap_or(0)))
            .collect();
        // Records per entry of `progress.in_dataflow`, in the same order.
        let mut batch_sizes: VecDeque<usize> = VecDeque::new();
        let mut last_checkpoint = Instant::now();
        let metrics = control.progress.borrow().metrics.clone();
        for (partition, offset) in &next {
            if let Some(gauges) = metrics.partition(*partition) {
                gauges.settled.fetch_max(*offset, Ordering::Relaxed);
                gauges.end.fetch_max(*offset, Ordering::Relaxed);
            }
        }
        // When the log ends were last queried; `None` queries them at the first activation.
        let mut ends_queried: Option<Instant> = None;

        move |output| {
            let Some(cap) = capability.as_mut() else {
                return;
            };
            let mut progress = control.progress.borrow_mut();
            progress.settle(&probe, &mut batch_sizes);
            if last_checkpoint.elapsed() >= options.checkpoint_interval
                && !progress.settled.is_empty()
            {
                match progress.write_checkpoint(&mut store.borrow_mut(), &probe, false) {
                    Ok(written) => {
                        last_checkpoint = Instant::now();
                        log.settled(&written);
                    }
                    Err(error) => tracing::error!(
                        error = %format!("{error:#}"),
                        "Writing the checkpoint failed; retrying, and a restart re-reads from the last one."
                    ),
                }
            }

            if control.stop.is_stopped() {
                tracing::info!(worker = index, "Source stopped.");
                capability = None;
                control.finished.set(true);
                return;
            }

            let now = clock.now_ms().max(*cap.time());
            cap.downgrade(&now);

            if progress.outstanding >= options.max_read_ahead {
                // The probe advances as the dataflow drains, which reschedules the worker.
                activator.activate_after(options.poll_interval);
                return;
            }

            if ends_queried.is_none_or(|at| at.elapsed() >= END_OFFSET_INTERVAL) {
                ends_queried = Some(Instant::now());
                query_end_offsets(log.as_mut(), &next, &metrics);
            }

            let mut read = 0usize;
            // A source that is unreachable for now (Fluvio) is read again at the next poll;
            // meanwhile the pipeline is not idle.
            let mut unavailable = false;
            let mut session = output.session(cap);
            for (partition, offset) in next.iter_mut() {
                let records = match log.read(*partition, *offset, options.batch_records) {
                    Ok(records) => {
                        metrics.source.mark_up();
                        records
                    }
                    Err(error) if error.is_transient() => {
                        metrics.source.mark_down(format!("{error:#}"));
                        unavailable = true;
                        continue;
                    }
                    Err(error) => {
                        tracing::error!(error = %format!("{error:#}"), partition = *partition, "Reading the source failed; stopping.");
                        metrics.source.mark_down(format!("{error:#}"));
                        control.failed.set(true);
                        control.stop.stop();
                        break;
                    }
                };
                let Some(last) = records.last() else { continue };
                *offset = last.offset + 1;
                if let Some(gauges) = metrics.partition(*partition) {
                    gauges.end.fetch_max(*offset, Ordering::Relaxed);
                }
                read += records.len();
                progress.in_dataflow.push_back((now, *partition, *offset));
                batch_sizes.push_back(records.len());
                session.give_iterator(records.into_iter());
            }
            drop(session);
            progress.outstanding += read;
            metrics
                .events_ingested
                .fetch_add(read as u64, Ordering::Relaxed);

            if read > 0 {
                activator.activate();
            } else if options.until_idle && !unavailable {
                tracing::info!(worker = index, "Source read every partition to its end.");
                capability = None;
                control.finished.set(true);
            } else {
                activator.activate_after(options.poll_interval.min(options.checkpoint_interval));
            }
        }
    })
}

/// How often the source operator queries the log end of its partitions for the lag metrics.
const END_OFFSET_INTERVAL: Duration = Duration::from_secs(1);

/// Queries the log end of each partition in `next` into the metrics, and marks the source
/// up or down by the result.
fn query_end_offsets(log: &mut dyn Source, next: &[(u32, u64)], metrics: &Metrics) {
    for (partition, _) in next {
        match log.end_offset(*partition) {
            Ok(end) => {
                metrics.source.mark_up();
                if let Some(gauges) = metrics.partition(*partition) {
                    gauges.end.fetch_max(end, Ordering::Relaxed);
                }
            }
            Err(error) => {
                tracing::warn!(error = %format!("{error:#}"), partition = *partition, "Querying the log end of a partition failed.");
                metrics.source.mark_down(format!("{error:#}"));
            }
        }
    }
}
