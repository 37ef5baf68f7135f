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
//!   ([`WindowLimiter`]). A slot in the future re-stamps the delivery: it is emitted as
//!   [`Attempted::Pending`] at `t`, for the durable sink, and waits in `scheduled` under a
//!   capability at the slot time, which does not hold back the frontier for anything earlier.
//! * a due delivery joins its endpoint's FIFO queue and starts when the endpoint and the
//!   worker have a free in-flight place, taking turns with other endpoints. A request in
//!   flight holds a capability at its delivery's time: only these, bounded in number, keep the
//!   frontier at past times.
//! * a delivery still waiting for a place when the operator finishes a run is emitted as
//!   pending at its own time, and from then on shares one capability, `current`, which the
//!   operator moves up to the clock's "now" every time it runs (at least every
//!   [`HOLD_REFRESH_MS`] while anything waits). A slow or hung endpoint therefore never holds
//!   back the frontier for the others.
//! * a failed attempt with a retry left emits, at the attempt's time, its row, the retry's
//!   pending entry and the retry itself.
//!
//! Each endpoint's health (the `health` module) gates its starts. An open breaker or a
//! `Retry-After` pause keeps the endpoint's queue waiting, durably pending and without holding
//! back the frontier, until a wake-up at the pause's end. A half-open breaker lets one probe
//! through. An endpoint that is disabled (in its configuration, or by a 410 Gone or by
//! failing for too long) parks its deliveries: each is recorded as pending without a due time
//! and leaves memory; a disabling is emitted as [`Attempted::EndpointDisabled`], and a breaker
//! opening as [`Attempted::BreakerOpened`].
//!
//! No request starts while more than `max_unsynced_results` attempt results wait for their
//! durable write: that bounds what a crash can make hookflow send twice.
//!
//! The endpoint directory is operator state, started from [`DeliverContext::endpoints`] and
//! changed by a second input of [`EndpointUpdate`]s that reaches every worker
//! ([`Deliver::deliver_live`]). Each run of the operator applies the updates it received before
//! it looks at a delivery, and every request reads the endpoint as it is when the request
//! starts: URL, secrets, headers, timeouts, limits and enabled flag. A delivery naming an
//! endpoint the directory lacks waits until the update input's frontier has passed its time,
//! so an endpoint created at a time is never missed by a delivery at that time; then it is
//! dead-lettered as `unknown_endpoint`, or as `endpoint_deleted` when an update deleted it.
//! Deleting an endpoint dead-letters its queued, scheduled and parked deliveries at once, and
//! its retries as they come round. Disabling it through an update parks its deliveries as a
//! run-time disabling does; enabling it resumes the parked deliveries, which the worker that
//! owns the endpoint reads back through [`ParkedDeliveries`].
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
//!   schedule, a failure that no retry can fix, and a 4xx past its allowed retries yield
//!   `dead_lettered`. A delivery whose event is older than the maximum event age yields
//!   `expired` without a request.
//! * A retry is due at the schedule's next step, raised to the end of a valid `Retry-After`
//!   (clamped), or, after a 429 or a timeout without one, to the penalty floor.
//! * A request task that ends without a result (its runtime shut down, or it panicked)
//!   releases its place with an error log and no row.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;

use hookflow_schemas::{
    AttemptRow, Delivery, Endpoint, ErrorKind, Millis, Outcome, PendingDelivery,
};
use serde::{Deserialize, Serialize};
use timely::dataflow::channels::pact::{Exchange, Pipeline};
use timely::dataflow::operators::generic::operator::empty;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::Capability;
use timely::dataflow::Stream;
use timely::progress::frontier::MutableAntichain;
use timely::scheduling::SyncActivator;

use super::client::DeliveryClient;
use super::result::{dead_letter_row, is_overload};
use crate::clock::{Clock, Wakeup};
use crate::health::{Admission, EndpointHealth, HealthPolicy, Signal, Transition};
use crate::rate_limit::{StartDecision, WindowLimiter};
use crate::retry::{jitter_seed, RetryPolicy};
use crate::retry_after::{clamp_retry_after, parse_retry_after};
use crate::stop::StopSignal;

/// The default limit on requests in flight per worker.
pub const DEFAULT_MAX_IN_FLIGHT_TOTAL: usize = 256;

/// How often, at least, the operator moves its capability for queued and in-flight
/// deliveries up to "now", in ms: the most a slow endpoint can hold back the frontier.
pub const HOLD_REFRESH_MS: u64 = 100;

/// Minimum time between two logged failures of one endpoint, in ms.
pub const FAILURE_LOG_MS: u64 = 10_000;

/// The default bound on attempt results not yet durably written.
pub const DEFAULT_MAX_UNSYNCED_RESULTS: usize = 64;

/// Counts of the decisions the deliver operator makes about endpoints, over all workers
/// sharing them; the pipeline reports them.
#[derive(Debug, Default)]
pub struct DeliverCounters {
    /// Breakers opened, counting a reopening after a failed probe.
    pub breakers_opened: AtomicU64,
    /// Breakers closed by a successful probe.
    pub breakers_closed: AtomicU64,
    /// Endpoints disabled at run time.
    pub endpoints_disabled: AtomicU64,
    /// Deliveries parked because their endpoint is disabled.
    pub deliveries_parked: AtomicU64,
    /// 429 answers.
    pub throttled: AtomicU64,
    /// `Retry-After` values that were not valid and counted as absent.
    pub retry_after_invalid: AtomicU64,
    /// Valid `Retry-After` values that asked for more than the maximum pause.
    pub retry_after_capped: AtomicU64,
    /// Ids of the endpoints whose breaker is open or half-open. Locked only when a breaker
    /// opens or closes, and when metrics are scraped.
    pub open_breakers: std::sync::Mutex<std::collections::BTreeSet<String>>,
    /// Ids of the disabled endpoints: disabled at run time, or before it when the pipeline
    /// adds them at start. Locked only when an endpoint is disabled or enabled, and when
    /// metrics are scraped.
    pub disabled_endpoints: std::sync::Mutex<std::collections::BTreeSet<String>>,
}

impl DeliverCounters {
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds or removes `endpoint_id` in one of the id sets; a poisoned lock is taken over,
    /// because a set of ids cannot be left half-changed.
    pub fn set_member(
        set: &std::sync::Mutex<std::collections::BTreeSet<String>>,
        endpoint_id: &str,
        member: bool,
    ) {
        let mut ids = set
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if member {
            ids.insert(endpoint_id.to_string());
        } else {
            ids.remove(endpoint_id);
        }
    }
}

/// An endpoint the deliver operator disabled, to record durably.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct EndpointDisabled {
    /// The endpoint's id.
    pub endpoint_id: String,
    /// The endpoint's tenant, when the directory contains the endpoint.
    pub tenant: Option<String>,
    /// When it was disabled.
    pub at_ms: Millis,
    /// The rule that disabled it, for the operator.
    pub reason: String,
}

/// What the deliver operator emits.
// A row is by far the largest variant and the most frequent one, so boxing it would cost an
// allocation per attempt to save memory on the rarer variants.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Attempted {
    /// The row of an attempt or of a decision made without a request.
    Row(AttemptRow),
    /// A delivery to attempt again, stamped one ms before its next attempt time.
    Retry(Delivery),
    /// A delivery that now waits for a later time, to record durably as pending. It is
    /// emitted at a time no later than the delivery's own, so the record it came from counts
    /// as settled only once this is written. A parked delivery has
    /// [`PendingDelivery::PARKED`] as its due time.
    Pending(PendingDelivery),
    /// The endpoint was disabled; its deliveries are parked until it is enabled again.
    EndpointDisabled(EndpointDisabled),
    /// The endpoint's circuit breaker opened, or opened again after a failed probe.
    BreakerOpened(BreakerOpened),
}

/// A circuit breaker the deliver operator opened, for alerts.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BreakerOpened {
    /// The endpoint's id.
    pub endpoint_id: String,
    /// The endpoint's tenant, when the directory contains the endpoint.
    pub tenant: Option<String>,
    /// When the breaker opened.
    pub at_ms: Millis,
    /// When its probe may start.
    pub until_ms: Millis,
    /// Failed attempts in the breaker window that opened it (1 for a failed probe).
    pub failures: u32,
    /// Attempts in that window.
    pub attempts: u32,
}

/// A change to the deliver operator's endpoint directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EndpointUpdate {
    /// The endpoint as the directory contains it when the pipeline starts. A run-time disabling
    /// recorded earlier stays in force.
    Load(Endpoint),
    /// The endpoint created or replaced while running. With `enabled = true` it also ends a
    /// run-time disabling, and the endpoint's parked deliveries resume.
    Apply(Endpoint),
    /// The endpoint with this id was deleted.
    Delete(String),
}

/// Reads the deliveries the deliver operator parked, from the store of the process that owns
/// the endpoint, so that enabling or deleting the endpoint while running can resume or
/// dead-letter them.
pub trait ParkedDeliveries {
    /// Returns the deliveries of `endpoint_id` parked while it was disabled.
    ///
    /// # Errors
    ///
    /// Returns why the store could not be read.
    fn parked(&mut self, endpoint_id: &str) -> Result<Vec<PendingDelivery>, String>;

    /// Forgets the run-time disabling of `endpoint_id` (410 Gone, failing too long), so that
    /// the next start does not disable it again.
    ///
    /// # Errors
    ///
    /// Returns why the store could not be written.
    fn clear_disabled(&mut self, endpoint_id: &str) -> Result<(), String>;
}

/// A store without parked deliveries, for a directory that never changes.
struct NoParked;

impl ParkedDeliveries for NoParked {
    fn parked(&mut self, _endpoint_id: &str) -> Result<Vec<PendingDelivery>, String> {
        Ok(Vec::new())
    }

    fn clear_disabled(&mut self, _endpoint_id: &str) -> Result<(), String> {
        Ok(())
    }
}

/// The live endpoint directory's inputs: the updates, the endpoints this process's store
/// records as disabled at run time, and the store of parked deliveries.
pub struct LiveDirectory<'scope> {
    /// The updates; every worker must receive every update (broadcast).
    pub updates: Stream<'scope, u64, Vec<EndpointUpdate>>,
    /// Endpoints disabled at run time by an earlier run, whose deliveries stay parked.
    pub disabled: HashSet<String>,
    /// The store that parked deliveries are read back from.
    pub parked: Box<dyn ParkedDeliveries>,
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
    /// The endpoint directory by endpoint id when the operator starts; [`EndpointUpdate`]s
    /// change the operator's copy.
    pub endpoints: Arc<HashMap<String, Endpoint>>,
    /// The source of "now", and the owner of waiting.
    pub clock: Arc<dyn Clock>,
    /// Maximum requests in flight per worker, over all endpoints. Default 256.
    pub max_in_flight_total: usize,
    /// When failed deliveries are attempted again.
    pub retry: RetryPolicy,
    /// Requests started and not yet turned into rows, over all workers sharing it.
    pub requests_in_flight: Arc<AtomicUsize>,
    /// Set when the pipeline stops: requests in flight finish, and deliveries waiting for a
    /// later time (a retry, a rate-limit window), durably pending, are left for the next run.
    pub stop: Arc<StopSignal>,
    /// Attempt results emitted and not yet durably written; the pipeline's durable sink
    /// subtracts what it writes (rows with a `started_at`).
    pub unsynced_results: Arc<AtomicUsize>,
    /// No request starts while `unsynced_results` is above this: it bounds what a crash can
    /// make hookflow send twice.
    pub max_unsynced_results: usize,
    /// The breaker, pause and disable rules.
    pub health: HealthPolicy,
    /// Counts of the operator's decisions about endpoints.
    pub counters: Arc<DeliverCounters>,
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
            unsynced_results: Arc::new(AtomicUsize::new(0)),
            max_unsynced_results: DEFAULT_MAX_UNSYNCED_RESULTS,
            health: HealthPolicy::default(),
            counters: Arc::new(DeliverCounters::default()),
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
            .field("health", &self.health)
            .finish_non_exhaustive()
    }
}

/// Sends deliveries over HTTP, within each endpoint's rate limit and in-flight cap, and
/// decides their retries.
pub trait Deliver<'scope> {
    /// Delivers with the directory of `context.endpoints`, which never changes.
    fn deliver(
        self,
        context: DeliverContext,
        payloads: Box<dyn PayloadSource>,
    ) -> Stream<'scope, u64, Vec<Attempted>>;

    /// Delivers with a directory that `directory.updates` changes while running. See the
    /// module documentation for the contract.
    fn deliver_live(
        self,
        directory: LiveDirectory<'scope>,
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
        let directory = LiveDirectory {
            updates: empty(self.scope()),
            disabled: HashSet::new(),
            parked: Box::new(NoParked),
        };
        self.deliver_live(directory, context, payloads)
    }

    fn deliver_live(
        self,
        directory: LiveDirectory<'scope>,
        context: DeliverContext,
        payloads: Box<dyn PayloadSource>,
    ) -> Stream<'scope, u64, Vec<Attempted>> {
        let scope = self.scope();
        let exchange = Exchange::new(|delivery: &Delivery| endpoint_hash(&delivery.endpoint_id));
        let LiveDirectory {
            updates,
            disabled,
            parked,
        } = directory;

        self.binary_frontier(
            updates,
            exchange,
            Pipeline,
            "Deliver",
            move |_capability, info| {
                let wakeup = Wakeup::new(scope.worker(), info.address);
                context.stop.watch(wakeup.sync_activator());
                let (sender, receiver) = mpsc::channel();
                let owner = Owner {
                    index: scope.index(),
                    peers: scope.peers(),
                };
                let mut state = DeliverState::new(context, payloads, sender, receiver, wakeup);
                state.disabled = disabled;
                state.parked = parked;
                state.owner = owner;

                move |(input, _), (updates, update_frontier), output| {
                    let now = state.context.clock.now_ms();
                    let port = output.output_index();

                    // Updates first: a delivery at a time the updates input has passed must see
                    // every update up to that time.
                    updates.for_each_stamp(|capability, containers| {
                        let Some(time) = capability.least().copied() else {
                            return;
                        };
                        let held = capability.delayed(&time, port);
                        for container in containers {
                            for update in container.drain(..) {
                                state.update(&held, update, now);
                            }
                        }
                    });

                    input.for_each_stamp(|capability, containers| {
                        let Some(time) = capability.least().copied() else {
                            return;
                        };
                        let held = capability.delayed(&time, port);
                        for container in containers {
                            for delivery in container.drain(..) {
                                state.accept(&held, delivery, now, update_frontier);
                            }
                        }
                    });
                    state.release_unknown(now, update_frontier);

                    state.release_scheduled(now);
                    state.release_holds(now);
                    state.collect_completions(now);
                    state.start_requests(now);
                    state.park_waiting(now);

                    let mut emitted = std::mem::take(&mut state.emitted);
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
            },
        )
    }
}

/// This worker's place among the workers the deliver input is exchanged over.
#[derive(Debug, Clone, Copy, Default)]
struct Owner {
    index: usize,
    peers: usize,
}

impl Owner {
    /// Returns whether the exchange sends `endpoint_id`'s deliveries to this worker. Timely's
    /// exchange picks `hash % peers` (a mask when `peers` is a power of two, the same value).
    fn owns(&self, endpoint_id: &str) -> bool {
        let peers = self.peers.max(1) as u64;
        endpoint_hash(endpoint_id) % peers == self.index as u64
    }
}

/// Maps an endpoint id to the value that picks its worker: 64-bit FNV-1a of the id's UTF-8
/// bytes.
///
/// The function is fixed here, not taken from `std` or a hashing crate, so every process
/// and every build agrees on which worker owns an endpoint.
pub fn endpoint_hash(endpoint_id: &str) -> u64 {
    hookflow_schemas::fnv1a(endpoint_id.as_bytes())
}

/// A due delivery waiting for an in-flight place.
struct Waiting {
    /// The time of its reserved rate-limit slot (its due time when unlimited).
    slot_ms: Millis,
    delivery: Delivery,
    /// The capability at the delivery's own time, until it is recorded as pending; `None`
    /// once it is pending and covered by `DeliverState::current`.
    held: Option<Capability<u64>>,
}

/// A delivery granted a start in this run of the operator, before its task is spawned.
struct Starting {
    delivery: Delivery,
    /// Held until the request's row is emitted.
    capability: Capability<u64>,
    /// The time of its rate-limit slot (its due time when unlimited).
    due_at_ms: Millis,
    /// The end of the rate-limit window the start was counted in; the task sends nothing at
    /// or after it. `None` for an endpoint without a rate limit.
    window_end_ms: Option<Millis>,
}

/// The way a request task ended.
// Rows are the common end; boxing them would allocate once more per attempt.
#[allow(clippy::large_enum_variant)]
enum TaskEnd {
    /// The attempt's row.
    Row(AttemptRow),
    /// The task ran after its rate-limit window had ended and sent nothing.
    MissedWindow,
    /// The task ended without a result (its runtime shut down, or it panicked).
    Lost,
}

/// The end of one request task.
struct Completion {
    ticket: u64,
    end: TaskEnd,
}

/// One endpoint's share of the operator state.
#[derive(Default)]
struct EndpointState {
    /// Due deliveries waiting for an in-flight place, oldest first.
    waiting: VecDeque<Waiting>,
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
    /// Held until the request's row is emitted: at the delivery's own time when it started
    /// on arrival, otherwise at its start time.
    capability: Capability<u64>,
}

/// The deliveries scheduled at one time, with the capability held for them; each delivery
/// with its rate-limit slot.
type ScheduledAt = (Capability<u64>, Vec<(Millis, Delivery)>);

/// The per-worker state of the deliver operator.
struct DeliverState {
    context: DeliverContext,
    payloads: Box<dyn PayloadSource>,
    /// Deliveries stamped to a later time (a rate-limit slot not yet open), durably pending,
    /// by that time, each time with the capability held for it.
    scheduled: BTreeMap<Millis, ScheduledAt>,
    /// One capability for the waiting deliveries that are durably pending, moved up to "now"
    /// each time the operator runs; `None` when there are none.
    current: Option<Capability<u64>>,
    /// Endpoints with waiting deliveries or requests in flight, by endpoint id.
    endpoints: HashMap<String, EndpointState>,
    /// Endpoints with waiting deliveries and a free place, in the order they get their turn.
    ready: VecDeque<String>,
    /// Endpoints that queued a delivery with its own capability in this run of the operator,
    /// which `park_waiting` must visit; the others hold none.
    unparked: HashSet<String>,
    /// Requests on the runtime, by ticket.
    in_flight: HashMap<u64, InFlight>,
    next_ticket: u64,
    /// Records to emit at the end of this activation, each with its capability.
    emitted: Vec<(Capability<u64>, Attempted)>,
    /// Endpoint ids already logged as unknown, so each is logged once per worker.
    reported_unknown: HashSet<String>,
    /// Per endpoint: when a failed attempt was last logged, and how many failures were not
    /// logged since, so that a failing endpoint logs at most once per [`FAILURE_LOG_MS`].
    failure_log: HashMap<String, (Millis, u64)>,
    /// The health of endpoints that have one worth keeping, by endpoint id.
    health: HashMap<String, EndpointHealth>,
    /// Endpoints disabled at run time, by this run or an earlier one; their deliveries are
    /// parked.
    disabled: HashSet<String>,
    /// The endpoint directory, by endpoint id. Requests take the entry as it is when they start.
    directory: HashMap<String, Arc<Endpoint>>,
    /// Endpoints an update deleted; their deliveries are dead-lettered as `endpoint_deleted`.
    deleted: HashSet<String>,
    /// Deliveries naming an endpoint the directory lacks, by their time, each time with the
    /// capability held for it, until the updates input has passed that time.
    unknown: BTreeMap<Millis, ScheduledAt>,
    /// The store that deliveries parked by an earlier disabling are read back from.
    parked: Box<dyn ParkedDeliveries>,
    /// This worker's place, which decides the endpoints it owns.
    owner: Owner,
    /// Endpoints whose queue is held (breaker open, `Retry-After` pause), by the time the
    /// hold ends.
    holds: BTreeMap<Millis, Vec<String>>,
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
        let directory = context
            .endpoints
            .iter()
            .map(|(id, endpoint)| (id.clone(), Arc::new(endpoint.clone())))
            .collect();
        DeliverState {
            context,
            payloads,
            scheduled: BTreeMap::new(),
            current: None,
            endpoints: HashMap::new(),
            ready: VecDeque::new(),
            unparked: HashSet::new(),
            in_flight: HashMap::new(),
            next_ticket: 0,
            emitted: Vec::new(),
            reported_unknown: HashSet::new(),
            failure_log: HashMap::new(),
            health: HashMap::new(),
            disabled: HashSet::new(),
            directory,
            deleted: HashSet::new(),
            unknown: BTreeMap::new(),
            parked: Box::new(NoParked),
            owner: Owner::default(),
            holds: BTreeMap::new(),
            sender,
            receiver,
            wakeup,
            activator,
        }
    }

    /// Accepts `delivery` at once, or, when its endpoint is not in the directory and the
    /// updates input (`updates`) may still bring it, keeps it in `unknown` until then. `held`
    /// is a capability at the delivery's due time.
    fn accept(
        &mut self,
        held: &Capability<u64>,
        delivery: Delivery,
        now: Millis,
        updates: &MutableAntichain<u64>,
    ) {
        let due_at_ms = *held.time();
        let known = self.directory.contains_key(&delivery.endpoint_id)
            || self.deleted.contains(&delivery.endpoint_id);
        if !known && updates.less_equal(&due_at_ms) {
            match self.unknown.entry(due_at_ms) {
                Entry::Occupied(mut entry) => entry.get_mut().1.push((due_at_ms, delivery)),
                Entry::Vacant(entry) => {
                    entry.insert((held.clone(), vec![(due_at_ms, delivery)]));
                }
            }
            return;
        }
        self.accept_now(held, delivery, now);
    }

    /// Accepts the deliveries in `unknown` whose time the updates input has passed.
    fn release_unknown(&mut self, now: Millis, updates: &MutableAntichain<u64>) {
        while let Some(entry) = self.unknown.first_entry() {
            if updates.less_equal(entry.key()) {
                break;
            }
            let (capability, deliveries) = entry.remove();
            for (_, delivery) in deliveries {
                self.accept_now(&capability, delivery, now);
            }
        }
    }

    /// Reserves `delivery`'s rate-limit slot and queues or schedules it, parks it when its
    /// endpoint is disabled, or emits its dead-letter row when its endpoint is unknown or
    /// deleted. `held` is a capability at the delivery's due time.
    fn accept_now(&mut self, held: &Capability<u64>, delivery: Delivery, now: Millis) {
        let due_at_ms = *held.time();
        if self.is_disabled(&delivery.endpoint_id) {
            self.park(held.clone(), &delivery);
            return;
        }
        let endpoint = match self.directory.get(&delivery.endpoint_id) {
            Some(endpoint) => endpoint,
            None => {
                let row = self.missing_endpoint_row(&delivery, due_at_ms, now);
                self.emitted.push((held.clone(), Attempted::Row(row)));
                return;
            }
        };

        let rate_limit = endpoint.rate_limit;
        let budget_shift = self.budget_shift(&delivery.endpoint_id);
        let state = self
            .endpoints
            .entry(delivery.endpoint_id.clone())
            .or_default();
        let slot_ms = match (rate_limit, state.limiter.as_mut()) {
            (Some(_), Some(limiter)) => limiter.reserve(due_at_ms),
            (Some(limit), None) => {
                let limiter = state.limiter.insert(WindowLimiter::new(limit));
                limiter.set_budget_shift(budget_shift);
                limiter.reserve(due_at_ms)
            }
            (None, _) => due_at_ms,
        };

        if slot_ms > now {
            let pending = PendingDelivery::from_delivery(&delivery, slot_ms);
            self.emitted
                .push((held.clone(), Attempted::Pending(pending)));
            self.schedule(held, slot_ms, slot_ms, delivery);
        } else {
            self.unparked.insert(delivery.endpoint_id.clone());
            self.enqueue(Waiting {
                slot_ms,
                delivery,
                held: Some(held.clone()),
            });
        }
    }

    /// Appends a due delivery to its endpoint's queue and gives the endpoint a turn if it
    /// has a free place.
    fn enqueue(&mut self, waiting: Waiting) {
        let endpoint_id = waiting.delivery.endpoint_id.clone();
        let limit = self.in_flight_limit(&endpoint_id);
        let state = self.endpoints.entry(endpoint_id.clone()).or_default();
        state.waiting.push_back(waiting);
        if !state.ready && state.in_flight < limit {
            state.ready = true;
            self.ready.push_back(endpoint_id);
        }
    }

    /// The endpoint's in-flight cap; without a rate limit to halve, an overloaded endpoint's
    /// halvings apply to this cap instead.
    fn in_flight_limit(&self, endpoint_id: &str) -> usize {
        let Some(endpoint) = self.directory.get(endpoint_id) else {
            return 1;
        };
        let cap = endpoint.max_in_flight.max(1);
        if endpoint.rate_limit.is_some() {
            return cap;
        }
        let shift = self.budget_shift(endpoint_id);
        cap.checked_shr(shift).unwrap_or(0).max(1)
    }

    /// Returns how many times the endpoint's budget is halved for overload.
    fn budget_shift(&self, endpoint_id: &str) -> u32 {
        self.health
            .get(endpoint_id)
            .map_or(0, EndpointHealth::budget_shift)
    }

    /// Returns the endpoint's budget in force: its rate limit's requests per window, or its
    /// in-flight cap, halved for overload.
    fn budget(&self, endpoint_id: &str) -> u32 {
        let limited = self
            .endpoints
            .get(endpoint_id)
            .and_then(|state| state.limiter.as_ref())
            .map(WindowLimiter::budget);
        limited
            .unwrap_or_else(|| u32::try_from(self.in_flight_limit(endpoint_id)).unwrap_or(u32::MAX))
    }

    /// Returns whether the endpoint is disabled, in the directory or at run time.
    fn is_disabled(&self, endpoint_id: &str) -> bool {
        self.disabled.contains(endpoint_id)
            || self
                .directory
                .get(endpoint_id)
                .is_some_and(|endpoint| !endpoint.enabled)
    }

    /// Builds the dead-letter row of a delivery whose endpoint the directory lacks: deleted by
    /// an update, or never known.
    fn missing_endpoint_row(
        &mut self,
        delivery: &Delivery,
        due_at_ms: Millis,
        now: Millis,
    ) -> AttemptRow {
        if self.deleted.contains(&delivery.endpoint_id) {
            let message = format!("endpoint `{}` was deleted", delivery.endpoint_id);
            let kind = ErrorKind::EndpointDeleted.as_str();
            return dead_letter_row(delivery, due_at_ms, now, kind, message);
        }
        if self.reported_unknown.insert(delivery.endpoint_id.clone()) {
            tracing::warn!(
                endpoint_id = %delivery.endpoint_id,
                "Deliveries name an endpoint missing from the directory; dead-lettering them."
            );
        }
        vanished_endpoint_row(delivery, due_at_ms, now)
    }

    /// Applies one directory update at the time of `held`.
    fn update(&mut self, held: &Capability<u64>, update: EndpointUpdate, now: Millis) {
        match update {
            EndpointUpdate::Load(endpoint) => {
                let id = endpoint.id.clone();
                let resumes = endpoint.enabled && !self.disabled.contains(&id);
                self.deleted.remove(&id);
                self.directory.insert(id.clone(), Arc::new(endpoint));
                if resumes {
                    self.resume_parked(&id, held, now);
                }
            }
            EndpointUpdate::Apply(endpoint) => self.apply_endpoint(held, endpoint, now),
            EndpointUpdate::Delete(id) => self.delete_endpoint(held, &id, now),
        }
    }

    /// Creates or replaces an endpoint while running.
    fn apply_endpoint(&mut self, held: &Capability<u64>, endpoint: Endpoint, now: Millis) {
        let id = endpoint.id.clone();
        let was_disabled = self.is_disabled(&id) || !self.directory.contains_key(&id);
        let previous = self
            .directory
            .insert(id.clone(), Arc::new(endpoint.clone()));
        self.deleted.remove(&id);
        self.reported_unknown.remove(&id);
        tracing::info!(
            endpoint_id = %id,
            enabled = endpoint.enabled,
            created = previous.is_none(),
            "Endpoint changed while running."
        );

        // A new limit counts from the next slot; slots already given keep their time.
        let limit_changed = previous
            .as_ref()
            .is_none_or(|previous| previous.rate_limit != endpoint.rate_limit);
        if limit_changed {
            if let Some(state) = self.endpoints.get_mut(&id) {
                state.limiter = None;
            }
        }

        DeliverCounters::set_member(
            &self.context.counters.disabled_endpoints,
            &id,
            !endpoint.enabled,
        );
        if endpoint.enabled {
            if self.disabled.remove(&id) {
                tracing::info!(endpoint_id = %id, "Run-time disabling ended by an endpoint change.");
            }
            if self.owner.owns(&id) {
                if let Err(error) = self.parked.clear_disabled(&id) {
                    tracing::error!(endpoint_id = %id, %error, "Cannot clear the endpoint's run-time disabling in the state store; the next start disables it again.");
                }
            }
            if was_disabled {
                self.resume_parked(&id, held, now);
            }
            // A raised in-flight limit, or the end of a disabling, may free a place.
            let limit = self.in_flight_limit(&id);
            if let Some(state) = self.endpoints.get_mut(&id) {
                if !state.ready && !state.waiting.is_empty() && state.in_flight < limit {
                    state.ready = true;
                    self.ready.push_back(id);
                }
            }
        } else if !was_disabled {
            DeliverCounters::bump(&self.context.counters.endpoints_disabled);
            self.park_queue(&id, now);
        }
    }

    /// Deletes an endpoint while running: dead-letters its queued, scheduled and parked
    /// deliveries. Requests in flight finish; their retries are dead-lettered as they come.
    fn delete_endpoint(&mut self, held: &Capability<u64>, id: &str, now: Millis) {
        self.directory.remove(id);
        self.deleted.insert(id.to_string());
        self.disabled.remove(id);
        DeliverCounters::set_member(&self.context.counters.disabled_endpoints, id, false);
        DeliverCounters::set_member(&self.context.counters.open_breakers, id, false);
        let mut dropped: Vec<(Capability<u64>, Delivery)> = Vec::new();

        let waiting = match self.endpoints.get_mut(id) {
            Some(state) => {
                state.ready = false;
                std::mem::take(&mut state.waiting)
            }
            None => VecDeque::new(),
        };
        for Waiting {
            delivery,
            held: own,
            ..
        } in waiting
        {
            match own.or_else(|| self.current_at(now)) {
                Some(capability) => dropped.push((capability, delivery)),
                None => {
                    tracing::error!("A pending delivery has no held capability; it stays pending.")
                }
            }
        }
        for (capability, deliveries) in self.scheduled.values_mut() {
            let (gone, kept): (Vec<_>, Vec<_>) = std::mem::take(deliveries)
                .into_iter()
                .partition(|(_, delivery)| delivery.endpoint_id == id);
            *deliveries = kept;
            dropped.extend(
                gone.into_iter()
                    .map(|(_, delivery)| (capability.clone(), delivery)),
            );
        }
        self.scheduled
            .retain(|_, (_, deliveries)| !deliveries.is_empty());

        if self.owner.owns(id) {
            match self.parked.parked(id) {
                Ok(parked) => dropped.extend(
                    parked
                        .iter()
                        .map(|entry| (held.clone(), entry.to_delivery())),
                ),
                Err(error) => {
                    tracing::error!(endpoint_id = %id, %error, "Cannot read the deleted endpoint's parked deliveries; they stay parked.")
                }
            }
            if let Err(error) = self.parked.clear_disabled(id) {
                tracing::error!(endpoint_id = %id, %error, "Cannot clear the deleted endpoint's run-time disabling in the state store.");
            }
        }

        tracing::warn!(
            endpoint_id = %id,
            dead_lettered = dropped.len(),
            in_flight = self.endpoints.get(id).map_or(0, |state| state.in_flight),
            "Endpoint deleted; dead-lettering its waiting deliveries."
        );
        for (capability, delivery) in dropped {
            let due_at_ms = *capability.time();
            let row = self.missing_endpoint_row(&delivery, due_at_ms, now);
            self.emitted.push((capability, Attempted::Row(row)));
        }
    }

    /// Reads back the deliveries `endpoint_id` parked while disabled and accepts them again at
    /// the time of `held`; only the worker that owns the endpoint does.
    // NOTE: the store is read, not memory: a delivery parked in the same step as the enabling,
    // before the durable sink wrote it, stays parked until the next start resumes it.
    fn resume_parked(&mut self, endpoint_id: &str, held: &Capability<u64>, now: Millis) {
        if !self.owner.owns(endpoint_id) {
            return;
        }
        let parked = match self.parked.parked(endpoint_id) {
            Ok(parked) => parked,
            Err(error) => {
                tracing::error!(endpoint_id = %endpoint_id, %error, "Cannot read the endpoint's parked deliveries; they stay parked until the next start.");
                return;
            }
        };
        if parked.is_empty() {
            return;
        }
        tracing::info!(
            endpoint_id = %endpoint_id,
            deliveries = parked.len(),
            "Resuming parked deliveries."
        );
        for entry in parked {
            self.accept_now(held, entry.to_delivery(), now);
        }
    }

    /// Records `delivery` as parked under `capability`; it leaves memory until its endpoint
    /// is enabled again.
    fn park(&mut self, capability: Capability<u64>, delivery: &Delivery) {
        let parked = PendingDelivery::from_delivery(delivery, PendingDelivery::PARKED);
        DeliverCounters::bump(&self.context.counters.deliveries_parked);
        self.emitted.push((capability, Attempted::Pending(parked)));
    }

    /// Returns the tenant of an endpoint in the directory.
    fn tenant_of(&self, endpoint_id: &str) -> Option<String> {
        self.directory
            .get(endpoint_id)
            .map(|endpoint| endpoint.tenant.clone())
    }

    /// Returns a capability at `now` under `current`, for a delivery that is pending already.
    fn current_at(&self, now: Millis) -> Option<Capability<u64>> {
        let current = self.current.as_ref()?;
        Some(current.delayed(&now.max(*current.time())))
    }

    /// Disables `endpoint_id` for `reason`: records it under `capability`, and parks its
    /// waiting deliveries. Its scheduled deliveries and retries are parked as they come due.
    fn disable(
        &mut self,
        endpoint_id: &str,
        reason: String,
        now: Millis,
        capability: &Capability<u64>,
    ) {
        if !self.disabled.insert(endpoint_id.to_string()) {
            return;
        }
        DeliverCounters::bump(&self.context.counters.endpoints_disabled);
        DeliverCounters::set_member(&self.context.counters.disabled_endpoints, endpoint_id, true);
        tracing::warn!(
            endpoint_id = %endpoint_id,
            %reason,
            "Endpoint disabled; its deliveries are parked until it is enabled again."
        );
        self.emitted.push((
            capability.clone(),
            Attempted::EndpointDisabled(EndpointDisabled {
                endpoint_id: endpoint_id.to_string(),
                tenant: self.tenant_of(endpoint_id),
                at_ms: now,
                reason,
            }),
        ));

        self.park_queue(endpoint_id, now);
    }

    /// Parks the waiting deliveries of a disabled endpoint. Its scheduled deliveries and
    /// retries are parked as they come due.
    fn park_queue(&mut self, endpoint_id: &str, now: Millis) {
        let waiting = match self.endpoints.get_mut(endpoint_id) {
            Some(state) => {
                state.ready = false;
                std::mem::take(&mut state.waiting)
            }
            None => VecDeque::new(),
        };
        for Waiting { delivery, held, .. } in waiting {
            let Some(capability) = held.or_else(|| self.current_at(now)) else {
                tracing::error!("A pending delivery has no held capability; it stays pending.");
                continue;
            };
            self.park(capability, &delivery);
        }
    }

    /// Keeps `endpoint_id`'s queue waiting until `until_ms`. `refresh_hold`, which ends every
    /// run of the operator, asks the clock to wake it then.
    fn hold(&mut self, endpoint_id: String, until_ms: Millis) {
        let holders = self.holds.entry(until_ms).or_default();
        if !holders.contains(&endpoint_id) {
            holders.push(endpoint_id);
        }
    }

    /// Gives the endpoints whose hold has ended a turn again.
    fn release_holds(&mut self, now: Millis) {
        while let Some(entry) = self.holds.first_entry() {
            if *entry.key() > now {
                break;
            }
            for endpoint_id in entry.remove() {
                let limit = self.in_flight_limit(&endpoint_id);
                let Some(state) = self.endpoints.get_mut(&endpoint_id) else {
                    continue;
                };
                if !state.ready && !state.waiting.is_empty() && state.in_flight < limit {
                    state.ready = true;
                    self.ready.push_back(endpoint_id);
                }
            }
        }
    }

    /// Makes sure `current` exists, from `held` (whose time is at or before `now`).
    fn hold_current(&mut self, held: &Capability<u64>, now: Millis) {
        if self.current.is_none() {
            self.current = Some(held.delayed(&now.max(*held.time())));
        }
    }

    /// Moves every scheduled delivery whose slot has come into its endpoint's queue.
    fn release_scheduled(&mut self, now: Millis) {
        while let Some(entry) = self.scheduled.first_entry() {
            if *entry.key() > now {
                break;
            }
            let (capability, deliveries) = entry.remove();
            self.hold_current(&capability, now);
            for (slot_ms, delivery) in deliveries {
                if self.is_disabled(&delivery.endpoint_id) {
                    self.park(capability.clone(), &delivery);
                    continue;
                }
                self.enqueue(Waiting {
                    slot_ms,
                    delivery,
                    held: None,
                });
            }
        }
    }

    /// Turns finished requests into rows, and failed ones with a retry left into a pending
    /// entry and the retry itself; feeds each result to its endpoint's health.
    fn collect_completions(&mut self, now: Millis) {
        while let Ok(Completion { ticket, end }) = self.receiver.try_recv() {
            self.context
                .requests_in_flight
                .fetch_sub(1, Ordering::SeqCst);
            let Some(InFlight {
                endpoint_id,
                delivery,
                capability,
            }) = self.in_flight.remove(&ticket)
            else {
                tracing::error!(
                    ticket,
                    "A request finished that the operator did not start."
                );
                continue;
            };
            let mut row = match end {
                TaskEnd::Row(row) => row,
                TaskEnd::MissedWindow => {
                    self.release_place(&endpoint_id);
                    self.retake_slot(delivery, capability, now);
                    continue;
                }
                TaskEnd::Lost => {
                    self.release_place(&endpoint_id);
                    tracing::error!(
                        endpoint_id = %endpoint_id,
                        event_id = %delivery.ingested.event.id,
                        "A delivery request ended without a result; no attempt row is written."
                    );
                    continue;
                }
            };
            if row.started_at_ms.is_some() {
                self.context.unsynced_results.fetch_add(1, Ordering::SeqCst);
            }

            let not_before = self.observe_health(&endpoint_id, &mut row, &capability, now);
            if row.outcome == Outcome::Failed.as_str() {
                self.schedule_retry(&mut row, delivery, &capability, not_before, now);
            }

            // After the health saw the result, so that a probe's end lets the queue go on.
            self.release_place(&endpoint_id);
            self.log_failure(&row, now);
            self.emitted.push((capability, Attempted::Row(row)));
        }
    }

    /// Gives a delivery whose task missed its rate-limit window the first open slot from `now`
    /// on. It sent nothing, so it keeps its attempt number; its window keeps the start it was
    /// counted for, which only makes that window stricter.
    fn retake_slot(&mut self, delivery: Delivery, capability: Capability<u64>, now: Millis) {
        let slot_ms = self
            .endpoints
            .get_mut(&delivery.endpoint_id)
            .and_then(|state| state.limiter.as_mut())
            .map_or(now, |limiter| limiter.reserve(now));
        let waiting = Waiting {
            slot_ms,
            delivery,
            held: Some(capability),
        };
        if slot_ms > now {
            self.reschedule(waiting, slot_ms, now);
        } else {
            self.unparked.insert(waiting.delivery.endpoint_id.clone());
            self.enqueue(waiting);
        }
    }

    /// Decides a failed attempt's next step: a retry at the schedule's next step raised to
    /// `not_before`, a parked retry when the endpoint is disabled, or a dead letter when the
    /// schedule or the 4xx retries are used up.
    fn schedule_retry(
        &mut self,
        row: &mut AttemptRow,
        delivery: Delivery,
        capability: &Capability<u64>,
        not_before: Millis,
        now: Millis,
    ) {
        let client_error = row.error_kind.as_deref() == Some(ErrorKind::ClientError.as_str());
        let next = if client_error && self.context.retry.client_errors_exhausted(delivery.attempt) {
            None
        } else {
            let seed = jitter_seed(&delivery, delivery.attempt);
            self.context
                .retry
                .next_attempt_at(delivery.attempt, now, seed)
                .map(|next_ms| next_ms.max(not_before))
        };

        let Some(next_ms) = next else {
            row.outcome = Outcome::DeadLettered.as_str().to_string();
            let gave_up = if client_error {
                let retries = self.context.retry.client_error_retries;
                let plural = if retries == 1 { "retry" } else { "retries" };
                format!(
                    "gave up after {} attempts: the endpoint refused the request (4xx), and 4xx \
                     answers get {retries} {plural}",
                    delivery.attempt
                )
            } else {
                format!("gave up after {} attempts", delivery.attempt)
            };
            row.error_message = Some(match row.error_message.take() {
                Some(message) => format!("{message}; {gave_up}"),
                None => gave_up,
            });
            return;
        };

        row.next_attempt_at_ms = Some(next_ms);
        let retry = Delivery {
            attempt: delivery.attempt + 1,
            ..delivery
        };
        if self.is_disabled(&retry.endpoint_id) {
            self.park(capability.clone(), &retry);
            return;
        }
        let pending = PendingDelivery::from_delivery(&retry, next_ms);
        self.emitted
            .push((capability.clone(), Attempted::Pending(pending)));
        if !self.context.stop.is_stopped() {
            // The feedback edge adds 1 ms, so the retry arrives at `next_ms`.
            let stamp = (next_ms - 1).max(*capability.time());
            self.emitted
                .push((capability.delayed(&stamp), Attempted::Retry(retry)));
        }
    }

    /// Feeds an attempt's result to its endpoint's health: a valid `Retry-After` pauses the
    /// endpoint, a 429 or timeout without one halves its budget, and the breaker and disable
    /// rules count the result. Returns the earliest time the delivery may be retried.
    fn observe_health(
        &mut self,
        endpoint_id: &str,
        row: &mut AttemptRow,
        capability: &Capability<u64>,
        now: Millis,
    ) -> Millis {
        let kind = row.error_kind.as_deref().and_then(ErrorKind::from_name);
        let policy = &self.context.health;
        let counters = &self.context.counters;
        let mut not_before = 0;

        // A `Retry-After` means "wait" only on a 429 or 5xx; on a 3xx it is no pause request.
        let pausing_status = matches!(row.http_status, Some(429 | 500..=599));
        let mut paused = false;
        if let (true, Some(value)) = (pausing_status, row.retry_after.as_deref()) {
            match parse_retry_after(value, now) {
                Some(until_ms) => {
                    let clamped = clamp_retry_after(
                        until_ms,
                        now,
                        policy.retry_after_min_ms,
                        policy.retry_after_max_ms,
                    );
                    if clamped < until_ms {
                        DeliverCounters::bump(&counters.retry_after_capped);
                    }
                    not_before = clamped;
                    paused = true;
                }
                None => DeliverCounters::bump(&counters.retry_after_invalid),
            }
        }
        if kind == Some(ErrorKind::Throttled) {
            DeliverCounters::bump(&counters.throttled);
        }
        let overloaded = kind.is_some_and(is_overload) && !paused;
        if overloaded {
            not_before = now.saturating_add(self.context.retry.penalty_floor_ms);
        }

        let signal = match kind {
            _ if row.outcome == Outcome::Delivered.as_str() => Signal::Delivered,
            Some(ErrorKind::Gone) => Signal::Gone,
            Some(ErrorKind::Throttled) => Signal::Throttled,
            _ if row.attempt == 0 => Signal::NotContacted,
            _ => Signal::Failed,
        };
        let budget = self.budget(endpoint_id);
        let health = self.health.entry(endpoint_id.to_string()).or_default();
        if paused {
            health.pause_until(not_before);
        }
        if overloaded {
            health.overloaded();
        }
        let transition = health.record(signal, now, budget, &self.context.health);
        let shift = health.budget_shift();
        if let Some(limiter) = self
            .endpoints
            .get_mut(endpoint_id)
            .and_then(|state| state.limiter.as_mut())
        {
            limiter.set_budget_shift(shift);
        }

        match transition {
            Some(Transition::BreakerOpened {
                until_ms,
                failures,
                attempts,
            }) => {
                DeliverCounters::bump(&self.context.counters.breakers_opened);
                DeliverCounters::set_member(
                    &self.context.counters.open_breakers,
                    endpoint_id,
                    true,
                );
                tracing::warn!(
                    endpoint_id = %endpoint_id,
                    failures,
                    attempts,
                    probe_in_ms = until_ms.saturating_sub(now),
                    "Circuit breaker opened; the endpoint's deliveries wait for a probe."
                );
                self.emitted.push((
                    capability.clone(),
                    Attempted::BreakerOpened(BreakerOpened {
                        endpoint_id: endpoint_id.to_string(),
                        tenant: self.tenant_of(endpoint_id),
                        at_ms: now,
                        until_ms,
                        failures,
                        attempts,
                    }),
                ));
            }
            Some(Transition::BreakerClosed) => {
                DeliverCounters::bump(&self.context.counters.breakers_closed);
                DeliverCounters::set_member(
                    &self.context.counters.open_breakers,
                    endpoint_id,
                    false,
                );
                tracing::info!(
                    endpoint_id = %endpoint_id,
                    "Probe delivered; circuit breaker closed."
                );
            }
            Some(Transition::Disable { reason }) => {
                let note = format!("endpoint disabled: {reason}");
                row.error_message = Some(match row.error_message.take() {
                    Some(message) => format!("{message}; {note}"),
                    None => note,
                });
                self.disable(endpoint_id, reason, now, capability);
            }
            None => {}
        }
        not_before
    }

    /// Logs a failed attempt at WARN, at most once per endpoint every [`FAILURE_LOG_MS`],
    /// with the number of failures not logged since.
    fn log_failure(&mut self, row: &AttemptRow, now: Millis) {
        if row.outcome == Outcome::Delivered.as_str() {
            return;
        }
        let endpoint_id = row.endpoint_id.clone().unwrap_or_default();
        let (last_ms, unlogged) = self
            .failure_log
            .entry(endpoint_id.clone())
            .or_insert((0, 0));
        if now.saturating_sub(*last_ms) < FAILURE_LOG_MS && *last_ms != 0 {
            *unlogged += 1;
            return;
        }
        tracing::warn!(
            endpoint_id = %endpoint_id,
            event_id = row.event_id.as_deref().unwrap_or_default(),
            attempt = row.attempt,
            outcome = %row.outcome,
            error_kind = row.error_kind.as_deref().unwrap_or_default(),
            http_status = row.http_status.unwrap_or_default(),
            error = row.error_message.as_deref().unwrap_or_default(),
            unlogged_failures = *unlogged,
            "Delivery attempt failed."
        );
        *last_ms = now;
        *unlogged = 0;
    }

    /// Frees one of `endpoint_id`'s places, giving the endpoint a turn if it has waiting
    /// deliveries.
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
    /// its limit or empty, the worker-wide limit is reached, or too many results wait for
    /// their durable write.
    fn start_requests(&mut self, now: Millis) {
        // A retry whose payload cannot be read back frees its place again; go round until a
        // pass frees none.
        while self.start_round(now) > 0 {}
    }

    /// One pass of `start_requests`; returns how many places payload failures freed.
    fn start_round(&mut self, now: Millis) -> usize {
        if self.context.stop.is_stopped() {
            return 0;
        }
        let total_limit = self.context.max_in_flight_total.max(1);
        let mut starting: Vec<Starting> = Vec::new();

        loop {
            if self.in_flight.len() + starting.len() >= total_limit {
                break;
            }
            if self.context.unsynced_results.load(Ordering::SeqCst)
                > self.context.max_unsynced_results
            {
                // The durable sink runs right after this operator on the same worker.
                self.context.clock.wake_at(now + 1, &self.wakeup);
                break;
            }
            let Some(endpoint_id) = self.ready.pop_front() else {
                break;
            };
            let limit = self.in_flight_limit(&endpoint_id);
            let gate = self
                .health
                .get(&endpoint_id)
                .map(|health| (health.held_until(now), health.awaiting_probe()));
            let Some(state) = self.endpoints.get_mut(&endpoint_id) else {
                continue;
            };
            match gate {
                Some((Some(until_ms), _)) => {
                    // An open breaker or a pause: the queue waits, durably pending, for a
                    // wake-up at the hold's end.
                    state.ready = false;
                    self.hold(endpoint_id, until_ms);
                    continue;
                }
                Some((None, true)) => {
                    // The probe's result gives the endpoint its next turn.
                    state.ready = false;
                    continue;
                }
                _ => {}
            }
            let Some(waiting) = state.waiting.pop_front() else {
                state.ready = false;
                continue;
            };

            let decision = match state.limiter.as_mut() {
                Some(limiter) => limiter.start(waiting.slot_ms, now),
                None => StartDecision::Start,
            };
            let window_end_ms = state
                .limiter
                .as_ref()
                .map(|limiter| limiter.window_end(now));
            if let StartDecision::WaitUntil(slot_ms) = decision {
                // The window filled while this delivery waited for a place: it moves to the
                // next open window, and the endpoint's later deliveries keep their own slots.
                if state.waiting.is_empty() {
                    state.ready = false;
                } else {
                    self.ready.push_back(endpoint_id);
                }
                self.reschedule(waiting, slot_ms, now);
                continue;
            }

            let has_more = !state.waiting.is_empty();
            let due_at_ms = waiting.slot_ms;
            let expired = self.expired_row(&waiting.delivery, now);
            let capability = match waiting.held {
                Some(held) => held,
                None => match self.current.as_ref() {
                    Some(current) => current.delayed(&now.max(*current.time())),
                    None => {
                        tracing::error!(
                            "A pending delivery has no held capability; it stays pending."
                        );
                        continue;
                    }
                },
            };
            if let Some(row) = expired {
                self.emitted.push((capability, Attempted::Row(row)));
            } else {
                if let Some(health) = self.health.get_mut(&endpoint_id) {
                    if health.admit(now) == Admission::Probe {
                        tracing::info!(
                            endpoint_id = %endpoint_id,
                            "Circuit breaker half-open; sending one probe delivery."
                        );
                    }
                }
                if let Some(state) = self.endpoints.get_mut(&endpoint_id) {
                    state.in_flight += 1;
                }
                starting.push(Starting {
                    delivery: waiting.delivery,
                    capability,
                    due_at_ms,
                    window_end_ms,
                });
            }
            let in_flight = self
                .endpoints
                .get(&endpoint_id)
                .map_or(0, |state| state.in_flight);
            if has_more && in_flight < limit {
                self.ready.push_back(endpoint_id);
            } else if let Some(state) = self.endpoints.get_mut(&endpoint_id) {
                state.ready = false;
            }
        }

        let freed = self.load_payloads(&mut starting, now);
        for granted in starting {
            self.start(granted);
        }
        freed
    }

    /// Moves a waiting delivery to a later slot, recording it as pending first if it was not.
    fn reschedule(&mut self, waiting: Waiting, slot_ms: Millis, now: Millis) {
        let Waiting { delivery, held, .. } = waiting;
        let base = match held {
            Some(held) => {
                let pending = PendingDelivery::from_delivery(&delivery, slot_ms);
                self.emitted
                    .push((held.clone(), Attempted::Pending(pending)));
                held
            }
            // Already pending at an earlier due time: delaying it more needs no new write.
            None => match self.current.as_ref() {
                Some(current) => current.delayed(&now.max(*current.time())),
                None => {
                    tracing::error!("A pending delivery has no held capability; it stays pending.");
                    return;
                }
            },
        };
        let time = slot_ms.max(*base.time());
        self.schedule(&base, time, slot_ms, delivery);
    }

    /// Puts `delivery` in `scheduled` at `time`, under a capability delayed from `base` when
    /// `time` has none yet.
    // TODO: a scheduled retry keeps its whole `Delivery`, about 340 bytes of heap with its
    // strings and its map entry. Keeping only the source position, endpoint, generation and
    // attempt would cut that to under 100 bytes. The event would then be read back with the
    // payload when the retry is due, so `PayloadSource` would have to return the whole event.
    fn schedule(
        &mut self,
        base: &Capability<u64>,
        time: Millis,
        slot_ms: Millis,
        delivery: Delivery,
    ) {
        match self.scheduled.entry(time) {
            Entry::Occupied(mut entry) => entry.get_mut().1.push((slot_ms, delivery)),
            // Jitter gives almost every retry a time of its own, so most entries hold one
            // delivery for their whole life. `vec![..]` allocates room for exactly that one,
            // where a push onto an empty Vec would allocate room for four: three quarters of
            // the memory of every pending retry went to those empty places.
            Entry::Vacant(entry) => {
                entry.insert((base.delayed(&time), vec![(slot_ms, delivery)]));
            }
        }
    }

    /// Records every delivery still waiting with its own capability as pending, then lets
    /// `current` cover it, so that a slow endpoint's queue does not hold back the frontier.
    fn park_waiting(&mut self, now: Millis) {
        let mut parked: Vec<(Capability<u64>, PendingDelivery)> = Vec::new();
        for endpoint_id in self.unparked.drain() {
            // A restart resumes a held endpoint's queue no earlier than the hold's end.
            let held_until = self
                .health
                .get(&endpoint_id)
                .and_then(|health| health.held_until(now))
                .unwrap_or(now);
            let Some(state) = self.endpoints.get_mut(&endpoint_id) else {
                continue;
            };
            for waiting in state.waiting.iter_mut() {
                if let Some(held) = waiting.held.take() {
                    let due_ms = waiting.slot_ms.max(held_until);
                    parked.push((
                        held,
                        PendingDelivery::from_delivery(&waiting.delivery, due_ms),
                    ));
                }
            }
        }
        for (held, pending) in parked {
            self.hold_current(&held, now);
            self.emitted.push((held, Attempted::Pending(pending)));
        }
    }

    /// Builds the `expired` row of `delivery` if its event is older than the maximum event age.
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
    /// payload cannot be read is dead-lettered instead of started. Returns how many were.
    fn load_payloads(&mut self, starting: &mut Vec<Starting>, now: Millis) -> usize {
        let positions: Vec<(u32, u64)> = starting
            .iter()
            .map(|granted| &granted.delivery)
            .filter(|delivery| !delivery.has_payload())
            .map(|delivery| (delivery.ingested.partition, delivery.ingested.offset))
            .collect();
        if positions.is_empty() {
            return 0;
        }
        let mut fetched = self.payloads.fetch(&positions).into_iter();
        let mut failed = 0;

        let mut kept = Vec::with_capacity(starting.len());
        for mut granted in starting.drain(..) {
            if granted.delivery.has_payload() {
                kept.push(granted);
                continue;
            }
            match fetched.next() {
                Some(Ok(payload)) if !payload.is_empty() => {
                    granted.delivery.ingested.event.payload = payload;
                    kept.push(granted);
                }
                other => {
                    let Starting {
                        delivery,
                        capability,
                        ..
                    } = granted;
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
                    let kind = ErrorKind::PayloadExpired.as_str();
                    let row = dead_letter_row(&delivery, now, now, kind, message);
                    self.emitted.push((capability, Attempted::Row(row)));
                    self.release_place(&delivery.endpoint_id.clone());
                    failed += 1;
                }
            }
        }
        *starting = kept;
        failed
    }

    /// Spawns the request task of a granted start, holding its capability until its row is
    /// emitted.
    ///
    /// The rate-limit window is granted here, but the task reads its start time only when the
    /// runtime polls it. A task that runs after its window has ended sends nothing and hands
    /// the delivery back (see `collect_completions`), so no window starts more than its budget.
    fn start(&mut self, granted: Starting) {
        let Starting {
            delivery,
            capability,
            due_at_ms,
            window_end_ms,
        } = granted;
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        let mut stripped = delivery.clone();
        stripped.ingested.event.payload = Vec::new();
        self.in_flight.insert(
            ticket,
            InFlight {
                endpoint_id: delivery.endpoint_id.clone(),
                delivery: stripped,
                capability,
            },
        );
        self.context
            .requests_in_flight
            .fetch_add(1, Ordering::SeqCst);

        let completion = CompletionGuard {
            ticket,
            end: None,
            sender: self.sender.clone(),
            activator: Arc::clone(&self.activator),
        };
        let client = self.context.client.clone();
        // The endpoint as it is now: an update applied later affects the next attempt.
        let endpoint = self.directory.get(&delivery.endpoint_id).cloned();
        let clock = Arc::clone(&self.context.clock);
        self.context.runtime.spawn(async move {
            let end = match (endpoint.as_deref(), window_end_ms) {
                (Some(endpoint), Some(window_end_ms)) => client
                    .attempt_before(endpoint, &delivery, clock.as_ref(), window_end_ms)
                    .await
                    .map_or(TaskEnd::MissedWindow, |result| {
                        TaskEnd::Row(result.to_row(&delivery, due_at_ms))
                    }),
                (Some(endpoint), None) => {
                    let result = client.attempt(endpoint, &delivery, clock.as_ref()).await;
                    TaskEnd::Row(result.to_row(&delivery, due_at_ms))
                }
                (None, _) => {
                    TaskEnd::Row(vanished_endpoint_row(&delivery, due_at_ms, clock.now_ms()))
                }
            };
            completion.finish(end);
        });
    }

    /// Moves `current` up to `now`, drops it when nothing needs it, forgets idle endpoints,
    /// and asks the clock to wake the operator when it next has something to do.
    fn refresh_hold(&mut self, now: Millis) {
        if self.context.stop.is_stopped() {
            // Every waiting or scheduled delivery is durably pending by now (`park_waiting`
            // ran first), so the next run resumes it.
            let mut left: usize = self
                .scheduled
                .values()
                .map(|(_, deliveries)| deliveries.len())
                .sum();
            self.scheduled.clear();
            for state in self.endpoints.values_mut() {
                left += state.waiting.len();
                state.waiting.clear();
            }
            if left > 0 {
                tracing::info!(
                    deliveries = left,
                    "Stopping; waiting deliveries stay pending for the next run."
                );
            }
        }

        let waiting = self
            .endpoints
            .values()
            .any(|state| !state.waiting.is_empty());
        if waiting {
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
        let policy = &self.context.health;
        self.health
            .retain(|_, health| !health.is_settled(now, policy));
        if let Some(next) = self.scheduled.keys().next() {
            self.context.clock.wake_at(*next, &self.wakeup);
        }
        if let Some(next) = self.holds.keys().next() {
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

/// Reports a request task's end to the operator when dropped: how it finished, or
/// [`TaskEnd::Lost`] when the task was cancelled or panicked.
struct CompletionGuard {
    ticket: u64,
    end: Option<TaskEnd>,
    sender: Sender<Completion>,
    activator: Arc<SyncActivator>,
}

impl CompletionGuard {
    /// Reports how the task ended.
    fn finish(mut self, end: TaskEnd) {
        self.end = Some(end);
    }
}

impl Drop for CompletionGuard {
    fn drop(&mut self) {
        let completion = Completion {
            ticket: self.ticket,
            end: self.end.take().unwrap_or(TaskEnd::Lost),
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
    fn owner_matches_the_exchange() {
        use timely::dataflow::operators::{Exchange as _, Inspect, ToStream};

        for workers in [3, 4] {
            let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
            let sink = Arc::clone(&seen);
            timely::execute(timely::Config::process(workers), move |worker| {
                let index = worker.index();
                let peers = worker.peers();
                let sink = Arc::clone(&sink);
                worker.dataflow::<u64, _, _>(|scope| {
                    let ids: Vec<String> = if index == 0 {
                        (0..40).map(|n| format!("ep_{n}")).collect()
                    } else {
                        Vec::new()
                    };
                    ids.to_stream(scope)
                        .container::<Vec<String>>()
                        .exchange(|id: &String| endpoint_hash(id))
                        .inspect(move |id: &String| {
                            let owner = Owner { index, peers };
                            sink.lock()
                                .expect("lock")
                                .push((id.clone(), owner.owns(id)));
                        });
                });
            })
            .expect("timely");
            let seen = seen.lock().expect("lock");
            assert_eq!(seen.len(), 40, "{workers} workers");
            for (id, owned) in seen.iter() {
                assert!(
                    owned,
                    "{workers} workers: {id} reached a worker that does not own it"
                );
            }
        }
    }

    #[test]
    fn endpoint_hash_is_fixed() {
        // FNV-1a test vectors; a change here moves endpoints between workers.
        assert_eq!(endpoint_hash(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(endpoint_hash("a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(endpoint_hash("foobar"), 0x8594_4171_f739_67e8);
    }
}
