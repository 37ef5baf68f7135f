//! `hookflow endpoints`: the state of each endpoint as an operator sees it, and enabling an
//! endpoint that hookflow disabled at run time.
//!
//! In: the configuration and the data directory's state store. Out: a table of endpoints
//! with their parked deliveries, each enabled, disabled in the configuration, or disabled at
//! run time with its reason and time. Or: the state store with one endpoint enabled again, so
//! that the next run resumes its parked deliveries. Both hold the data directory's lock, so they
//! never race a running pipeline.
//!
//! TODO: enabling takes effect at the next start; a running pipeline learns of it only once
//! the management API feeds endpoint changes into the dataflow.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use hookflow_connectors::StateStore;
use hookflow_operators::deliver::without_credentials;
use hookflow_schemas::format_millis;

use crate::cluster::Cluster;
use crate::config::Config;
use crate::dataflow::lock_data_dir;

/// Renders the endpoints of `config` with their state in `data_dir`'s state store, one line
/// each, plus the endpoints disabled at run time that the configuration no longer names.
///
/// # Errors
///
/// Fails if the data directory is in use by a running pipeline or its store cannot be read.
pub fn list(config: &Config, data_dir: &Path) -> anyhow::Result<String> {
    let _lock = lock_data_dir(data_dir)?;
    let store = open(data_dir)?;
    let disabled = store.disabled_endpoints()?;
    let parked = store.parked_by_endpoint()?;

    let mut table = String::new();
    let _ = writeln!(
        table,
        "{:<24} {:<16} {:>7}  {:<44} url",
        "endpoint", "tenant", "parked", "state"
    );
    for endpoint in config.endpoints() {
        let state = match disabled.iter().find(|d| d.endpoint_id == endpoint.id) {
            Some(entry) => format!(
                "disabled at {}: {}",
                format_millis(entry.disabled_at_ms),
                entry.reason
            ),
            None if !endpoint.enabled => "disabled in the configuration".to_string(),
            None => "enabled".to_string(),
        };
        let url = url::Url::parse(&endpoint.url)
            .map(without_credentials)
            .unwrap_or_else(|_| "(invalid URL)".to_string());
        let _ = writeln!(
            table,
            "{:<24} {:<16} {:>7}  {:<44} {url}",
            endpoint.id,
            endpoint.tenant,
            parked.get(&endpoint.id).copied().unwrap_or(0),
            state
        );
    }
    let configured: Vec<String> = config.endpoints().into_iter().map(|e| e.id).collect();
    for entry in disabled
        .iter()
        .filter(|d| !configured.contains(&d.endpoint_id))
    {
        let _ = writeln!(
            table,
            "{:<24} {:<16} {:>7}  not in the configuration; disabled at {}: {}",
            entry.endpoint_id,
            "-",
            parked.get(&entry.endpoint_id).copied().unwrap_or(0),
            format_millis(entry.disabled_at_ms),
            entry.reason
        );
    }
    Ok(table)
}

/// Enables `endpoint_id` again in `data_dir`'s state store, and returns a line for the
/// operator saying what the next run will do.
///
/// # Errors
///
/// Fails if the data directory is in use by a running pipeline, the store cannot be written,
/// or hookflow never disabled the endpoint (the message names where to look instead).
pub fn enable(data_dir: &Path, endpoint_id: &str) -> anyhow::Result<String> {
    let _lock = lock_data_dir(data_dir)?;
    let mut store = open(data_dir)?;
    let (was_disabled, parked) = store.enable_endpoint(endpoint_id)?;
    if !was_disabled {
        anyhow::bail!(
            "endpoint `{endpoint_id}` is not disabled at run time, so there is nothing to enable \
             (`hookflow endpoints list` shows each endpoint's state; one with `enabled = false` \
             is enabled in the configuration file)"
        );
    }
    Ok(format!(
        "endpoint `{endpoint_id}` enabled; the next `hookflow run` resumes its {parked} parked \
         deliveries"
    ))
}

fn open(data_dir: &Path) -> anyhow::Result<StateStore> {
    // TODO: a cluster keeps each endpoint's state in the store of the process that owns it
    // (`Cluster::process_owning_endpoint`); reading those stores would support clusters here.
    // Until then, a cluster's data directory is rejected, and no single-process store is
    // created in it.
    Cluster::default().check_layout(data_dir)?;
    StateStore::open(data_dir)
        .with_context(|| format!("cannot open the state store in {}", data_dir.display()))
}
