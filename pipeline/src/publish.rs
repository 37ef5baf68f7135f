//! `hookflow publish`: appends NDJSON events to the local log, or produces them to a Fluvio
//! topic.
//!
//! Every line is validated before anything is written: if any line is invalid, each bad line
//! is reported with its number and reason and nothing is appended. With `raw`, lines are
//! appended as they are, as a producer writing straight to a stream would, and the pipeline
//! dead-letters the bad ones. Records are keyed by tenant so that one tenant's events stay in
//! one partition, in order. Blank lines are skipped. Fluvio's producer is waited on until the
//! SPU has acknowledged every record, so success means the events are in the topic.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use hookflow_connectors::{
    ConnectorError, FluvioOptions, FluvioSource, LocalLog, LocalLogOptions, SourceStatus,
};
use hookflow_schemas::{decode_event, Millis};

/// Lines appended per transaction, so that a large file does not build one huge transaction.
const APPEND_CHUNK: usize = 10_000;

/// The destination events are published to.
#[derive(Debug, Clone)]
pub enum PublishTarget {
    /// The local log under a data directory.
    Local {
        /// The data directory holding the local log.
        data_dir: PathBuf,
        /// Partitions, used only when the log is created.
        partitions: u32,
    },
    /// A Fluvio topic.
    Fluvio(FluvioOptions),
}

impl std::fmt::Display for PublishTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PublishTarget::Local { data_dir, .. } => write!(f, "{}", data_dir.display()),
            PublishTarget::Fluvio(options) => {
                write!(f, "Fluvio topic {} at {}", options.topic, options.endpoint)
            }
        }
    }
}

/// What to publish and where.
#[derive(Debug, Clone)]
pub struct PublishOptions {
    /// The destination of the events.
    pub target: PublishTarget,
    /// Append lines without validating them.
    pub raw: bool,
    /// The payload limit lines are validated against.
    pub max_payload_bytes: usize,
}

/// Why nothing, or not everything, was published.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// Reading the input failed.
    #[error("cannot read {input}")]
    Read {
        /// The input's name (`-` for standard input).
        input: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Some lines are invalid; nothing was written.
    #[error("{} invalid line(s) in {input}; nothing was published:\n{}", .errors.len(), .errors.join("\n"))]
    Invalid {
        /// The input's name.
        input: String,
        /// One message per bad line: `line N: reason`.
        errors: Vec<String>,
    },
    /// The local log or the Fluvio topic failed. Events of chunks acknowledged before the
    /// failure stay published.
    #[error("cannot publish to {target} ({published} event(s) published before the failure)")]
    Log {
        /// The local log's data directory or the Fluvio topic.
        target: String,
        /// Events published before the failure.
        published: usize,
        /// The log's error.
        source: Box<hookflow_connectors::ConnectorError>,
    },
}

/// Counts of a successful publish.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PublishReport {
    /// Records appended.
    pub appended: usize,
    /// Records appended without passing validation (`raw` only).
    pub invalid_appended: usize,
}

/// Publishes the lines of `input` (`-` for standard input).
///
/// # Errors
///
/// See [`PublishError`]. Validation errors write nothing; a log error may leave earlier
/// chunks appended, which the report of the error says.
pub fn publish_path(
    input: &Path,
    options: &PublishOptions,
    now_ms: Millis,
) -> Result<PublishReport, PublishError> {
    let name = input.display().to_string();
    let reader: Box<dyn Read> = if name == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        let file = std::fs::File::open(input).map_err(|source| PublishError::Read {
            input: name.clone(),
            source,
        })?;
        Box::new(file)
    };
    publish_reader(reader, &name, options, now_ms)
}

/// Publishes the lines read from `reader`; `name` is used in messages.
///
/// # Errors
///
/// See [`publish_path`].
pub fn publish_reader(
    reader: impl Read,
    name: &str,
    options: &PublishOptions,
    now_ms: Millis,
) -> Result<PublishReport, PublishError> {
    let mut lines: Vec<(String, Vec<u8>)> = Vec::new();
    let mut errors = Vec::new();
    let mut invalid_appended = 0;
    let mut reader = BufReader::new(reader);
    let mut line_number = 0usize;
    loop {
        let mut line = Vec::new();
        let read = reader
            .read_until(b'\n', &mut line)
            .map_err(|source| PublishError::Read {
                input: name.to_string(),
                source,
            })?;
        if read == 0 {
            break;
        }
        line_number += 1;
        while matches!(line.last(), Some(b'\n' | b'\r')) {
            line.pop();
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match decode_event(&line, options.max_payload_bytes) {
            Ok(event) => lines.push((event.tenant, line)),
            Err(error) if options.raw => {
                invalid_appended += 1;
                lines.push((tenant_hint(&line), line));
                tracing::debug!(line = line_number, %error, "Appending an invalid line as it is (--raw).");
            }
            Err(error) => errors.push(format!("line {line_number}: {error}")),
        }
    }
    if !errors.is_empty() {
        return Err(PublishError::Invalid {
            input: name.to_string(),
            errors,
        });
    }

    let mut published = 0;
    let log_error = |published: usize| {
        move |source: hookflow_connectors::ConnectorError| PublishError::Log {
            target: options.target.to_string(),
            published,
            source: Box::new(source),
        }
    };
    let mut sink = Appender::open(&options.target).map_err(log_error(0))?;
    for chunk in lines.chunks(APPEND_CHUNK) {
        let records: Vec<(&[u8], &[u8])> = chunk
            .iter()
            .map(|(tenant, line)| (tenant.as_bytes(), line.as_slice()))
            .collect();
        sink.append(&records, now_ms)
            .map_err(log_error(published))?;
        published += records.len();
    }
    Ok(PublishReport {
        appended: lines.len(),
        invalid_appended,
    })
}

/// An open publish target: the one place that appends events to the configured source, used
/// by `hookflow publish`, `POST /v1/events` and the operational events of alerts.
pub enum Appender {
    /// The local log.
    Local(LocalLog),
    /// A Fluvio topic's producer.
    Fluvio(Box<FluvioSource>),
}

impl Appender {
    /// Opens `target` for appending.
    ///
    /// # Errors
    ///
    /// Fails if the local log cannot be opened or the Fluvio cluster cannot be reached.
    pub fn open(target: &PublishTarget) -> Result<Self, ConnectorError> {
        match target {
            PublishTarget::Local {
                data_dir,
                partitions,
            } => LocalLog::open(
                data_dir,
                &LocalLogOptions {
                    partitions: *partitions,
                },
            )
            .map(Appender::Local),
            PublishTarget::Fluvio(fluvio) => {
                FluvioSource::connect(fluvio.clone(), SourceStatus::new())
                    .map(|source| Appender::Fluvio(Box::new(source)))
            }
        }
    }

    /// Appends `records`, each (partition key, record), and returns their positions. The
    /// local log appends them in one transaction; Fluvio returns once the SPU acknowledged
    /// every one.
    ///
    /// # Errors
    ///
    /// Fails if the source refuses the write.
    pub fn append(
        &mut self,
        records: &[(&[u8], &[u8])],
        now_ms: Millis,
    ) -> Result<Vec<(u32, u64)>, ConnectorError> {
        match self {
            Appender::Local(log) => log.append(records, now_ms),
            Appender::Fluvio(topic) => topic.produce(records),
        }
    }
}

/// The tenant of a line that failed validation, if it has one, so that it still lands in
/// its tenant's partition.
fn tenant_hint(line: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(line)
        .ok()
        .and_then(|value| value.get("tenant")?.as_str().map(str::to_string))
        .unwrap_or_default()
}
