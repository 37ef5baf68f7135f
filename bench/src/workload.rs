//! The workload of a scenario: the endpoints and their subscriptions (a [`Topology`]), the
//! events published, and the `hookflow run` configuration that points the endpoints at the
//! receiver.
//!
//! Everything here is a pure function of its arguments and the seed, so two runs with the same
//! seed publish the same events to the same endpoints.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;

use rand::rngs::StdRng;
use rand::seq::index::sample;
use rand::{Rng, SeedableRng};

use crate::receiver::Mode;

/// Size of every payload, and of every raw-ceiling request body, in bytes.
pub const PAYLOAD_BYTES: usize = 1024;

/// The signing secret of every benchmark endpoint. It protects nothing: the receiver does not
/// verify signatures, but the pipeline computes them as it would for a real endpoint.
pub const SECRET: &str = "whsec_OMhpMczFh+Cb7Am6GI1akbsDYS0vhHnHi3+2/ntqj3o=";

/// The event type no benchmark event has, given to endpoints that no type is routed to.
const UNUSED_TYPE: &str = "unused.type";

/// Returns the payload of event `n`: a JSON object of exactly [`PAYLOAD_BYTES`] bytes.
pub fn payload(n: u64) -> String {
    let head = format!(r#"{{"n":{n},"pad":""#);
    let tail = r#""}"#;
    let pad = PAYLOAD_BYTES.saturating_sub(head.len() + tail.len());
    let mut text = String::with_capacity(PAYLOAD_BYTES);
    text.push_str(&head);
    text.extend(std::iter::repeat_n('x', pad));
    text.push_str(tail);
    text
}

/// Returns event `n` as the NDJSON line a producer publishes. Its id is `evt_<n>`, which the
/// receiver turns back into `n`.
pub fn event_line(n: u64, tenant: &str, event_type: &str) -> String {
    format!(
        r#"{{"id":"evt_{n}","tenant":"{tenant}","type":"{event_type}","created_at":"2026-01-01T00:00:00Z","payload":{}}}"#,
        payload(n)
    )
}

/// One endpoint of a topology.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSpec {
    /// The endpoint number, used in its id (`ep<number>`) and its receiver path.
    pub number: u32,
    /// Index into [`Topology::tenants`].
    pub tenant: usize,
    /// Indexes into [`Topology::event_types`] of the types routed to this endpoint.
    pub event_types: Vec<usize>,
    /// The receiver's behaviour for it.
    pub mode: Mode,
}

impl EndpointSpec {
    /// Returns the endpoint id in the configuration.
    pub fn id(&self) -> String {
        format!("ep{}", self.number)
    }

    /// Returns the receiver path of the endpoint.
    pub fn path(&self) -> String {
        format!("/e/{}/{}", self.number, self.mode.segment())
    }
}

/// Tenants, event types, endpoints, and which endpoints each (tenant, event type) reaches.
#[derive(Debug, Clone)]
pub struct Topology {
    /// Tenant names.
    pub tenants: Vec<String>,
    /// Event type names, shared by all tenants.
    pub event_types: Vec<String>,
    /// The endpoints, in number order.
    pub endpoints: Vec<EndpointSpec>,
}

impl Topology {
    /// Creates one tenant, one event type and one endpoint with the receiver behaviour `mode`.
    pub fn single(mode: Mode) -> Topology {
        Topology {
            tenants: vec!["t0".to_string()],
            event_types: vec!["bench.event".to_string()],
            endpoints: vec![EndpointSpec {
                number: 0,
                tenant: 0,
                event_types: vec![0],
                mode,
            }],
        }
    }

    /// Creates `tenants` tenants with `endpoints_per_tenant` endpoints each and `event_types`
    /// event types. Each (tenant, type) is routed to 1 to 3 of the tenant's endpoints (uniformly,
    /// at most `endpoints_per_tenant`), chosen by `seed`.
    pub fn fan_out(
        tenants: usize,
        endpoints_per_tenant: usize,
        event_types: usize,
        seed: u64,
    ) -> Topology {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut endpoints = Vec::with_capacity(tenants * endpoints_per_tenant);
        for tenant in 0..tenants {
            let first = endpoints.len();
            for _ in 0..endpoints_per_tenant {
                endpoints.push(EndpointSpec {
                    number: u32::try_from(endpoints.len()).unwrap_or(u32::MAX),
                    tenant,
                    event_types: Vec::new(),
                    mode: Mode::Ok,
                });
            }
            for event_type in 0..event_types {
                let fan_out = rng.random_range(1..=3).min(endpoints_per_tenant);
                for chosen in sample(&mut rng, endpoints_per_tenant, fan_out) {
                    endpoints[first + chosen].event_types.push(event_type);
                }
            }
        }
        for endpoint in &mut endpoints {
            endpoint.event_types.sort_unstable();
        }
        Topology {
            tenants: (0..tenants).map(|t| format!("t{t}")).collect(),
            event_types: (0..event_types).map(|e| format!("type.{e}")).collect(),
            endpoints,
        }
    }

    /// Makes `failing_percent` % of the endpoints respond with 503 and another
    /// `hanging_percent` % hold the request (rounded down, chosen by `seed`).
    pub fn with_unhealthy(
        mut self,
        failing_percent: usize,
        hanging_percent: usize,
        seed: u64,
    ) -> Topology {
        let count = self.endpoints.len();
        let failing = count * failing_percent / 100;
        let hanging = count * hanging_percent / 100;
        let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed_fa11);
        let chosen = sample(&mut rng, count, (failing + hanging).min(count));
        for (rank, index) in chosen.into_iter().enumerate() {
            self.endpoints[index].mode = if rank < failing {
                Mode::Fail
            } else {
                Mode::Hang
            };
        }
        self
    }

    /// Returns the same topology without its failing and hanging endpoints.
    pub fn healthy_only(&self) -> Topology {
        Topology {
            endpoints: self
                .endpoints
                .iter()
                .filter(|endpoint| endpoint.mode == Mode::Ok)
                .cloned()
                .collect(),
            ..self.clone()
        }
    }

    /// Returns, for each (tenant, event type), the positions in [`Topology::endpoints`] of the
    /// endpoints it reaches.
    pub fn routes(&self) -> HashMap<(usize, usize), Vec<usize>> {
        let mut routes: HashMap<(usize, usize), Vec<usize>> = HashMap::new();
        for (position, endpoint) in self.endpoints.iter().enumerate() {
            for event_type in &endpoint.event_types {
                routes
                    .entry((endpoint.tenant, *event_type))
                    .or_default()
                    .push(position);
            }
        }
        routes
    }
}

/// Draws the (tenant, event type) of each of `count` events uniformly with `seed`.
pub fn draw_events(topology: &Topology, count: usize, seed: u64) -> Vec<(usize, usize)> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0xe7e7_e7e7);
    (0..count)
        .map(|_| {
            (
                rng.random_range(0..topology.tenants.len()),
                rng.random_range(0..topology.event_types.len()),
            )
        })
        .collect()
}

/// Settings of the generated `hookflow run` configuration.
#[derive(Debug, Clone)]
pub struct ConfigSettings {
    /// `http://127.0.0.1:PORT` of the receiver.
    pub receiver_url: String,
    /// Timely worker threads.
    pub workers: usize,
    /// `delivery.max_in_flight`: requests in flight per worker over all endpoints.
    pub max_in_flight_total: usize,
    /// `max_in_flight` of each endpoint; the pipeline's default when `None`.
    pub endpoint_max_in_flight: Option<usize>,
    /// `timeout_ms` of each endpoint; the pipeline's default when `None`.
    pub endpoint_timeout_ms: Option<u64>,
    /// `retry.schedule_ms`.
    pub retry_schedule_ms: Vec<u64>,
    /// `health.breaker_min_requests`; the pipeline's default when `None`.
    pub breaker_min_requests: Option<u32>,
}

/// Returns the TOML configuration of `topology` with `settings`, archiving to `archive_dir`.
pub fn config_text(topology: &Topology, settings: &ConfigSettings, archive_dir: &Path) -> String {
    let quoted_dir = serde_json::to_string(&archive_dir.display().to_string()).unwrap_or_default();
    let mut text = String::new();
    let _ = write!(
        text,
        "# Written by hookflow-bench.\n\
         [pipeline]\nworkers = {}\n\n\
         [delivery]\nmax_in_flight = {}\nallowed_private_cidrs = [\"127.0.0.1/32\"]\n\n\
         [retry]\nschedule_ms = {:?}\n\n\
         [archive]\ndir = {quoted_dir}\n",
        settings.workers, settings.max_in_flight_total, settings.retry_schedule_ms,
    );
    if let Some(min_requests) = settings.breaker_min_requests {
        let _ = write!(text, "\n[health]\nbreaker_min_requests = {min_requests}\n");
    }
    for endpoint in &topology.endpoints {
        let types: Vec<&str> = if endpoint.event_types.is_empty() {
            vec![UNUSED_TYPE]
        } else {
            endpoint
                .event_types
                .iter()
                .map(|t| topology.event_types[*t].as_str())
                .collect()
        };
        let _ = write!(
            text,
            "\n[[endpoints]]\nid = \"{}\"\ntenant = \"{}\"\nurl = \"{}{}\"\n\
             event_types = {types:?}\nsecret = \"{SECRET}\"\n",
            endpoint.id(),
            topology.tenants[endpoint.tenant],
            settings.receiver_url,
            endpoint.path(),
        );
        if let Some(limit) = settings.endpoint_max_in_flight {
            let _ = writeln!(text, "max_in_flight = {limit}");
        }
        if let Some(timeout) = settings.endpoint_timeout_ms {
            let _ = writeln!(text, "timeout_ms = {timeout}");
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    use hookflow::config::Config;
    use hookflow_schemas::{decode_event, DEFAULT_MAX_PAYLOAD_BYTES};

    #[test]
    fn payload_is_exactly_one_kib_of_json() {
        for n in [0, 7, 123_456_789, u64::MAX] {
            let text = payload(n);
            assert_eq!(text.len(), PAYLOAD_BYTES, "event {n}");
            let value: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
            assert_eq!(value["n"], serde_json::json!(n));
        }
    }

    #[test]
    fn event_line_decodes() {
        let line = event_line(42, "t3", "type.1");
        let event = decode_event(line.as_bytes(), DEFAULT_MAX_PAYLOAD_BYTES).expect("valid event");
        assert_eq!(event.id, "evt_42");
        assert_eq!(event.tenant, "t3");
        assert_eq!(event.event_type, "type.1");
        assert_eq!(event.payload, payload(42).into_bytes());
    }

    #[test]
    fn fan_out_reaches_one_to_three_endpoints() {
        let topology = Topology::fan_out(200, 5, 5, 42);
        assert_eq!(topology.endpoints.len(), 1000);
        let routes = topology.routes();
        assert_eq!(routes.len(), 200 * 5);
        let mut seen_fan_outs = [false; 4];
        for ((tenant, _), targets) in &routes {
            assert!((1..=3).contains(&targets.len()), "{targets:?}");
            seen_fan_outs[targets.len()] = true;
            for target in targets {
                assert_eq!(topology.endpoints[*target].tenant, *tenant);
            }
        }
        assert_eq!(seen_fan_outs, [false, true, true, true]);
    }

    #[test]
    fn fan_out_depends_on_seed_only() {
        let first = Topology::fan_out(20, 5, 5, 7);
        let again = Topology::fan_out(20, 5, 5, 7);
        let other = Topology::fan_out(20, 5, 5, 8);
        assert_eq!(first.endpoints, again.endpoints);
        assert_ne!(first.endpoints, other.endpoints);
    }

    #[test]
    fn unhealthy_endpoints_are_counted_and_removable() {
        let topology = Topology::fan_out(200, 5, 5, 1).with_unhealthy(10, 1, 1);
        let count = |mode| topology.endpoints.iter().filter(|e| e.mode == mode).count();
        assert_eq!(count(Mode::Fail), 100);
        assert_eq!(count(Mode::Hang), 10);
        assert_eq!(count(Mode::Ok), 890);
        let healthy = topology.healthy_only();
        assert_eq!(healthy.endpoints.len(), 890);
        assert!(healthy.endpoints.iter().all(|e| e.mode == Mode::Ok));
    }

    #[test]
    fn drawn_events_stay_in_range() {
        let topology = Topology::fan_out(3, 2, 4, 1);
        let events = draw_events(&topology, 500, 9);
        assert_eq!(events.len(), 500);
        assert!(events.iter().all(|(tenant, _)| *tenant < 3));
        assert!(events.iter().all(|(_, event_type)| *event_type < 4));
        assert_eq!(events, draw_events(&topology, 500, 9));
    }

    #[test]
    fn config_text_is_a_valid_config() {
        let topology = Topology::fan_out(10, 5, 5, 3).with_unhealthy(10, 2, 3);
        let settings = ConfigSettings {
            receiver_url: "http://127.0.0.1:9".to_string(),
            workers: 2,
            max_in_flight_total: 64,
            endpoint_max_in_flight: Some(16),
            endpoint_timeout_ms: Some(250),
            retry_schedule_ms: vec![100, 200],
            breaker_min_requests: None,
        };
        let text = config_text(&topology, &settings, Path::new("/tmp/a \"quoted\" dir"));
        let config = Config::parse(&text, Path::new("bench.toml")).expect("valid config");
        assert_eq!(
            config.health.policy(),
            hookflow_operators::health::HealthPolicy::default()
        );
        assert_eq!(config.endpoints().len(), 50);
        assert_eq!(config.pipeline.workers, 2);
        assert_eq!(config.delivery.max_in_flight, 64);
        assert_eq!(config.retry.schedule_ms, vec![100, 200]);
        assert_eq!(config.archive.dir, Path::new("/tmp/a \"quoted\" dir"));
        let endpoint = &config.endpoints[0];
        assert_eq!(endpoint.max_in_flight, 16);
        assert_eq!(endpoint.timeout_ms, 250);
        assert!(endpoint.url.starts_with("http://127.0.0.1:9/e/0/"));

        let held_open = ConfigSettings {
            breaker_min_requests: Some(u32::MAX),
            ..settings
        };
        let text = config_text(&topology, &held_open, Path::new("/tmp/archive"));
        let config = Config::parse(&text, Path::new("bench.toml")).expect("valid config");
        assert_eq!(config.health.breaker_min_requests, u32::MAX);
    }
}
