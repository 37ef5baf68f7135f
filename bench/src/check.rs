//! Accounting: checks that every delivery a scenario expects shows up exactly as expected in
//! the attempt archive and at the receiver, so that a figure is never taken from a run that
//! lost or misrouted deliveries.

use std::collections::{BTreeMap, HashMap};

use hookflow_schemas::AttemptRow;
use serde::{Deserialize, Serialize};

use crate::receiver::{Arrival, Mode};

/// Problems listed one by one before the rest are only counted.
const MAX_LISTED: usize = 5;

/// The deliveries a scenario expects.
#[derive(Debug, Clone, Default)]
pub struct Expected {
    /// Every delivery as (event number, endpoint number, the receiver's behaviour).
    pub deliveries: Vec<(u64, u32, Mode)>,
    /// Events that no endpoint subscribes to.
    pub unrouted_events: usize,
    /// Whether the run stops while every delivery waits for its second attempt, so each must
    /// have exactly one `failed` row with a next attempt time and no final row.
    pub waiting_for_retry: bool,
    /// Whether the run stops once the healthy deliveries are done, so a delivery to a failing
    /// or hanging endpoint may still be pending (its breaker holds it): it needs at most one
    /// final row rather than exactly one.
    pub unhealthy_may_be_pending: bool,
}

/// The counts and problems found in the archive and at the receiver.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Tally {
    /// Archive rows per outcome.
    pub outcomes: BTreeMap<String, usize>,
    /// Deliveries that got a 200 response more than once.
    pub duplicates: usize,
    /// Everything that differs from the expectation; empty when all is accounted for.
    pub problems: Vec<String>,
}

/// The rows and requests seen for one (event, endpoint) delivery.
#[derive(Debug, Default)]
struct Seen {
    mode: Option<Mode>,
    final_rows: usize,
    wrong_outcome: Option<String>,
    failed_rows_with_retry: usize,
    received_ok: usize,
    received_any: usize,
}

/// Compares `rows` and `arrivals` with `expected`.
pub fn check(expected: &Expected, rows: &[AttemptRow], arrivals: &[Arrival]) -> Tally {
    let mut tally = Tally::default();
    let mut problems = Problems::default();
    let mut seen: HashMap<(u64, u32), Seen> = HashMap::with_capacity(expected.deliveries.len());
    for (event, endpoint, mode) in &expected.deliveries {
        seen.entry((*event, *endpoint)).or_default().mode = Some(*mode);
    }

    let mut unrouted = 0usize;
    for row in rows {
        *tally.outcomes.entry(row.outcome.clone()).or_default() += 1;
        match row.outcome.as_str() {
            "unrouted" => {
                unrouted += 1;
                continue;
            }
            "invalid" => {
                problems.push(format!("invalid record at offset {}", row.offset));
                continue;
            }
            _ => {}
        }
        let key = match (parse_event(row), parse_endpoint(row)) {
            (Some(event), Some(endpoint)) => (event, endpoint),
            _ => {
                problems.push(format!(
                    "row with unexpected ids {:?} / {:?}",
                    row.event_id, row.endpoint_id
                ));
                continue;
            }
        };
        let entry = seen.entry(key).or_default();
        if row.outcome == "failed" {
            if row.next_attempt_at_ms.is_some() {
                entry.failed_rows_with_retry += 1;
            }
            continue;
        }
        entry.final_rows += 1;
        let expected_outcome = match entry.mode {
            Some(Mode::Ok) => "delivered",
            _ => "dead_lettered",
        };
        if row.outcome != expected_outcome {
            entry.wrong_outcome = Some(row.outcome.clone());
        }
    }
    if unrouted != expected.unrouted_events {
        problems.push(format!(
            "{unrouted} unrouted rows, expected {}",
            expected.unrouted_events
        ));
    }

    for arrival in arrivals {
        let entry = seen.entry((arrival.event, arrival.endpoint)).or_default();
        entry.received_any += 1;
        if arrival.status == 200 {
            entry.received_ok += 1;
        }
    }

    let mut keys: Vec<&(u64, u32)> = seen.keys().collect();
    keys.sort_unstable();
    for key @ (event, endpoint) in keys {
        let entry = &seen[key];
        let name = format!("evt_{event} to ep{endpoint}");
        let Some(mode) = entry.mode else {
            problems.push(format!("{name} was not expected but has rows or requests"));
            continue;
        };
        if expected.waiting_for_retry {
            if entry.failed_rows_with_retry != 1 || entry.final_rows != 0 {
                problems.push(format!(
                    "{name}: {} failed rows with a retry and {} final rows, expected 1 and 0",
                    entry.failed_rows_with_retry, entry.final_rows
                ));
            }
            if entry.received_any != 1 {
                problems.push(format!(
                    "{name}: {} requests, expected 1",
                    entry.received_any
                ));
            }
            continue;
        }
        let pending_allowed =
            expected.unhealthy_may_be_pending && matches!(mode, Mode::Fail | Mode::Hang);
        if entry.final_rows > 1 || (entry.final_rows == 0 && !pending_allowed) {
            problems.push(format!(
                "{name}: {} final rows, expected 1",
                entry.final_rows
            ));
        }
        if let Some(outcome) = &entry.wrong_outcome {
            problems.push(format!("{name}: outcome {outcome}"));
        }
        match mode {
            Mode::Ok if entry.received_ok == 0 => {
                problems.push(format!("{name}: the receiver never answered 200"));
            }
            Mode::Ok => tally.duplicates += entry.received_ok - 1,
            Mode::Fail | Mode::Hang if entry.received_ok > 0 => {
                problems.push(format!("{name}: an unhealthy endpoint answered 200"));
            }
            Mode::Fail | Mode::Hang => {}
        }
    }
    tally.problems = problems.finish();
    tally
}

fn parse_event(row: &AttemptRow) -> Option<u64> {
    row.event_id.as_deref()?.strip_prefix("evt_")?.parse().ok()
}

fn parse_endpoint(row: &AttemptRow) -> Option<u32> {
    row.endpoint_id.as_deref()?.strip_prefix("ep")?.parse().ok()
}

/// Problem messages, the first few in full and the rest counted.
#[derive(Default)]
struct Problems {
    listed: Vec<String>,
    more: usize,
}

impl Problems {
    fn push(&mut self, message: String) {
        if self.listed.len() < MAX_LISTED {
            self.listed.push(message);
        } else {
            self.more += 1;
        }
    }

    fn finish(mut self) -> Vec<String> {
        if self.more > 0 {
            self.listed.push(format!("and {} more problems", self.more));
        }
        self.listed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(event: u64, endpoint: u32, outcome: &str) -> AttemptRow {
        AttemptRow {
            event_id: Some(format!("evt_{event}")),
            endpoint_id: Some(format!("ep{endpoint}")),
            outcome: outcome.to_string(),
            ..AttemptRow::default()
        }
    }

    fn arrival(event: u64, endpoint: u32, status: u16) -> Arrival {
        Arrival {
            event,
            endpoint,
            status,
            received_us: 0,
        }
    }

    fn expected() -> Expected {
        Expected {
            deliveries: vec![(0, 1, Mode::Ok), (0, 2, Mode::Fail), (1, 1, Mode::Ok)],
            unrouted_events: 1,
            waiting_for_retry: false,
            unhealthy_may_be_pending: false,
        }
    }

    fn complete_rows() -> Vec<AttemptRow> {
        let mut unrouted = row(2, 0, "unrouted");
        unrouted.endpoint_id = None;
        vec![
            row(0, 1, "delivered"),
            row(0, 2, "failed"),
            row(0, 2, "dead_lettered"),
            row(1, 1, "delivered"),
            unrouted,
        ]
    }

    fn complete_arrivals() -> Vec<Arrival> {
        vec![
            arrival(0, 1, 200),
            arrival(0, 2, 503),
            arrival(0, 2, 503),
            arrival(1, 1, 200),
        ]
    }

    #[test]
    fn complete_run_has_no_problems() {
        let tally = check(&expected(), &complete_rows(), &complete_arrivals());
        assert_eq!(tally.problems, Vec::<String>::new());
        assert_eq!(tally.outcomes["delivered"], 2);
        assert_eq!(tally.outcomes["dead_lettered"], 1);
        assert_eq!(tally.duplicates, 0);
    }

    #[test]
    fn missing_row_is_a_problem() {
        let mut rows = complete_rows();
        rows.remove(3);
        let tally = check(&expected(), &rows, &complete_arrivals());
        assert_eq!(
            tally.problems,
            vec!["evt_1 to ep1: 0 final rows, expected 1"]
        );
    }

    #[test]
    fn missing_arrival_is_a_problem() {
        let mut arrivals = complete_arrivals();
        arrivals.pop();
        let tally = check(&expected(), &complete_rows(), &arrivals);
        assert_eq!(
            tally.problems,
            vec!["evt_1 to ep1: the receiver never answered 200"]
        );
    }

    #[test]
    fn wrong_outcome_is_a_problem() {
        let mut rows = complete_rows();
        rows[2].outcome = "delivered".to_string();
        let tally = check(&expected(), &rows, &complete_arrivals());
        assert_eq!(tally.problems, vec!["evt_0 to ep2: outcome delivered"]);
    }

    #[test]
    fn unexpected_delivery_is_a_problem() {
        let mut rows = complete_rows();
        rows.push(row(1, 2, "delivered"));
        let tally = check(&expected(), &rows, &complete_arrivals());
        assert_eq!(
            tally.problems,
            vec!["evt_1 to ep2 was not expected but has rows or requests"]
        );
    }

    #[test]
    fn duplicate_arrival_is_counted_not_a_problem() {
        let mut arrivals = complete_arrivals();
        arrivals.push(arrival(0, 1, 200));
        let tally = check(&expected(), &complete_rows(), &arrivals);
        assert!(tally.problems.is_empty());
        assert_eq!(tally.duplicates, 1);
    }

    #[test]
    fn unrouted_count_must_match() {
        let mut rows = complete_rows();
        rows.pop();
        let tally = check(&expected(), &rows, &complete_arrivals());
        assert_eq!(tally.problems, vec!["0 unrouted rows, expected 1"]);
    }

    #[test]
    fn waiting_for_retry_needs_one_failed_row_each() {
        let expected = Expected {
            deliveries: vec![(0, 0, Mode::Fail), (1, 0, Mode::Fail)],
            unrouted_events: 0,
            waiting_for_retry: true,
            unhealthy_may_be_pending: false,
        };
        let mut failed = row(0, 0, "failed");
        failed.next_attempt_at_ms = Some(1);
        let arrivals = [arrival(0, 0, 503), arrival(1, 0, 503)];
        let tally = check(&expected, &[failed.clone()], &arrivals);
        assert_eq!(
            tally.problems,
            vec!["evt_1 to ep0: 0 failed rows with a retry and 0 final rows, expected 1 and 0"]
        );
        let mut second = failed;
        second.event_id = Some("evt_1".to_string());
        let rows = [row(0, 0, "failed"), second];
        let tally = check(&expected, &rows, &arrivals);
        assert_eq!(tally.problems.len(), 1, "{:?}", tally.problems);
    }

    #[test]
    fn unhealthy_delivery_may_stay_pending_only_when_allowed() {
        let mut rows = complete_rows();
        rows.remove(2);
        let tally = check(&expected(), &rows, &complete_arrivals());
        assert_eq!(
            tally.problems,
            vec!["evt_0 to ep2: 0 final rows, expected 1"]
        );
        let allowed = Expected {
            unhealthy_may_be_pending: true,
            ..expected()
        };
        let tally = check(&allowed, &rows, &complete_arrivals());
        assert_eq!(tally.problems, Vec::<String>::new());

        // A healthy delivery must still be final, and no delivery may be final twice.
        let mut rows = complete_rows();
        rows.remove(3);
        rows.push(row(0, 2, "dead_lettered"));
        let tally = check(&allowed, &rows, &complete_arrivals());
        assert_eq!(
            tally.problems,
            vec![
                "evt_0 to ep2: 2 final rows, expected 1",
                "evt_1 to ep1: 0 final rows, expected 1"
            ]
        );
    }

    #[test]
    fn long_problem_lists_are_cut() {
        let expected = Expected {
            deliveries: (0..20).map(|event| (event, 0, Mode::Ok)).collect(),
            ..Expected::default()
        };
        let tally = check(&expected, &[], &[]);
        assert_eq!(tally.problems.len(), MAX_LISTED + 1);
        assert_eq!(tally.problems[MAX_LISTED], "and 35 more problems");
    }
}
