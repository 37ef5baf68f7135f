//! Filter pushdown over a real archive: ten days of Parquet files written by the pipeline's
//! own `ArchiveWriter`, with the original events in a real local log. A one-day selection
//! must open only that day's row groups (plus row groups holding replay rows) and still
//! select exactly the right events.

use std::path::Path;

use hookflow_connectors::{ArchiveOptions, ArchiveWriter, LocalLog, LocalLogOptions};
use hookflow_replay::config::ToolConfig;
use hookflow_replay::select::{build_plan, sha256_hex, OutcomeFilter, Selection};
use hookflow_replay::stats::{compute_stats, StatsQuery};
use hookflow_schemas::AttemptRow;

const DAYS: u64 = 10;
const EVENTS_PER_DAY: u64 = 2_000;
const ROWS_PER_GROUP: usize = 500;
/// 2026-01-01T00:00:00Z in ms.
const FIRST_DAY_MS: u64 = 1_767_225_600_000;
const DAY_MS: u64 = 86_400_000;
/// The day the tests select, and how many of its events a later replay already delivered.
const SELECTED_DAY: u64 = 5;
const ALREADY_REPLAYED: u64 = 100;

fn row(event_id: &str, position: (u32, u64), ingested_at_ms: u64, payload: &[u8]) -> AttemptRow {
    AttemptRow {
        event_id: Some(event_id.to_string()),
        tenant: Some("acme".into()),
        endpoint_id: Some("ep_a".into()),
        event_type: Some("charge.succeeded".into()),
        attempt: 1,
        partition: position.0,
        offset: position.1,
        ingested_at_ms: Some(ingested_at_ms),
        due_at_ms: ingested_at_ms,
        started_at_ms: Some(ingested_at_ms + 100),
        finished_at_ms: ingested_at_ms + 400,
        latency_ms: Some(300),
        outcome: "dead_lettered".into(),
        http_status: Some(500),
        error_kind: Some("http_status".into()),
        body_sha256: Some(sha256_hex(payload)),
        ..AttemptRow::default()
    }
}

/// Writes the log and the archive; returns the archive directory.
fn build_archive(data_dir: &Path) -> std::path::PathBuf {
    let mut log = LocalLog::open(data_dir, &LocalLogOptions::default()).expect("log");
    let archive = data_dir.join("archive");
    let mut options = ArchiveOptions::new(&archive, "w0");
    options.max_rows_per_row_group = ROWS_PER_GROUP;
    let mut writer = ArchiveWriter::new(options, FIRST_DAY_MS).expect("archive writer");

    let mut seq = 0u64;
    let mut replayed = Vec::new();
    for day in 0..DAYS {
        let mut lines = Vec::new();
        for n in 0..EVENTS_PER_DAY {
            let id = format!("evt_{day}_{n:05}");
            let payload = format!(r#"{{"day": {day}, "n": {n}}}"#);
            lines.push((id, payload));
        }
        let records: Vec<String> = lines
            .iter()
            .map(|(id, payload)| {
                format!(
                    r#"{{"id":"{id}","tenant":"acme","type":"charge.succeeded","created_at":"2026-01-01T00:00:00Z","payload":{payload}}}"#
                )
            })
            .collect();
        let pairs: Vec<(&[u8], &[u8])> = records
            .iter()
            .map(|r| (b"acme".as_slice(), r.as_bytes()))
            .collect();
        let positions = log
            .append(&pairs, FIRST_DAY_MS + day * DAY_MS)
            .expect("append");

        let rows: Vec<AttemptRow> = lines
            .iter()
            .zip(&positions)
            .enumerate()
            .map(|(n, ((id, payload), position))| {
                let at = FIRST_DAY_MS + day * DAY_MS + n as u64 * 40_000;
                row(id, *position, at, payload.as_bytes())
            })
            .collect();
        let mut rows = rows;
        if day == SELECTED_DAY {
            replayed = rows[..ALREADY_REPLAYED as usize].to_vec();
            // A record that did not decode keeps the id it carried; it is not an event.
            rows.push(AttemptRow {
                endpoint_id: None,
                offset: 999_999,
                outcome: "invalid".into(),
                error_kind: Some("invalid_field".into()),
                ..rows[0].clone()
            });
        }
        let first = seq + 1;
        seq += rows.len() as u64;
        writer
            .write_staged(first, seq, &rows, 0)
            .expect("write day");
    }

    // A replay three days later delivered the first events of the selected day.
    let replay_rows: Vec<AttemptRow> = replayed
        .into_iter()
        .map(|mut row| {
            row.generation = 1;
            row.replay_id = Some("earlier".into());
            row.finished_at_ms = FIRST_DAY_MS + (SELECTED_DAY + 3) * DAY_MS;
            row.ingested_at_ms = Some(row.finished_at_ms - 1_000);
            row.outcome = "delivered".into();
            row.http_status = Some(200);
            row.error_kind = None;
            row
        })
        .collect();
    writer
        .write_staged(seq + 1, seq + replay_rows.len() as u64, &replay_rows, 0)
        .expect("write replay rows");
    archive
}

#[test]
fn one_day_selection_reads_one_day() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let archive = build_archive(dir.path());
    let config = ToolConfig::parse(
        "[[endpoints]]\nid = \"ep_a\"\ntenant = \"acme\"\nurl = \"http://x\"\nevent_types = [\"*\"]\n",
        Path::new("test.toml"),
    )
    .expect("config");
    let mut log = LocalLog::open(dir.path(), &LocalLogOptions::default()).expect("log");
    let day_start = FIRST_DAY_MS + SELECTED_DAY * DAY_MS;
    let selection = Selection {
        since_ms: Some(day_start),
        until_ms: Some(day_start + DAY_MS - 1),
        outcome: Some(OutcomeFilter::Failed),
        ..Selection::default()
    };

    let plan = build_plan(&selection, &config, &archive, &mut log).expect("plan");

    let scan = plan.summary.scan;
    eprintln!("selection scan: {scan:?}");
    assert_eq!(plan.summary.events, EVENTS_PER_DAY - ALREADY_REPLAYED);
    assert_eq!(
        plan.summary.skipped.payload_gone, 0,
        "the invalid row is no event"
    );
    assert_eq!(plan.summary.skipped.payload_changed, 0);
    assert!(plan
        .items
        .iter()
        .all(|item| item.event_id.starts_with(&format!("evt_{SELECTED_DAY}_"))));
    assert_eq!(scan.files, DAYS as usize + 1);
    assert_eq!(
        scan.files_skipped_by_date, SELECTED_DAY as usize,
        "days before --since"
    );
    // The selected day also holds one invalid row.
    let groups_of_day = (EVENTS_PER_DAY as usize + 1).div_ceil(ROWS_PER_GROUP);
    assert_eq!(
        scan.row_groups_read,
        groups_of_day + 1,
        "the day's row groups and the replay rows' group"
    );
    assert_eq!(scan.rows_read, EVENTS_PER_DAY + 1 + ALREADY_REPLAYED);
    assert!(scan.bytes_read * 5 < scan.bytes_total, "{scan:?}");
}

#[test]
fn one_day_stats_read_one_day() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let archive = build_archive(dir.path());
    let day_start = FIRST_DAY_MS + SELECTED_DAY * DAY_MS;
    let query = StatsQuery {
        since_ms: Some(day_start),
        until_ms: Some(day_start + DAY_MS - 1),
        ..StatsQuery::default()
    };

    let report = compute_stats(&archive, &query).expect("stats");

    eprintln!("stats scan: {:?}", report.scan);
    assert_eq!(
        report.scan.files_skipped_by_date, DAYS as usize,
        "every other day's file"
    );
    assert_eq!(report.scan.rows_read, EVENTS_PER_DAY + 1);
    assert_eq!(report.invalid, 1);
    assert_eq!(report.endpoints.len(), 1);
    let endpoint = &report.endpoints[0];
    assert_eq!(endpoint.deliveries, EVENTS_PER_DAY);
    assert_eq!(endpoint.delivered, 0);
    assert_eq!(endpoint.latency_p50_ms, Some(300));
    assert_eq!(endpoint.first_failure_ms, Some(day_start + 400));
    assert_eq!(
        endpoint.top_error_kinds,
        vec![("http_status".to_string(), EVENTS_PER_DAY)]
    );
}

#[test]
fn event_id_list_prunes_row_groups() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let archive = build_archive(dir.path());
    let config = ToolConfig::parse(
        "[[endpoints]]\nid = \"ep_a\"\ntenant = \"acme\"\nurl = \"http://x\"\nevent_types = [\"*\"]\n",
        Path::new("test.toml"),
    )
    .expect("config");
    let mut log = LocalLog::open(dir.path(), &LocalLogOptions::default()).expect("log");
    let ids = [
        format!("evt_{SELECTED_DAY}_00150"),
        format!("evt_{SELECTED_DAY}_01999"),
    ];
    let selection = Selection {
        event_ids: Some(ids.iter().cloned().collect()),
        outcome: Some(OutcomeFilter::DeadLettered),
        ..Selection::default()
    };

    let plan = build_plan(&selection, &config, &archive, &mut log).expect("plan");

    let mut selected: Vec<&str> = plan.items.iter().map(|i| i.event_id.as_str()).collect();
    selected.sort_unstable();
    assert_eq!(selected, [ids[0].as_str(), ids[1].as_str()]);
    let scan = plan.summary.scan;
    eprintln!("event id scan: {scan:?}");
    assert_eq!(scan.files_skipped_by_date, 0);
    assert_eq!(
        scan.row_groups_read, 2,
        "only the two row groups whose id range holds an id"
    );
}
