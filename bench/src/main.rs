//! `hookflow-bench`: measures what hookflow can do on this machine, in one command.
//!
//! It starts a loopback receiver in a process of its own and measures the raw ceiling: a plain
//! HTTP client posting straight to the receiver. Then it runs the whole pipeline (local log,
//! dataflow, signatures, Parquet archive) against that receiver in the scenarios (a) to (e),
//! each in a child process. It prints a table, writes it as JSON, and exits non-zero if any
//! delivery is not accounted for. The project's targets are reported, never enforced.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

mod check;
mod control;
mod measure;
mod raw;
mod receiver;
mod report;
mod scenario;
mod suite;
mod workload;

use crate::report::Settings;
use crate::scenario::{Kind, ScenarioSpec};
use crate::suite::{run_suite, SuiteOptions};

#[derive(Parser)]
#[command(
    name = "hookflow-bench",
    version,
    about = "Measure hookflow's throughput, latency and memory against a loopback receiver",
    long_about = "Measure hookflow's throughput, latency and memory against a loopback \
                  receiver.\n\nRuns the raw ceiling and the scenarios (a) one endpoint, (b) \
                  1000 endpoints with fan-out, (c) 10 % failing and 1 % hanging endpoints \
                  next to its baseline (c0), (d) a steady rate at half of (a), and (e) \
                  pending retries held in memory. Prints a table and writes it as JSON."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Internal>,

    #[command(flatten)]
    options: BenchArgs,
}

#[derive(clap::Args)]
struct BenchArgs {
    /// Events published in each throughput scenario (a, b, c), and raw-ceiling requests.
    /// Default 50000; 300 with --smoke.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    events: Option<u64>,

    /// Requests in flight: of the raw client, per timely worker of the pipeline, and per
    /// endpoint in the one-endpoint scenarios (a), (d) and (e).
    #[arg(long, value_name = "N", default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=4096))]
    concurrency: u64,

    /// Seed of the endpoints' subscriptions, the unhealthy endpoints and the events.
    #[arg(long, value_name = "N", default_value_t = 42)]
    seed: u64,

    /// Pending retries held in scenario (e). The target is stated for 1000000.
    /// Default 100000; 300 with --smoke.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pending_retries: Option<u64>,

    /// How long scenario (d) publishes, in seconds. Default 10; 1 with --smoke.
    #[arg(long, value_name = "SECS")]
    steady_secs: Option<f64>,

    /// Events per second published in scenario (d). Default: half of (a)'s measured rate.
    #[arg(long, value_name = "N")]
    steady_rate: Option<f64>,

    /// Timeout of every endpoint in scenario (c) and its baseline, in ms. The hanging
    /// endpoints keep requests open far longer.
    #[arg(long, value_name = "MS", default_value_t = 250, value_parser = clap::value_parser!(u64).range(1..))]
    unhealthy_timeout_ms: u64,

    /// Timely worker threads of the pipeline.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=256))]
    workers: u64,

    /// Tokio worker threads of the receiver process.
    #[arg(long, value_name = "N", default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=64))]
    receiver_threads: u64,

    /// Scenarios to run, comma-separated; `c` runs its baseline (c0) too.
    #[arg(
        long,
        value_name = "LIST",
        value_delimiter = ',',
        default_value = "a,b,c,d,e"
    )]
    scenarios: Vec<Choice>,

    /// File the report is written to as JSON. Default hookflow-bench.json; none with --smoke.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,

    /// Directory for the scenarios' logs and archives. Default: a temporary directory,
    /// removed afterwards.
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,

    /// Maximum time one scenario may take before it is killed and the run fails, in
    /// seconds. It is also the maximum wait for deliveries in (d) and (e).
    #[arg(long, value_name = "SECS", default_value_t = 900)]
    timeout_secs: u64,

    /// Run every scenario with tiny counts (a few seconds) and check only that every
    /// delivery is accounted for and every rate is above zero.
    #[arg(long)]
    smoke: bool,
}

/// A scenario as named on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Choice {
    A,
    B,
    C,
    D,
    E,
}

#[derive(Subcommand)]
enum Internal {
    /// Run the loopback receiver (started by the benchmark itself).
    #[command(hide = true)]
    Receiver {
        /// Tokio worker threads.
        #[arg(long, default_value_t = 2)]
        threads: usize,
    },
    /// Run one scenario described by JSON and print its result (started by the benchmark).
    #[command(hide = true)]
    Scenario {
        /// The scenario as JSON.
        #[arg(long)]
        spec: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,hookflow_bench=info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    // The workspace builds reqwest without a default TLS crypto provider, so ring is installed
    // here. The pipeline installs ring the same way and keeps a provider already installed.
    let _ = rustls::crypto::ring::default_provider().install_default();

    let outcome = match cli.command {
        Some(Internal::Receiver { threads }) => {
            receiver::serve(threads).map(|()| ExitCode::SUCCESS)
        }
        Some(Internal::Scenario { spec }) => {
            run_scenario_process(&spec).map(|()| ExitCode::SUCCESS)
        }
        None => run_benchmark(&cli.options),
    };
    match outcome {
        Ok(code) => code,
        Err(error) => {
            eprintln!("hookflow-bench: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_scenario_process(spec: &str) -> anyhow::Result<()> {
    let spec: ScenarioSpec = serde_json::from_str(spec).context("invalid scenario spec")?;
    let result = scenario::run_scenario(&spec)?;
    println!(
        "{}",
        serde_json::to_string(&result).context("cannot encode the result")?
    );
    Ok(())
}

fn run_benchmark(args: &BenchArgs) -> anyhow::Result<ExitCode> {
    let smoke = args.smoke;
    let pick = |given: Option<u64>, full: u64, small: u64| {
        usize::try_from(given.unwrap_or(if smoke { small } else { full })).unwrap_or(usize::MAX)
    };
    let settings = Settings {
        seed: args.seed,
        events: pick(args.events, 50_000, 300),
        concurrency: usize::try_from(args.concurrency).unwrap_or(usize::MAX),
        workers: usize::try_from(args.workers).unwrap_or(usize::MAX),
        receiver_threads: usize::try_from(args.receiver_threads).unwrap_or(usize::MAX),
        pending_retries: pick(args.pending_retries, 100_000, 300),
        steady_secs: args.steady_secs.unwrap_or(if smoke { 1.0 } else { 10.0 }),
        unhealthy_timeout_ms: args.unhealthy_timeout_ms,
        smoke,
    };
    if !(settings.steady_secs > 0.0 && settings.steady_secs <= 3600.0) {
        anyhow::bail!(
            "--steady-secs {} is out of range; give 0 < SECS <= 3600",
            settings.steady_secs
        );
    }
    if let Some(rate) = args.steady_rate {
        if !(rate > 0.0 && rate <= 1e7) {
            anyhow::bail!("--steady-rate {rate} is out of range; give 0 < N <= 10000000");
        }
    }

    let mut kinds = Vec::new();
    for (choice, mut chosen) in [
        (Choice::A, vec![Kind::Single]),
        (Choice::B, vec![Kind::FanOut]),
        (Choice::C, vec![Kind::HealthyOnly, Kind::Unhealthy]),
        (Choice::D, vec![Kind::Steady]),
        (Choice::E, vec![Kind::PendingRetries]),
    ] {
        if args.scenarios.contains(&choice) {
            kinds.append(&mut chosen);
        }
    }
    if kinds.contains(&Kind::Steady) && !kinds.contains(&Kind::Single) && args.steady_rate.is_none()
    {
        anyhow::bail!(
            "scenario d runs at half of (a)'s rate: add a to --scenarios or give --steady-rate"
        );
    }

    let temporary;
    let dir = match &args.dir {
        Some(dir) => dir.clone(),
        None => {
            temporary = tempfile::Builder::new()
                .prefix("hookflow-bench-")
                .tempdir()
                .context("cannot create a temporary directory")?;
            temporary.path().to_path_buf()
        }
    };
    tracing::info!(
        seed = settings.seed,
        events = settings.events,
        concurrency = settings.concurrency,
        dir = %dir.display(),
        "Benchmark started."
    );
    let options = SuiteOptions {
        settings,
        kinds,
        steady_rate: args.steady_rate,
        dir,
        scenario_timeout: Duration::from_secs(args.timeout_secs),
        wait_secs: if smoke { 60 } else { args.timeout_secs },
    };
    let report = run_suite(&options)?;

    print!("{}", report.to_table());
    let json_path = match (&args.json, smoke) {
        (Some(path), _) => Some(path.clone()),
        (None, false) => Some(PathBuf::from("hookflow-bench.json")),
        (None, true) => None,
    };
    if let Some(path) = json_path {
        let json = serde_json::to_string_pretty(&report).context("cannot encode the report")?;
        std::fs::write(&path, json + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
        println!("\nreport written to {}", path.display());
    }

    let failures = report.failures();
    if failures.is_empty() {
        if smoke {
            println!("\nsmoke: every scenario ran, every delivery is accounted for");
        }
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!("hookflow-bench: the figures above are not valid:");
    for failure in &failures {
        eprintln!("  {failure}");
    }
    Ok(ExitCode::FAILURE)
}
