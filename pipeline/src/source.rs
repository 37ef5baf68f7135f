//! The source operator: reads this worker's partitions of a [`Source`] into the dataflow.
//!
//! Out: raw records, each at the time the source read it (ms). Partition `p` belongs to
//! worker `p % peers`; a worker that owns none still advances its capability, so the frontier
//! moves on every worker.
//!
//! State: the next offset of each owned partition, and the (time, count) of batches sent but
//! not yet past the end-of-dataflow probe. Reading pauses while more than `max_read_ahead`
//! records are in the dataflow, so a slow endpoint cannot make the source buffer the log in
//! memory. The capability is dropped when the pipeline stops, or, with `until_idle`, once a
//! poll finds every owned partition at its end.

use hookflow_operators::stop::StopSignal;
use std::cell::Cell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use hookflow_connectors::Source;
use hookflow_operators::clock::Clock;
use hookflow_schemas::SourceRecord;
use timely::dataflow::operators::generic::operator::source;
use timely::dataflow::operators::probe::Handle as ProbeHandle;
use timely::dataflow::{Scope, Stream};

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
}

/// Shared flags between the source operator and the worker loop.
#[derive(Debug, Clone, Default)]
pub struct SourceControl {
    /// Set by a signal handler: stop reading and drain.
    pub stop: Arc<StopSignal>,
    /// Set by the operator once it has dropped its capability.
    pub finished: Rc<Cell<bool>>,
    /// Set when reading failed; the pipeline stops and reports it.
    pub failed: Rc<Cell<bool>>,
}

/// Builds the source operator for this worker.
pub fn read_source<'scope>(
    scope: Scope<'scope, u64>,
    mut log: Box<dyn Source>,
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
        let mut next: Vec<(u32, u64)> = owned.iter().map(|p| (*p, 0)).collect();
        // Batches sent and not yet past the probe: (time, records).
        let mut in_dataflow: VecDeque<(u64, usize)> = VecDeque::new();
        let mut outstanding = 0usize;

        move |output| {
            let Some(cap) = capability.as_mut() else {
                return;
            };
            if control.stop.is_stopped() {
                tracing::info!(worker = index, "Source stopped.");
                capability = None;
                control.finished.set(true);
                return;
            }

            let now = clock.now_ms().max(*cap.time());
            cap.downgrade(&now);

            while let Some((time, count)) = in_dataflow.front().copied() {
                if probe.less_equal(&time) {
                    break;
                }
                in_dataflow.pop_front();
                outstanding -= count;
            }
            if outstanding >= options.max_read_ahead {
                // The probe advances as the dataflow drains, which reschedules the worker.
                activator.activate_after(options.poll_interval);
                return;
            }

            let mut read = 0usize;
            let mut session = output.session(cap);
            for (partition, offset) in next.iter_mut() {
                let records = match log.read(*partition, *offset, options.batch_records) {
                    Ok(records) => records,
                    Err(error) => {
                        tracing::error!(%error, partition = *partition, "Reading the source failed; stopping.");
                        control.failed.set(true);
                        control.stop.stop();
                        break;
                    }
                };
                if let Some(last) = records.last() {
                    *offset = last.offset + 1;
                }
                read += records.len();
                session.give_iterator(records.into_iter());
            }
            drop(session);

            if read > 0 {
                in_dataflow.push_back((now, read));
                outstanding += read;
                activator.activate();
            } else if options.until_idle {
                tracing::info!(worker = index, "Source read every partition to its end.");
                capability = None;
                control.finished.set(true);
            } else {
                activator.activate_after(options.poll_interval);
            }
        }
    })
}
