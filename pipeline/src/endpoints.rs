//! `hookflow endpoints`: the endpoint directory of a data directory as an operator sees it,
//! enabling an endpoint, and applying an endpoints file.
//!
//! In: the configuration, the data directory's state store and, for `apply`, a TOML file of
//! `[[endpoints]]`. Out: a table of the stored endpoints with their parked deliveries, each
//! enabled, disabled in the directory, or disabled at run time with its reason and time; or the
//! store with endpoints enabled, created or replaced. The store is the truth for endpoints: a
//! configured endpoint whose id the store lacks is inserted at the next start, and the list
//! shows it as such. Every command holds the data directory's lock, so it never races a
//! running pipeline; a running pipeline is changed through its endpoint registry instead.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use hookflow_connectors::StateStore;
use hookflow_operators::deliver::without_credentials;
use hookflow_schemas::{format_millis, Endpoint};

use crate::cluster::Cluster;
use crate::config::Config;
use crate::dataflow::lock_data_dir;

/// Renders the stored endpoints with their state in `data_dir`'s state store, one line each,
/// then the configured endpoints the store lacks, and the endpoints disabled at run time that
/// neither names.
///
/// # Errors
///
/// Fails if the data directory is in use by a running pipeline or its store cannot be read.
pub fn list(config: &Config, data_dir: &Path) -> anyhow::Result<String> {
    let _lock = lock_data_dir(data_dir)?;
    let store = open(data_dir)?;
    let stored = store.endpoints()?;
    let disabled = store.disabled_endpoints()?;
    let parked = store.parked_by_endpoint()?;

    let mut table = String::new();
    let _ = writeln!(
        table,
        "{:<24} {:<16} {:>7}  {:<44} url",
        "endpoint", "tenant", "parked", "state"
    );
    let stored_ids: HashSet<&str> = stored.iter().map(|e| e.id.as_str()).collect();
    let waiting: Vec<Endpoint> = config
        .endpoints()
        .into_iter()
        .filter(|endpoint| !stored_ids.contains(endpoint.id.as_str()))
        .collect();
    for (endpoint, from_config) in stored
        .iter()
        .map(|e| (e, false))
        .chain(waiting.iter().map(|e| (e, true)))
    {
        let state = match disabled.iter().find(|d| d.endpoint_id == endpoint.id) {
            Some(entry) => format!(
                "disabled at {}: {}",
                format_millis(entry.disabled_at_ms),
                entry.reason
            ),
            None if from_config => "configured; stored at the next start".to_string(),
            None if !endpoint.enabled => "disabled in the directory".to_string(),
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
    let known: HashSet<&str> = stored_ids
        .iter()
        .copied()
        .chain(waiting.iter().map(|e| e.id.as_str()))
        .collect();
    for entry in disabled
        .iter()
        .filter(|d| !known.contains(d.endpoint_id.as_str()))
    {
        let _ = writeln!(
            table,
            "{:<24} {:<16} {:>7}  not in the directory; disabled at {}: {}",
            entry.endpoint_id,
            "-",
            parked.get(&entry.endpoint_id).copied().unwrap_or(0),
            format_millis(entry.disabled_at_ms),
            entry.reason
        );
    }
    Ok(table)
}

/// Enables `endpoint_id` in `data_dir`'s state store: ends a run-time disabling and sets the
/// stored endpoint's `enabled`. Returns a line for the operator saying what the next run will
/// do.
///
/// # Errors
///
/// Fails if the data directory is in use by a running pipeline, the store cannot be written,
/// or the endpoint is neither disabled at run time nor disabled in the directory.
pub fn enable(data_dir: &Path, endpoint_id: &str) -> anyhow::Result<String> {
    let _lock = lock_data_dir(data_dir)?;
    let mut store = open(data_dir)?;
    let (was_disabled, parked) = store.enable_endpoint(endpoint_id)?;
    let mut was_off = false;
    let stored = store.endpoint(endpoint_id)?;
    if let Some(mut endpoint) = stored.clone() {
        if !endpoint.enabled {
            endpoint.enabled = true;
            store.put_endpoint(&endpoint, wall_clock_ms())?;
            was_off = true;
        }
    }
    if stored.is_none() && !was_disabled {
        anyhow::bail!(
            "endpoint `{endpoint_id}` not found in the state store of {}              (`hookflow endpoints list` shows the stored endpoints)",
            data_dir.display()
        );
    }
    if !was_disabled && !was_off {
        anyhow::bail!(
            "endpoint `{endpoint_id}` is not disabled, so there is nothing to enable \
             (`hookflow endpoints list` shows each endpoint's state)"
        );
    }
    Ok(format!(
        "endpoint `{endpoint_id}` enabled; the next `hookflow run` resumes its {parked} parked \
         deliveries"
    ))
}

/// Creates or replaces, in `data_dir`'s state store, each endpoint that the endpoints file
/// `file` names, validated against `config`'s delivery settings. Endpoints the file does not
/// name stay as stored. Returns a line per endpoint for the operator.
///
/// # Errors
///
/// Fails if the file cannot be read or is invalid (the message names the field; nothing is
/// stored then), the data directory is in use by a running pipeline, or the store cannot be
/// written.
pub fn apply(config: &Config, data_dir: &Path, file: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("cannot read the endpoints file {}", file.display()))?;
    let endpoints = config.parse_endpoints(&text, file)?;
    if endpoints.is_empty() {
        anyhow::bail!(
            "{} lists no `[[endpoints]]`; nothing to apply",
            file.display()
        );
    }
    let _lock = lock_data_dir(data_dir)?;
    let mut store = open(data_dir)?;
    let mut report = String::new();
    let now_ms = wall_clock_ms();
    for endpoint in &endpoints {
        let created = store.put_endpoint(endpoint, now_ms)?;
        let _ = writeln!(
            report,
            "endpoint `{}` {}",
            endpoint.id,
            if created { "created" } else { "updated" }
        );
    }
    let _ = write!(
        report,
        "{} endpoints applied; the next `hookflow run` uses them",
        endpoints.len()
    );
    Ok(report)
}

/// Returns the wall clock's time in ms since the Unix epoch.
fn wall_clock_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
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

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    fn entry(id: &str, url: &str) -> String {
        format!(
            "[[endpoints]]\nid = \"{id}\"\ntenant = \"acme\"\nurl = \"{url}\"\n\
             event_types = [\"*\"]\nsecret = \"{SECRET}\"\n"
        )
    }

    /// Returns a config with one endpoint, `kept`, on loopback.
    fn config_with_kept() -> Config {
        let text = format!(
            "[delivery]\nallowed_private_cidrs = [\"127.0.0.1/32\"]\n{}",
            entry("kept", "http://127.0.0.1:9/kept")
        );
        Config::parse(&text, Path::new("hookflow.toml")).expect("config")
    }

    #[test]
    fn apply_creates_updates_and_keeps() {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = config_with_kept();
        let file = dir.path().join("endpoints.toml");

        std::fs::write(&file, entry("ep1", "http://127.0.0.1:9/a")).expect("write");
        let created = apply(&config, dir.path(), &file).expect("apply");
        assert!(created.contains("endpoint `ep1` created"), "{created}");
        let mut store = open(dir.path()).expect("store");
        store
            .put_endpoint(&config.endpoints()[0], 1)
            .expect("store kept");
        drop(store);

        std::fs::write(&file, entry("ep1", "http://127.0.0.1:9/b")).expect("write");
        let updated = apply(&config, dir.path(), &file).expect("apply");
        assert!(updated.contains("endpoint `ep1` updated"), "{updated}");
        let store = open(dir.path()).expect("store");
        let ids: Vec<String> = store
            .endpoints()
            .expect("read")
            .into_iter()
            .map(|e| e.id)
            .collect();
        assert_eq!(ids, ["ep1", "kept"], "apply deletes nothing");
        let url = store.endpoint("ep1").expect("read").map(|e| e.url);
        assert_eq!(url.as_deref(), Some("http://127.0.0.1:9/b"));
    }

    #[test]
    fn enable_names_unknown_and_enabled_endpoints() {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = config_with_kept();
        let mut store = open(dir.path()).expect("store");
        store
            .put_endpoint(&config.endpoints()[0], 1)
            .expect("store kept");
        drop(store);

        let unknown = format!("{:#}", enable(dir.path(), "nope").expect_err("unknown"));
        assert!(unknown.contains("`nope` not found"), "{unknown}");
        let enabled = format!("{:#}", enable(dir.path(), "kept").expect_err("enabled"));
        assert!(enabled.contains("is not disabled"), "{enabled}");
    }

    #[test]
    fn apply_rejects_invalid_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = Config::parse("", Path::new("hookflow.toml")).expect("config");
        let file = dir.path().join("endpoints.toml");
        // Loopback is not in `allowed_private_cidrs` of this configuration.
        let text = format!(
            "{}{}",
            entry("ok", "https://example.com/hook"),
            entry("bad", "http://127.0.0.1:9/a")
        );
        std::fs::write(&file, text).expect("write");
        let error = apply(&config, dir.path(), &file).expect_err("invalid address");
        let message = format!("{error:#}");
        assert!(message.contains("endpoints[1].url"), "{message}");
        let store = open(dir.path()).expect("store");
        assert!(
            store.endpoints().expect("read").is_empty(),
            "nothing is stored"
        );
    }
}
