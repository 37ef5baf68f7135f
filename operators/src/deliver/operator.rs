//! The deliver operator: sends each delivery on a tokio runtime and emits its attempt row.
//!
//! In: deliveries, stamped with the time they are due (ms). The input is exchanged by
//! [`endpoint_hash`] of the endpoint id, so one worker owns each endpoint's queue and
//! in-flight count. Out: one [`AttemptRow`] per delivery, at the delivery's time.
//!
//! State, per worker:
//! * a FIFO queue per endpoint of deliveries waiting for a send slot, each holding a
//!   capability at its time. An endpoint's entry is removed once its queue is empty and
//!   none of its requests is in flight.
//! * a round-robin list of endpoints that have queued deliveries and a free slot, so the
//!   worker-wide cap is shared fairly.
//! * the in-flight map from ticket to the capability of a request running on the runtime,
//!   released when the request's row is emitted.
//!
//! The operator never blocks its worker. Each request is a tokio task that sends its row over
//! a channel and then wakes the operator through a `SyncActivator`; the operator runs only
//! when input or a result arrives.
//!
//! # Contract
//!
//! * Every delivery yields exactly one row, at its own time: delivered, dead-lettered after
//!   its one attempt, or dead-lettered without a request when its endpoint is missing from
//!   the directory (`unknown_endpoint`) or disabled (`endpoint_disabled`).
//! * At most `endpoint.max_in_flight` requests run per endpoint and `max_in_flight_total`
//!   per worker (a limit of 0 counts as 1). Deliveries beyond them wait in arrival order.
//! * The operator holds one capability per queued or in-flight delivery and none otherwise,
//!   so its output frontier passes a time once every delivery at that time has its row.
//! * A request task that ends without a result (its runtime shut down, or it panicked)
//!   releases its capability with an error log and no row.
//!
//! TODO: deliveries waiting behind the in-flight caps hold capabilities at their due time, so
//! a slow endpoint holds back the frontier. The rate-limit stage should re-stamp them to a
//! later time and record them as pending, leaving only in-flight requests at past times.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;

use hookflow_schemas::{AttemptRow, Delivery, Endpoint, ErrorKind, Millis};
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::Capability;
use timely::dataflow::Stream;
use timely::scheduling::SyncActivator;

use super::client::DeliveryClient;
use super::result::dead_letter_row;
use crate::clock::Clock;

/// The default limit on requests in flight per worker.
pub const DEFAULT_MAX_IN_FLIGHT_TOTAL: usize = 256;

/// The `error_kind` of a delivery dead-lettered because its endpoint is disabled.
pub const ENDPOINT_DISABLED: &str = "endpoint_disabled";

/// The runtime, client, endpoint directory and clock the deliver operator works with.
#[derive(Clone)]
pub struct DeliverContext {
    /// The process's tokio runtime, shared by all workers; requests run on it.
    pub runtime: tokio::runtime::Handle,
    /// The HTTP client, shared by all workers.
    pub client: DeliveryClient,
    /// The endpoint directory by endpoint id, read-only.
    pub endpoints: Arc<HashMap<String, Endpoint>>,
    /// The source of "now" for the attempt rows.
    pub clock: Arc<dyn Clock>,
    /// Maximum requests in flight per worker, over all endpoints. Default 256.
    pub max_in_flight_total: usize,
}

impl DeliverContext {
    /// Creates a context with the default worker-wide in-flight limit.
    pub fn new(
        runtime: tokio::runtime::Handle,
        client: DeliveryClient,
        endpoints: Arc<HashMap<String, Endpoint>>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        DeliverContext {
            runtime,
            client,
            endpoints,
            clock,
            max_in_flight_total: DEFAULT_MAX_IN_FLIGHT_TOTAL,
        }
    }
}

impl fmt::Debug for DeliverContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeliverContext")
            .field("client", &self.client)
            .field("endpoints", &self.endpoints.len())
            .field("max_in_flight_total", &self.max_in_flight_total)
            .finish_non_exhaustive()
    }
}

/// Sends deliveries over HTTP.
///
/// # Examples
///
/// A delivery to an endpoint missing from the directory is dead-lettered without a request:
///
/// ```
/// use std::collections::HashMap;
/// use std::sync::{Arc, Mutex};
///
/// use hookflow_operators::clock::WallClock;
/// use hookflow_operators::deliver::{ClientConfig, Deliver, DeliverContext, DeliveryClient};
/// use hookflow_schemas::{Delivery, Event, IngestedEvent};
/// use timely::dataflow::operators::{Input, Inspect, Probe};
///
/// let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
/// let client = DeliveryClient::new(ClientConfig::default()).expect("HTTP client");
/// let directory = Arc::new(HashMap::new());
/// let context = DeliverContext::new(runtime.handle().clone(), client, directory, Arc::new(WallClock));
/// let event = Event {
///     id: "evt_1".into(),
///     tenant: "acme".into(),
///     event_type: "charge.succeeded".into(),
///     created_at: "2026-12-04T10:00:00Z".into(),
///     payload: br#"{"amount":1200}"#.to_vec(),
/// };
/// let ingested = IngestedEvent { partition: 0, offset: 7, appended_at_ms: None, read_at_ms: 0, event };
/// let delivery = Delivery { endpoint_id: "ep_missing".into(), generation: 0, attempt: 1, ingested };
///
/// let rows = timely::execute_directly(move |worker| {
///     let rows = Arc::new(Mutex::new(Vec::new()));
///     let sink = Arc::clone(&rows);
///     let (mut input, probe) = worker.dataflow::<u64, _, _>(|scope| {
///         let (input, deliveries) = scope.new_input::<Vec<Delivery>>();
///         let (probe, _) = deliveries
///             .deliver(context)
///             .inspect(move |row| sink.lock().expect("lock").push(row.clone()))
///             .probe();
///         (input, probe)
///     });
///     input.advance_to(1_000);
///     input.send(delivery);
///     drop(input);
///     while !probe.done() {
///         worker.step_or_park(None);
///     }
///     let rows = rows.lock().expect("lock").clone();
///     rows
/// });
///
/// assert_eq!(rows.len(), 1);
/// assert_eq!(rows[0].due_at_ms, 1_000);
/// assert_eq!(rows[0].outcome, "dead_lettered");
/// assert_eq!(rows[0].error_kind.as_deref(), Some("unknown_endpoint"));
/// assert_eq!(rows[0].attempt, 0, "no request was made");
/// ```
pub trait Deliver<'scope> {
    /// Makes one attempt per delivery and emits its attempt row at the delivery's time.
    /// See the module documentation for the contract.
    fn deliver(self, context: DeliverContext) -> Stream<'scope, u64, Vec<AttemptRow>>;
}

impl<'scope> Deliver<'scope> for Stream<'scope, u64, Vec<Delivery>> {
    fn deliver(self, context: DeliverContext) -> Stream<'scope, u64, Vec<AttemptRow>> {
        let scope = self.scope();
        let exchange = Exchange::new(|delivery: &Delivery| endpoint_hash(&delivery.endpoint_id));

        self.unary(exchange, "Deliver", move |_capability, info| {
            let activator = Arc::new(scope.worker().sync_activator_for(info.address.to_vec()));
            let (sender, receiver) = mpsc::channel();
            let mut state = DeliverState::new(context, sender, receiver, activator);

            move |input, output| {
                input.for_each_stamp(|capability, containers| {
                    let Some(retained) = capability.retain_least(output.output_index()) else {
                        let dropped: usize = containers.map(|container| container.len()).sum();
                        tracing::error!(
                            deliveries = dropped,
                            "Deliver received deliveries without a timestamp; dropping them."
                        );
                        return;
                    };
                    let mut decided = Vec::new();
                    for container in containers {
                        for delivery in container.drain(..) {
                            if let Some(row) = state.accept(&retained, delivery) {
                                decided.push(row);
                            }
                        }
                    }
                    if !decided.is_empty() {
                        output.session(&retained).give_iterator(decided.into_iter());
                    }
                });

                let mut completed = state.collect_completions();
                completed.sort_by_key(|(capability, _)| *capability.time());
                let mut completed = completed.into_iter().peekable();
                while let Some((capability, row)) = completed.next() {
                    let mut session = output.session(&capability);
                    session.give(row);
                    while let Some((_, row)) =
                        completed.next_if(|(next, _)| next.time() == capability.time())
                    {
                        session.give(row);
                    }
                }

                state.start_requests();
            }
        })
    }
}

/// Maps an endpoint id to the value that picks its worker: 64-bit FNV-1a of the id's UTF-8
/// bytes.
///
/// The function is fixed here, not taken from `std` or a hashing crate, so every process
/// and every build agrees on which worker owns an endpoint.
pub fn endpoint_hash(endpoint_id: &str) -> u64 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    endpoint_id
        .as_bytes()
        .iter()
        .fold(OFFSET_BASIS, |hash, byte| {
            (hash ^ u64::from(*byte)).wrapping_mul(PRIME)
        })
}

/// The result of one request task: its row, or `None` when the task ended without one.
struct Completion {
    ticket: u64,
    row: Option<AttemptRow>,
}

/// One endpoint's share of the operator state.
#[derive(Default)]
struct EndpointQueue {
    /// Deliveries waiting for a send slot, oldest first, each with a capability at its time.
    waiting: VecDeque<(Capability<u64>, Delivery)>,
    /// Requests of this endpoint running on the runtime.
    in_flight: usize,
    /// Whether the endpoint is in `DeliverState::ready`.
    ready: bool,
}

/// A request running on the runtime.
struct InFlight {
    /// Held until the request's row is emitted.
    capability: Capability<u64>,
    endpoint_id: String,
}

/// The per-worker state of the deliver operator.
struct DeliverState {
    context: DeliverContext,
    /// Queues of the endpoints with waiting or in-flight deliveries, by endpoint id.
    queues: HashMap<String, EndpointQueue>,
    /// Endpoints with waiting deliveries and a free slot, in the order they get their turn.
    ready: VecDeque<String>,
    /// Requests on the runtime, by ticket.
    in_flight: HashMap<u64, InFlight>,
    next_ticket: u64,
    /// Endpoint ids already logged as unknown, so each is logged once per worker.
    reported_unknown: HashSet<String>,
    sender: Sender<Completion>,
    receiver: Receiver<Completion>,
    activator: Arc<SyncActivator>,
}

impl DeliverState {
    fn new(
        context: DeliverContext,
        sender: Sender<Completion>,
        receiver: Receiver<Completion>,
        activator: Arc<SyncActivator>,
    ) -> Self {
        DeliverState {
            context,
            queues: HashMap::new(),
            ready: VecDeque::new(),
            in_flight: HashMap::new(),
            next_ticket: 0,
            reported_unknown: HashSet::new(),
            sender,
            receiver,
            activator,
        }
    }

    /// Queues `delivery`, or returns its dead-letter row when its endpoint is unknown or
    /// disabled.
    fn accept(&mut self, capability: &Capability<u64>, delivery: Delivery) -> Option<AttemptRow> {
        let due_at_ms = *capability.time();
        let Some(endpoint) = self.context.endpoints.get(&delivery.endpoint_id) else {
            if self.reported_unknown.insert(delivery.endpoint_id.clone()) {
                tracing::warn!(
                    endpoint_id = %delivery.endpoint_id,
                    "Deliveries name an endpoint missing from the directory; dead-lettering them."
                );
            }
            let message = format!(
                "endpoint `{}` is not configured on this pipeline",
                delivery.endpoint_id
            );
            let now_ms = self.context.clock.now_ms();
            let kind = ErrorKind::UnknownEndpoint.as_str();
            return Some(dead_letter_row(&delivery, due_at_ms, now_ms, kind, message));
        };

        if !endpoint.enabled {
            tracing::debug!(
                endpoint_id = %endpoint.id,
                event_id = %delivery.ingested.event.id,
                "Endpoint is disabled; dead-lettering the delivery."
            );
            // TODO: park the delivery (stored without a due time, resumed on re-enable)
            // once the state store exists, instead of dead-lettering it.
            let message = format!(
                "endpoint `{}` is disabled; the delivery was not attempted",
                endpoint.id
            );
            let now_ms = self.context.clock.now_ms();
            return Some(dead_letter_row(
                &delivery,
                due_at_ms,
                now_ms,
                ENDPOINT_DISABLED,
                message,
            ));
        }

        let limit = endpoint.max_in_flight.max(1);
        let queue = self.queues.entry(delivery.endpoint_id.clone()).or_default();
        if !queue.ready && queue.in_flight < limit {
            queue.ready = true;
            self.ready.push_back(delivery.endpoint_id.clone());
        }
        queue.waiting.push_back((capability.clone(), delivery));
        None
    }

    /// Takes the rows of finished requests, each with the capability to emit it at.
    fn collect_completions(&mut self) -> Vec<(Capability<u64>, AttemptRow)> {
        let mut completed = Vec::new();
        while let Ok(Completion { ticket, row }) = self.receiver.try_recv() {
            let Some(InFlight {
                capability,
                endpoint_id,
            }) = self.in_flight.remove(&ticket)
            else {
                tracing::error!(
                    ticket,
                    "A request finished that the operator did not start."
                );
                continue;
            };
            self.release_slot(&endpoint_id);
            match row {
                Some(row) => completed.push((capability, row)),
                None => tracing::error!(
                    endpoint_id = %endpoint_id,
                    due_at_ms = *capability.time(),
                    "A delivery request ended without a result; no attempt row is written."
                ),
            }
        }
        completed
    }

    /// Frees one of `endpoint_id`'s slots, putting the endpoint back in turn if it has
    /// waiting deliveries, or forgetting it when it has nothing left.
    fn release_slot(&mut self, endpoint_id: &str) {
        let Some(queue) = self.queues.get_mut(endpoint_id) else {
            return;
        };
        queue.in_flight = queue.in_flight.saturating_sub(1);
        if queue.waiting.is_empty() {
            if queue.in_flight == 0 {
                self.queues.remove(endpoint_id);
            }
        } else if !queue.ready {
            queue.ready = true;
            self.ready.push_back(endpoint_id.to_string());
        }
    }

    /// Starts waiting deliveries, one per endpoint in turn, until every ready endpoint is
    /// at its limit or empty, or the worker-wide limit is reached.
    fn start_requests(&mut self) {
        let total_limit = self.context.max_in_flight_total.max(1);
        while self.in_flight.len() < total_limit {
            let Some(endpoint_id) = self.ready.pop_front() else {
                break;
            };
            let limit = self
                .context
                .endpoints
                .get(&endpoint_id)
                .map_or(1, |endpoint| endpoint.max_in_flight.max(1));
            let Some(queue) = self.queues.get_mut(&endpoint_id) else {
                continue;
            };
            let Some((capability, delivery)) = queue.waiting.pop_front() else {
                queue.ready = false;
                continue;
            };
            queue.in_flight += 1;
            if !queue.waiting.is_empty() && queue.in_flight < limit {
                self.ready.push_back(endpoint_id);
            } else {
                queue.ready = false;
            }
            self.start(capability, delivery);
        }
    }

    /// Spawns the request task for `delivery`.
    fn start(&mut self, capability: Capability<u64>, delivery: Delivery) {
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        let due_at_ms = *capability.time();
        let endpoint_id = delivery.endpoint_id.clone();
        self.in_flight.insert(
            ticket,
            InFlight {
                capability,
                endpoint_id,
            },
        );

        let completion = CompletionGuard {
            ticket,
            row: None,
            sender: self.sender.clone(),
            activator: Arc::clone(&self.activator),
        };
        let client = self.context.client.clone();
        let endpoints = Arc::clone(&self.context.endpoints);
        let clock = Arc::clone(&self.context.clock);
        self.context.runtime.spawn(async move {
            let row = match endpoints.get(&delivery.endpoint_id) {
                Some(endpoint) => {
                    let result = client.attempt(endpoint, &delivery, clock.as_ref()).await;
                    result.to_row(&delivery, due_at_ms)
                }
                None => vanished_endpoint_row(&delivery, due_at_ms, clock.now_ms()),
            };
            completion.finish(row);
        });
    }
}

/// Builds the row of a delivery whose endpoint left the directory between queueing and
/// sending.
fn vanished_endpoint_row(delivery: &Delivery, due_at_ms: Millis, now_ms: Millis) -> AttemptRow {
    let message = format!(
        "endpoint `{}` is not configured on this pipeline",
        delivery.endpoint_id
    );
    dead_letter_row(
        delivery,
        due_at_ms,
        now_ms,
        ErrorKind::UnknownEndpoint.as_str(),
        message,
    )
}

/// Reports a request task's end to the operator when dropped: with its row when the task
/// finished, without one when the task was cancelled or panicked.
struct CompletionGuard {
    ticket: u64,
    row: Option<AttemptRow>,
    sender: Sender<Completion>,
    activator: Arc<SyncActivator>,
}

impl CompletionGuard {
    /// Reports the task's row.
    fn finish(mut self, row: AttemptRow) {
        self.row = Some(row);
    }
}

impl Drop for CompletionGuard {
    fn drop(&mut self) {
        let completion = Completion {
            ticket: self.ticket,
            row: self.row.take(),
        };
        // Both fail only after the operator or its worker has shut down, when no one reads the
        // result any more.
        if self.sender.send(completion).is_ok() && self.activator.activate().is_err() {
            tracing::debug!(
                ticket = self.ticket,
                "Worker is gone; dropping a delivery result."
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_hash_is_fixed() {
        // FNV-1a test vectors; a change here moves endpoints between workers.
        assert_eq!(endpoint_hash(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(endpoint_hash("a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(endpoint_hash("foobar"), 0x8594_4171_f739_67e8);
    }
}
