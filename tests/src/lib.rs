//! Whole-pipeline tests of hookflow, run in process through the `hookflow` library against real
//! HTTP receivers on 127.0.0.1, the real local log and real Parquet files.
//!
//! The tests live in `tests/tests/`; this library only holds what they share.

#![warn(missing_docs)]

use hookflow_operators::stop::StopSignal;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use hookflow::config::Config;
use hookflow::dataflow::{run, RunOptions, RunReport};
use hookflow::publish::{publish_reader, PublishOptions};
use hookflow_operators::clock::{Clock, WallClock};

/// A signing secret for test endpoints.
pub const SECRET: &str = "whsec_RTPHghziaKPNKV/Y78ALF6hfDn11pL7egmdm4fV+DaE=";

/// One NDJSON event line.
pub fn event_line(tenant: &str, id: &str, event_type: &str, payload: &str) -> String {
    format!(
        r#"{{"id":"{id}","tenant":"{tenant}","type":"{event_type}","created_at":"2026-12-04T10:00:00Z","payload":{payload}}}"#
    )
}

/// Config text allowing loopback, with one endpoint per (id, tenant, url, patterns) and
/// `extra` appended verbatim.
pub fn config_text(endpoints: &[(&str, &str, String, &str)], extra: &str) -> String {
    let mut text = String::from("[delivery]\nallowed_private_cidrs = [\"127.0.0.1/32\"]\n");
    text.push_str(extra);
    for (id, tenant, url, patterns) in endpoints {
        text.push_str(&format!(
            "\n[[endpoints]]\nid = \"{id}\"\ntenant = \"{tenant}\"\nurl = \"{url}\"\n\
             event_types = {patterns}\nsecret = \"{SECRET}\"\ntimeout_ms = 5000\n"
        ));
    }
    text
}

/// Publishes `lines` (as `--raw` when `raw`) to the local log in `data_dir`.
///
/// # Errors
///
/// Fails as `hookflow publish` would.
pub fn publish_lines(data_dir: &Path, lines: &[String], raw: bool) -> anyhow::Result<usize> {
    let text = lines.join("\n");
    let options = PublishOptions {
        target: hookflow::publish::PublishTarget::Local {
            data_dir: data_dir.to_path_buf(),
            partitions: 4,
        },
        raw,
        max_payload_bytes: hookflow_schemas::DEFAULT_MAX_PAYLOAD_BYTES,
    };
    Ok(publish_reader(text.as_bytes(), "test events", &options, WallClock.now_ms())?.appended)
}

/// Runs the pipeline until idle on `data_dir` with the config `text`.
///
/// # Errors
///
/// Fails if the config is invalid or the pipeline fails.
pub fn run_until_idle(data_dir: &Path, text: &str, workers: usize) -> anyhow::Result<RunReport> {
    let mut config = Config::parse(text, Path::new("test.toml"))?;
    config.pipeline.workers = workers;
    run(RunOptions {
        config,
        data_dir: data_dir.to_path_buf(),
        until_idle: true,
        clock: Arc::new(WallClock),
        stop: Arc::new(StopSignal::new()),
        cluster: hookflow::cluster::Cluster::default(),
    })
}

/// Receiver behaviours keyed by path, for [`hookflow::receiver::Receiver::start`].
pub type Behaviours = HashMap<String, hookflow::receiver::Behaviour>;
