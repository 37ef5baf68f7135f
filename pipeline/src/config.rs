//! The `hookflow run` configuration file (TOML).
//!
//! Every table rejects unknown fields, so a misspelt option fails at start instead of being
//! ignored. [`Config::load`] parses and then validates; an error names the file, the field
//! (as a TOML path such as `endpoints[2].secret`) and the problem. `examples/hookflow.toml`
//! documents every field and is parsed by a test.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use base64::Engine;
use hookflow_operators::deliver::AddressPolicy;
use hookflow_operators::health::HealthPolicy;
use hookflow_operators::retry::RetryPolicy;
use hookflow_schemas::{Endpoint, EventTypePattern, RateLimit, DEFAULT_MAX_PAYLOAD_BYTES};
use ipnet::IpNet;
use serde::Deserialize;

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Settings of the dataflow.
    #[serde(default)]
    pub pipeline: PipelineConfig,
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
    /// The endpoints to deliver to.
    #[serde(default)]
    pub endpoints: Vec<EndpointConfig>,
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
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            max_in_flight: 256,
            max_response_bytes: 64 * 1024,
            allowed_private_cidrs: Vec::new(),
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
    /// The longest pause a `Retry-After` causes, in ms; longer requests are capped.
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
#[derive(Debug, Clone, Deserialize)]
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
    /// One signing secret, `whsec_` followed by base64.
    pub secret: Option<String>,
    /// Several signing secrets (during a rotation each one signs every request).
    #[serde(default)]
    pub secrets: Vec<String>,
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
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Parses and validates configuration text; `path` is used in messages only.
    ///
    /// # Errors
    ///
    /// See [`ConfigError`].
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        config
            .validate()
            .map_err(|(field, problem)| ConfigError::Field {
                path: path.to_path_buf(),
                field,
                problem,
            })?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), (String, String)> {
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
        let policy = AddressPolicy::new(self.allowed_networks()?);

        let mut ids = HashSet::new();
        for (index, endpoint) in self.endpoints.iter().enumerate() {
            let field = |name: &str| format!("endpoints[{index}].{name}");
            if !ids.insert(endpoint.id.as_str()) {
                return Err((
                    field("id"),
                    format!("duplicate endpoint id `{}`", endpoint.id),
                ));
            }
            endpoint
                .to_endpoint()
                .map_err(|(name, problem)| (field(&name), problem))?;
            check_literal_address(&endpoint.url, &policy)
                .map_err(|problem| (field("url"), problem))?;
        }
        Ok(())
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

    /// Returns the configured endpoints, validated.
    pub fn endpoints(&self) -> Vec<Endpoint> {
        self.endpoints
            .iter()
            .filter_map(|e| e.to_endpoint().ok())
            .collect()
    }
}

impl EndpointConfig {
    /// Converts to the shared endpoint type, or names the field that is wrong.
    fn to_endpoint(&self) -> Result<Endpoint, (String, String)> {
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
                    format!("`{url}` must be an http or https URL with a host"),
                );
            }
            Err(e) => return bad("url", format!("`{}` is not a URL ({e})", self.url)),
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

        let mut secrets: Vec<String> = self.secret.iter().cloned().collect();
        secrets.extend(self.secrets.iter().cloned());
        if secrets.is_empty() {
            return bad("secret", "missing: set `secret = \"whsec_...\"`".into());
        }
        for (index, secret) in secrets.iter().enumerate() {
            let name = if self.secret.is_some() && index == 0 {
                "secret".to_string()
            } else {
                format!("secrets[{}]", index - usize::from(self.secret.is_some()))
            };
            if let Err(problem) = check_secret(secret) {
                return bad(&name, problem);
            }
        }

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

/// Rejects a URL whose host is an IP address, or `localhost`, that the address policy refuses.
/// Host names are checked again after every resolution, at send time.
fn check_literal_address(url: &str, policy: &AddressPolicy) -> Result<(), String> {
    let Ok(parsed) = url::Url::parse(url) else {
        return Ok(());
    };
    let address: std::net::IpAddr = match parsed.host() {
        Some(url::Host::Ipv4(address)) => address.into(),
        Some(url::Host::Ipv6(address)) => address.into(),
        Some(url::Host::Domain(name)) if name == "localhost" || name.ends_with(".localhost") => {
            std::net::Ipv4Addr::LOCALHOST.into()
        }
        _ => return Ok(()),
    };
    policy.check(address).map_err(|range| {
        format!(
            "`{url}` points at {address}, a {} address; list its network in \
             `delivery.allowed_private_cidrs` if the endpoint is trusted",
            range.as_str()
        )
    })
}

/// Checks a Standard Webhooks secret: `whsec_` then base64 of 24 to 64 bytes.
fn check_secret(secret: &str) -> Result<(), String> {
    let Some(encoded) = secret.strip_prefix("whsec_") else {
        return Err("must start with `whsec_` followed by base64".into());
    };
    let key = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .map_err(|e| format!("the part after `whsec_` is not valid base64 ({e})"))?;
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
    fn example_config_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/hookflow.toml");
        let config = Config::load(&path).expect("examples/hookflow.toml must be valid");
        assert!(!config.endpoints.is_empty());
        assert_eq!(config.endpoints().len(), config.endpoints.len());
    }

    #[test]
    fn defaults_apply() {
        let config = parse(&endpoint("")).expect("valid");
        assert_eq!(config.pipeline.workers, 1);
        assert_eq!(config.endpoints[0].timeout_ms, 15_000);
        assert!(config.endpoints[0].enabled);
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
                endpoint("").replace("https://example.com/hook", "http://[::ffff:127.0.0.1]/"),
                "field `endpoints[0].url`",
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
