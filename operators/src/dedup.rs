//! Dedup: keeps the first occurrence of each (tenant, event id) within a retention window.
//!
//! In: ingested events at the time the pipeline read them. Out: the same events, less every
//! later occurrence of a (tenant, id) already seen within the window. The input is exchanged by
//! tenant, so one worker decides all of a tenant's events.
//!
//! State, per worker: a first-seen index from (tenant, id) to the time and source position of
//! the first occurrence, plus a queue of expiries in first-seen order. An entry is pruned once
//! the input frontier passes its first-seen time plus the retention; events wait in a stash
//! keyed by time until the input frontier passes that time.
//!
//! # Contract
//!
//! * Decisions are made one timestamp at a time, in time order, and within a timestamp in
//!   (partition, offset) order, so the same input gives the same decisions whatever the
//!   batching or the worker count.
//! * A record at the same (partition, offset) as the first occurrence passes again: that is a
//!   re-read of the record that won (after a restart), not a duplicate.
//! * A replay record is keyed by its [`Event::dedup_id`](hookflow_schemas::Event::dedup_id),
//!   (tenant, id, replay id, generation): it passes beside the original event, once per replay
//!   run, and a copy that an interrupted replay appended again is dropped like any repeat.
//! * Differential's `reduce` would not do here: when the first occurrence aged out of the
//!   window, the reduction would promote a later duplicate still inside it and deliver it.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use differential_dataflow::Hashable;
use hookflow_schemas::{FirstSeen, IngestedEvent, Millis};
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::Capability;
use timely::dataflow::Stream;

/// Where and when a (tenant, id) was first seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seen {
    at_ms: Millis,
    partition: u32,
    offset: u64,
}

/// The first-seen index of one worker, with retention.
#[derive(Debug)]
pub struct DedupIndex {
    retention_ms: u64,
    first_seen: HashMap<(String, String), Seen>,
    /// (expiry time, key) in first-seen order; times are non-decreasing because events are
    /// admitted in time order.
    expiries: VecDeque<(Millis, (String, String))>,
}

impl DedupIndex {
    /// Creates an empty index that forgets a (tenant, id) `retention_ms` after it was first seen.
    pub fn new(retention_ms: u64) -> Self {
        DedupIndex {
            retention_ms,
            first_seen: HashMap::new(),
            expiries: VecDeque::new(),
        }
    }

    /// Decides whether `event`, read at `now_ms`, is the first occurrence of its (tenant, id)
    /// within the window, recording it if so.
    pub fn admit(&mut self, event: &IngestedEvent, now_ms: Millis) -> bool {
        let key = (event.event.tenant.clone(), event.event.dedup_id());
        let seen = Seen {
            at_ms: now_ms,
            partition: event.partition,
            offset: event.offset,
        };

        if let Some(first) = self.first_seen.get(&key) {
            let expired = first.at_ms.saturating_add(self.retention_ms) <= now_ms;
            if !expired {
                return (first.partition, first.offset) == (event.partition, event.offset);
            }
        }

        let expires_at = now_ms.saturating_add(self.retention_ms);
        self.expiries.push_back((expires_at, key.clone()));
        self.first_seen.insert(key, seen);
        true
    }

    /// Remembers an occurrence from an earlier run.
    pub fn restore(&mut self, first: &FirstSeen) {
        let key = (first.tenant.clone(), first.event_id.clone());
        let expires_at = first.first_seen_ms.saturating_add(self.retention_ms);
        self.expiries.push_back((expires_at, key.clone()));
        self.first_seen.insert(
            key,
            Seen {
                at_ms: first.first_seen_ms,
                partition: first.partition,
                offset: first.offset,
            },
        );
    }

    /// Forgets every entry whose window closed at or before `now_ms`.
    pub fn prune(&mut self, now_ms: Millis) {
        while let Some((expires_at, _)) = self.expiries.front() {
            if *expires_at > now_ms {
                break;
            }
            let Some((expires_at, key)) = self.expiries.pop_front() else {
                break;
            };
            // The key may have been seen again after it expired; keep that newer entry.
            let stale = self
                .first_seen
                .get(&key)
                .is_some_and(|first| first.at_ms.saturating_add(self.retention_ms) == expires_at);
            if stale {
                self.first_seen.remove(&key);
            }
        }
    }

    /// The number of (tenant, id) pairs remembered.
    pub fn len(&self) -> usize {
        self.first_seen.len()
    }

    /// Returns whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.first_seen.is_empty()
    }
}

/// Settings of the dedup operator.
#[derive(Debug, Clone)]
pub struct DedupConfig {
    /// How long after its first occurrence a (tenant, id) is still recognised, in ms.
    pub retention_ms: u64,
    /// First occurrences remembered from earlier runs. Each worker keeps those of the
    /// tenants it owns and ignores the rest, so every worker may be given all of them.
    pub restored: Vec<FirstSeen>,
}

/// Removes repeated (tenant, id) events from a stream.
pub trait Dedup<'scope> {
    /// Keeps the first occurrence of each (tenant, id) within `config.retention_ms`, adding one
    /// to `duplicates` for every occurrence dropped.
    fn dedup(self, config: DedupConfig, duplicates: Arc<AtomicU64>) -> Self;
}

impl<'scope> Dedup<'scope> for Stream<'scope, u64, Vec<IngestedEvent>> {
    fn dedup(self, config: DedupConfig, duplicates: Arc<AtomicU64>) -> Self {
        let exchange = Exchange::new(|event: &IngestedEvent| event.event.tenant.hashed());

        let scope = self.scope();
        let (index, peers) = (scope.index(), scope.peers() as u64);
        self.unary_frontier(exchange, "Dedup", move |_capability, _info| {
            let mut dedup = DedupIndex::new(config.retention_ms);
            // Restored in first-seen order, as `expiries` requires.
            let mut restored = config.restored;
            restored.sort_by_key(|first| first.first_seen_ms);
            for first in restored
                .iter()
                .filter(|first| first.tenant.hashed() % peers == index as u64)
            {
                dedup.restore(first);
            }
            let mut index = dedup;
            // Events waiting for the input frontier to pass their time, keyed by that time.
            let mut stash: BTreeMap<u64, (Capability<u64>, Vec<IngestedEvent>)> = BTreeMap::new();

            move |(input, frontier), output| {
                input.for_each_stamp(|capability, containers| {
                    let Some(retained) = capability.retain_least(output.output_index()) else {
                        return;
                    };
                    let (_, events) = stash
                        .entry(*retained.time())
                        .or_insert_with(|| (retained.clone(), Vec::new()));
                    for container in containers {
                        events.append(container);
                    }
                });

                while let Some(entry) = stash.first_entry() {
                    let time = *entry.key();
                    if frontier.less_equal(&time) {
                        break;
                    }
                    let (capability, mut events) = entry.remove();
                    events.sort_by_key(|event| (event.partition, event.offset));

                    index.prune(time);
                    let mut session = output.session(&capability);
                    for event in events {
                        if index.admit(&event, time) {
                            session.give(event);
                        } else {
                            duplicates.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }

                if let Some(time) = frontier.frontier().first() {
                    index.prune(*time);
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hookflow_schemas::Event;

    fn event(tenant: &str, id: &str, partition: u32, offset: u64) -> IngestedEvent {
        IngestedEvent {
            partition,
            offset,
            appended_at_ms: None,
            read_at_ms: 0,
            event: Event {
                id: id.into(),
                tenant: tenant.into(),
                event_type: "t".into(),
                created_at: "2026-12-04T10:00:00Z".into(),
                payload: b"{}".to_vec(),
                replay: None,
            },
        }
    }

    #[test]
    fn index_keeps_first_occurrence() {
        let mut index = DedupIndex::new(1_000);
        assert!(index.admit(&event("a", "1", 0, 0), 10));
        assert!(
            !index.admit(&event("a", "1", 0, 5), 20),
            "same tenant and id is a duplicate"
        );
        assert!(
            index.admit(&event("b", "1", 1, 0), 20),
            "another tenant may reuse the id"
        );
        assert!(
            index.admit(&event("a", "1", 0, 0), 30),
            "a re-read of the first record passes"
        );
    }

    #[test]
    fn index_admits_replay_once_per_run() {
        let mut index = DedupIndex::new(1_000);
        assert!(index.admit(&event("a", "1", 0, 0), 10));
        let mut replay = event("a", "1", 0, 9);
        replay.event.replay = Some(hookflow_schemas::Replay {
            id: "rp".into(),
            generation: 1,
            endpoints: vec!["ep".into()],
            from_partition: Some(0),
            from_offset: Some(0),
        });
        assert!(
            index.admit(&replay, 20),
            "a replay is not a repeat of the original"
        );
        let mut appended_again = replay.clone();
        appended_again.offset = 10;
        assert!(
            !index.admit(&appended_again, 30),
            "the same replay run appended twice is a repeat"
        );
        assert!(
            index.admit(&replay, 40),
            "a re-read of the first replay record passes"
        );
    }

    #[test]
    fn index_forgets_after_retention() {
        let mut index = DedupIndex::new(1_000);
        assert!(index.admit(&event("a", "1", 0, 0), 0));
        assert!(!index.admit(&event("a", "1", 0, 1), 999));
        index.prune(1_000);
        assert!(index.is_empty());
        assert!(
            index.admit(&event("a", "1", 0, 2), 1_000),
            "window closed: a new first occurrence"
        );
    }

    #[test]
    fn prune_keeps_entries_seen_again_after_expiry() {
        let mut index = DedupIndex::new(100);
        assert!(index.admit(&event("a", "1", 0, 0), 0));
        assert!(
            index.admit(&event("a", "1", 0, 1), 150),
            "expired entry replaced"
        );
        index.prune(120);
        assert_eq!(
            index.len(),
            1,
            "the entry first seen at 150 is still inside its window"
        );
        assert!(!index.admit(&event("a", "1", 0, 2), 200));
    }
}
