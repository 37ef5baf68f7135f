//! `hookflow-replay`: the replay tool's own binary, with the same `replay` and `stats`
//! commands as `hookflow replay` and `hookflow stats`.

use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use hookflow_replay::cli::{install_stop_handler, run_replay, run_stats, ReplayArgs, StatsArgs};

#[derive(Parser)]
#[command(
    name = "hookflow-replay",
    version,
    about = "Replay archived webhook deliveries and report on the attempt archive"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Select archived deliveries or events and republish them as a new generation.
    Replay(ReplayArgs),
    /// Per-endpoint statistics over the attempt archive.
    Stats(StatsArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match &cli.command {
        Command::Replay(args) => {
            let stop = Arc::new(AtomicBool::new(false));
            install_stop_handler(stop.clone()).and_then(|()| run_replay(args, stop))
        }
        Command::Stats(args) => run_stats(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("hookflow-replay: {error:#}");
            ExitCode::FAILURE
        }
    }
}
