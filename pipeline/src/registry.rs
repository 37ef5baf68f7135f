//! The endpoint registry: creates, changes and deletes endpoints while the pipeline runs.
//!
//! In: [`EndpointChange`]s from the management API or an embedding program. Out: the change,
//! written to the `endpoints` table of the state store of the process that serves the
//! management API and then sent to worker 0 of that process. That worker feeds it into the
//! dataflow at the current time T of its inputs: into the subscriptions collection that route
//! half-joins with, and into the endpoint-updates stream broadcast to every worker's deliver
//! operator. [`EndpointRegistry::apply`] returns once a probe on both has passed T, so an
//! event read after it returns is routed and delivered with the change. Events read before
//! are not routed again.
//!
//! State: one SQLite connection of its own (WAL, busy timeout, as every state-store
//! connection), and the sending end of the channel to worker 0. A mutex spans the write and
//! the send, so the dataflow receives changes in the order the store recorded them.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};

use hookflow_connectors::{ConnectorError, DisabledEndpoint, StateStore};
use hookflow_schemas::{Endpoint, Millis};
use tokio::sync::oneshot;

/// A change to the endpoint directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointChange {
    /// Creates the endpoint, or replaces the one with its id. An endpoint applied with
    /// `enabled = true` is enabled even if hookflow disabled it at run time (410 Gone, failing
    /// too long), and its parked deliveries resume.
    Upsert(Endpoint),
    /// Deletes the endpoint; its pending, queued and parked deliveries are dead-lettered with
    /// the error kind `endpoint_deleted`.
    Delete {
        /// The endpoint's id.
        id: String,
    },
}

impl EndpointChange {
    /// Returns the id of the endpoint the change is about.
    pub fn endpoint_id(&self) -> &str {
        match self {
            EndpointChange::Upsert(endpoint) => &endpoint.id,
            EndpointChange::Delete { id } => id,
        }
    }
}

/// The result of [`EndpointRegistry::apply`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// For an upsert, whether the endpoint was created (`false`: it replaced a stored one).
    /// For a delete, always `false`.
    pub created: bool,
    /// The dataflow time (ms) the change was fed in at. Events read at or after it are routed
    /// and delivered with the change.
    pub effective_at_ms: Millis,
}

/// The reason a change was not applied.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// A delete named an endpoint the directory does not hold.
    #[error("endpoint `{id}` not found")]
    NotFound {
        /// The id asked for.
        id: String,
    },
    /// An upsert carried an endpoint that cannot be delivered to.
    #[error("invalid endpoint field `{field}`: {problem}")]
    Invalid {
        /// The field of [`Endpoint`], as a path such as `rate_limit.window_ms`.
        field: String,
        /// The problem with it.
        problem: String,
    },
    /// The state store could not be read or written; nothing changed.
    #[error("the endpoint store failed: {0}")]
    Store(#[from] ConnectorError),
    /// The change is stored, but the pipeline stopped (or never started) before the dataflow
    /// absorbed it. The next start loads it from the store.
    #[error(
        "the change to endpoint `{id}` is stored, but the pipeline is not running, so it takes \
         effect at the next start"
    )]
    PipelineStopped {
        /// The endpoint the change was about.
        id: String,
    },
}

/// A change on its way to the dataflow, with where to report the time it was fed in at.
pub(crate) struct PendingChange {
    pub(crate) change: EndpointChange,
    pub(crate) fed: oneshot::Sender<Millis>,
}

/// The receiving end of the registry's changes, taken by worker 0 of the process that serves
/// the management API.
pub(crate) type ChangeFeed = Receiver<PendingChange>;

/// The endpoint directory of a running pipeline. Cheap to clone; `Send + Sync`.
#[derive(Clone)]
pub struct EndpointRegistry {
    inner: Arc<Inner>,
}

struct Inner {
    state_dir: PathBuf,
    /// The store connection and the channel to worker 0, locked together.
    writer: Mutex<Writer>,
}

struct Writer {
    store: StateStore,
    changes: Sender<PendingChange>,
}

impl EndpointRegistry {
    /// Opens the registry on the state store in `state_dir`, returning it and the feed the
    /// dataflow drains. Until a pipeline drains the feed, `apply` stores changes and then
    /// reports [`RegistryError::PipelineStopped`] once the feed is dropped.
    ///
    /// # Errors
    ///
    /// Fails if the state store cannot be opened.
    pub(crate) fn open(state_dir: &Path) -> Result<(Self, ChangeFeed), RegistryError> {
        let store = StateStore::open_dir(state_dir)?;
        let (changes, feed) = mpsc::channel();
        let registry = EndpointRegistry {
            inner: Arc::new(Inner {
                state_dir: state_dir.to_path_buf(),
                writer: Mutex::new(Writer { store, changes }),
            }),
        };
        Ok((registry, feed))
    }

    /// Returns the directory of the state store the registry writes.
    pub fn state_dir(&self) -> &Path {
        &self.inner.state_dir
    }

    /// Reads every endpoint, by id.
    ///
    /// # Errors
    ///
    /// Fails if the store cannot be read.
    pub fn list(&self) -> Result<Vec<Endpoint>, RegistryError> {
        Ok(self.lock().store.endpoints()?)
    }

    /// Reads one endpoint.
    ///
    /// # Errors
    ///
    /// Fails if the store cannot be read.
    pub fn get(&self, id: &str) -> Result<Option<Endpoint>, RegistryError> {
        Ok(self.lock().store.endpoint(id)?)
    }

    /// Reads the endpoints hookflow disabled at run time (410 Gone, failing too long) that the
    /// registry's store records. In a cluster, that is only the endpoints process 0 owns.
    ///
    /// # Errors
    ///
    /// Fails if the store cannot be read.
    pub fn disabled_at_run_time(&self) -> Result<Vec<DisabledEndpoint>, RegistryError> {
        Ok(self.lock().store.disabled_endpoints()?)
    }

    /// Persists the change, feeds it into the running dataflow, and returns once the
    /// dataflow has absorbed it (its probe passed the change's time).
    ///
    /// Dropping the returned future after the store write does not undo the change; it still
    /// reaches the dataflow.
    ///
    /// # Errors
    ///
    /// [`RegistryError::Invalid`] and [`RegistryError::NotFound`] change nothing;
    /// [`RegistryError::Store`] changes nothing; [`RegistryError::PipelineStopped`] means the
    /// change is stored and takes effect at the next start.
    pub async fn apply(&self, change: EndpointChange) -> Result<Applied, RegistryError> {
        if let EndpointChange::Upsert(endpoint) = &change {
            validate(endpoint)?;
        }
        let id = change.endpoint_id().to_string();
        let inner = Arc::clone(&self.inner);
        let submitted = tokio::task::spawn_blocking(move || inner.store_and_send(change))
            .await
            .map_err(|_| RegistryError::PipelineStopped { id: id.clone() })??;
        let (created, fed) = submitted;
        let effective_at_ms = fed
            .await
            .map_err(|_| RegistryError::PipelineStopped { id })?;
        Ok(Applied {
            created,
            effective_at_ms,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Writer> {
        // A panic while holding the lock leaves the store connection usable: every write is
        // one transaction.
        self.inner
            .writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Inner {
    /// Writes the change and sends it to worker 0, under one lock.
    fn store_and_send(
        &self,
        change: EndpointChange,
    ) -> Result<(bool, oneshot::Receiver<Millis>), RegistryError> {
        let mut writer = self
            .writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let created = match &change {
            EndpointChange::Upsert(endpoint) => {
                writer.store.put_endpoint(endpoint, wall_clock_ms())?
            }
            EndpointChange::Delete { id } => {
                if !writer.store.delete_endpoint(id)? {
                    return Err(RegistryError::NotFound { id: id.clone() });
                }
                false
            }
        };
        let (fed, absorbed) = oneshot::channel();
        let id = change.endpoint_id().to_string();
        tracing::info!(
            endpoint_id = %id,
            change = match &change {
                EndpointChange::Upsert(_) if created => "create",
                EndpointChange::Upsert(_) => "update",
                EndpointChange::Delete { .. } => "delete",
            },
            "Endpoint change stored; feeding it into the dataflow."
        );
        // A closed channel means the pipeline stopped; dropping `fed` then reports that.
        let _ = writer.changes.send(PendingChange { change, fed });
        Ok((created, absorbed))
    }
}

/// Returns the wall clock's time in ms since the Unix epoch, for `updated_at_ms`.
fn wall_clock_ms() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| Millis::try_from(elapsed.as_millis()).unwrap_or(Millis::MAX))
        .unwrap_or(0)
}

/// Checks what the deliver operator relies on: the same rules the configuration file applies
/// to `[[endpoints]]`, except the address policy (private networks, `https_only`), which the
/// caller checks with its own messages.
///
/// # Errors
///
/// Names the first invalid field.
pub fn validate(endpoint: &Endpoint) -> Result<(), RegistryError> {
    let invalid = |field: &str, problem: &str| {
        Err(RegistryError::Invalid {
            field: field.to_string(),
            problem: problem.to_string(),
        })
    };
    if endpoint.id.trim().is_empty() || endpoint.id.chars().any(char::is_control) {
        return invalid("id", "must be a non-empty name without control characters");
    }
    if endpoint.tenant.trim().is_empty() {
        return invalid("tenant", "must not be empty");
    }
    match url::Url::parse(&endpoint.url) {
        Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => {}
        _ => return invalid("url", "must be an http or https URL with a host"),
    }
    if endpoint.event_types.is_empty() {
        return invalid("event_types", "list at least one pattern, such as \"*\"");
    }
    if endpoint.secrets.is_empty() {
        return invalid("secrets", "at least one signing secret is required");
    }
    if endpoint.timeout_ms == 0 {
        return invalid("timeout_ms", "must be at least 1");
    }
    if endpoint.connect_timeout_ms == 0 {
        return invalid("connect_timeout_ms", "must be at least 1");
    }
    if endpoint.max_in_flight == 0 {
        return invalid("max_in_flight", "must be at least 1");
    }
    if let Some(limit) = endpoint.rate_limit {
        if limit.max_requests == 0 {
            return invalid("rate_limit.max_requests", "must be at least 1");
        }
        if limit.window_ms == 0 {
            return invalid("rate_limit.window_ms", "must be at least 1");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use hookflow_schemas::{EventTypePattern, SigningSecret};

    fn endpoint(id: &str, url: &str) -> Endpoint {
        Endpoint {
            id: id.to_string(),
            tenant: "acme".to_string(),
            url: url.to_string(),
            event_types: vec![EventTypePattern::parse("*").expect("pattern")],
            secrets: vec![SigningSecret::new("whsec_c2VjcmV0")],
            headers: std::collections::BTreeMap::new(),
            timeout_ms: 1000,
            connect_timeout_ms: 500,
            max_in_flight: 4,
            enabled: true,
            rate_limit: None,
        }
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    }

    #[test]
    fn apply_stores_and_reports_the_feed_time() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (registry, feed) = EndpointRegistry::open(dir.path()).expect("open");
        // Acts as worker 0: acknowledges each change with the time it was fed in at.
        let worker = std::thread::spawn(move || {
            let mut times = Vec::new();
            for (time, pending) in (100..).zip(feed.iter()) {
                times.push(pending.change.endpoint_id().to_string());
                let _ = pending.fed.send(time);
            }
            times
        });

        let runtime = runtime();
        let created = runtime
            .block_on(registry.apply(EndpointChange::Upsert(endpoint(
                "ep1",
                "http://127.0.0.1:9/a",
            ))))
            .expect("create");
        assert!(created.created);
        assert_eq!(created.effective_at_ms, 100);
        let updated = runtime
            .block_on(registry.apply(EndpointChange::Upsert(endpoint(
                "ep1",
                "http://127.0.0.1:9/b",
            ))))
            .expect("update");
        assert!(!updated.created);
        assert_eq!(updated.effective_at_ms, 101);
        assert_eq!(
            registry.get("ep1").expect("get").map(|e| e.url),
            Some("http://127.0.0.1:9/b".to_string())
        );

        let missing =
            runtime.block_on(registry.apply(EndpointChange::Delete { id: "nope".into() }));
        assert!(matches!(missing, Err(RegistryError::NotFound { id }) if id == "nope"));
        runtime
            .block_on(registry.apply(EndpointChange::Delete { id: "ep1".into() }))
            .expect("delete");
        assert!(registry.list().expect("list").is_empty());

        drop(registry);
        let fed = worker.join().expect("worker");
        assert_eq!(
            fed,
            vec!["ep1", "ep1", "ep1"],
            "a rejected delete is not fed in"
        );
    }

    #[test]
    fn stopped_pipeline_keeps_the_change() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (registry, feed) = EndpointRegistry::open(dir.path()).expect("open");
        drop(feed);
        let result = runtime().block_on(registry.apply(EndpointChange::Upsert(endpoint(
            "ep1",
            "http://127.0.0.1:9/a",
        ))));
        assert!(
            matches!(result, Err(RegistryError::PipelineStopped { .. })),
            "{result:?}"
        );
        drop(registry);

        let store = StateStore::open_dir(dir.path()).expect("reopen");
        assert_eq!(
            store.endpoint("ep1").expect("read").map(|e| e.id),
            Some("ep1".to_string())
        );
    }

    #[test]
    fn invalid_endpoint_changes_nothing() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (registry, _feed) = EndpointRegistry::open(dir.path()).expect("open");
        let cases = [
            ("id", endpoint(" ", "http://127.0.0.1:9/a")),
            ("url", endpoint("ep1", "ftp://127.0.0.1/a")),
            (
                "max_in_flight",
                Endpoint {
                    max_in_flight: 0,
                    ..endpoint("ep1", "http://127.0.0.1:9/a")
                },
            ),
            (
                "secrets",
                Endpoint {
                    secrets: Vec::new(),
                    ..endpoint("ep1", "http://127.0.0.1:9/a")
                },
            ),
        ];
        let runtime = runtime();
        for (field, invalid) in cases {
            let result = runtime.block_on(registry.apply(EndpointChange::Upsert(invalid)));
            assert!(
                matches!(&result, Err(RegistryError::Invalid { field: named, .. }) if named == field),
                "{field}: {result:?}"
            );
        }
        assert!(registry.list().expect("list").is_empty());
    }
}
