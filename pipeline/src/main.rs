//! The `hookflow` command line: `run`, `publish`, `endpoints`, `replay`, `stats` and `demo`.

use hookflow_operators::stop::StopSignal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};
use hookflow::cluster::{read_hosts, Cluster};
use hookflow::config::{Config, FluvioConfig, SourceKind};
use hookflow::dataflow::{run, RunOptions};
use hookflow::demo::{run_demo, DemoOptions};
use hookflow::publish::{publish_path, PublishOptions, PublishTarget};
use hookflow_operators::clock::{Clock, WallClock};
use hookflow_schemas::DEFAULT_MAX_PAYLOAD_BYTES;

#[derive(Parser)]
#[command(
    name = "hookflow",
    version,
    about = "Webhook delivery as a stream-processing dataflow"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Deliver events from the local log or a Fluvio topic to the configured endpoints.
    Run {
        /// The configuration file (TOML); see examples/hookflow.toml.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Where events are read from; overrides `source.kind`. `fluvio` needs a
        /// `[source.fluvio]` table in the config.
        #[arg(long, value_enum, value_name = "KIND")]
        source: Option<SourceKind>,
        /// Directory of the local log and, by default, the archive.
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        /// Exit once every event in the log is delivered, dead-lettered, expired, unrouted or
        /// invalid; pending retries keep it running.
        #[arg(long)]
        until_idle: bool,
        /// Timely worker threads; overrides `pipeline.workers`. In a cluster, the threads of
        /// each process: give every process the same count.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=256))]
        workers: Option<u16>,
        /// Processes in the timely cluster; more than 1 needs --hosts and a --process-index.
        /// The count is fixed for a data directory.
        #[arg(long, value_name = "P", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
        processes: u16,
        /// This process's index in the cluster, from 0 to P-1. Process 0 serves the
        /// management API.
        #[arg(long, value_name = "I", default_value_t = 0)]
        process_index: u16,
        /// File listing one host:port per process, in index order: where each process listens
        /// for the others.
        #[arg(long, value_name = "FILE")]
        hosts: Option<PathBuf>,
    },
    /// Append NDJSON events to the local log, or produce them to a Fluvio topic.
    Publish {
        /// Where events go: the local log under --data-dir, or the Fluvio topic that
        /// --config's `[source.fluvio]` or --endpoint and --topic name. Default: --config's
        /// `[source] kind`, or `local` without --config.
        #[arg(long, value_enum, value_name = "KIND")]
        source: Option<SourceKind>,
        /// Directory of the local log (created if missing); required when publishing to the
        /// local log.
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
        /// A configuration file whose `[source]` names where events go.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// The Fluvio SC address, `host:port`; overrides the config's.
        #[arg(long, value_name = "ADDR")]
        endpoint: Option<String>,
        /// The Fluvio topic; overrides the config's.
        #[arg(long, value_name = "NAME")]
        topic: Option<String>,
        /// Append lines as they are, without validation, as a raw stream producer would.
        #[arg(long)]
        raw: bool,
        /// Partitions of a new log; an existing log keeps its count.
        #[arg(long, value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=4096))]
        partitions: u32,
        /// Largest payload accepted, in bytes.
        #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_MAX_PAYLOAD_BYTES)]
        max_payload_bytes: usize,
        /// NDJSON file, one event per line; `-` reads standard input.
        #[arg(value_name = "FILE")]
        input: PathBuf,
    },
    /// Republish archived deliveries or events as a new delivery generation (see README,
    /// Replay). Needs the pipeline running to deliver them.
    Replay(hookflow_replay::cli::ReplayArgs),
    /// Per-endpoint statistics over the attempt archive: deliveries, success ratio, latency
    /// percentiles, top error kinds, first and last failure.
    Stats(hookflow_replay::cli::StatsArgs),
    /// Show the stored endpoints and their parked deliveries, enable one, or apply a file of
    /// endpoints to the store.
    Endpoints {
        #[command(subcommand)]
        action: EndpointsCommand,
    },
    /// Run a self-contained demo against a receiver on 127.0.0.1.
    Demo {
        /// Where the demo's config, log and Parquet archive go; a previous demo's are replaced.
        #[arg(long, value_name = "DIR", default_value = "hookflow-demo")]
        dir: PathBuf,
        /// Events to generate.
        #[arg(long, value_name = "N", default_value_t = 3000)]
        events: usize,
        /// Seed of the event generator.
        #[arg(long, default_value_t = 7)]
        seed: u64,
    },
}

#[derive(Subcommand)]
enum EndpointsCommand {
    /// List the stored endpoints (and configured ones not stored yet): enabled or disabled
    /// (and why), and parked deliveries.
    List {
        /// The configuration file (TOML).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// The pipeline's data directory; the pipeline must not be running.
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
    },
    /// Enable an endpoint that hookflow disabled (410 Gone, or failing too long) or that is
    /// disabled in the store; the next run resumes its parked deliveries.
    Enable {
        /// The pipeline's data directory; the pipeline must not be running.
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        /// The endpoint's id.
        #[arg(value_name = "ENDPOINT_ID")]
        endpoint_id: String,
    },
    /// Create or replace in the store each endpoint a TOML file of `[[endpoints]]` lists (the
    /// configuration file's format); endpoints it does not list are kept.
    Apply {
        /// The configuration file (TOML), whose delivery settings check the endpoints.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// The pipeline's data directory; the pipeline must not be running.
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        /// The endpoints file (TOML).
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => exit_with_usage(error),
    };

    // The demo feeds malformed records on purpose; its summary reports them instead of logs.
    let default_filter = match cli.command {
        Command::Demo { .. } => "error",
        _ => "warn,hookflow=info",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match execute(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("hookflow: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Prints a command-line error with the usage of the command it concerns, and exits 2.
/// clap prints usage for some errors (a missing argument) but not others (an invalid value).
fn exit_with_usage(error: clap::Error) -> ! {
    use clap::error::ErrorKind;
    if matches!(
        error.kind(),
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion
    ) || error.to_string().contains("Usage:")
    {
        error.exit();
    }
    let mut command = Cli::command();
    command.build();
    let subcommand = std::env::args().nth(1).unwrap_or_default();
    let usage = match command.find_subcommand_mut(&subcommand) {
        Some(sub) => sub.render_usage(),
        None => command.render_usage(),
    };
    eprint!("{error}");
    eprintln!("\n{usage}");
    std::process::exit(2);
}

fn execute(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run {
            config,
            source,
            data_dir,
            until_idle,
            workers,
            processes,
            process_index,
            hosts,
        } => {
            let cluster = cluster_from_args(processes, process_index, hosts.as_deref())?;
            let mut loaded = Config::load(&config)?;
            if let Some(source) = source {
                loaded.set_source_kind(source, &config)?;
            }
            if let Some(workers) = workers {
                loaded.pipeline.workers = usize::from(workers);
            }
            let stop = Arc::new(StopSignal::new());
            install_signal_handlers(stop.clone())?;
            let report = run(RunOptions {
                config: loaded,
                data_dir,
                until_idle,
                clock: Arc::new(WallClock),
                stop,
                cluster,
            })?;
            let count = |outcome: &str| report.outcomes.get(outcome).copied().unwrap_or(0);
            let counter = |counter: &std::sync::atomic::AtomicU64| {
                counter.load(std::sync::atomic::Ordering::Relaxed)
            };
            let counters = &report.counters;
            tracing::info!(
                delivered = count("delivered"),
                failed_and_retried = count("failed"),
                dead_lettered = count("dead_lettered"),
                expired = count("expired"),
                invalid = count("invalid"),
                unrouted = count("unrouted"),
                duplicates = report.duplicates,
                parked = report.parked,
                disabled_endpoints = report.disabled_endpoints.len(),
                breakers_opened = counter(&counters.breakers_opened),
                throttled = counter(&counters.throttled),
                retry_after_invalid = counter(&counters.retry_after_invalid),
                retry_after_capped = counter(&counters.retry_after_capped),
                files = report.files.len(),
                archive = %report.archive_dir.display(),
                process = report.process_index,
                "Pipeline stopped."
            );
            if report.parked > 0 {
                println!(
                    "{} deliveries parked: their endpoints are disabled (`hookflow endpoints list`)",
                    report.parked
                );
            }
            Ok(())
        }
        Command::Endpoints {
            action: EndpointsCommand::List { config, data_dir },
        } => {
            let loaded = Config::load_offline(&config)?;
            print!("{}", hookflow::endpoints::list(&loaded, &data_dir)?);
            Ok(())
        }
        Command::Endpoints {
            action:
                EndpointsCommand::Enable {
                    data_dir,
                    endpoint_id,
                },
        } => {
            println!("{}", hookflow::endpoints::enable(&data_dir, &endpoint_id)?);
            Ok(())
        }
        Command::Endpoints {
            action:
                EndpointsCommand::Apply {
                    config,
                    data_dir,
                    file,
                },
        } => {
            let loaded = Config::load_offline(&config)?;
            println!("{}", hookflow::endpoints::apply(&loaded, &data_dir, &file)?);
            Ok(())
        }
        Command::Publish {
            source,
            data_dir,
            config,
            endpoint,
            topic,
            raw,
            partitions,
            max_payload_bytes,
            input,
        } => {
            // The flag wins. Otherwise the config file decides, as it does for `hookflow run`.
            let source = match (source, config.as_deref()) {
                (Some(source), _) => source,
                (None, Some(path)) => Config::load_source(path)?.kind,
                (None, None) => SourceKind::Local,
            };
            let target = match source {
                SourceKind::Local => PublishTarget::Local {
                    data_dir: data_dir.unwrap_or_else(|| {
                        exit_with_usage(Cli::command().error(
                            clap::error::ErrorKind::MissingRequiredArgument,
                            "publishing to the local log needs --data-dir (the directory `hookflow run` reads)",
                        ))
                    }),
                    partitions,
                },
                SourceKind::Fluvio => PublishTarget::Fluvio(
                    fluvio_target(config.as_deref(), endpoint, topic)?.options(),
                ),
            };
            let options = PublishOptions {
                target,
                raw,
                max_payload_bytes,
            };
            let report = publish_path(&input, &options, WallClock.now_ms())?;
            println!(
                "published {} event(s) to {}",
                report.appended, options.target
            );
            if report.invalid_appended > 0 {
                println!(
                    "{} of them invalid, appended as they are (--raw)",
                    report.invalid_appended
                );
            }
            Ok(())
        }
        Command::Replay(args) => {
            let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
            hookflow_replay::cli::install_stop_handler(stop.clone())?;
            hookflow_replay::cli::run_replay(&args, stop)
        }
        Command::Stats(args) => hookflow_replay::cli::run_stats(&args),
        Command::Demo { dir, events, seed } => {
            let summary = run_demo(&DemoOptions { dir, events, seed })?;
            print!("{summary}");
            Ok(())
        }
    }
}

/// The Fluvio topic `publish --source fluvio` writes to: the config's `[source.fluvio]`, with
/// --endpoint and --topic overriding its fields, or those two flags alone.
fn fluvio_target(
    config: Option<&std::path::Path>,
    endpoint: Option<String>,
    topic: Option<String>,
) -> anyhow::Result<FluvioConfig> {
    let from_file = match config {
        Some(path) => Config::load_source(path)?.fluvio,
        None => None,
    };
    let fluvio = match (from_file, endpoint, topic) {
        (Some(mut fluvio), endpoint, topic) => {
            if let Some(endpoint) = endpoint {
                fluvio.endpoint = endpoint;
            }
            if let Some(topic) = topic {
                fluvio.topic = topic;
            }
            fluvio
        }
        (None, Some(endpoint), Some(topic)) => FluvioConfig {
            endpoint,
            topic,
            consumer: String::new(),
            timeout_ms: 10_000,
        },
        (None, _, _) => {
            let error = Cli::command().error(
                clap::error::ErrorKind::MissingRequiredArgument,
                "--source fluvio needs --config with a [source.fluvio] table, or --endpoint and --topic",
            );
            exit_with_usage(error)
        }
    };
    fluvio
        .validate()
        .map_err(|(field, problem)| anyhow::anyhow!("{field}: {problem}"))?;
    Ok(fluvio)
}

/// Builds the cluster description from `run`'s arguments; a wrong combination prints usage and
/// exits 2, a bad hosts file is an error.
fn cluster_from_args(
    processes: u16,
    process_index: u16,
    hosts: Option<&std::path::Path>,
) -> anyhow::Result<Cluster> {
    use clap::error::ErrorKind;
    let usage_error = |message: String| -> ! {
        let mut command = Cli::command();
        command.build();
        let error = match command.find_subcommand_mut("run") {
            Some(run) => run.error(ErrorKind::ArgumentConflict, message),
            None => command.error(ErrorKind::ArgumentConflict, message),
        };
        error.exit()
    };
    let (processes, process_index) = (usize::from(processes), usize::from(process_index));
    if process_index >= processes {
        usage_error(format!(
            "--process-index {process_index} is not below --processes {processes}"
        ));
    }
    match hosts {
        None if processes > 1 => usage_error(format!(
            "--processes {processes} needs --hosts FILE, one host:port per process"
        )),
        None => Ok(Cluster::default()),
        Some(_) if processes == 1 => {
            usage_error("--hosts needs --processes greater than 1".to_string())
        }
        Some(path) => {
            let addresses = read_hosts(path, processes)?;
            Ok(Cluster::new(process_index, addresses)?)
        }
    }
}

/// On SIGINT or SIGTERM, stops the pipeline gracefully; a second signal exits at once.
fn install_signal_handlers(stop: Arc<StopSignal>) -> anyhow::Result<()> {
    hookflow_operators::stop::on_termination_signal("signals", move || {
        tracing::info!("Stopping: draining in-flight deliveries and flushing the archive.");
        stop.stop();
    })
    .context("cannot start the signal handler")
}
