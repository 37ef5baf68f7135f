//! The benchmark run: starts the receiver process, measures the raw ceiling, runs each
//! scenario in a child process and collects the [`Report`].

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};

use crate::control::ReceiverProcess;
use crate::raw;
use crate::report::{load_average, Machine, Report, Settings};
use crate::scenario::{Kind, ScenarioResult, ScenarioSpec};

/// Settings of a benchmark run.
#[derive(Debug, Clone)]
pub struct SuiteOptions {
    /// The settings recorded in the report.
    pub settings: Settings,
    /// Scenarios to run, in this order.
    pub kinds: Vec<Kind>,
    /// Events per second of (d); half of (a)'s rate when `None`.
    pub steady_rate: Option<f64>,
    /// Parent directory of the scenarios' directories.
    pub dir: PathBuf,
    /// Maximum time a scenario process may take before it is killed.
    pub scenario_timeout: Duration,
    /// Maximum wait for deliveries in (d) and (e), in seconds.
    pub wait_secs: u64,
}

/// Runs the benchmark.
///
/// # Errors
///
/// Fails if the receiver cannot start, or a scenario process fails or times out.
pub fn run_suite(options: &SuiteOptions) -> anyhow::Result<Report> {
    let settings = &options.settings;
    let machine = Machine::detect();
    let started_at_secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs());
    let receiver = ReceiverProcess::start(settings.receiver_threads)?;
    let receiver_url = receiver.control().base_url().to_string();
    tracing::info!(url = %receiver_url, pid = receiver.id(), "Receiver started.");

    receiver.control().reset()?;
    let raw = raw::measure(
        &format!("{receiver_url}/e/0/ok"),
        settings.events,
        settings.concurrency,
    )?;
    tracing::info!(
        per_second = raw.per_second as u64,
        failures = raw.failures,
        "Raw ceiling measured."
    );

    let mut report = Report {
        started_at_secs,
        machine,
        settings: settings.clone(),
        raw,
        scenarios: Vec::new(),
        targets: Vec::new(),
    };
    for kind in &options.kinds {
        let steady_rate = match (options.steady_rate, report.scenario(Kind::Single)) {
            (Some(rate), _) => rate,
            (None, Some(single)) => (single.per_second / 2.0).max(1.0),
            (None, None) => 0.0,
        };
        let spec = ScenarioSpec {
            kind: *kind,
            receiver_url: receiver_url.clone(),
            dir: options.dir.join(kind.short_name()),
            events: match kind {
                Kind::PendingRetries => settings.pending_retries,
                _ => settings.events,
            },
            concurrency: settings.concurrency,
            workers: settings.workers,
            seed: settings.seed,
            steady_rate,
            steady_secs: settings.steady_secs,
            unhealthy_timeout_ms: settings.unhealthy_timeout_ms,
            wait_secs: options.wait_secs,
        };
        tracing::info!(
            scenario = kind.short_name(),
            description = kind.description(),
            "Scenario started."
        );
        let result = run_child(&spec, options.scenario_timeout)
            .with_context(|| format!("scenario ({}) failed", kind.short_name()))?;
        tracing::info!(
            scenario = kind.short_name(),
            delivered = result.delivered,
            per_second = result.per_second as u64,
            problems = result.tally.problems.len(),
            "Scenario finished."
        );
        if let Err(error) = std::fs::remove_dir_all(&spec.dir) {
            tracing::warn!(%error, dir = %spec.dir.display(), "Cannot remove a scenario directory.");
        }
        report.scenarios.push(result);
    }
    drop(receiver);
    report.machine.load_at_end = load_average();
    report.evaluate_targets();
    Ok(report)
}

/// Runs `hookflow-bench scenario` for `spec` and reads its result, killing it after
/// `timeout`.
fn run_child(spec: &ScenarioSpec, timeout: Duration) -> anyhow::Result<ScenarioResult> {
    let executable = std::env::current_exe().context("cannot locate hookflow-bench")?;
    let spec_json = serde_json::to_string(spec).context("cannot encode the scenario")?;
    let mut child = Command::new(&executable)
        .arg("scenario")
        .arg("--spec")
        .arg(&spec_json)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("cannot start {} scenario", executable.display()))?;

    // A thread drains standard output while this one waits, so a full pipe cannot block the
    // child.
    let mut stdout = child.stdout.take().context("the scenario has no stdout")?;
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        stdout.read_to_string(&mut text).map(|_| text)
    });

    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().context("cannot wait for the scenario")? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "the scenario did not finish within {} s; it was killed",
                timeout.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let output = match reader.join() {
        Ok(read) => read.context("cannot read the scenario's output")?,
        Err(_) => bail!("the thread reading the scenario's output panicked"),
    };
    if !status.success() {
        bail!("the scenario process exited with {status}");
    }
    let line = output.lines().last().unwrap_or_default();
    serde_json::from_str(line)
        .with_context(|| format!("the scenario printed {line:?} instead of its result"))
}
