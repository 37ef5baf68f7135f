//! Republishing: appends a run's planned items to the source as replay records, at a chosen
//! rate, recording progress in the ledger after each append.
//!
//! In: a ledger run and a [`ReplayTarget`] (the local log or a Fluvio topic). Out: replay
//! records on the source, which the running pipeline delivers. Progress goes to standard
//! error, as a progress bar on a terminal and as plain lines otherwise. State: none beyond the
//! ledger, so an interrupted run resumes from its first item still `planned`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hookflow_connectors::{ConnectorError, FluvioSource, LocalLog, Source};
use hookflow_schemas::{encode_replay_record, Millis, Replay};

use crate::ledger::{ItemStatus, Ledger};
use crate::select::{original_record, PayloadProblem};
use crate::{ReplayError, Result};

/// A source the tool can append replay records to and read original records from.
pub trait ReplayTarget: Source {
    /// Appends (key, value) records in one batch and returns each one's (partition, offset).
    ///
    /// # Errors
    ///
    /// Fails if nothing could be appended.
    fn append_records(
        &mut self,
        records: &[(&[u8], &[u8])],
        now_ms: Millis,
    ) -> std::result::Result<Vec<(u32, u64)>, ConnectorError>;
}

impl ReplayTarget for LocalLog {
    fn append_records(
        &mut self,
        records: &[(&[u8], &[u8])],
        now_ms: Millis,
    ) -> std::result::Result<Vec<(u32, u64)>, ConnectorError> {
        self.append(records, now_ms)
    }
}

impl ReplayTarget for FluvioSource {
    fn append_records(
        &mut self,
        records: &[(&[u8], &[u8])],
        _now_ms: Millis,
    ) -> std::result::Result<Vec<(u32, u64)>, ConnectorError> {
        self.produce(records)
    }
}

/// The form of progress output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressStyle {
    /// A bar with rate and ETA (standard error is a terminal).
    Bar,
    /// A plain line at most this often.
    Lines(Duration),
    /// Nothing.
    Quiet,
}

/// Settings of one republish session.
#[derive(Debug, Clone)]
pub struct RepublishOptions {
    /// Events appended per second, at most.
    pub rate_per_sec: f64,
    /// The form of progress output.
    pub progress: ProgressStyle,
    /// Set (by a signal handler) to stop after the current batch.
    pub stop: Arc<AtomicBool>,
}

/// The counts of one republish session.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RepublishReport {
    /// Events appended in this session.
    pub appended: u64,
    /// Events skipped because their original record left the log after planning.
    pub payload_gone: u64,
    /// Events still planned when the session stopped; 0 when the run finished.
    pub remaining: u64,
}

/// Appends the planned items of run `generation` to `target`, then marks the run finished.
///
/// Items are appended in batches small enough to keep to `rate_per_sec`; each batch is one
/// append and then one ledger transaction. When `stop` is set, the session ends after the
/// batch in progress and reports what remains.
///
/// # Errors
///
/// Fails if the ledger or the target fails, or if an original record no longer matches the
/// archive, because nothing is re-serialized in its place. Items not yet marked stay planned.
pub fn republish(
    ledger: &mut Ledger,
    generation: u32,
    target: &mut dyn ReplayTarget,
    options: &RepublishOptions,
    now_ms: &dyn Fn() -> Millis,
) -> Result<RepublishReport> {
    let run = ledger.run(generation)?.ok_or_else(|| {
        ReplayError::Invalid(format!(
            "the replay ledger has no run with generation {generation}"
        ))
    })?;
    let items = ledger.planned_items(generation)?;
    let total = run.items;
    let done_before = total - items.len() as u64;
    let rate = if options.rate_per_sec.is_finite() && options.rate_per_sec > 0.0 {
        options.rate_per_sec
    } else {
        f64::MAX
    };
    // About four batches a second, so the pace stays even without a transaction per event.
    let batch = ((rate / 4.0).floor() as usize).clamp(1, 500);
    let mut progress = Progress::new(options.progress, &run.replay_id, total, done_before);
    let mut report = RepublishReport::default();
    let started = Instant::now();
    let mut sent = 0u64;

    for chunk in items.chunks(batch) {
        if options.stop.load(Ordering::SeqCst) {
            break;
        }
        let mut records: Vec<(String, Vec<u8>, u64)> = Vec::with_capacity(chunk.len());
        let mut marks = Vec::with_capacity(chunk.len());
        for (seq, item) in chunk {
            match original_record(item, target)? {
                Ok(event) => {
                    let replay = Replay {
                        id: run.replay_id.clone(),
                        generation,
                        endpoints: item.endpoints.clone(),
                        from_partition: Some(item.partition),
                        from_offset: Some(item.offset),
                    };
                    records.push((
                        item.tenant.clone(),
                        encode_replay_record(&event, &replay),
                        *seq,
                    ));
                }
                Err(PayloadProblem::Gone) => {
                    report.payload_gone += 1;
                    marks.push((*seq, ItemStatus::PayloadGone, None));
                }
                Err(PayloadProblem::Changed(reason)) => {
                    return Err(ReplayError::Invalid(format!(
                        "replay {} stopped: {reason}; nothing was re-serialized in its place",
                        run.replay_id
                    )));
                }
            }
        }
        let pairs: Vec<(&[u8], &[u8])> = records
            .iter()
            .map(|(tenant, value, _)| (tenant.as_bytes(), value.as_slice()))
            .collect();
        let positions = target.append_records(&pairs, now_ms())?;
        for ((_, _, seq), position) in records.iter().zip(positions) {
            marks.push((*seq, ItemStatus::Appended, Some(position)));
        }
        ledger.mark(generation, &marks)?;
        report.appended += records.len() as u64;
        sent += chunk.len() as u64;
        progress.advance(chunk.len() as u64);

        // Sleep until this many events are due at the rate, waking often enough to stop.
        let due = Duration::from_secs_f64(sent as f64 / rate);
        while started.elapsed() < due && !options.stop.load(Ordering::SeqCst) {
            std::thread::sleep((due - started.elapsed()).min(Duration::from_millis(50)));
        }
    }

    report.remaining = ledger.planned_items(generation)?.len() as u64;
    if report.remaining == 0 {
        ledger.finish(generation, now_ms())?;
    }
    progress.finish();
    Ok(report)
}

/// Progress output: an indicatif bar, or plain lines for logs and pipes.
struct Progress {
    style: ProgressStyle,
    bar: Option<indicatif::ProgressBar>,
    replay_id: String,
    total: u64,
    position: u64,
    started: Instant,
    done_before: u64,
    last_line: Instant,
}

impl Progress {
    fn new(style: ProgressStyle, replay_id: &str, total: u64, done_before: u64) -> Self {
        let bar = (style == ProgressStyle::Bar).then(|| {
            let bar = indicatif::ProgressBar::new(total);
            let template = "{prefix} [{bar:30}] {pos}/{len} events, {per_sec}, ETA {eta}";
            if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_prefix(format!("replay {replay_id}"));
            bar.set_position(done_before);
            bar
        });
        Progress {
            style,
            bar,
            replay_id: replay_id.to_string(),
            total,
            position: done_before,
            started: Instant::now(),
            done_before,
            last_line: Instant::now(),
        }
    }

    fn advance(&mut self, count: u64) {
        self.position += count;
        if let Some(bar) = &self.bar {
            bar.set_position(self.position);
        }
        if let ProgressStyle::Lines(every) = self.style {
            if self.last_line.elapsed() >= every {
                self.last_line = Instant::now();
                eprintln!("{}", self.line());
            }
        }
    }

    /// `replay rp: 120/400 events (30%), 40.0 events/s, ETA 7 s`.
    fn line(&self) -> String {
        let elapsed = self.started.elapsed().as_secs_f64();
        let sent = self.position - self.done_before;
        let rate = if elapsed > 0.0 {
            sent as f64 / elapsed
        } else {
            0.0
        };
        let left = self.total.saturating_sub(self.position);
        let eta = if rate > 0.0 {
            format!("{:.0} s", left as f64 / rate)
        } else {
            "unknown".to_string()
        };
        let percent = (self.position * 100).checked_div(self.total).unwrap_or(100);
        format!(
            "replay {}: {}/{} events ({percent}%), {rate:.1} events/s, ETA {eta}",
            self.replay_id, self.position, self.total
        )
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish();
        }
        if matches!(self.style, ProgressStyle::Lines(_)) {
            eprintln!("{}", self.line());
        }
    }
}
