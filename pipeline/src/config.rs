//! The `hookflow run` configuration file (TOML).
//!
//! Every table rejects unknown fields, so a misspelt option fails at start instead of being
//! ignored. [`Config::load`] parses and then validates; an error names the file, the field
//! (as a TOML path such as `endpoints[2].secret`) and the problem. `examples/hookflow.toml`
//! documents every field and is parsed by a test.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};

use base64::Engine;
use hookflow_operators::deliver::{parse_static_header, AddressPolicy};
use hookflow_operators::health::HealthPolicy;
use hookflow_operators::retry::RetryPolicy;
use hookflow_schemas::{
    redact_user_info, Endpoint, EventTypePattern, Millis, RateLimit, SigningSecret,
    DEFAULT_MAX_PAYLOAD_BYTES,
};
use ipnet::IpNet;
use serde::Deserialize;

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Settings of the dataflow.
    #[serde(default)]
    pub pipeline: PipelineConfig,
    /// The source events are read from: the local log (default) or a Fluvio topic.
    #[serde(default)]
    pub source: SourceConfig,
    /// The embedded local log.
    #[serde(default)]
    pub local_log: LocalLogConfig,
    /// The Parquet attempt archive.
    #[serde(default)]
    pub archive: ArchiveConfig,
    /// HTTP delivery settings shared by all endpoints.
    #[serde(default)]
    pub delivery: DeliveryConfig,
    /// When failed deliveries are attempted again.
    #[serde(default)]
    pub retry: RetryConfig,
    /// The circuit breaker, `Retry-After` pauses and disabling of failing endpoints.
    #[serde(default)]
    pub health: HealthConfig,
    /// The Prometheus metrics and the readiness check.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Operational events about failing endpoints and a lagging pipeline.
    #[serde(default)]
    pub alerts: crate::alerts::AlertsConfig,
    /// The endpoints to deliver to.
    #[serde(default)]
    pub endpoints: Vec<EndpointConfig>,
    /// The HTTP server: listen address and the tokens of the management and ingest routes.
    #[serde(default)]
    pub http: crate::http::HttpConfig,
    /// `endpoints` validated, with their secrets read from the environment and files once,
    /// at load.
    #[serde(skip)]
    resolved_endpoints: Vec<Endpoint>,
}

/// `[pipeline]`: settings of the dataflow.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    /// Timely worker threads, per process in a cluster. Fixed for a data directory once a run
    /// has used it. Default 1.
    pub workers: usize,
    /// How often an idle source looks for new records, in ms. Default 2. This is the floor
    /// of end-to-end latency on the local log.
    pub poll_interval_ms: u64,
    /// Records read but not yet archived, per worker, before the source stops reading.
    /// Default 10000.
    pub max_read_ahead: usize,
    /// Largest accepted payload in bytes; larger events are dead-lettered. Default 262144.
    pub max_payload_bytes: usize,
    /// How long a (tenant, id) is remembered for deduplication, in seconds. Default 86400.
    pub dedup_window_secs: u64,
    /// How often, at most, the settled-offset checkpoint is written, in ms. Default 100.
    pub checkpoint_interval_ms: u64,
    /// No request starts while more attempt results than this wait for their durable write.
    /// It bounds what a crash can make hookflow send twice. Default 64.
    pub max_unsynced_results: usize,
    /// On SIGINT or SIGTERM, how long requests in flight may take to finish before they are
    /// abandoned (and delivered again by the next run), in seconds. Default 30.
    pub shutdown_grace_secs: u64,
    /// How often the log is truncated past its retention and the state store pruned, in
    /// seconds. Default 60.
    pub maintenance_interval_secs: u64,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            workers: 1,
            poll_interval_ms: 2,
            max_read_ahead: 10_000,
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
            dedup_window_secs: 24 * 60 * 60,
            checkpoint_interval_ms: 100,
            max_unsynced_results: 64,
            shutdown_grace_secs: 30,
            maintenance_interval_secs: 60,
        }
    }
}

/// `[local_log]`: the embedded local log under the data directory.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LocalLogConfig {
    /// Partitions of a new log; an existing log keeps the count it was created with.
    /// Default 4.
    pub partitions: u32,
    /// How long records are kept, in seconds, for replays. Older records are deleted once
    /// they are below the checkpoint and no pending delivery needs them. Default 604800
    /// (7 days).
    pub retention_secs: u64,
}

impl Default for LocalLogConfig {
    fn default() -> Self {
        LocalLogConfig {
            partitions: 4,
            retention_secs: 7 * 24 * 3600,
        }
    }
}

/// The kind of source events are read from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// The embedded local log under the data directory.
    #[default]
    Local,
    /// A topic of a Fluvio cluster, configured in `[source.fluvio]`.
    Fluvio,
}

/// `[source]`: where events are read from.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SourceConfig {
    /// `"local"` (default) or `"fluvio"`. The `--source` flag overrides it.
    pub kind: SourceKind,
    /// The Fluvio topic; required when `kind` is `"fluvio"`.
    pub fluvio: Option<FluvioConfig>,
}

/// `[source.fluvio]`: the Fluvio topic events are read from and published to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FluvioConfig {
    /// The SC's public address, `host:port`.
    pub endpoint: String,
    /// The topic; its partition count is read from the cluster.
    pub topic: String,
    /// The Fluvio consumer whose offsets follow hookflow's checkpoint, so that Fluvio's tools
    /// show the lag; `""` for none. Default `"hookflow"`.
    #[serde(default = "default_consumer")]
    pub consumer: String,
    /// How long connecting or one request may take, in ms. Default 10000.
    #[serde(default = "default_fluvio_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_consumer() -> String {
    "hookflow".to_string()
}

fn default_fluvio_timeout_ms() -> u64 {
    10_000
}

impl FluvioConfig {
    /// The connector's options.
    pub fn options(&self) -> hookflow_connectors::FluvioOptions {
        hookflow_connectors::FluvioOptions {
            endpoint: self.endpoint.clone(),
            topic: self.topic.clone(),
            consumer: self.consumer.clone(),
            timeout_ms: self.timeout_ms,
        }
    }

    /// Checks every field, returning the first bad one (a path under `source.fluvio`) and its
    /// problem.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let field = |name: &str| format!("source.fluvio.{name}");
        check_host_port(&self.endpoint).map_err(|problem| (field("endpoint"), problem))?;
        check_fluvio_name(&self.topic).map_err(|problem| (field("topic"), problem))?;
        if !self.consumer.is_empty() {
            check_fluvio_name(&self.consumer).map_err(|problem| (field("consumer"), problem))?;
        }
        if self.timeout_ms == 0 || self.timeout_ms > 600_000 {
            return Err((field("timeout_ms"), "must be between 1 and 600000".into()));
        }
        Ok(())
    }
}

/// Checks a `host:port` address.
fn check_host_port(address: &str) -> Result<(), String> {
    let Some((host, port)) = address.rsplit_once(':') else {
        return Err(format!("{address:?} is not host:port"));
    };
    if host.is_empty() || host.contains(char::is_whitespace) {
        return Err(format!("{address:?} has no host"));
    }
    match port.parse::<u16>() {
        Ok(port) if port > 0 => Ok(()),
        _ => Err(format!("{address:?} has no port from 1 to 65535")),
    }
}

/// Checks a Fluvio topic or consumer name: 1 to 63 lowercase letters, digits and `-`,
/// starting and ending with a letter or digit.
fn check_fluvio_name(name: &str) -> Result<(), String> {
    let allowed = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-';
    if name.is_empty()
        || name.len() > 63
        || !name.chars().all(allowed)
        || name.starts_with('-')
        || name.ends_with('-')
    {
        return Err(format!(
            "{name:?} is not a Fluvio name: 1 to 63 lowercase letters, digits and '-', not starting or ending with '-'"
        ));
    }
    Ok(())
}

/// `[archive]`: the Parquet attempt archive.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ArchiveConfig {
    /// Where Parquet files go. Relative paths are under the data directory.
    /// Default `archive`.
    pub dir: PathBuf,
    /// Rows after which a file is completed. Default 200000.
    pub max_rows_per_file: usize,
    /// Estimated uncompressed bytes of rows after which a file is completed (the file on disk
    /// is smaller, compressed). Default 67108864 (64 MiB).
    pub max_file_bytes: u64,
    /// Staged rows are written to a file at least this often, in seconds. Default 60.
    pub max_file_age_secs: u64,
}

impl Default for ArchiveConfig {
    fn default() -> Self {
        ArchiveConfig {
            dir: PathBuf::from("archive"),
            max_rows_per_file: 200_000,
            max_file_bytes: 64 * 1024 * 1024,
            max_file_age_secs: 60,
        }
    }
}

/// `[delivery]`: HTTP settings shared by all endpoints.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    /// Requests in flight at once, per worker. Default 256.
    pub max_in_flight: usize,
    /// Most response-body bytes read per attempt. Default 65536.
    pub max_response_bytes: usize,
    /// Non-public networks endpoints may nevertheless be in, as CIDRs such as
    /// `127.0.0.1/32`. Default: none.
    pub allowed_private_cidrs: Vec<String>,
    /// The HTTP proxy all deliveries go through, as `http://host:port`. Only this field turns
    /// a proxy on; `HTTP_PROXY` and the like are ignored. The proxy may be in a private
    /// network, but every address of each target must still be allowed. Default: none.
    pub proxy: Option<String>,
    /// Whether only `https` endpoint URLs are allowed. An `http` URL fails at load, and one
    /// that reaches an attempt anyway is dead-lettered without a request. Default false.
    pub https_only: bool,
    /// A PEM file of CA certificates trusted besides the system's, for receivers with
    /// certificates from a private CA. Relative to the config file's directory.
    /// Default: none.
    pub ca_bundle: Option<PathBuf>,
    /// The contents of `ca_bundle`, read at load.
    #[serde(skip)]
    pub ca_bundle_pem: Option<Vec<u8>>,
}

impl DeliveryConfig {
    /// Returns `proxy` parsed, or `None` when no proxy is set.
    ///
    /// # Errors
    ///
    /// The problem with `proxy`: not a URL, not `http` or `https`, without a host, or with a
    /// path.
    pub fn proxy_url(&self) -> Result<Option<url::Url>, String> {
        let Some(text) = &self.proxy else {
            return Ok(None);
        };
        let shown = redact_user_info(text);
        let url = url::Url::parse(text).map_err(|e| {
            format!("`{shown}` is not a URL such as http://proxy.internal:3128 ({e})")
        })?;
        if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
            return Err(format!(
                "`{shown}` must be an http or https URL with a host, such as http://proxy.internal:3128"
            ));
        }
        if url.path() != "/" || url.query().is_some() {
            return Err(format!("`{shown}` must not have a path or query"));
        }
        Ok(Some(url))
    }
}

/// Reads the config file at `path`.
fn read_config_file(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Parses config text into its sections without validating them. `path` is used in messages
/// only.
fn parse_toml(text: &str, path: &Path) -> Result<Config, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        message: e.to_string().trim_end().to_string(),
    })
}

/// Reads and checks `delivery.ca_bundle`, relative to `base_dir`.
fn read_ca_bundle(delivery: &DeliveryConfig, base_dir: &Path) -> Result<Option<Vec<u8>>, String> {
    let Some(file) = &delivery.ca_bundle else {
        return Ok(None);
    };
    let path = base_dir.join(file);
    let pem = std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let certificates = reqwest::Certificate::from_pem_bundle(&pem)
        .map_err(|_| format!("{} is not a list of PEM certificates", path.display()))?;
    if certificates.is_empty() {
        return Err(format!(
            "{} contains no `-----BEGIN CERTIFICATE-----` block",
            path.display()
        ));
    }
    Ok(Some(pem))
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            max_in_flight: 256,
            max_response_bytes: 64 * 1024,
            allowed_private_cidrs: Vec::new(),
            proxy: None,
            https_only: false,
            ca_bundle: None,
            ca_bundle_pem: None,
        }
    }
}

/// `[retry]`: when failed deliveries are attempted again.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Delays between attempts in ms, one per retry; after the last one the delivery is
    /// dead-lettered. Default: 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 14 h, 20 h, 24 h.
    pub schedule_ms: Vec<u64>,
    /// Each delay moves by up to this percentage either way, seeded per delivery and attempt.
    /// Default 10, at most 100.
    pub jitter_percent: u8,
    /// Events first read longer ago than this are dead-lettered as `expired` instead of
    /// attempted, in seconds. Default 345600 (4 days).
    pub max_event_age_secs: u64,
    /// Retries given to a delivery that a 4xx other than 408, 410 and 429 refused; after
    /// them it is dead-lettered. Default 3.
    pub client_error_retries: u32,
    /// After a 429 or a timeout without a valid `Retry-After`, the next attempt comes no
    /// sooner than this, in ms. Default 60000.
    pub penalty_floor_ms: u64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        let policy = RetryPolicy::default();
        RetryConfig {
            schedule_ms: policy.schedule_ms,
            jitter_percent: policy.jitter_percent,
            max_event_age_secs: policy.max_event_age_ms / 1000,
            client_error_retries: policy.client_error_retries,
            penalty_floor_ms: policy.penalty_floor_ms,
        }
    }
}

impl RetryConfig {
    /// Returns the retry policy this section describes.
    pub fn policy(&self) -> RetryPolicy {
        RetryPolicy {
            schedule_ms: self.schedule_ms.clone(),
            jitter_percent: self.jitter_percent,
            max_event_age_ms: self.max_event_age_secs.saturating_mul(1000),
            client_error_retries: self.client_error_retries,
            penalty_floor_ms: self.penalty_floor_ms,
        }
    }
}

/// `[health]`: the circuit breaker, `Retry-After` pauses and disabling of failing endpoints.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// Length of the windows the breaker counts attempts in, in ms. Default 60000.
    pub breaker_window_ms: u64,
    /// Attempts a window needs before its failures can open the breaker. Default 10.
    pub breaker_min_requests: u32,
    /// Percentage of failed attempts in a window that opens the breaker, 1 to 100.
    /// Default 50.
    pub breaker_failure_percent: u8,
    /// How long an open breaker waits before its probe, in ms. Default 30000.
    pub breaker_cooldown_ms: u64,
    /// Each failed probe doubles the wait, up to this, in ms. Default 600000.
    pub breaker_max_cooldown_ms: u64,
    /// An endpoint whose attempts fail without a success for this long is disabled, in
    /// seconds. Default 432000 (5 days).
    pub disable_after_secs: u64,
    /// The shortest pause a `Retry-After` causes, in ms. Default 1000.
    pub retry_after_min_ms: u64,
    /// The maximum pause a `Retry-After` causes, in ms. Longer requests are capped.
    /// Default 3600000.
    pub retry_after_max_ms: u64,
}

impl Default for HealthConfig {
    fn default() -> Self {
        let policy = HealthPolicy::default();
        HealthConfig {
            breaker_window_ms: policy.breaker_window_ms,
            breaker_min_requests: policy.breaker_min_requests,
            breaker_failure_percent: policy.breaker_failure_percent,
            breaker_cooldown_ms: policy.breaker_cooldown_ms,
            breaker_max_cooldown_ms: policy.breaker_max_cooldown_ms,
            disable_after_secs: policy.disable_after_ms / 1000,
            retry_after_min_ms: policy.retry_after_min_ms,
            retry_after_max_ms: policy.retry_after_max_ms,
        }
    }
}

impl HealthConfig {
    /// Returns the health policy this section describes.
    pub fn policy(&self) -> HealthPolicy {
        HealthPolicy {
            breaker_window_ms: self.breaker_window_ms,
            breaker_min_requests: self.breaker_min_requests,
            breaker_failure_percent: self.breaker_failure_percent,
            breaker_cooldown_ms: self.breaker_cooldown_ms,
            breaker_max_cooldown_ms: self.breaker_max_cooldown_ms,
            disable_after_ms: self.disable_after_secs.saturating_mul(1000),
            retry_after_min_ms: self.retry_after_min_ms,
            retry_after_max_ms: self.retry_after_max_ms,
        }
    }

    fn validate(&self) -> Result<(), (String, String)> {
        let at_least_one = [
            ("health.breaker_window_ms", self.breaker_window_ms),
            ("health.breaker_cooldown_ms", self.breaker_cooldown_ms),
            ("health.disable_after_secs", self.disable_after_secs),
            (
                "health.breaker_min_requests",
                u64::from(self.breaker_min_requests),
            ),
        ];
        for (field, value) in at_least_one {
            if value == 0 {
                return Err((field.into(), "must be at least 1".into()));
            }
        }
        if !(1..=100).contains(&self.breaker_failure_percent) {
            return Err((
                "health.breaker_failure_percent".into(),
                "must be between 1 and 100".into(),
            ));
        }
        if self.breaker_max_cooldown_ms < self.breaker_cooldown_ms {
            return Err((
                "health.breaker_max_cooldown_ms".into(),
                "must be at least health.breaker_cooldown_ms".into(),
            ));
        }
        if self.retry_after_max_ms < self.retry_after_min_ms {
            return Err((
                "health.retry_after_max_ms".into(),
                "must be at least health.retry_after_min_ms".into(),
            ));
        }
        Ok(())
    }
}

/// `[metrics]`: the Prometheus metrics served at `/metrics` and the readiness check.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Endpoints whose metrics carry their own `endpoint` label: the ones stored when the run
    /// starts, then the first ones seen. Every later endpoint is counted under `endpoint="other"`.
    /// Default 1000, at most 100000.
    pub max_endpoint_series: usize,
    /// A worker whose dataflow frontier does not advance for this long while records are
    /// outstanding makes `/health/ready` fail, in seconds. Default 60, at least 1.
    pub ready_stall_secs: u64,
    /// How often the pending and parked deliveries in the state store are counted for
    /// `hookflow_retries_pending` and `hookflow_parked_deliveries`, in seconds. Each count
    /// scans the pending table. Default 10, at least 1.
    pub pending_refresh_secs: u64,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            max_endpoint_series: crate::metrics::DEFAULT_MAX_ENDPOINT_SERIES,
            ready_stall_secs: 60,
            pending_refresh_secs: 10,
        }
    }
}

impl MetricsConfig {
    fn validate(&self) -> Result<(), (String, String)> {
        if self.max_endpoint_series > 100_000 {
            return Err((
                "metrics.max_endpoint_series".into(),
                "must be at most 100000".into(),
            ));
        }
        if self.ready_stall_secs == 0 {
            return Err((
                "metrics.ready_stall_secs".into(),
                "must be at least 1".into(),
            ));
        }
        if self.pending_refresh_secs == 0 {
            return Err((
                "metrics.pending_refresh_secs".into(),
                "must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

/// `rate_limit = { max_requests = 10, window_ms = 1000 }` of an endpoint.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Requests that may start per window; at least 1.
    pub max_requests: u32,
    /// The window in ms, aligned to multiples of itself since the Unix epoch. Default 1000.
    #[serde(default = "default_window_ms")]
    pub window_ms: u64,
}

fn default_window_ms() -> u64 {
    1_000
}

/// `[[endpoints]]`: one customer endpoint.
///
/// `Debug` shows the URL without its user info and no secret or header value.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointConfig {
    /// Globally unique id.
    pub id: String,
    /// The tenant whose events the endpoint receives.
    pub tenant: String,
    /// `http` or `https` URL deliveries are POSTed to.
    pub url: String,
    /// Event-type patterns: `*`, `charge.*` or an exact type.
    pub event_types: Vec<String>,
    /// One signing secret, `whsec_` followed by the base64 of 24 to 64 bytes.
    pub secret: Option<SecretText>,
    /// The environment variable that contains the signing secret, instead of `secret`.
    pub secret_env: Option<String>,
    /// The file that contains the signing secret, instead of `secret`. A relative path is
    /// relative to the config file's directory; whitespace around the secret is ignored.
    pub secret_file: Option<PathBuf>,
    /// More signing secrets, each a `"whsec_..."` string or a table with one of `value`,
    /// `env` or `file` and an optional `expires_at` (RFC 3339). Every secret not yet expired
    /// signs every request, which is how a rotation keeps old receivers working.
    #[serde(default)]
    pub secrets: Vec<SecretEntry>,
    /// Extra headers sent with every request, such as `{ "x-team" = "payments" }`.
    /// `content-type`, `content-length`, `host`, `transfer-encoding`, `connection` and
    /// `webhook-*` are reserved. Default: none.
    #[serde(default)]
    pub headers: BTreeMap<String, SecretText>,
    /// Limit on a whole request, in ms. Default 15000.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Limit on connecting, in ms. Default 5000.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Requests in flight to this endpoint at once. Default 8.
    #[serde(default = "default_endpoint_in_flight")]
    pub max_in_flight: usize,
    /// Whether deliveries are attempted. Default true.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// At most this many requests start per window. Default: unlimited.
    pub rate_limit: Option<RateLimitConfig>,
}

impl fmt::Debug for EndpointConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EndpointConfig")
            .field("id", &self.id)
            .field("tenant", &self.tenant)
            .field("url", &redact_user_info(&self.url))
            .field("event_types", &self.event_types)
            .field("secret", &self.secret)
            .field("secret_env", &self.secret_env)
            .field("secret_file", &self.secret_file)
            .field("secrets", &self.secrets)
            .field("headers", &self.headers)
            .field("timeout_ms", &self.timeout_ms)
            .field("connect_timeout_ms", &self.connect_timeout_ms)
            .field("max_in_flight", &self.max_in_flight)
            .field("enabled", &self.enabled)
            .field("rate_limit", &self.rate_limit)
            .finish()
    }
}

/// A secret written in the config file, or a header value that may be one. `Debug` never
/// shows it.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct SecretText(pub String);

impl fmt::Debug for SecretText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"<redacted>\"")
    }
}

/// One entry of an endpoint's `secrets` list: a plain `"whsec_..."` string, or a table that
/// names where the secret is and when it expires.
#[derive(Debug, Clone)]
pub enum SecretEntry {
    /// A secret written inline; it never expires.
    Value(SecretText),
    /// A table such as `{ env = "OLD_SECRET", expires_at = "2026-01-31T00:00:00Z" }`.
    Table(SecretTable),
}

/// `{ value | env | file, expires_at }`: one signing secret and its expiry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretTable {
    /// The secret itself.
    pub value: Option<SecretText>,
    /// The environment variable that contains the secret.
    pub env: Option<String>,
    /// The file that contains the secret, relative to the config file's directory.
    pub file: Option<PathBuf>,
    /// When the secret stops signing, as RFC 3339 (`2026-01-31T00:00:00Z`). Default: never.
    pub expires_at: Option<String>,
}

impl<'de> Deserialize<'de> for SecretEntry {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct EntryVisitor;

        impl<'de> serde::de::Visitor<'de> for EntryVisitor {
            type Value = SecretEntry;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a \"whsec_...\" string or a table with value, env or file")
            }

            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<SecretEntry, E> {
                Ok(SecretEntry::Value(SecretText(text.to_string())))
            }

            fn visit_map<M: serde::de::MapAccess<'de>>(
                self,
                map: M,
            ) -> Result<SecretEntry, M::Error> {
                let table =
                    SecretTable::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Ok(SecretEntry::Table(table))
            }
        }

        deserializer.deserialize_any(EntryVisitor)
    }
}

fn default_timeout_ms() -> u64 {
    15_000
}
fn default_connect_timeout_ms() -> u64 {
    5_000
}
fn default_endpoint_in_flight() -> usize {
    8
}
fn default_true() -> bool {
    true
}

/// A configuration file that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML or does not match the expected shape.
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, with line and column.
        message: String,
    },
    /// A field has an unusable value.
    #[error("invalid config file {path}: field `{field}`: {problem}")]
    Field {
        /// The file.
        path: PathBuf,
        /// The field as a TOML path.
        field: String,
        /// What is wrong and how to fix it.
        problem: String,
    },
}

impl Config {
    /// Reads, parses and validates a configuration file.
    ///
    /// # Errors
    ///
    /// See [`ConfigError`]; every variant names the file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Config::parse(&read_config_file(path)?, path)
    }

    /// Loads only the `[source]` section of the config file at `path`, for commands that
    /// write to the source and deliver nothing, such as `hookflow publish`. The whole file
    /// must parse, but no secret or token is read, so a producer's machine needs none of the
    /// variables or files that `hookflow run` reads them from.
    ///
    /// # Errors
    ///
    /// See [`ConfigError`]; every variant names the file.
    pub fn load_source(path: &Path) -> Result<SourceConfig, ConfigError> {
        let config = parse_toml(&read_config_file(path)?, path)?;
        config
            .validate_source()
            .map_err(|(field, problem)| ConfigError::Field {
                path: path.to_path_buf(),
                field,
                problem,
            })?;
        Ok(config.source)
    }

    /// Parses and validates configuration text; `path` is used in messages only.
    ///
    /// # Errors
    ///
    /// See [`ConfigError`].
    ///
    /// Secrets named by `secret_env` or `secret_file` are read here, once; a relative secret
    /// file is looked up in `path`'s directory.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        Config::parse_checked(text, path, true)
    }

    /// Loads the config file at `path` for a command that does not run the pipeline, such as
    /// `hookflow endpoints list`: as [`Config::load`], except that the `[http]` tokens are not
    /// read, so the variables and files holding them may be absent.
    ///
    /// # Errors
    ///
    /// See [`ConfigError`]; every variant names the file.
    pub fn load_offline(path: &Path) -> Result<Config, ConfigError> {
        Config::parse_checked(&read_config_file(path)?, path, false)
    }

    /// Parses and validates `text`, reading the `[http]` tokens only with `read_tokens`.
    fn parse_checked(text: &str, path: &Path, read_tokens: bool) -> Result<Config, ConfigError> {
        let mut config = parse_toml(text, path)?;
        let base_dir = path.parent().unwrap_or(Path::new(""));
        config.delivery.ca_bundle_pem =
            read_ca_bundle(&config.delivery, base_dir).map_err(|problem| ConfigError::Field {
                path: path.to_path_buf(),
                field: "delivery.ca_bundle".to_string(),
                problem,
            })?;
        config.resolved_endpoints =
            config
                .validate(base_dir, now_ms())
                .map_err(|(field, problem)| ConfigError::Field {
                    path: path.to_path_buf(),
                    field,
                    problem,
                })?;
        let http = if read_tokens {
            config.http.validate(base_dir)
        } else {
            config.http.listen().map(|_| ())
        };
        http.map_err(|(field, problem)| ConfigError::Field {
            path: path.to_path_buf(),
            field,
            problem,
        })?;
        Ok(config)
    }

    /// Sets the source kind (the `--source` flag) and checks the source again; `path` is the
    /// file the config was loaded from, for the message.
    ///
    /// # Errors
    ///
    /// Names the field that the new kind needs and is missing or wrong.
    pub fn set_source_kind(&mut self, kind: SourceKind, path: &Path) -> Result<(), ConfigError> {
        self.source.kind = kind;
        self.validate_source()
            .map_err(|(field, problem)| ConfigError::Field {
                path: path.to_path_buf(),
                field,
                problem,
            })
    }

    /// Where events for this pipeline are appended: its Fluvio topic, or the local log under
    /// `data_dir`.
    pub fn publish_target(&self, data_dir: &Path) -> crate::publish::PublishTarget {
        match self.fluvio() {
            Some(fluvio) => crate::publish::PublishTarget::Fluvio(fluvio.options()),
            None => crate::publish::PublishTarget::Local {
                data_dir: data_dir.to_path_buf(),
                partitions: self.local_log.partitions,
            },
        }
    }

    /// The Fluvio settings when the source is Fluvio.
    pub fn fluvio(&self) -> Option<&FluvioConfig> {
        match self.source.kind {
            SourceKind::Fluvio => self.source.fluvio.as_ref(),
            SourceKind::Local => None,
        }
    }

    fn validate_source(&self) -> Result<(), (String, String)> {
        match (&self.source.kind, &self.source.fluvio) {
            (SourceKind::Fluvio, None) => Err((
                "source.fluvio".into(),
                "is required when the source is fluvio: give endpoint and topic".into(),
            )),
            (_, Some(fluvio)) => fluvio.validate(),
            (SourceKind::Local, None) => Ok(()),
        }
    }

    /// Checks every field and returns the endpoints, or the first bad field and its problem.
    fn validate(&self, base_dir: &Path, now_ms: Millis) -> Result<Vec<Endpoint>, (String, String)> {
        let p = &self.pipeline;
        if p.workers == 0 || p.workers > 256 {
            return Err((
                "pipeline.workers".into(),
                "must be between 1 and 256".into(),
            ));
        }
        if p.poll_interval_ms == 0 || p.poll_interval_ms > 60_000 {
            return Err((
                "pipeline.poll_interval_ms".into(),
                "must be between 1 and 60000".into(),
            ));
        }
        if p.max_read_ahead == 0 {
            return Err((
                "pipeline.max_read_ahead".into(),
                "must be at least 1".into(),
            ));
        }
        if p.max_payload_bytes == 0 {
            return Err((
                "pipeline.max_payload_bytes".into(),
                "must be at least 1".into(),
            ));
        }
        self.validate_source()?;
        if self.local_log.partitions == 0 || self.local_log.partitions > 4096 {
            return Err((
                "local_log.partitions".into(),
                "must be between 1 and 4096".into(),
            ));
        }
        if self.archive.max_rows_per_file == 0 {
            return Err((
                "archive.max_rows_per_file".into(),
                "must be at least 1".into(),
            ));
        }
        if self.retry.jitter_percent > 100 {
            return Err((
                "retry.jitter_percent".into(),
                "must be between 0 and 100".into(),
            ));
        }
        if self.retry.schedule_ms.len() > 100 {
            return Err(("retry.schedule_ms".into(), "at most 100 retries".into()));
        }
        if self.retry.max_event_age_secs == 0 {
            return Err((
                "retry.max_event_age_secs".into(),
                "must be at least 1".into(),
            ));
        }
        if self.delivery.max_in_flight == 0 {
            return Err(("delivery.max_in_flight".into(), "must be at least 1".into()));
        }
        self.health.validate()?;
        self.metrics.validate()?;
        self.alerts.validate()?;
        let policy = AddressPolicy::new(self.allowed_networks()?);
        self.delivery
            .proxy_url()
            .map_err(|problem| ("delivery.proxy".to_string(), problem))?;

        self.validate_endpoints(&self.endpoints, base_dir, now_ms, &policy)
    }

    /// Checks `[[endpoints]]` entries against this configuration's delivery settings and
    /// returns them resolved, or the first bad field and its problem.
    fn validate_endpoints(
        &self,
        entries: &[EndpointConfig],
        base_dir: &Path,
        now_ms: Millis,
        policy: &AddressPolicy,
    ) -> Result<Vec<Endpoint>, (String, String)> {
        let mut ids = HashSet::new();
        let mut endpoints = Vec::with_capacity(entries.len());
        for (index, endpoint) in entries.iter().enumerate() {
            let field = |name: &str| format!("endpoints[{index}].{name}");
            if !ids.insert(endpoint.id.as_str()) {
                return Err((
                    field("id"),
                    format!("duplicate endpoint id `{}`", endpoint.id),
                ));
            }
            let resolved = endpoint
                .to_endpoint(base_dir, now_ms)
                .map_err(|(name, problem)| (field(&name), problem))?;
            check_literal_address(&endpoint.url, policy)
                .map_err(|problem| (field("url"), problem))?;
            if self.delivery.https_only && !endpoint.url.starts_with("https:") {
                return Err((
                    field("url"),
                    "`delivery.https_only` is set, so the url must start with https://".to_string(),
                ));
            }
            endpoints.push(resolved);
        }
        Ok(endpoints)
    }

    /// The networks endpoints may be in although not public.
    ///
    /// # Errors
    ///
    /// Returns the field and problem of the first entry that is not a CIDR.
    pub fn allowed_networks(&self) -> Result<Vec<IpNet>, (String, String)> {
        let mut networks = Vec::new();
        for (index, cidr) in self.delivery.allowed_private_cidrs.iter().enumerate() {
            let parsed = cidr
                .parse::<IpNet>()
                .or_else(|_| cidr.parse::<std::net::IpAddr>().map(IpNet::from))
                .map_err(|_| {
                    (
                        format!("delivery.allowed_private_cidrs[{index}]"),
                        format!("`{cidr}` is not a CIDR such as `127.0.0.1/32` or `10.0.0.0/8`"),
                    )
                })?;
            networks.push(parsed);
        }
        Ok(networks)
    }

    /// Returns the configured endpoints as validated at load, secrets resolved.
    pub fn endpoints(&self) -> Vec<Endpoint> {
        self.resolved_endpoints.clone()
    }

    /// Parses and validates an endpoints file: `[[endpoints]]` tables in this file's format,
    /// checked against this configuration's delivery settings (allowed networks,
    /// `https_only`). Other top-level tables are ignored, so a configuration file is an
    /// endpoints file too. `path` is used in messages and to find relative secret files.
    ///
    /// # Errors
    ///
    /// See [`ConfigError`]; a field error names the field as `endpoints[i].name`.
    pub fn parse_endpoints(&self, text: &str, path: &Path) -> Result<Vec<Endpoint>, ConfigError> {
        /// The `[[endpoints]]` of an endpoints file.
        #[derive(Deserialize)]
        struct EndpointsFile {
            #[serde(default)]
            endpoints: Vec<EndpointConfig>,
        }
        let file: EndpointsFile = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        let field_error = |(field, problem)| ConfigError::Field {
            path: path.to_path_buf(),
            field,
            problem,
        };
        let policy = AddressPolicy::new(self.allowed_networks().map_err(field_error)?);
        let base_dir = path.parent().unwrap_or(Path::new(""));
        self.validate_endpoints(&file.endpoints, base_dir, now_ms(), &policy)
            .map_err(field_error)
    }
}

/// Returns the wall clock's time in ms since the Unix epoch, for the expiry check at load.
fn now_ms() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| Millis::try_from(elapsed.as_millis()).unwrap_or(Millis::MAX))
        .unwrap_or(0)
}

impl EndpointConfig {
    /// Converts to the shared endpoint type, reading secrets from the environment and files,
    /// or names the field that is wrong.
    fn to_endpoint(&self, base_dir: &Path, now_ms: Millis) -> Result<Endpoint, (String, String)> {
        let bad = |name: &str, problem: String| Err((name.to_string(), problem));

        if self.id.trim().is_empty() || self.id.chars().any(char::is_control) {
            return bad(
                "id",
                "must be a non-empty name without control characters".into(),
            );
        }
        if self.tenant.trim().is_empty() {
            return bad("tenant", "must not be empty".into());
        }
        match url::Url::parse(&self.url) {
            Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => {}
            Ok(url) => {
                return bad(
                    "url",
                    format!(
                        "`{}` must be an http or https URL with a host",
                        redact_user_info(url.as_str())
                    ),
                );
            }
            Err(e) => {
                let shown = redact_user_info(&self.url);
                return bad("url", format!("`{shown}` is not a URL ({e})"));
            }
        }
        if self.event_types.is_empty() {
            return bad(
                "event_types",
                "list at least one pattern, such as \"*\"".into(),
            );
        }
        let mut event_types = Vec::new();
        for (index, pattern) in self.event_types.iter().enumerate() {
            match EventTypePattern::parse(pattern) {
                Ok(parsed) => event_types.push(parsed),
                Err(e) => return bad(&format!("event_types[{index}]"), e.to_string()),
            }
        }

        let secrets = self.signing_secrets(base_dir)?;
        if secrets.is_empty() {
            return bad(
                "secret",
                "missing: set `secret = \"whsec_...\"`, `secret_env` or `secret_file`".into(),
            );
        }
        if !secrets.iter().any(|secret| secret.is_active_at(now_ms)) {
            return bad(
                "secrets",
                "every secret has expired; add one without `expires_at` or with a later one".into(),
            );
        }

        let headers = self.static_headers()?;

        if self.timeout_ms == 0 || self.connect_timeout_ms == 0 {
            let name = if self.timeout_ms == 0 {
                "timeout_ms"
            } else {
                "connect_timeout_ms"
            };
            return bad(name, "must be at least 1".into());
        }
        if self.max_in_flight == 0 {
            return bad("max_in_flight", "must be at least 1".into());
        }
        if let Some(limit) = self.rate_limit {
            if limit.max_requests == 0 {
                return bad("rate_limit.max_requests", "must be at least 1".into());
            }
            if limit.window_ms == 0 {
                return bad("rate_limit.window_ms", "must be at least 1".into());
            }
        }

        Ok(Endpoint {
            id: self.id.clone(),
            tenant: self.tenant.clone(),
            url: self.url.clone(),
            event_types,
            secrets,
            headers,
            timeout_ms: self.timeout_ms,
            connect_timeout_ms: self.connect_timeout_ms,
            max_in_flight: self.max_in_flight,
            enabled: self.enabled,
            rate_limit: self.rate_limit.map(|limit| RateLimit {
                max_requests: limit.max_requests,
                window_ms: limit.window_ms,
            }),
        })
    }
}

impl EndpointConfig {
    /// Collects the secrets of `secret`, `secret_env`, `secret_file` and `secrets`, in that
    /// order, read and checked.
    fn signing_secrets(&self, base_dir: &Path) -> Result<Vec<SigningSecret>, (String, String)> {
        let single = [
            ("secret", self.secret.is_some()),
            ("secret_env", self.secret_env.is_some()),
            ("secret_file", self.secret_file.is_some()),
        ];
        let set: Vec<&str> = single
            .iter()
            .filter(|(_, set)| *set)
            .map(|(name, _)| *name)
            .collect();
        if set.len() > 1 {
            return Err((
                set[1].to_string(),
                format!(
                    "set only one of `{}` and `{}`; list more secrets under `secrets`",
                    set[0], set[1]
                ),
            ));
        }

        let mut secrets = Vec::new();
        let source = match (&self.secret, &self.secret_env, &self.secret_file) {
            (Some(text), _, _) => Some(("secret".to_string(), SecretSource::Inline(text))),
            (_, Some(name), _) => Some(("secret_env".to_string(), SecretSource::Env(name))),
            (_, _, Some(file)) => Some(("secret_file".to_string(), SecretSource::File(file))),
            _ => None,
        };
        if let Some((field, source)) = source {
            let value = source.read(base_dir).map_err(|problem| (field, problem))?;
            secrets.push(SigningSecret::new(value));
        }

        for (index, entry) in self.secrets.iter().enumerate() {
            let field = |name: &str| match name {
                "" => format!("secrets[{index}]"),
                name => format!("secrets[{index}].{name}"),
            };
            let (source, expires_at, name) = match entry {
                SecretEntry::Value(text) => (SecretSource::Inline(text), None, ""),
                SecretEntry::Table(table) => {
                    let (source, name) = match (&table.value, &table.env, &table.file) {
                        (Some(text), None, None) => (SecretSource::Inline(text), "value"),
                        (None, Some(name), None) => (SecretSource::Env(name), "env"),
                        (None, None, Some(file)) => (SecretSource::File(file), "file"),
                        _ => {
                            return Err((
                                field(""),
                                "set exactly one of `value`, `env` and `file`".into(),
                            ))
                        }
                    };
                    (source, table.expires_at.as_deref(), name)
                }
            };
            let value = source
                .read(base_dir)
                .map_err(|problem| (field(name), problem))?;
            let secret = match expires_at {
                None => SigningSecret::new(value),
                Some(text) => {
                    let at_ms =
                        parse_rfc3339_ms(text).map_err(|problem| (field("expires_at"), problem))?;
                    SigningSecret::expiring(value, at_ms)
                }
            };
            secrets.push(secret);
        }
        Ok(secrets)
    }

    /// Checks the static headers and returns them by lowercase name.
    fn static_headers(&self) -> Result<BTreeMap<String, String>, (String, String)> {
        let mut headers = BTreeMap::new();
        for (name, value) in &self.headers {
            let field = format!("headers.{name}");
            let (parsed, _) =
                parse_static_header(name, &value.0).map_err(|e| (field.clone(), e.to_string()))?;
            if headers
                .insert(parsed.to_string(), value.0.clone())
                .is_some()
            {
                return Err((
                    field,
                    format!("header `{parsed}` is set twice, in different cases"),
                ));
            }
        }

        let credentials = url::Url::parse(&self.url)
            .map(|url| !url.username().is_empty() || url.password().is_some())
            .unwrap_or(false);
        if credentials && headers.contains_key("authorization") {
            return Err((
                "headers.authorization".to_string(),
                "the url contains credentials, which are sent as an `authorization` header; \
                 keep either the credentials or this header"
                    .to_string(),
            ));
        }
        Ok(headers)
    }
}

/// The location of one secret's text.
enum SecretSource<'a> {
    Inline(&'a SecretText),
    Env(&'a str),
    File(&'a Path),
}

impl SecretSource<'_> {
    /// Reads and checks the secret. The problem names the variable or file, never the value.
    fn read(&self, base_dir: &Path) -> Result<String, String> {
        let (value, origin) = match self {
            SecretSource::Inline(text) => (text.0.clone(), String::new()),
            SecretSource::Env(name) => {
                let value = std::env::var(name).map_err(|e| match e {
                    std::env::VarError::NotPresent => {
                        format!("environment variable `{name}` is not set")
                    }
                    std::env::VarError::NotUnicode(_) => {
                        format!("environment variable `{name}` is not valid UTF-8")
                    }
                })?;
                (
                    value.trim().to_string(),
                    format!(" (in environment variable `{name}`)"),
                )
            }
            SecretSource::File(file) => {
                let path = base_dir.join(file);
                let value = std::fs::read_to_string(&path)
                    .map_err(|e| format!("cannot read secret file {}: {e}", path.display()))?;
                (
                    value.trim().to_string(),
                    format!(" (in file {})", path.display()),
                )
            }
        };
        check_secret(&value).map_err(|problem| format!("{problem}{origin}"))?;
        Ok(value)
    }
}

/// Parses an RFC 3339 time such as `2026-01-31T00:00:00Z` into ms since the Unix epoch.
fn parse_rfc3339_ms(text: &str) -> Result<Millis, String> {
    let time = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .map_err(|e| {
            format!("`{text}` is not an RFC 3339 time such as 2026-01-31T00:00:00Z ({e})")
        })?;
    Millis::try_from(time.unix_timestamp_nanos() / 1_000_000)
        .map_err(|_| format!("`{text}` is before 1970"))
}

/// Rejects a URL whose host is an IP address, or `localhost`, that the address policy refuses.
/// Host names are checked again after every resolution, at send time.
fn check_literal_address(url: &str, policy: &AddressPolicy) -> Result<(), String> {
    let Ok(parsed) = url::Url::parse(url) else {
        return Ok(());
    };
    let address: std::net::IpAddr = match parsed.host() {
        Some(url::Host::Ipv4(address)) => address.into(),
        Some(url::Host::Ipv6(address)) => address.into(),
        Some(url::Host::Domain(name)) if is_localhost(name) => std::net::Ipv4Addr::LOCALHOST.into(),
        _ => return Ok(()),
    };
    policy.check(address).map_err(|range| {
        let range = range.as_str();
        let article = if range.starts_with(['a', 'e', 'i', 'o', 'u']) {
            "an"
        } else {
            "a"
        };
        format!(
            "`{}` points at {address}, {article} {range} address; list its network in \
             `delivery.allowed_private_cidrs` if the endpoint is trusted",
            redact_user_info(url)
        )
    })
}

/// Returns whether a host name means this machine: `localhost` or a name under it, with or
/// without the trailing dot of a fully qualified name, in any case.
fn is_localhost(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    name == "localhost" || name.ends_with(".localhost")
}

/// Checks a Standard Webhooks secret: `whsec_` then base64 of 24 to 64 bytes.
pub(crate) fn check_secret(secret: &str) -> Result<(), String> {
    let Some(encoded) = secret.strip_prefix("whsec_") else {
        return Err("must start with `whsec_` followed by base64".into());
    };
    // The decode error is not shown: its message quotes the offending byte of the secret.
    let key = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .map_err(|_| "the part after `whsec_` is not valid padded base64".to_string())?;
    if !(24..=64).contains(&key.len()) {
        return Err(format!(
            "the key is {} bytes; use 24 to 64 random bytes",
            key.len()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("test.toml"))
    }

    fn endpoint(extra: &str) -> String {
        format!(
            "[[endpoints]]\nid = \"ep1\"\ntenant = \"acme\"\nurl = \"https://example.com/hook\"\n\
             event_types = [\"charge.*\"]\nsecret = \"{SECRET}\"\n{extra}\n"
        )
    }

    #[test]
    fn source_defaults_to_local() {
        let config = parse(&endpoint("")).expect("valid");
        assert_eq!(config.source.kind, SourceKind::Local);
        assert!(config.fluvio().is_none());
    }

    #[test]
    fn fluvio_source_parses() {
        let text = format!(
            "[source]\nkind = \"fluvio\"\n[source.fluvio]\nendpoint = \"127.0.0.1:9003\"\ntopic = \"events\"\n{}",
            endpoint("")
        );
        let config = parse(&text).expect("valid");
        let fluvio = config.fluvio().expect("fluvio settings");
        assert_eq!(fluvio.endpoint, "127.0.0.1:9003");
        assert_eq!(fluvio.topic, "events");
        assert_eq!(fluvio.consumer, "hookflow");
        assert_eq!(fluvio.timeout_ms, 10_000);
    }

    #[test]
    fn bad_source_values_name_the_field() {
        let cases = [
            ("[source]\nkind = \"kafka\"\n", "kind"),
            ("[source]\nkind = \"fluvio\"\n", "source.fluvio"),
            (
                "[source.fluvio]\nendpoint = \"localhost\"\ntopic = \"events\"\n",
                "source.fluvio.endpoint",
            ),
            (
                "[source.fluvio]\nendpoint = \"127.0.0.1:9003\"\ntopic = \"Events!\"\n",
                "source.fluvio.topic",
            ),
            (
                "[source.fluvio]\nendpoint = \"127.0.0.1:9003\"\ntopic = \"events\"\ntimeout_ms = 0\n",
                "source.fluvio.timeout_ms",
            ),
            (
                "[source.fluvio]\nendpoint = \"127.0.0.1:9003\"\ntopic = \"events\"\nbroker = \"x\"\n",
                "broker",
            ),
        ];
        for (source, field) in cases {
            let text = format!("{source}{}", endpoint(""));
            let message = parse(&text).expect_err("must be rejected").to_string();
            assert!(message.contains(field), "{source:?}: {message}");
        }
    }

    #[test]
    fn source_flag_needs_the_fluvio_table() {
        let mut config = parse(&endpoint("")).expect("valid");
        let message = config
            .set_source_kind(SourceKind::Fluvio, Path::new("test.toml"))
            .expect_err("no [source.fluvio]")
            .to_string();
        assert!(message.contains("source.fluvio"), "{message}");
        assert!(message.contains("test.toml"), "{message}");
    }

    #[test]
    fn example_config_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/hookflow.toml");
        let config = Config::load(&path).expect("examples/hookflow.toml must be valid");
        assert!(!config.endpoints.is_empty());
        assert_eq!(config.endpoints().len(), config.endpoints.len());
        assert!(config.alerts.enabled);
        assert!(config
            .endpoints
            .iter()
            .any(|endpoint| endpoint.tenant == config.alerts.operator_tenant));
    }

    #[test]
    fn alerts_error_names_field() {
        let text = format!(
            "[alerts]\nenabled = true\noperator_tenant = \"ops\"\nfailing_percent = 30\n\
             recovered_percent = 40\n{}",
            endpoint("")
        );
        let error = parse(&text).expect_err("recovered above failing");
        let message = error.to_string();
        assert!(message.contains("alerts.recovered_percent"), "{message}");
        let unknown = parse(&format!("[alerts]\nwindow_ms = 5\n{}", endpoint("")))
            .expect_err("unknown field");
        assert!(unknown.to_string().contains("window_ms"), "{unknown}");
    }

    #[test]
    fn defaults_apply() {
        let config = parse(&endpoint("")).expect("valid");
        assert_eq!(config.pipeline.workers, 1);
        assert_eq!(config.endpoints[0].timeout_ms, 15_000);
        assert!(config.endpoints[0].enabled);
    }

    /// A second valid secret, as during a rotation.
    const OLD_SECRET: &str = "whsec_d2ViaG9vay10ZXN0LXNlY3JldC0wMTIzNDU2Nzg5YWI=";

    /// Returns `endpoint(extra)` without its `secret` line.
    fn endpoint_without_secret(extra: &str) -> String {
        endpoint(extra).replace(&format!("secret = \"{SECRET}\"\n"), "")
    }

    fn secret_values(config: &Config) -> Vec<(String, Option<Millis>)> {
        config.endpoints()[0]
            .secrets
            .iter()
            .map(|secret| (secret.value.clone(), secret.expires_at_ms))
            .collect()
    }

    #[test]
    fn secret_from_env() {
        let name = "HOOKFLOW_TEST_SECRET_FROM_ENV";
        std::env::set_var(name, format!("{SECRET}\n"));
        let config = parse(&endpoint_without_secret(&format!(
            "secret_env = \"{name}\""
        )))
        .expect("valid");
        assert_eq!(secret_values(&config), [(SECRET.to_string(), None)]);
    }

    #[test]
    fn secret_from_file_beside_config() {
        let dir = tempfile::tempdir().expect("temporary directory");
        std::fs::write(dir.path().join("ep1.secret"), format!("{SECRET}\n")).expect("write");
        let text = endpoint_without_secret("secret_file = \"ep1.secret\"");
        let config = Config::parse(&text, &dir.path().join("hookflow.toml")).expect("valid");
        assert_eq!(secret_values(&config), [(SECRET.to_string(), None)]);
    }

    #[test]
    fn rotation_secrets_with_expiry() {
        let name = "HOOKFLOW_TEST_OLD_SECRET";
        std::env::set_var(name, OLD_SECRET);
        let extra = format!(
            "[[endpoints.secrets]]\nenv = \"{name}\"\nexpires_at = \"2999-01-02T03:04:05Z\"\n\
             [[endpoints.secrets]]\nvalue = \"{OLD_SECRET}\"\n"
        );
        let config = parse(&endpoint(&extra)).expect("valid");
        assert_eq!(
            secret_values(&config),
            [
                (SECRET.to_string(), None),
                (OLD_SECRET.to_string(), Some(32_472_241_445_000)),
                (OLD_SECRET.to_string(), None),
            ]
        );

        let inline = format!("secrets = [\"{OLD_SECRET}\", {{ value = \"{OLD_SECRET}\" }}]");
        let config = parse(&endpoint(&inline)).expect("valid");
        assert_eq!(secret_values(&config).len(), 3);
    }

    #[test]
    fn static_headers_lowercased() {
        let config = parse(&endpoint("headers = { \"X-Team\" = \"payments\" }")).expect("valid");
        let headers = &config.endpoints()[0].headers;
        assert_eq!(headers.get("x-team").map(String::as_str), Some("payments"));
    }

    #[test]
    fn secret_errors_hide_values() {
        let missing_env = "HOOKFLOW_TEST_SECRET_NOT_SET";
        std::env::remove_var(missing_env);
        let bad_env = "HOOKFLOW_TEST_SECRET_NOT_BASE64";
        std::env::set_var(bad_env, "whsec_s3cr3t!!value");
        let cases = [
            (
                endpoint_without_secret(&format!("secret_env = \"{missing_env}\"")),
                "field `endpoints[0].secret_env`: environment variable \
                 `HOOKFLOW_TEST_SECRET_NOT_SET` is not set",
            ),
            (
                endpoint_without_secret(&format!("secret_env = \"{bad_env}\"")),
                "not valid padded base64 (in environment variable `HOOKFLOW_TEST_SECRET_NOT_BASE64`)",
            ),
            (
                endpoint_without_secret("secret_file = \"no/such/file\""),
                "field `endpoints[0].secret_file`: cannot read secret file no/such/file",
            ),
            (
                endpoint("secret_env = \"X\""),
                "field `endpoints[0].secret_env`: set only one of `secret` and `secret_env`",
            ),
            (
                endpoint("secrets = [{ value = \"whsec_s3cr3t!!value\" }]"),
                "field `endpoints[0].secrets[0].value`: the part after `whsec_`",
            ),
            (
                endpoint("secrets = [{ env = \"A\", file = \"b\" }]"),
                "field `endpoints[0].secrets[0]`: set exactly one of `value`, `env` and `file`",
            ),
            (
                endpoint("secrets = [{ valeu = \"x\" }]"),
                "unknown field `valeu`",
            ),
            (
                endpoint(&format!(
                    "secrets = [{{ value = \"{OLD_SECRET}\", expires_at = \"tomorrow\" }}]"
                )),
                "field `endpoints[0].secrets[0].expires_at`: `tomorrow` is not an RFC 3339 time",
            ),
            (
                endpoint_without_secret(&format!(
                    "secrets = [{{ value = \"{OLD_SECRET}\", expires_at = \"2020-01-01T00:00:00Z\" }}]"
                )),
                "field `endpoints[0].secrets`: every secret has expired",
            ),
            (
                endpoint_without_secret(""),
                "field `endpoints[0].secret`: missing",
            ),
        ];
        for (text, expected) in cases {
            let message = parse(&text).expect_err("must be rejected").to_string();
            assert!(
                message.contains(expected),
                "expected `{expected}` in: {message}"
            );
            assert!(!message.contains("s3cr3t"), "secret in: {message}");
        }
    }

    #[test]
    fn static_header_errors_name_field() {
        let cases = [
            (
                endpoint("headers = { \"content-type\" = \"text/plain\" }"),
                "field `endpoints[0].headers.content-type`: invalid static header `content-type`: \
                 hookflow sets this header itself",
            ),
            (
                endpoint("headers = { \"Webhook-Id\" = \"x\" }"),
                "field `endpoints[0].headers.Webhook-Id`",
            ),
            (
                endpoint("headers = { host = \"a\" }"),
                "field `endpoints[0].headers.host`",
            ),
            (
                endpoint("headers = { \"content-length\" = \"1\" }"),
                "field `endpoints[0].headers.content-length`",
            ),
            (
                endpoint("headers = { \"x team\" = \"a\" }"),
                "not a valid HTTP header name",
            ),
            (
                endpoint("headers = { \"x-token\" = \"s3cr3t\\n\" }"),
                "field `endpoints[0].headers.x-token`: invalid static header `x-token`: the value",
            ),
            (
                endpoint("headers = { \"X-Team\" = \"a\", \"x-team\" = \"b\" }"),
                "is set twice",
            ),
            (
                endpoint("headers = { authorization = \"Bearer s3cr3t\" }")
                    .replace("https://example.com", "https://user:pw@example.com"),
                "field `endpoints[0].headers.authorization`: the url contains credentials",
            ),
        ];
        for (text, expected) in cases {
            let message = parse(&text).expect_err("must be rejected").to_string();
            assert!(
                message.contains(expected),
                "expected `{expected}` in: {message}"
            );
            assert!(!message.contains("s3cr3t"), "header value in: {message}");
        }
    }

    #[test]
    fn delivery_ssrf_options() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let ca = rcgen_self_signed().cert;
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).expect("write bundle");
        let text = format!(
            "[delivery]\nproxy = \"http://10.1.2.3:3128\"\nhttps_only = true\n\
             ca_bundle = \"ca.pem\"\n{}",
            endpoint("")
        );

        let config = Config::parse(&text, &dir.path().join("hookflow.toml")).expect("valid");

        let proxy = config.delivery.proxy_url().expect("valid proxy");
        assert_eq!(
            proxy.map(String::from).as_deref(),
            Some("http://10.1.2.3:3128/")
        );
        assert!(config.delivery.https_only);
        assert_eq!(config.delivery.ca_bundle_pem, Some(ca.pem().into_bytes()));
    }

    #[test]
    fn delivery_ssrf_option_errors() {
        let dir = tempfile::tempdir().expect("temporary directory");
        std::fs::write(dir.path().join("empty.pem"), "").expect("write");
        std::fs::write(
            dir.path().join("bad.pem"),
            "-----BEGIN CERTIFICATE-----\n!!\n-----END CERTIFICATE-----\n",
        )
        .expect("write");
        let cases = [
            (
                "[delivery]\nproxy = \"socks5://p:1080\"\n".to_string(),
                "field `delivery.proxy`: `socks5://p:1080` must be an http or https URL",
            ),
            (
                "[delivery]\nproxy = \"proxy:3128\"\n".to_string(),
                "field `delivery.proxy`",
            ),
            (
                "[delivery]\nproxy = \"http://u:s3cr3t@p:3128/x\"\n".to_string(),
                "field `delivery.proxy`: `http://***@p:3128/x` must not have a path",
            ),
            (
                "[delivery]\nca_bundle = \"missing.pem\"\n".to_string(),
                "field `delivery.ca_bundle`: cannot read",
            ),
            (
                "[delivery]\nca_bundle = \"empty.pem\"\n".to_string(),
                "contains no `-----BEGIN CERTIFICATE-----` block",
            ),
            (
                "[delivery]\nca_bundle = \"bad.pem\"\n".to_string(),
                "is not a list of PEM certificates",
            ),
            (
                format!(
                    "[delivery]\nhttps_only = true\n{}",
                    endpoint("").replace("https://example.com", "http://example.com")
                ),
                "field `endpoints[0].url`: `delivery.https_only` is set",
            ),
        ];
        for (text, expected) in cases {
            let message = Config::parse(&text, &dir.path().join("hookflow.toml"))
                .expect_err("must be rejected")
                .to_string();
            assert!(
                message.contains(expected),
                "expected `{expected}` in: {message}"
            );
            assert!(!message.contains("s3cr3t"), "{message}");
        }
    }

    fn rcgen_self_signed() -> rcgen::CertifiedKey<rcgen::KeyPair> {
        rcgen::generate_simple_self_signed(vec!["proxy.test".to_string()]).expect("certificate")
    }

    #[test]
    fn debug_hides_secrets() {
        let with_header =
            parse(&endpoint("headers = { authorization = \"Bearer t0ken\" }")).expect("valid");
        let with_credentials =
            parse(&endpoint("").replace("https://example.com", "https://user:pa55@example.com"))
                .expect("valid");
        let debug = format!("{with_header:?} {with_credentials:?}");
        let key = SECRET.trim_start_matches("whsec_");
        for hidden in [key, "t0ken", "pa55"] {
            assert!(!debug.contains(hidden), "`{hidden}` in {debug}");
        }
        assert!(debug.contains("https://***@example.com/hook"), "{debug}");
    }

    #[test]
    fn errors_name_file_and_field() {
        let cases = [
            (endpoint("colour = \"red\""), "unknown field `colour`"),
            (
                endpoint("").replace("whsec_", "sk_"),
                "field `endpoints[0].secret`",
            ),
            (
                endpoint("").replace("https://example.com/hook", "not a url"),
                "field `endpoints[0].url`",
            ),
            (
                endpoint("").replace("charge.*", "char*ge"),
                "field `endpoints[0].event_types[0]`",
            ),
            (
                format!("{}{}", endpoint(""), endpoint("")),
                "duplicate endpoint id `ep1`",
            ),
            (
                "[delivery]\nallowed_private_cidrs = [\"localhost\"]\n".to_string(),
                "field `delivery.allowed_private_cidrs[0]`",
            ),
            (
                "[pipeline]\nworkers = 0\n".to_string(),
                "field `pipeline.workers`",
            ),
            (
                "[pipeline]\nworkers = \"two\"\n".to_string(),
                "invalid type",
            ),
            (
                endpoint("").replace("https://example.com/hook", "http://10.0.0.1/hook"),
                "field `endpoints[0].url`: `http://10.0.0.1/hook` points at 10.0.0.1",
            ),
            (
                endpoint("").replace("https://example.com/hook", "http://localhost:9000/"),
                "delivery.allowed_private_cidrs",
            ),
            (
                endpoint("").replace("https://example.com/hook", "http://LOCALHOST.:9000/"),
                "points at 127.0.0.1, a loopback address",
            ),
            (
                endpoint("").replace("https://example.com/hook", "http://0.0.0.0:9000/"),
                "an unspecified address",
            ),
            (
                endpoint("").replace("https://example.com/hook", "http://[::ffff:127.0.0.1]/"),
                "field `endpoints[0].url`",
            ),
            (
                endpoint("").replace("https://example.com/hook", "http://u:s3cr3t@10.0.0.1/"),
                "field `endpoints[0].url`: `http://***@10.0.0.1/` points at 10.0.0.1",
            ),
            (
                endpoint("").replace("https://example.com/hook", "ftp://u:s3cr3t@example.com/"),
                "field `endpoints[0].url`: `ftp://***@example.com/` must be an http",
            ),
            (
                "[retry]\njitter_percent = 150\n".to_string(),
                "field `retry.jitter_percent`",
            ),
            (
                endpoint("rate_limit = { max_requests = 0 }"),
                "field `endpoints[0].rate_limit.max_requests`",
            ),
            (
                endpoint("rate_limit = { max_request = 5 }"),
                "unknown field `max_request`",
            ),
        ];
        for (text, expected) in cases {
            let message = parse(&text).expect_err("must be rejected").to_string();
            assert!(
                message.starts_with("invalid config file test.toml"),
                "{message}"
            );
            assert!(
                message.contains(expected),
                "expected `{expected}` in: {message}"
            );
        }
    }
}
