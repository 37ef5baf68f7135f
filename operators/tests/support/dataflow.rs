//! A harness that runs the deliver operator in a timely dataflow wired as the pipeline wires
//! it: new deliveries are concatenated with the retries coming round a feedback edge, and
//! retries read their payloads back from an in-memory stand-in for the source log.
//!
//! On the wall clock the workers step until the dataflow finishes. On a [`VirtualClock`] the
//! one worker steps, and whenever it is idle with no request in flight, the harness advances
//! the clock to the earliest wake-up an operator asked for. Virtual time therefore does not
//! move while a request runs, and an attempt's start time is exactly the time it was due.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hookflow_operators::clock::{Clock, VirtualClock};
use hookflow_operators::deliver::{
    Attempted, BreakerOpened, Deliver, DeliverContext, EndpointDisabled, PayloadSource,
};
use hookflow_schemas::{AttemptRow, Delivery, Millis, PendingDelivery};
use timely::dataflow::operators::{Concat, ConnectLoop, Feedback, Input, Inspect, OkErr, Probe};

/// The virtual time a run should start at: after every delivery helper's `read_at_ms`, so
/// that no event counts as older than it is.
pub const VIRTUAL_START_MS: Millis = 1_700_000_001_000;

/// The maximum real time a test dataflow may run before the harness fails the test.
const REAL_TIME_LIMIT: Duration = Duration::from_secs(30);

/// How many consecutive idle steps, with nothing in flight and no wake-up requested, make the
/// harness report a stalled dataflow instead of waiting for [`REAL_TIME_LIMIT`].
const STALLED_STEPS: usize = 20;

/// An in-memory source log: the payload of each event by its (partition, offset).
#[derive(Debug, Clone, Default)]
pub struct MemoryLog {
    payloads: Arc<HashMap<(u32, u64), Vec<u8>>>,
    fetched: Arc<Mutex<Vec<(u32, u64)>>>,
}

impl MemoryLog {
    /// Creates a log holding the payload of every delivery's event.
    ///
    /// Panics when two deliveries put different payloads at one position, which would make
    /// the read-back ambiguous.
    pub fn of<'a>(deliveries: impl IntoIterator<Item = &'a Delivery>) -> Self {
        let mut payloads: HashMap<(u32, u64), Vec<u8>> = HashMap::new();
        for delivery in deliveries {
            let position = (delivery.ingested.partition, delivery.ingested.offset);
            let payload = &delivery.ingested.event.payload;
            let stored = payloads.entry(position).or_insert_with(|| payload.clone());
            assert_eq!(
                stored, payload,
                "two deliveries put different payloads at partition {}, offset {}",
                position.0, position.1
            );
        }
        MemoryLog {
            payloads: Arc::new(payloads),
            fetched: Arc::default(),
        }
    }

    /// Returns a copy of the log without the record at (`partition`, `offset`), as after
    /// the source's own retention removed it. The copy shares this log's fetch record.
    pub fn without(&self, partition: u32, offset: u64) -> Self {
        let mut payloads = (*self.payloads).clone();
        payloads.remove(&(partition, offset));
        MemoryLog {
            payloads: Arc::new(payloads),
            fetched: Arc::clone(&self.fetched),
        }
    }

    /// Returns the positions read so far, in the order they were requested.
    pub fn fetched(&self) -> Vec<(u32, u64)> {
        self.fetched.lock().expect("fetch record lock").clone()
    }
}

impl PayloadSource for MemoryLog {
    fn fetch(&mut self, positions: &[(u32, u64)]) -> Vec<Result<Vec<u8>, String>> {
        self.fetched
            .lock()
            .expect("fetch record lock")
            .extend_from_slice(positions);
        positions
            .iter()
            .map(|&(partition, offset)| {
                self.payloads
                    .get(&(partition, offset))
                    .cloned()
                    .ok_or_else(|| {
                        format!("partition {partition} has no record at offset {offset}")
                    })
            })
            .collect()
    }
}

/// What a harness run produced.
#[derive(Debug, Default)]
pub struct Run {
    /// Attempt rows with the timestamp each came out at, in the order they came out.
    pub rows: Vec<(u64, AttemptRow)>,
    /// Retries with the timestamp each came out at, before the feedback edge adds its 1 ms.
    pub retries: Vec<(u64, Delivery)>,
    /// Deliveries recorded as pending, with the timestamp each came out at.
    pub pending: Vec<(u64, PendingDelivery)>,
    /// Endpoints disabled, with the timestamp each came out at.
    pub disabled: Vec<(u64, EndpointDisabled)>,
    /// Circuit breakers opened, with the timestamp each came out at.
    pub breakers_opened: Vec<(u64, BreakerOpened)>,
    /// Worker steps taken, summed over all workers.
    pub steps: usize,
}

impl Run {
    /// Keeps one record of the deliver operator's output. The harness acts as the
    /// pipeline's durable sink, so every row with a start time counts as written at once.
    fn record(&mut self, time: u64, record: &Attempted, unsynced_results: &AtomicUsize) {
        match record {
            Attempted::Row(row) => {
                if row.started_at_ms.is_some() {
                    // Saturating, in case the operator counts fewer results than it emits.
                    let _ = unsynced_results.fetch_update(
                        Ordering::SeqCst,
                        Ordering::SeqCst,
                        |count| count.checked_sub(1),
                    );
                }
                self.rows.push((time, row.clone()));
            }
            Attempted::Retry(retry) => self.retries.push((time, retry.clone())),
            Attempted::Pending(pending) => self.pending.push((time, pending.clone())),
            Attempted::EndpointDisabled(disabled) => self.disabled.push((time, disabled.clone())),
            Attempted::BreakerOpened(opened) => self.breakers_opened.push((time, opened.clone())),
        }
    }

    /// Returns the rows of event `event_id` to endpoint `endpoint_id`, in attempt order.
    pub fn rows_of(&self, endpoint_id: &str, event_id: &str) -> Vec<AttemptRow> {
        let mut rows: Vec<AttemptRow> = self
            .rows
            .iter()
            .map(|(_, row)| row)
            .filter(|row| {
                row.endpoint_id.as_deref() == Some(endpoint_id)
                    && row.event_id.as_deref() == Some(event_id)
            })
            .cloned()
            .collect();
        rows.sort_by_key(|row| row.attempt);
        rows
    }
}

/// Runs the deliver operator on `workers` workers of this process with the wall clock.
/// Worker 0 sends each delivery at its time.
pub fn run_on_wall_clock(
    workers: usize,
    context: DeliverContext,
    deliveries: Vec<(u64, Delivery)>,
    log: MemoryLog,
) -> Run {
    run(workers, context, deliveries, log, None)
}

/// Runs the deliver operator on one worker whose `context.clock` is `clock`, advancing the
/// clock whenever the worker is idle and no request is in flight. The deliveries are all
/// sent before the first step, each at its time.
pub fn run_on_virtual_clock(
    clock: Arc<VirtualClock>,
    context: DeliverContext,
    deliveries: Vec<(u64, Delivery)>,
    log: MemoryLog,
) -> Run {
    run(1, context, deliveries, log, Some(clock))
}

// `ok_err` splits the operator's output by `Result`; the `Err` side carries retries, which
// are data, not errors, so its size does not matter.
#[allow(clippy::result_large_err)]
fn run(
    workers: usize,
    context: DeliverContext,
    deliveries: Vec<(u64, Delivery)>,
    log: MemoryLog,
    virtual_clock: Option<Arc<VirtualClock>>,
) -> Run {
    let outputs: Arc<Mutex<Run>> = Arc::default();
    let collected = Arc::clone(&outputs);
    let deliveries = Arc::new(deliveries);

    let guards = timely::execute(timely::Config::process(workers), move |worker| {
        let context = context.clone();
        let requests_in_flight = Arc::clone(&context.requests_in_flight);
        let unsynced_results = Arc::clone(&context.unsynced_results);
        let log = log.clone();
        let collected = Arc::clone(&collected);

        let (mut input, probe) = worker.dataflow::<u64, _, _>(|scope| {
            let (input, deliveries) = scope.new_input::<Vec<Delivery>>();
            let (retry_handle, retries) = scope.feedback::<Vec<Delivery>>(1);
            let (records, retries) = deliveries
                .concat(retries)
                .deliver(context, Box::new(log))
                .inspect_core(move |event| {
                    if let Ok((stamp, records)) = event {
                        let time = *stamp.expect_singleton();
                        let mut collected = collected.lock().expect("run lock");
                        for record in records {
                            collected.record(time, record, &unsynced_results);
                        }
                    }
                })
                .ok_err(|attempted| match attempted {
                    Attempted::Retry(delivery) => Err(delivery),
                    other => Ok(other),
                });
            retries.connect_loop(retry_handle);
            let (probe, _records): (_, timely::dataflow::Stream<'_, u64, Vec<Attempted>>) =
                records.probe();
            (input, probe)
        });

        if worker.index() == 0 {
            for (time, delivery) in deliveries.iter() {
                input.advance_to(*time);
                input.send(delivery.clone());
            }
        }
        drop(input);

        let deadline = Instant::now() + REAL_TIME_LIMIT;
        let mut steps = 0;
        let mut stalled = 0;
        while !probe.done() {
            assert!(
                Instant::now() < deadline,
                "the dataflow did not finish in {REAL_TIME_LIMIT:?}"
            );
            let Some(clock) = virtual_clock.as_ref() else {
                worker.step_or_park(Some(Duration::from_millis(500)));
                steps += 1;
                continue;
            };

            worker.step_or_park(Some(Duration::from_millis(1)));
            steps += 1;
            // In timely 0.32 a step parks only when no operator is activated, and a step that
            // ran operators keeps their activations listed until the next step's poll. An
            // empty list after a step therefore means the worker found nothing to do.
            let idle = worker.activations().borrow().empty_for() != Some(Duration::ZERO);
            if !idle || requests_in_flight.load(Ordering::SeqCst) > 0 {
                stalled = 0;
                continue;
            }
            match clock.next_wakeup() {
                Some(at_ms) => {
                    clock.advance_to(at_ms);
                    stalled = 0;
                }
                None => {
                    stalled += 1;
                    assert!(
                        stalled < STALLED_STEPS,
                        "the dataflow stalled at virtual time {}: idle, no request in flight \
                         and no wake-up requested, yet not finished",
                        clock.now_ms()
                    );
                }
            }
        }
        steps
    })
    .expect("timely starts");

    let steps: usize = guards
        .join()
        .into_iter()
        .map(|steps| steps.expect("worker finished"))
        .sum();
    let mut run = std::mem::take(&mut *outputs.lock().expect("run lock"));
    run.steps = steps;
    run
}
