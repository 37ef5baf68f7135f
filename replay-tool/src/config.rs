//! The parts of a `hookflow run` config file that replay and stats need: the archive
//! directory, the source (the local log's partition count, or a Fluvio topic), and each
//! endpoint's id, tenant and event types. The endpoints a pipeline stored in its state store
//! win over the file's, as they do for `hookflow run`.
//!
//! Unknown tables and fields are ignored here, because `hookflow run` validates the whole
//! file and this crate cannot depend on the pipeline crate that owns that validation.

use std::path::{Path, PathBuf};

use hookflow_connectors::{FluvioOptions, StateStore};
use hookflow_schemas::EventTypePattern;
use serde::Deserialize;

use crate::{ReplayError, Result};

/// An endpoint as replay sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointView {
    /// The endpoint's id.
    pub id: String,
    /// The tenant whose events it receives.
    pub tenant: String,
    /// The event types it subscribes to.
    pub event_types: Vec<EventTypePattern>,
}

impl EndpointView {
    /// Returns whether the endpoint subscribes to `event_type`.
    pub fn subscribes_to(&self, event_type: &str) -> bool {
        self.event_types.iter().any(|p| p.matches(event_type))
    }
}

/// What replay and stats read from the config file.
#[derive(Debug, Clone, Default)]
pub struct ToolConfig {
    /// The archive directory, under the data directory when relative. Default `archive`.
    pub archive_dir: Option<PathBuf>,
    /// Partitions of a new local log. Default 4.
    pub partitions: Option<u32>,
    /// The configured endpoints.
    pub endpoints: Vec<EndpointView>,
    /// The Fluvio topic events are republished to, when `[source] kind = "fluvio"`.
    pub fluvio: Option<FluvioOptions>,
}

#[derive(Deserialize, Default)]
struct FileView {
    #[serde(default)]
    archive: ArchiveView,
    #[serde(default)]
    local_log: LocalLogView,
    #[serde(default)]
    source: SourceView,
    #[serde(default)]
    endpoints: Vec<EndpointFile>,
}

#[derive(Deserialize, Default)]
struct SourceView {
    kind: Option<String>,
    fluvio: Option<FluvioView>,
}

#[derive(Deserialize)]
struct FluvioView {
    endpoint: String,
    topic: String,
    timeout_ms: Option<u64>,
}

#[derive(Deserialize, Default)]
struct ArchiveView {
    dir: Option<PathBuf>,
}

#[derive(Deserialize, Default)]
struct LocalLogView {
    partitions: Option<u32>,
}

#[derive(Deserialize)]
struct EndpointFile {
    id: String,
    tenant: String,
    event_types: Vec<String>,
}

impl ToolConfig {
    /// Reads the config file at `path`.
    ///
    /// # Errors
    ///
    /// Fails if the file cannot be read, is not TOML of the expected shape, or an endpoint's
    /// event-type pattern is invalid.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| ReplayError::Io {
            action: "read config file",
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses config text; `path` is used in messages only.
    ///
    /// # Errors
    ///
    /// See [`ToolConfig::load`].
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let file: FileView = toml::from_str(text).map_err(|e| {
            ReplayError::Invalid(format!(
                "invalid config file {}: {}",
                path.display(),
                e.to_string().trim_end()
            ))
        })?;
        let mut endpoints = Vec::with_capacity(file.endpoints.len());
        for (index, endpoint) in file.endpoints.into_iter().enumerate() {
            let event_types = endpoint
                .event_types
                .iter()
                .map(|pattern| EventTypePattern::parse(pattern))
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| {
                    ReplayError::Invalid(format!(
                        "invalid config file {}: field `endpoints[{index}].event_types`: {e}",
                        path.display()
                    ))
                })?;
            endpoints.push(EndpointView {
                id: endpoint.id,
                tenant: endpoint.tenant,
                event_types,
            });
        }
        let fluvio = match (file.source.kind.as_deref(), file.source.fluvio) {
            (None | Some("local"), _) => None,
            (Some("fluvio"), Some(fluvio)) => {
                let mut options = FluvioOptions::new(fluvio.endpoint, fluvio.topic);
                // Republishing must not move the consumer offset that mirrors the pipeline's
                // checkpoint.
                options.consumer = String::new();
                if let Some(timeout_ms) = fluvio.timeout_ms {
                    options.timeout_ms = timeout_ms;
                }
                Some(options)
            }
            (Some("fluvio"), None) => {
                return Err(ReplayError::Invalid(format!(
                    "invalid config file {}: field `source.fluvio`: required when `source.kind` is \"fluvio\"",
                    path.display()
                )))
            }
            (Some(other), _) => {
                return Err(ReplayError::Invalid(format!(
                    "invalid config file {}: field `source.kind`: unknown source {other:?}; expected \"local\" or \"fluvio\"",
                    path.display()
                )))
            }
        };
        Ok(ToolConfig {
            archive_dir: file.archive.dir,
            partitions: file.local_log.partitions,
            endpoints,
            fluvio,
        })
    }

    /// Adds the endpoints stored by the pipeline under `data_dir`, when it has run there. A
    /// stored endpoint wins over the file's entry with its id, and the file's other entries
    /// stay, as `hookflow run` seeds them at its next start. Endpoints made through the
    /// management API are only in the store.
    ///
    /// # Errors
    ///
    /// Fails if the store exists but cannot be read.
    pub fn with_stored_endpoints(mut self, data_dir: &Path) -> Result<Self> {
        // A cluster keeps its endpoint directory in process 0's store.
        let state = data_dir.join("state");
        let dir = if state.join("process-0").join("state.sqlite").exists() {
            state.join("process-0")
        } else {
            state
        };
        if !dir.join("state.sqlite").exists() {
            return Ok(self);
        }
        let stored = StateStore::open_dir(&dir)?.endpoints()?;

        let mut endpoints: Vec<EndpointView> = stored
            .into_iter()
            .map(|endpoint| EndpointView {
                id: endpoint.id,
                tenant: endpoint.tenant,
                event_types: endpoint.event_types,
            })
            .collect();
        for configured in self.endpoints {
            if !endpoints.iter().any(|stored| stored.id == configured.id) {
                endpoints.push(configured);
            }
        }
        self.endpoints = endpoints;
        Ok(self)
    }

    /// Returns the archive directory for `data_dir`.
    pub fn archive_dir(&self, data_dir: &Path) -> PathBuf {
        match &self.archive_dir {
            Some(dir) if dir.is_absolute() => dir.clone(),
            Some(dir) => data_dir.join(dir),
            None => data_dir.join("archive"),
        }
    }

    /// Returns the endpoint with `id`, if configured.
    pub fn endpoint(&self, id: &str) -> Option<&EndpointView> {
        self.endpoints.iter().find(|endpoint| endpoint.id == id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_reads_the_example_config() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/hookflow.toml");
        let config = ToolConfig::load(&path).expect("the example config parses");
        assert_eq!(config.partitions, Some(4));
        assert_eq!(config.archive_dir(Path::new("/d")), Path::new("/d/archive"));
        let billing = config.endpoint("ep_acme_billing").expect("ep_acme_billing");
        assert_eq!(billing.tenant, "acme");
        assert!(billing.subscribes_to("charge.succeeded"));
        assert!(!billing.subscribes_to("user.created"));
    }

    #[test]
    fn parse_names_bad_pattern() {
        let text = "[[endpoints]]\nid = \"e\"\ntenant = \"t\"\nurl = \"http://x\"\nevent_types = [\"a*b\"]\n";
        let error = ToolConfig::parse(text, Path::new("c.toml")).expect_err("bad pattern");
        assert!(
            error.to_string().contains("endpoints[0].event_types"),
            "{error}"
        );
    }

    #[test]
    fn stored_endpoints_win_and_file_fills_in() {
        let dir = tempfile::tempdir().expect("dir");
        let text = "[[endpoints]]\nid = \"ep_a\"\ntenant = \"file\"\nurl = \"http://x\"\nevent_types = [\"a.*\"]\n\
                    [[endpoints]]\nid = \"ep_b\"\ntenant = \"file\"\nurl = \"http://x\"\nevent_types = [\"b.*\"]\n";
        let config = ToolConfig::parse(text, Path::new("c.toml")).expect("config");

        // No store yet: the file's endpoints.
        let unchanged = config
            .clone()
            .with_stored_endpoints(dir.path())
            .expect("no store");
        assert_eq!(unchanged.endpoints, config.endpoints);

        let mut store = StateStore::open(dir.path()).expect("store");
        let stored = |id: &str, tenant: &str, pattern: &str| hookflow_schemas::Endpoint {
            id: id.to_string(),
            tenant: tenant.to_string(),
            url: "http://127.0.0.1:9/".to_string(),
            event_types: vec![EventTypePattern::parse(pattern).expect("pattern")],
            secrets: Vec::new(),
            headers: Default::default(),
            timeout_ms: 1000,
            connect_timeout_ms: 1000,
            max_in_flight: 1,
            enabled: true,
            rate_limit: None,
        };
        store
            .put_endpoint(&stored("ep_a", "store", "c.*"), 1)
            .expect("put");
        store
            .put_endpoint(&stored("ep_api", "store", "d.*"), 1)
            .expect("put");
        drop(store);

        let merged = config.with_stored_endpoints(dir.path()).expect("merged");
        let ids: Vec<&str> = merged.endpoints.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(ids, ["ep_a", "ep_api", "ep_b"]);
        let a = merged.endpoint("ep_a").expect("ep_a");
        assert_eq!(a.tenant, "store");
        assert!(a.subscribes_to("c.x"));
        assert!(!a.subscribes_to("a.x"));
        assert_eq!(merged.endpoint("ep_b").expect("ep_b").tenant, "file");
    }
}
