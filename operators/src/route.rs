//! Route: fans each event out to the endpoints subscribed to it, by a lookup in the arranged
//! subscriptions as of the event's time (a half-join).
//!
//! In: deduplicated events, and the subscriptions as a differential collection of
//! `(tenant, Subscription)` arranged by tenant. Out: `Ok(delivery)` for each (event, subscribed
//! endpoint) and `Err(event)` for an event no endpoint subscribes to, so that the caller can
//! record it as unrouted. Events are exchanged by tenant to the worker that holds that tenant's
//! part of the arrangement; they are never arranged themselves.
//!
//! State: a stash of events keyed by time, each waiting until the arrangement is complete
//! through its time (the arrangement's frontier has passed it). The operator holds the
//! subscription trace's logical compaction at the least time it may still look up: its event
//! input frontier and its stash.
//!
//! # Contract
//!
//! * An event at time `t` sees exactly the subscriptions whose accumulated count at `t` is
//!   positive: a subscription added after `t` or retracted at or before `t` is not delivered.
//! * A subscription change never re-delivers events routed before it.
//! * An endpoint with several matching patterns gets one delivery per event.
//! * A replay record (an event with a `replay` mark) goes only to the endpoints its mark
//!   names that are subscribed as above, at the mark's generation. A named endpoint that is
//!   not subscribed is skipped, and a record left with none is unrouted. An endpoint created after
//!   the original event was published receives it this way (a backfill).

use std::collections::BTreeMap;

use differential_dataflow::operators::arrange::{Arranged, TraceAgent};
use differential_dataflow::trace::cursor::{cursor_list, Cursor};
use differential_dataflow::trace::implementations::ValSpine;
use differential_dataflow::trace::TraceReader;
use differential_dataflow::Hashable;
use hookflow_schemas::{Delivery, EventTypePattern, IngestedEvent};
use serde::{Deserialize, Serialize};
use timely::dataflow::channels::pact::{Exchange, Pipeline};
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::Capability;
use timely::dataflow::Stream;
use timely::progress::Antichain;

/// One endpoint's subscription, the value of the subscriptions collection keyed by tenant.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Subscription {
    /// The subscribed endpoint.
    pub endpoint_id: String,
    /// The event types it receives.
    pub event_types: Vec<EventTypePattern>,
}

impl Subscription {
    /// Returns whether the subscription covers `event_type`.
    pub fn matches(&self, event_type: &str) -> bool {
        self.event_types
            .iter()
            .any(|pattern| pattern.matches(event_type))
    }
}

/// The trace of the subscriptions arranged by tenant.
pub type SubscriptionTrace = TraceAgent<ValSpine<String, Subscription, u64, isize>>;

/// The result of routing one event: a delivery, or the event itself when nothing subscribes.
pub type Routed = Result<Delivery, IngestedEvent>;

/// Fans events out to subscribed endpoints.
pub trait Route<'scope> {
    /// Looks each event up in `subscriptions` as of its time; see the module documentation.
    fn route(
        self,
        subscriptions: Arranged<'scope, SubscriptionTrace>,
    ) -> Stream<'scope, u64, Vec<Routed>>;
}

impl<'scope> Route<'scope> for Stream<'scope, u64, Vec<IngestedEvent>> {
    fn route(
        self,
        subscriptions: Arranged<'scope, SubscriptionTrace>,
    ) -> Stream<'scope, u64, Vec<Routed>> {
        let mut trace = Some(subscriptions.trace);
        // The route reads the whole trace at once, so physical merging need not wait for it.
        if let Some(trace) = trace.as_mut() {
            trace.set_physical_compaction(Antichain::new().borrow());
        }
        // Must match the arrangement's own exchange, which hashes the key the same way.
        let exchange = Exchange::new(|event: &IngestedEvent| event.event.tenant.hashed());

        self.binary_frontier(
            subscriptions.stream,
            exchange,
            Pipeline,
            "Route",
            move |_capability, _info| {
                // Events waiting for the arrangement to be complete through their time.
                let mut stash: BTreeMap<u64, (Capability<u64>, Vec<IngestedEvent>)> =
                    BTreeMap::new();

                move |(events, events_frontier), (batches, batches_frontier), output| {
                    events.for_each_stamp(|capability, containers| {
                        let Some(retained) = capability.retain_least(output.output_index()) else {
                            return;
                        };
                        let (_, stashed) = stash
                            .entry(*retained.time())
                            .or_insert_with(|| (retained.clone(), Vec::new()));
                        for container in containers {
                            stashed.append(container);
                        }
                    });
                    // The batches themselves are read through the trace; this input only
                    // tells how far the arrangement is complete.
                    batches.for_each_stamp(|_, _| {});

                    if let Some(trace) = trace.as_mut() {
                        while let Some(entry) = stash.first_entry() {
                            let time = *entry.key();
                            if batches_frontier.less_equal(&time) {
                                break;
                            }
                            let (capability, mut stashed) = entry.remove();
                            stashed.sort_by(|a, b| a.event.tenant.cmp(&b.event.tenant));
                            let mut session = output.session(&capability);
                            lookup_all(trace, time, stashed, |routed| session.give(routed));
                        }

                        let mut compaction = Antichain::new();
                        for time in events_frontier.frontier().iter() {
                            compaction.insert(*time);
                        }
                        if let Some(time) = stash.keys().next() {
                            compaction.insert(*time);
                        }
                        trace.set_logical_compaction(compaction.borrow());
                    }

                    if events_frontier.is_empty() && stash.is_empty() {
                        trace = None;
                    }
                }
            },
        )
    }
}

/// Routes `events`, sorted by tenant, against the subscriptions accumulated up to `time`.
fn lookup_all(
    trace: &mut SubscriptionTrace,
    time: u64,
    events: Vec<IngestedEvent>,
    mut emit: impl FnMut(Routed),
) {
    let Some(batches) = trace.batches_through(Antichain::new().borrow()) else {
        // Only a trace compacted past every time returns nothing; then nothing subscribes.
        events.into_iter().for_each(|event| emit(Err(event)));
        return;
    };
    let (mut cursor, storage) = cursor_list(batches);

    let mut subscribed: Vec<Subscription> = Vec::new();
    let mut current_tenant: Option<String> = None;
    for event in events {
        if current_tenant.as_deref() != Some(event.event.tenant.as_str()) {
            subscribed.clear();
            cursor.rewind_keys(&storage);
            cursor.seek_key(&storage, &event.event.tenant);
            if cursor.get_key(&storage) == Some(&event.event.tenant) {
                while let Some(subscription) = cursor.get_val(&storage) {
                    let mut count = 0isize;
                    cursor.map_times(&storage, |t, diff| {
                        if *t <= time {
                            count += *diff;
                        }
                    });
                    if count > 0 {
                        subscribed.push(subscription.clone());
                    }
                    cursor.step_val(&storage);
                }
            }
            current_tenant = Some(event.event.tenant.clone());
        }

        // A replay record goes only to the endpoints it names, and to those only while they
        // belong to its tenant and subscribe to its type.
        let targets = event.event.replay.as_ref().map(|replay| &replay.endpoints);
        let generation = event
            .event
            .replay
            .as_ref()
            .map_or(0, |replay| replay.generation);
        let mut matched: Vec<&str> = subscribed
            .iter()
            .filter(|subscription| subscription.matches(&event.event.event_type))
            .filter(|subscription| {
                targets.is_none_or(|targets| targets.contains(&subscription.endpoint_id))
            })
            .map(|subscription| subscription.endpoint_id.as_str())
            .collect();
        matched.dedup();
        if matched.is_empty() {
            emit(Err(event));
            continue;
        }
        for endpoint_id in matched {
            emit(Ok(Delivery {
                endpoint_id: endpoint_id.to_string(),
                generation,
                attempt: 1,
                ingested: event.clone(),
            }));
        }
    }
}
