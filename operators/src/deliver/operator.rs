//! The deliver operator: rate limit, in-flight caps, HTTP attempts and retry decisions for the
//! endpoints this worker owns.
//!
//! In: deliveries, stamped with the time they are due (ms), both new ones from the route and
//! retries coming round the feedback loop. The input is exchanged by [`endpoint_hash`] of
//! the endpoint id, so one worker owns each endpoint's whole state. Out: [`Attempted`]
//! records: an attempt row for every attempt and every decision made without a request, and
//! for each failed attempt that will be retried, the retry itself, stamped one ms before its
//! next attempt time (the feedback edge adds that ms back). A retry carries no payload; it is
//! read back through the [`PayloadSource`] when the retry is due.
//!
//! The rate limit, the per-endpoint in-flight cap and the worker-wide cap are one decision in
//! one state, so that a delivery is counted once and given its slot once:
//!
//! * a delivery arriving at time `t` reserves the first rate-limit slot at or after `t`
//!   ([`WindowLimiter`]). A slot in the future re-stamps the delivery: it waits in
//!   `scheduled` under a capability at the slot time, which does not hold back the frontier
//!   for anything earlier.
//! * a due delivery joins its endpoint's FIFO queue and starts when the endpoint and the
//!   worker have a free in-flight place, taking turns with other endpoints.
//! * due deliveries and requests in flight share one capability, `current`, which the
//!   operator moves up to the clock's "now" every time it runs (at least every
//!   [`HOLD_REFRESH_MS`] while anything is queued or in flight). A slow or hung endpoint
//!   therefore never holds the global frontier more than that far behind the clock.
//!
//! Each request is a tokio task that sends its result over a channel and wakes the operator
//! through a `SyncActivator`; the operator never blocks its worker and never polls. Times the
//! operator must wake at (a scheduled slot, the next refresh) go through the [`Clock`], so a
//! virtual clock drives the whole schedule in tests.
//!
//! # Contract
//!
//! * Nothing is sent before the time it is due, nor before its rate-limit slot.
//! * At most `rate_limit.max_requests` requests of an endpoint start in any window of its
//!   rate limit, at most `endpoint.max_in_flight` run at once per endpoint and at most
//!   `max_in_flight_total` per worker (a limit of 0 counts as 1).
//! * Every attempt yields one row. A failed attempt with a retry left yields a row with
//!   outcome `failed` and `next_attempt_at`, and the retry; the last attempt of an exhausted
//!   schedule, and a failure that no retry can fix, yields `dead_lettered`. A delivery whose
//!   event is older than the maximum event age yields `expired` without a request.
//! * A request task that ends without a result (its runtime shut down, or it panicked)
//!   releases its place with an error log and no row.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;

use hookflow_schemas::{AttemptRow, Delivery, Endpoint, ErrorKind, Millis, Outcome};
use serde::{Deserialize, Serialize};
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::Capability;
use timely::dataflow::Stream;
use timely::scheduling::SyncActivator;

use super::client::DeliveryClient;
use super::result::dead_letter_row;
use crate::clock::{Clock, Wakeup};
use crate::rate_limit::{StartDecision, WindowLimiter};
use crate::retry::{jitter_seed, RetryPolicy};
use crate::stop::StopSignal;

/// The default limit on requests in flight per worker.
pub const DEFAULT_MAX_IN_FLIGHT_TOTAL: usize = 256;

/// How often, at least, the operator moves its capability for queued and in-flight
/// deliveries up to "now", in ms: the most a slow endpoint can hold back the frontier.
pub const HOLD_REFRESH_MS: u64 = 100;

/// The `error_kind` of a delivery dead-lettered because its endpoint is disabled.
pub const ENDPOINT_DISABLED: &str = "endpoint_disabled";

/// What the deliver operator emits.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Attempted {
    /// The row of an attempt or of a decision made without a request.
    Row(AttemptRow),
    /// A delivery to attempt again, stamped one ms before its next attempt time.
    Retry(Delivery),
}

/// Reads payloads back from the source for retries, which travel without them.
pub trait PayloadSource {
    /// Returns the payload of the event recorded at each (partition, offset), in order, or
    /// why it cannot be had (the record is gone, or no longer decodes).
    fn fetch(&mut self, positions: &[(u32, u64)]) -> Vec<Result<Vec<u8>, String>>;
}

/// What the deliver operator needs besides its input.
#[derive(Clone)]
pub struct DeliverContext {
    /// The process's tokio runtime, shared by all workers; requests run on it.
    pub runtime: tokio::runtime::Handle,
    /// The HTTP client, shared by all workers.
    pub client: DeliveryClient,
    /// The endpoint directory by endpoint id, read-only.
    pub endpoints: Arc<HashMap<String, Endpoint>>,
    /// The source of "now", and the owner of waiting.
    pub clock: Arc<dyn Clock>,
    /// The most requests in flight per worker, over all endpoints. Default 256.
    pub max_in_flight_total: usize,
    /// When failed deliveries are attempted again.
    pub retry: RetryPolicy,
    /// Requests started and not yet turned into rows, over all workers sharing it.
    pub requests_in_flight: Arc<AtomicUsize>,
    /// Set when the pipeline stops: requests in flight finish, and deliveries waiting for a
    /// later time (a retry, a rate-limit window) are dropped with a warning.
    pub stop: Arc<StopSignal>,
}

impl DeliverContext {
    /// Creates a context with the default worker-wide in-flight limit and retry policy.
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
            retry: RetryPolicy::default(),
            requests_in_flight: Arc::new(AtomicUsize::new(0)),
            stop: Arc::new(StopSignal::new()),
        }
    }
}

impl fmt::Debug for DeliverContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeliverContext")
            .field("client", &self.client)
            .field("endpoints", &self.endpoints.len())
            .field("max_in_flight_total", &self.max_in_flight_total)
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

/// Sends deliveries over HTTP, within each endpoint's rate limit and in-flight cap, and
/// decides their retries.
pub trait Deliver<'scope> {
    /// See the module documentation for the contract.
    fn deliver(
        self,
        context: DeliverContext,
        payloads: Box<dyn PayloadSource>,
    ) -> Stream<'scope, u64, Vec<Attempted>>;
}

impl<'scope> Deliver<'scope> for Stream<'scope, u64, Vec<Delivery>> {
    fn deliver(
        self,
        context: DeliverContext,
        payloads: Box<dyn PayloadSource>,
    ) -> Stream<'scope, u64, Vec<Attempted>> {
        let scope = self.scope();
        let exchange = Exchange::new(|delivery: &Delivery| endpoint_hash(&delivery.endpoint_id));

        self.unary(exchange, "Deliver", move |_capability, info| {
            let wakeup = Wakeup::new(scope.worker(), info.address);
            context.stop.watch(wakeup.sync_activator());
            let (sender, receiver) = mpsc::channel();
            let mut state = DeliverState::new(context, payloads, sender, receiver, wakeup);

            move |input, output| {
                let now = state.context.clock.now_ms();
                let port = output.output_index();
                let mut emitted: Vec<(Capability<u64>, Attempted)> = Vec::new();

                input.for_each_stamp(|capability, containers| {
                    let Some(time) = capability.least().copied() else {
                        return;
                    };
                    // Everything emitted or held for this input is at `time` or later.
                    let held = capability.delayed(&time, port);
                    for container in containers {
                        for delivery in container.drain(..) {
                            if let Some(row) = state.accept(&held, delivery, now) {
                                emitted.push((held.clone(), Attempted::Row(row)));
                            }
                        }
                    }
                });

                state.release_scheduled(now);
                state.collect_completions(now, &mut emitted);
                state.start_requests(now, &mut emitted);

                emitted.sort_by_key(|(capability, _)| *capability.time());
                let mut emitted = emitted.into_iter().peekable();
                while let Some((capability, record)) = emitted.next() {
                    let mut session = output.session(&capability);
                    session.give(record);
                    while let Some((_, record)) =
                        emitted.next_if(|(next, _)| next.time() == capability.time())
                    {
                        session.give(record);
                    }
                }

                state.refresh_hold(now);
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

/// A delivery with the time of its reserved rate-limit slot (its due time when unlimited).
struct Slotted {
    slot_ms: Millis,
    delivery: Delivery,
}

/// The result of one request task: its row, or `None` when the task ended without one.
struct Completion {
    ticket: u64,
    row: Option<AttemptRow>,
}

/// One endpoint's share of the operator state.
#[derive(Default)]
struct EndpointState {
    /// Due deliveries waiting for an in-flight place, oldest first.
    waiting: VecDeque<Slotted>,
    /// Requests of this endpoint running on the runtime.
    in_flight: usize,
    /// Whether the endpoint is in `DeliverState::ready`.
    ready: bool,
    /// Rate-limit reservations, when the endpoint is limited.
    limiter: Option<WindowLimiter>,
}

/// A request running on the runtime.
struct InFlight {
    endpoint_id: String,
    /// The delivery without its payload, to retry it if the attempt fails.
    delivery: Delivery,
}

/// The per-worker state of the deliver operator.
struct DeliverState {
    context: DeliverContext,
    payloads: Box<dyn PayloadSource>,
    /// Deliveries stamped to a later time (a rate-limit slot not yet open), by that time,
    /// each time with the capability held for it.
    scheduled: BTreeMap<Millis, (Capability<u64>, Vec<Slotted>)>,
    /// One capability for every due delivery that waits for a place and every request in
    /// flight, moved up to "now" each time the operator runs; `None` when there are none.
    current: Option<Capability<u64>>,
    /// Endpoints with waiting deliveries or requests in flight, by endpoint id.
    endpoints: HashMap<String, EndpointState>,
    /// Endpoints with waiting deliveries and a free place, in the order they get their turn.
    ready: VecDeque<String>,
    /// Requests on the runtime, by ticket.
    in_flight: HashMap<u64, InFlight>,
    next_ticket: u64,
    /// Endpoint ids already logged as unknown, so each is logged once per worker.
    reported_unknown: HashSet<String>,
    /// Deliveries waiting for a later time that a stop dropped, not yet logged.
    dropped_on_stop: usize,
    sender: Sender<Completion>,
    receiver: Receiver<Completion>,
    wakeup: Wakeup,
    activator: Arc<SyncActivator>,
}

impl DeliverState {
    fn new(
        context: DeliverContext,
        payloads: Box<dyn PayloadSource>,
        sender: Sender<Completion>,
        receiver: Receiver<Completion>,
        wakeup: Wakeup,
    ) -> Self {
        let activator = wakeup.sync_activator();
        DeliverState {
            context,
            payloads,
            scheduled: BTreeMap::new(),
            current: None,
            endpoints: HashMap::new(),
            ready: VecDeque::new(),
            in_flight: HashMap::new(),
            next_ticket: 0,
            reported_unknown: HashSet::new(),
            dropped_on_stop: 0,
            sender,
            receiver,
            wakeup,
            activator,
        }
    }

    /// Reserves `delivery`'s rate-limit slot and queues or schedules it, or returns its
    /// dead-letter row when its endpoint is unknown or disabled. `held` is a capability at
    /// the delivery's due time.
    fn accept(
        &mut self,
        held: &Capability<u64>,
        delivery: Delivery,
        now: Millis,
    ) -> Option<AttemptRow> {
        let due_at_ms = *held.time();
        let endpoint = match self.context.endpoints.get(&delivery.endpoint_id) {
            Some(endpoint) if endpoint.enabled => endpoint,
            Some(endpoint) => {
                // TODO: park the delivery (stored without a due time, resumed on re-enable)
                // once the state store exists, instead of dead-lettering it.
                let message = format!(
                    "endpoint `{}` is disabled; the delivery was not attempted",
                    endpoint.id
                );
                return Some(dead_letter_row(
                    &delivery,
                    due_at_ms,
                    now,
                    ENDPOINT_DISABLED,
                    message,
                ));
            }
            None => {
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
                let kind = ErrorKind::UnknownEndpoint.as_str();
                return Some(dead_letter_row(&delivery, due_at_ms, now, kind, message));
            }
        };

        let rate_limit = endpoint.rate_limit;
        let state = self
            .endpoints
            .entry(delivery.endpoint_id.clone())
            .or_default();
        let slot_ms = match (rate_limit, state.limiter.as_mut()) {
            (Some(_), Some(limiter)) => limiter.reserve(due_at_ms),
            (Some(limit), None) => state
                .limiter
                .insert(WindowLimiter::new(limit))
                .reserve(due_at_ms),
            (None, _) => due_at_ms,
        };
        let slotted = Slotted { slot_ms, delivery };

        if slot_ms > now {
            let (_, pending) = self
                .scheduled
                .entry(slot_ms)
                .or_insert_with(|| (held.delayed(&slot_ms), Vec::new()));
            pending.push(slotted);
        } else {
            self.hold_current(held, now);
            self.enqueue(slotted);
        }
        None
    }

    /// Makes sure `current` exists, from `held` (whose time is at or before `now`).
    fn hold_current(&mut self, held: &Capability<u64>, now: Millis) {
        if self.current.is_none() {
            self.current = Some(held.delayed(&now.max(*held.time())));
        }
    }

    /// Appends a due delivery to its endpoint's queue and gives the endpoint a turn if it
    /// has a free place.
    fn enqueue(&mut self, slotted: Slotted) {
        let endpoint_id = slotted.delivery.endpoint_id.clone();
        let limit = self.in_flight_limit(&endpoint_id);
        let state = self.endpoints.entry(endpoint_id.clone()).or_default();
        state.waiting.push_back(slotted);
        if !state.ready && state.in_flight < limit {
            state.ready = true;
            self.ready.push_back(endpoint_id);
        }
    }

    fn in_flight_limit(&self, endpoint_id: &str) -> usize {
        self.context
            .endpoints
            .get(endpoint_id)
            .map_or(1, |endpoint| endpoint.max_in_flight.max(1))
    }

    /// Moves every scheduled delivery whose slot has come into its endpoint's queue.
    fn release_scheduled(&mut self, now: Millis) {
        while let Some(entry) = self.scheduled.first_entry() {
            if *entry.key() > now {
                break;
            }
            let (capability, pending) = entry.remove();
            self.hold_current(&capability, now);
            for slotted in pending {
                self.enqueue(slotted);
            }
        }
    }

    /// Turns finished requests into rows and retries.
    fn collect_completions(
        &mut self,
        now: Millis,
        emitted: &mut Vec<(Capability<u64>, Attempted)>,
    ) {
        while let Ok(Completion { ticket, row }) = self.receiver.try_recv() {
            self.context
                .requests_in_flight
                .fetch_sub(1, Ordering::SeqCst);
            let Some(InFlight {
                endpoint_id,
                delivery,
            }) = self.in_flight.remove(&ticket)
            else {
                tracing::error!(
                    ticket,
                    "A request finished that the operator did not start."
                );
                continue;
            };
            self.release_place(&endpoint_id);
            let Some(current) = self.current.clone() else {
                tracing::error!(endpoint_id = %endpoint_id, "A request finished without a held capability; dropping its row.");
                continue;
            };
            let Some(mut row) = row else {
                tracing::error!(
                    endpoint_id = %endpoint_id,
                    event_id = %delivery.ingested.event.id,
                    "A delivery request ended without a result; no attempt row is written."
                );
                continue;
            };

            if row.outcome == Outcome::Failed.as_str() {
                let seed = jitter_seed(&delivery, delivery.attempt);
                match self
                    .context
                    .retry
                    .next_attempt_at(delivery.attempt, now, seed)
                {
                    Some(next_ms) => {
                        row.next_attempt_at_ms = Some(next_ms);
                        let retry = Delivery {
                            attempt: delivery.attempt + 1,
                            ..delivery
                        };
                        if self.context.stop.is_stopped() {
                            self.dropped_on_stop += 1;
                        } else {
                            // The feedback edge adds 1 ms, so the retry arrives at `next_ms`.
                            let stamp = (next_ms - 1).max(*current.time());
                            emitted.push((current.delayed(&stamp), Attempted::Retry(retry)));
                        }
                    }
                    None => {
                        row.outcome = Outcome::DeadLettered.as_str().to_string();
                        let gave_up = format!("gave up after {} attempts", delivery.attempt);
                        row.error_message = Some(match row.error_message.take() {
                            Some(message) => format!("{message}; {gave_up}"),
                            None => gave_up,
                        });
                    }
                }
            }
            emitted.push((current, Attempted::Row(row)));
        }
    }

    /// Frees one of `endpoint_id`'s places, giving the endpoint a turn if it has waiting
    /// deliveries, or forgetting it when it has nothing left.
    fn release_place(&mut self, endpoint_id: &str) {
        let Some(state) = self.endpoints.get_mut(endpoint_id) else {
            return;
        };
        state.in_flight = state.in_flight.saturating_sub(1);
        if !state.waiting.is_empty() && !state.ready {
            state.ready = true;
            self.ready.push_back(endpoint_id.to_string());
        }
    }

    /// Starts waiting deliveries, one per endpoint in turn, until every ready endpoint is at
    /// its limit or empty, or the worker-wide limit is reached.
    fn start_requests(&mut self, now: Millis, emitted: &mut Vec<(Capability<u64>, Attempted)>) {
        let total_limit = self.context.max_in_flight_total.max(1);
        let mut starting: Vec<Delivery> = Vec::new();

        while self.in_flight.len() + starting.len() < total_limit {
            let Some(endpoint_id) = self.ready.pop_front() else {
                break;
            };
            let limit = self.in_flight_limit(&endpoint_id);
            let Some(state) = self.endpoints.get_mut(&endpoint_id) else {
                continue;
            };
            let Some(slotted) = state.waiting.pop_front() else {
                state.ready = false;
                continue;
            };

            let decision = match state.limiter.as_mut() {
                Some(limiter) => limiter.start(slotted.slot_ms, now),
                None => StartDecision::Start,
            };
            if let StartDecision::WaitUntil(slot_ms) = decision {
                // The window filled while this delivery waited for a place: it moves to the
                // next open window, and the endpoint's later deliveries keep their own slots.
                if state.waiting.is_empty() {
                    state.ready = false;
                } else {
                    self.ready.push_back(endpoint_id);
                }
                self.schedule_from_current(
                    slot_ms,
                    vec![Slotted {
                        slot_ms,
                        delivery: slotted.delivery,
                    }],
                );
                continue;
            }

            let expired = self.expired_row(&slotted.delivery, now);
            let state = self.endpoints.get_mut(&endpoint_id).map(|state| {
                if expired.is_none() {
                    state.in_flight += 1;
                }
                !state.waiting.is_empty() && state.in_flight < limit
            });
            if state == Some(true) {
                self.ready.push_back(endpoint_id);
            } else if let Some(state) = self.endpoints.get_mut(&endpoint_id) {
                state.ready = false;
            }
            match (expired, self.current.clone()) {
                (Some(row), Some(current)) => emitted.push((current, Attempted::Row(row))),
                (Some(_), None) => tracing::error!("An expired delivery has no held capability."),
                (None, _) => starting.push(slotted.delivery),
            }
        }

        self.load_payloads(&mut starting, now, emitted);
        for delivery in starting {
            self.start(delivery);
        }
    }

    /// Re-stamps deliveries to `slot_ms`, from the shared capability.
    fn schedule_from_current(&mut self, slot_ms: Millis, moved: Vec<Slotted>) {
        let Some(current) = self.current.as_ref() else {
            tracing::error!("Deliveries to re-stamp have no held capability.");
            return;
        };
        let held = current.delayed(&slot_ms.max(*current.time()));
        let (_, pending) = self
            .scheduled
            .entry(*held.time())
            .or_insert_with(|| (held, Vec::new()));
        pending.extend(moved);
    }

    /// The `expired` row of `delivery`, if its event is older than the maximum event age.
    fn expired_row(&self, delivery: &Delivery, now: Millis) -> Option<AttemptRow> {
        let age_ms = now.saturating_sub(delivery.ingested.read_at_ms);
        if age_ms <= self.context.retry.max_event_age_ms {
            return None;
        }
        let message = format!(
            "event is {} s old, over the maximum event age of {} s",
            age_ms / 1000,
            self.context.retry.max_event_age_ms / 1000
        );
        let mut row = dead_letter_row(delivery, now, now, ErrorKind::Expired.as_str(), message);
        row.outcome = Outcome::Expired.as_str().to_string();
        Some(row)
    }

    /// Reads back the payloads of retries about to start, in one batch; a delivery whose
    /// payload cannot be read is dead-lettered instead of started.
    fn load_payloads(
        &mut self,
        starting: &mut Vec<Delivery>,
        now: Millis,
        emitted: &mut Vec<(Capability<u64>, Attempted)>,
    ) {
        let positions: Vec<(u32, u64)> = starting
            .iter()
            .filter(|delivery| !delivery.has_payload())
            .map(|delivery| (delivery.ingested.partition, delivery.ingested.offset))
            .collect();
        if positions.is_empty() {
            return;
        }
        let mut fetched = self.payloads.fetch(&positions).into_iter();

        let mut kept = Vec::with_capacity(starting.len());
        for mut delivery in starting.drain(..) {
            if delivery.has_payload() {
                kept.push(delivery);
                continue;
            }
            match fetched.next() {
                Some(Ok(payload)) if !payload.is_empty() => {
                    delivery.ingested.event.payload = payload;
                    kept.push(delivery);
                }
                other => {
                    let reason = match other {
                        Some(Err(reason)) => reason,
                        _ => "the source returned no payload".to_string(),
                    };
                    tracing::error!(
                        endpoint_id = %delivery.endpoint_id,
                        partition = delivery.ingested.partition,
                        offset = delivery.ingested.offset,
                        %reason,
                        "Cannot read a retry's payload back; dead-lettering it."
                    );
                    let message = format!("cannot read the payload back from the source: {reason}");
                    let kind = ErrorKind::PayloadUnavailable.as_str();
                    if let Some(current) = self.current.clone() {
                        emitted.push((
                            current,
                            Attempted::Row(dead_letter_row(&delivery, now, now, kind, message)),
                        ));
                    }
                    self.release_place(&delivery.endpoint_id.clone());
                }
            }
        }
        *starting = kept;
    }

    /// Spawns the request task for `delivery`.
    fn start(&mut self, delivery: Delivery) {
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        let due_at_ms = self.current.as_ref().map_or(0, |current| *current.time());
        let mut stripped = delivery.clone();
        stripped.ingested.event.payload = Vec::new();
        self.in_flight.insert(
            ticket,
            InFlight {
                endpoint_id: delivery.endpoint_id.clone(),
                delivery: stripped,
            },
        );
        self.context
            .requests_in_flight
            .fetch_add(1, Ordering::SeqCst);

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

    /// Moves `current` up to `now`, drops it when nothing needs it, forgets idle endpoints,
    /// and asks the clock to wake the operator when it next has something to do.
    fn refresh_hold(&mut self, now: Millis) {
        if self.context.stop.is_stopped() {
            self.dropped_on_stop += self
                .scheduled
                .values()
                .map(|(_, pending)| pending.len())
                .sum::<usize>();
            self.scheduled.clear();
            if self.dropped_on_stop > 0 {
                // TODO: persist these as pending deliveries in the state store, so that a
                // restart resumes them instead of re-reading the log from the start.
                tracing::warn!(
                    deliveries = self.dropped_on_stop,
                    "Stopping with deliveries waiting for a retry or a rate-limit window; \
                     they are not persisted, and a restart delivers them again from the log."
                );
                self.dropped_on_stop = 0;
            }
        }

        let waiting = self
            .endpoints
            .values()
            .any(|state| !state.waiting.is_empty());
        if waiting || !self.in_flight.is_empty() {
            if let Some(current) = self.current.as_mut() {
                if *current.time() < now {
                    current.downgrade(&now);
                }
            }
            self.context
                .clock
                .wake_at(now + HOLD_REFRESH_MS, &self.wakeup);
        } else {
            self.current = None;
        }

        self.endpoints.retain(|_, state| {
            if let Some(limiter) = state.limiter.as_mut() {
                limiter.prune(now);
            }
            !state.waiting.is_empty()
                || state.in_flight > 0
                || state
                    .limiter
                    .as_ref()
                    .is_some_and(|limiter| !limiter.is_idle())
        });
        if let Some(next) = self.scheduled.keys().next() {
            self.context.clock.wake_at(*next, &self.wakeup);
        }
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
