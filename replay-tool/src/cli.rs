//! The `replay` and `stats` commands, shared by `hookflow replay`/`hookflow stats` and the
//! `hookflow-replay` binary so that both spell and behave the same.

use std::collections::BTreeSet;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use hookflow_connectors::{FluvioSource, LocalLog, LocalLogOptions, SourceStatus};
use hookflow_schemas::{format_millis, Millis};

use crate::config::ToolConfig;
use crate::ledger::{Ledger, Run};
use crate::republish::{republish, ProgressStyle, ReplayTarget, RepublishOptions};
use crate::select::{build_plan, OutcomeFilter, Selection};
use crate::stats::{compute_stats, StatsQuery};
use crate::timespec::parse_time;

/// Writes `text` to standard output. A reader that closed the pipe (`| head`) ends the output
/// quietly, where `print!` would panic.
fn write_out(text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        result => result.context("cannot write to standard output"),
    }
}

/// `print!` through [`write_out`].
macro_rules! out {
    ($($arg:tt)*) => { write_out(&format!($($arg)*)) };
}

/// `println!` through [`write_out`].
macro_rules! outln {
    ($($arg:tt)*) => { write_out(&format!("{}\n", format_args!($($arg)*))) };
}

/// `replay`: select archived deliveries or events and republish them.
#[derive(Debug, Clone, clap::Args)]
pub struct ReplayArgs {
    /// The data directory of the local log, the archive and the replay ledger.
    #[arg(long, value_name = "DIR")]
    pub data_dir: PathBuf,
    /// The pipeline's configuration file; replay reads its endpoints and archive directory.
    #[arg(long, value_name = "FILE", required_unless_present = "list")]
    pub config: Option<PathBuf>,
    /// Events appended at or after this time: RFC 3339, a UTC date, or a duration before now
    /// (90s, 30m, 24h, 7d).
    #[arg(long, value_name = "TIME")]
    pub since: Option<String>,
    /// Events appended at or before this time (same forms as --since).
    #[arg(long, value_name = "TIME")]
    pub until: Option<String>,
    /// Only this tenant's events.
    #[arg(long, value_name = "TENANT")]
    pub tenant: Option<String>,
    /// Only deliveries to this endpoint (with --to-endpoint: events that had one).
    #[arg(long, value_name = "ID")]
    pub endpoint: Option<String>,
    /// Only events whose type matches: `*`, `prefix.*` or an exact type.
    #[arg(long, value_name = "PATTERN")]
    pub event_type: Option<String>,
    /// Only deliveries whose latest generation ended so; `failed` is dead-lettered or expired.
    #[arg(long, value_enum, value_name = "OUTCOME")]
    pub outcome: Option<OutcomeFilter>,
    /// Only the event ids listed in this file, one per line.
    #[arg(long, value_name = "FILE")]
    pub event_ids: Option<PathBuf>,
    /// Backfill: send every selected event of this endpoint's tenant and types to it, instead
    /// of redelivering to the endpoints the events went to.
    #[arg(long, value_name = "ID")]
    pub to_endpoint: Option<String>,
    /// Name of the replay; default `rp-<UTC time>`. A finished replay is not run again unless
    /// --force is given.
    #[arg(long, value_name = "ID")]
    pub id: Option<String>,
    /// Print what the selection covers, per endpoint with samples, and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// With --dry-run or --list, print JSON.
    #[arg(long)]
    pub json: bool,
    /// Events appended per second, at most.
    #[arg(long, value_name = "EVENTS_PER_SEC", default_value_t = 100.0)]
    pub rate: f64,
    /// Run a replay again as a new generation, even if it or the same selection ran before.
    #[arg(long)]
    pub force: bool,
    /// Continue the unfinished run of this replay where it stopped.
    #[arg(long, value_name = "ID", conflicts_with_all = ["since", "until", "tenant", "endpoint", "event_type", "outcome", "event_ids", "to_endpoint", "id", "dry_run", "force"])]
    pub resume: Option<String>,
    /// List the replays in the ledger and exit.
    #[arg(long, conflicts_with_all = ["resume", "dry_run", "force"])]
    pub list: bool,
}

/// `stats`: per-endpoint figures over the attempt archive.
#[derive(Debug, Clone, clap::Args)]
pub struct StatsArgs {
    /// The data directory whose archive is read.
    #[arg(long, value_name = "DIR", required_unless_present = "archive")]
    pub data_dir: Option<PathBuf>,
    /// The pipeline's configuration file, for a non-default archive directory.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The archive directory itself, in place of --data-dir.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["data_dir", "config"])]
    pub archive: Option<PathBuf>,
    /// Rows finished at or after this time: RFC 3339, a UTC date, or a duration before now.
    #[arg(long, value_name = "TIME")]
    pub since: Option<String>,
    /// Rows finished at or before this time (same forms as --since).
    #[arg(long, value_name = "TIME")]
    pub until: Option<String>,
    /// Only this tenant.
    #[arg(long, value_name = "TENANT")]
    pub tenant: Option<String>,
    /// Only this endpoint.
    #[arg(long, value_name = "ID")]
    pub endpoint: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

fn now_ms() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Runs `stats`, printing the table or JSON to standard output.
///
/// # Errors
///
/// Fails on a bad time or an unreadable archive or config.
pub fn run_stats(args: &StatsArgs) -> anyhow::Result<()> {
    let now = now_ms();
    let archive = match (&args.archive, &args.data_dir) {
        (Some(archive), _) => archive.clone(),
        (None, Some(data_dir)) => match &args.config {
            Some(config) => ToolConfig::load(config)?.archive_dir(data_dir),
            None => data_dir.join("archive"),
        },
        (None, None) => bail!("give --data-dir or --archive"),
    };
    let query = StatsQuery {
        since_ms: args
            .since
            .as_deref()
            .map(|t| parse_time(t, now))
            .transpose()?,
        until_ms: args
            .until
            .as_deref()
            .map(|t| parse_time(t, now))
            .transpose()?,
        tenant: args.tenant.clone(),
        endpoint: args.endpoint.clone(),
    };
    if !archive.is_dir() {
        bail!(
            "no archive at {}: check --data-dir (and --config, which may name another archive \
             directory) or pass --archive",
            archive.display()
        );
    }
    let report = compute_stats(&archive, &query)
        .with_context(|| format!("cannot compute statistics over {}", archive.display()))?;
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&report)?)?;
    } else {
        out!("{}", report.render())?;
    }
    Ok(())
}

/// Starts a thread that sets `stop` on SIGINT or SIGTERM, so that a replay stops after its
/// current batch. A second signal exits at once with code 130.
///
/// # Errors
///
/// Fails if the signal handler cannot start.
pub fn install_stop_handler(stop: Arc<AtomicBool>) -> anyhow::Result<()> {
    hookflow_operators::stop::on_termination_signal("replay-signals", move || {
        stop.store(true, Ordering::SeqCst);
    })
    .context("cannot start the signal handler")
}

/// Runs `replay`: lists, plans (dry run), starts or resumes a replay. Progress goes to
/// standard error; summaries to standard output.
///
/// # Errors
///
/// Fails on bad arguments, a replay that already ran (without `--force`), an interrupted
/// run (naming how to resume it), or a failing archive, log or ledger.
pub fn run_replay(args: &ReplayArgs, stop: Arc<AtomicBool>) -> anyhow::Result<()> {
    if args.list {
        return list_runs(&Ledger::open(&args.data_dir)?, args.json);
    }
    if args.rate.is_nan() || args.rate <= 0.0 {
        bail!(
            "invalid --rate {}: must be above 0 events per second",
            args.rate
        );
    }
    let config_path = args.config.as_ref().context("--config is required")?;
    let config = ToolConfig::load(config_path)?.with_stored_endpoints(&args.data_dir)?;
    let mut log = open_target(&config, &args.data_dir)?;
    let options = RepublishOptions {
        rate_per_sec: args.rate,
        progress: if std::io::stderr().is_terminal() {
            ProgressStyle::Bar
        } else {
            ProgressStyle::Lines(Duration::from_secs(1))
        },
        stop,
    };

    if let Some(replay_id) = &args.resume {
        let mut ledger = Ledger::open(&args.data_dir)?;
        let runs = ledger.runs(Some(replay_id))?;
        let Some(run) = runs.iter().rev().find(|run| run.finished_at_ms.is_none()) else {
            if runs.is_empty() {
                bail!("no replay named {replay_id} in {}", ledger.path().display());
            }
            bail!("replay {replay_id} has no unfinished run; every run of it is complete");
        };
        let _lock = lock_replays(&args.data_dir)?;
        return send(&mut ledger, run.clone(), log.as_mut(), &options, args);
    }

    let now = now_ms();
    let selection = Selection {
        since_ms: args
            .since
            .as_deref()
            .map(|t| parse_time(t, now))
            .transpose()?,
        until_ms: args
            .until
            .as_deref()
            .map(|t| parse_time(t, now))
            .transpose()?,
        tenant: args.tenant.clone(),
        endpoint: args.endpoint.clone(),
        event_type: args.event_type.clone(),
        outcome: args.outcome,
        event_ids: args.event_ids.as_deref().map(read_event_ids).transpose()?,
        to_endpoint: args.to_endpoint.clone(),
    };
    // Replayed deliveries go only to configured endpoints, so a name outside the configuration
    // is a mistake, not an empty selection.
    if let Some(name) = &selection.endpoint {
        if !config.endpoints.iter().any(|endpoint| &endpoint.id == name) {
            bail!(
                "endpoint `{name}` is not in the configuration; replays go only to configured \
                 endpoints"
            );
        }
    }
    let archive = config.archive_dir(&args.data_dir);
    let plan = build_plan(&selection, &config, &archive, log.as_mut())?;
    if args.dry_run {
        if args.json {
            outln!("{}", serde_json::to_string_pretty(&plan.summary)?)?;
        } else {
            out!("dry run, nothing changed: {}", plan.summary.render())?;
        }
        return Ok(());
    }

    // An empty selection writes nothing; with no ledger yet, no earlier run can be refused.
    if plan.items.is_empty() && !Ledger::exists(&args.data_dir) {
        out!("nothing to replay: {}", plan.summary.render())?;
        return Ok(());
    }

    let mut ledger = Ledger::open(&args.data_dir)?;
    let _lock = lock_replays(&args.data_dir)?;
    let replay_id = args
        .id
        .clone()
        .unwrap_or_else(|| format!("rp-{}", format_millis(now).replace([':', '.'], "")));
    check_id(&replay_id)?;
    let previous = ledger.runs(Some(&replay_id))?;
    if let Some(run) = previous.iter().find(|run| run.finished_at_ms.is_none()) {
        bail!(
            "replay {replay_id} has an unfinished run (generation {}); continue it with \
             --resume {replay_id}",
            run.generation
        );
    }
    if !args.force {
        if let Some(run) = previous.last() {
            bail!(
                "replay {replay_id} already ran (generation {}, {} events, finished {}); \
                 pass --force to run it again as a new generation",
                run.generation,
                run.appended,
                run.finished_at_ms.map_or_else(String::new, format_millis)
            );
        }
        if let Some(run) = ledger
            .runs(None)?
            .into_iter()
            .find(|run| run.selection == selection)
        {
            bail!(
                "the same selection was already replayed as {} (generation {}); pass --force \
                 to replay it again",
                run.replay_id,
                run.generation
            );
        }
    }
    if plan.items.is_empty() {
        out!("nothing to replay: {}", plan.summary.render())?;
        return Ok(());
    }

    let generation = ledger.next_generation(plan.summary.max_generation_seen)?;
    ledger.create_run(
        &replay_id,
        generation,
        &selection,
        &plan.summary,
        &plan.items,
        now,
    )?;
    outln!(
        "replay {replay_id} (generation {generation}): {}",
        plan.summary.render()
    )?;
    let run = ledger
        .run(generation)?
        .context("the run just recorded is missing from the ledger")?;
    send(&mut ledger, run, log.as_mut(), &options, args)
}

/// Opens the source replay records go to: the Fluvio topic the config names, or the local log
/// under `data_dir`.
fn open_target(config: &ToolConfig, data_dir: &Path) -> anyhow::Result<Box<dyn ReplayTarget>> {
    if let Some(fluvio) = &config.fluvio {
        let source = FluvioSource::connect(fluvio.clone(), SourceStatus::new())
            .with_context(|| format!("cannot open the Fluvio topic {:?}", fluvio.topic))?;
        return Ok(Box::new(source));
    }
    // Opening would create an empty log, and a dry run must change nothing.
    let log_path = data_dir.join("log").join("events.sqlite");
    if !log_path.exists() {
        bail!(
            "no local log at {}; pass the --data-dir that `hookflow run` uses",
            log_path.display()
        );
    }
    let log = LocalLog::open(
        data_dir,
        &LocalLogOptions {
            partitions: config.partitions.unwrap_or(4),
        },
    )
    .with_context(|| format!("cannot open the local log in {}", data_dir.display()))?;
    Ok(Box::new(log))
}

fn send(
    ledger: &mut Ledger,
    run: Run,
    log: &mut dyn ReplayTarget,
    options: &RepublishOptions,
    args: &ReplayArgs,
) -> anyhow::Result<()> {
    let report = republish(ledger, run.generation, log, options, &now_ms)?;
    if report.remaining > 0 {
        bail!(
            "replay {} interrupted: {} event(s) appended, {} left; continue with \
             `--resume {}` (nothing is sent twice)",
            run.replay_id,
            run.appended + report.appended,
            report.remaining,
            run.replay_id
        );
    }
    outln!(
        "replay {} (generation {}) appended {} event(s){}; the running pipeline delivers them \
         (hookflow run --data-dir {})",
        run.replay_id,
        run.generation,
        run.appended + report.appended,
        if report.payload_gone + run.payload_gone > 0 {
            format!(
                ", skipped {} whose record left the log",
                report.payload_gone + run.payload_gone
            )
        } else {
            String::new()
        },
        args.data_dir.display()
    )?;
    Ok(())
}

fn list_runs(ledger: &Ledger, json: bool) -> anyhow::Result<()> {
    let runs = ledger.runs(None)?;
    if json {
        outln!("{}", serde_json::to_string_pretty(&runs)?)?;
        return Ok(());
    }
    outln!(
        "{:<28} {:>10} {:>8} {:>8}  {:<24}  status",
        "replay",
        "generation",
        "events",
        "appended",
        "created"
    )?;
    for run in runs {
        let status = match run.finished_at_ms {
            Some(at) => format!("finished {}", format_millis(at)),
            None => "unfinished (--resume)".to_string(),
        };
        outln!(
            "{:<28} {:>10} {:>8} {:>8}  {:<24}  {status}",
            run.replay_id,
            run.generation,
            run.items,
            run.appended,
            format_millis(run.created_at_ms)
        )?;
    }
    Ok(())
}

fn check_id(id: &str) -> anyhow::Result<()> {
    if id.is_empty() || id.len() > 255 || id.chars().any(|c| c.is_control() || c.is_whitespace()) {
        bail!("invalid replay id `{id}`: 1 to 255 bytes without spaces or control characters");
    }
    Ok(())
}

fn read_event_ids(path: &Path) -> anyhow::Result<BTreeSet<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the event id file {}", path.display()))?;
    let ids: BTreeSet<String> = text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(str::to_string)
        .collect();
    if ids.is_empty() {
        bail!("the event id file {} lists no ids", path.display());
    }
    Ok(ids)
}

/// Takes `<data_dir>/replay/replay.lock`, so that two replays (or API resends) never
/// append at once.
///
/// # Errors
///
/// Fails if another replay holds it or the lock file cannot be opened.
pub fn lock_replays(data_dir: &Path) -> anyhow::Result<std::fs::File> {
    let path = data_dir.join("replay").join("replay.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => bail!(
            "another replay is already running in {} (it holds {}); wait for it to finish",
            data_dir.display(),
            path.display()
        ),
        Err(std::fs::TryLockError::Error(error)) => {
            Err(error).with_context(|| format!("cannot lock {}", path.display()))
        }
    }
}
