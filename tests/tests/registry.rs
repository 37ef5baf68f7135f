//! Endpoint changes through the registry while `hookflow run` runs: created, updated, disabled,
//! enabled and deleted endpoints, on two workers so that the updates are broadcast, and kept
//! across a restart. Real receivers on 127.0.0.1, the real local log, state store and archive.

use std::collections::HashMap;
use std::path::Path;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hookflow::config::Config;
use hookflow::dataflow::{archive_dir, run_with_registry, RunOptions, RunReport};
use hookflow::receiver::{Behaviour, Receiver};
use hookflow::registry::{EndpointChange, EndpointRegistry};
use hookflow_connectors::{read_attempts, StateStore};
use hookflow_operators::clock::WallClock;
use hookflow_operators::stop::StopSignal;
use hookflow_schemas::{AttemptRow, Endpoint};
use hookflow_tests::{config_text, event_line, publish_lines};

/// A pipeline running on a thread of its own until stopped.
struct Running {
    registry: EndpointRegistry,
    stop: Arc<StopSignal>,
    thread: std::thread::JoinHandle<anyhow::Result<RunReport>>,
    runtime: tokio::runtime::Runtime,
}

impl Running {
    fn start(data_dir: &Path, text: &str, workers: usize) -> Running {
        let mut config = Config::parse(text, Path::new("test.toml")).expect("config");
        config.pipeline.workers = workers;
        let stop = Arc::new(StopSignal::new());
        let options = RunOptions {
            config,
            data_dir: data_dir.to_path_buf(),
            until_idle: false,
            clock: Arc::new(WallClock),
            stop: stop.clone(),
            cluster: hookflow::cluster::Cluster::default(),
        };
        let (sender, registry) = mpsc::channel();
        let thread = std::thread::spawn(move || {
            run_with_registry(options, move |registry| {
                let _ = sender.send(registry);
            })
        });
        let registry = registry
            .recv_timeout(Duration::from_secs(30))
            .expect("the pipeline hands out its registry");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        Running {
            registry,
            stop,
            thread,
            runtime,
        }
    }

    fn apply(&self, change: EndpointChange) {
        self.runtime
            .block_on(self.registry.apply(change))
            .expect("the change is absorbed");
    }

    fn stop(self) -> RunReport {
        self.stop.stop();
        self.thread
            .join()
            .expect("pipeline thread")
            .expect("pipeline run")
    }
}

/// Waits up to 20 s for `done`, polling.
fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The `webhook-id` headers of the requests `receiver` got on `path`.
fn ids_at(receiver: &Receiver, path: &str) -> Vec<String> {
    receiver
        .requests_to(path)
        .iter()
        .filter_map(|request| request.header("webhook-id").map(str::to_string))
        .collect()
}

fn rows_of(data_dir: &Path, text: &str, endpoint_id: &str) -> Vec<AttemptRow> {
    let config = Config::parse(text, Path::new("test.toml")).expect("config");
    read_attempts(&archive_dir(&config, data_dir))
        .expect("archive")
        .into_iter()
        .filter(|row| row.endpoint_id.as_deref() == Some(endpoint_id))
        .collect()
}

/// The configured endpoint `id`, as the tests' configuration builds it, to change.
fn configured(text: &str, id: &str) -> Endpoint {
    Config::parse(text, Path::new("test.toml"))
        .expect("config")
        .endpoints()
        .into_iter()
        .find(|endpoint| endpoint.id == id)
        .expect("configured endpoint")
}

#[test]
fn endpoint_changes_apply_while_running() {
    let behaviours = HashMap::from([
        ("/fail".to_string(), Behaviour::Status(500)),
        ("/doomed".to_string(), Behaviour::Status(500)),
    ]);
    let receiver = Receiver::start(behaviours).expect("receiver");
    let endpoints = [
        ("base", "t1", receiver.url("/base"), r#"["*"]"#),
        ("moving", "t2", receiver.url("/fail"), r#"["*"]"#),
        ("doomed", "t3", receiver.url("/doomed"), r#"["*"]"#),
        ("paused", "t4", receiver.url("/paused"), r#"["*"]"#),
    ];
    // `moving` retries quickly; `doomed` waits a minute, so its retry is pending when deleted.
    let mut text = config_text(
        &endpoints,
        "[retry]\nschedule_ms = [300, 300, 300, 300, 300, 300, 300, 300]\njitter_percent = 0\n",
    );
    text = text.replace(
        "id = \"doomed\"",
        "id = \"doomed\"\nrate_limit = { max_requests = 1, window_ms = 60000 }",
    );
    let dir = tempfile::tempdir().expect("temporary directory");
    let running = Running::start(dir.path(), &text, 2);

    // Created: an event read before the change is not delivered to the new endpoint, one
    // read after it is.
    publish_lines(
        dir.path(),
        &[event_line("t1", "evt_before", "a.b", "{}")],
        false,
    )
    .expect("publish");
    wait_for("evt_before at /base", || {
        ids_at(&receiver, "/base")
            .iter()
            .any(|id| id.contains("evt_before"))
    });
    let mut created = configured(&text, "base");
    created.id = "new".to_string();
    created.url = receiver.url("/new");
    running.apply(EndpointChange::Upsert(created));
    publish_lines(
        dir.path(),
        &[event_line("t1", "evt_after", "a.b", "{}")],
        false,
    )
    .expect("publish");
    wait_for("evt_after at /new", || {
        !ids_at(&receiver, "/new").is_empty()
    });

    // Updated URL: the next attempt of a failing delivery goes to the new URL.
    publish_lines(
        dir.path(),
        &[event_line("t2", "evt_move", "a.b", "{}")],
        false,
    )
    .expect("publish");
    wait_for("a failed attempt at /fail", || {
        !receiver.requests_to("/fail").is_empty()
    });
    let mut moved = configured(&text, "moving");
    moved.url = receiver.url("/moved");
    running.apply(EndpointChange::Upsert(moved));
    let failed_before_move = receiver.requests_to("/fail").len();
    wait_for("the retry at /moved", || {
        !receiver.requests_to("/moved").is_empty()
    });

    // Disabled: a new event is parked, not sent; enabled: it resumes without a restart.
    let mut paused = configured(&text, "paused");
    paused.enabled = false;
    running.apply(EndpointChange::Upsert(paused.clone()));
    publish_lines(
        dir.path(),
        &[event_line("t4", "evt_parked", "a.b", "{}")],
        false,
    )
    .expect("publish");
    let store = StateStore::open(dir.path()).expect("state store");
    wait_for("evt_parked parked", || {
        !store.parked_of("paused").expect("read parked").is_empty()
    });
    assert!(
        receiver.requests_to("/paused").is_empty(),
        "a disabled endpoint got a request"
    );
    paused.enabled = true;
    running.apply(EndpointChange::Upsert(paused));
    wait_for("evt_parked at /paused", || {
        !receiver.requests_to("/paused").is_empty()
    });

    // Deleted: the delivery waiting for its retry is dead-lettered as `endpoint_deleted`.
    publish_lines(
        dir.path(),
        &[
            event_line("t3", "evt_doomed_1", "a.b", "{}"),
            event_line("t3", "evt_doomed_2", "a.b", "{}"),
        ],
        false,
    )
    .expect("publish");
    wait_for("a failed attempt at /doomed", || {
        !receiver.requests_to("/doomed").is_empty()
    });
    running.apply(EndpointChange::Delete {
        id: "doomed".to_string(),
    });
    let doomed_requests = receiver.requests_to("/doomed").len();
    std::thread::sleep(Duration::from_millis(300));
    let report = running.stop();

    let new_ids = ids_at(&receiver, "/new");
    assert_eq!(new_ids.len(), 1, "{new_ids:?}");
    assert!(new_ids[0].contains("evt_after"), "{new_ids:?}");
    assert!(
        ids_at(&receiver, "/moved")
            .iter()
            .all(|id| id.contains("evt_move")),
        "only the moved delivery goes to /moved"
    );
    assert!(
        receiver.requests_to("/fail").len() <= failed_before_move + 1,
        "the old URL got more than the attempt already in flight"
    );
    assert_eq!(
        receiver.requests_to("/doomed").len(),
        doomed_requests,
        "a deleted endpoint got a request"
    );

    let doomed = rows_of(dir.path(), &text, "doomed");
    let deleted: Vec<&AttemptRow> = doomed
        .iter()
        .filter(|row| row.error_kind.as_deref() == Some("endpoint_deleted"))
        .collect();
    assert_eq!(deleted.len(), 2, "{doomed:#?}");
    assert!(
        deleted.iter().all(|row| row.outcome == "dead_lettered"),
        "{deleted:#?}"
    );
    assert_eq!(report.parked, 0, "nothing stays parked");
    let store = StateStore::open(dir.path()).expect("state store");
    assert_eq!(
        store.pending().expect("pending").len(),
        0,
        "nothing stays pending"
    );
}

#[test]
fn restart_keeps_registry_endpoints() {
    let receiver = Receiver::start(HashMap::new()).expect("receiver");
    let endpoints = [("base", "t1", receiver.url("/base"), r#"["*"]"#)];
    let text = config_text(&endpoints, "");
    let dir = tempfile::tempdir().expect("temporary directory");

    let running = Running::start(dir.path(), &text, 2);
    let mut created = configured(&text, "base");
    created.id = "made".to_string();
    created.url = receiver.url("/made");
    running.apply(EndpointChange::Upsert(created));
    let mut changed = configured(&text, "base");
    changed.url = receiver.url("/base-changed");
    running.apply(EndpointChange::Upsert(changed));
    running.stop();

    // The configuration still names /base, but the store is the truth.
    publish_lines(dir.path(), &[event_line("t1", "evt_1", "a.b", "{}")], false).expect("publish");
    hookflow_tests::run_until_idle(dir.path(), &text, 2).expect("second run");
    assert_eq!(ids_at(&receiver, "/made").len(), 1);
    assert_eq!(ids_at(&receiver, "/base-changed").len(), 1);
    assert!(receiver.requests_to("/base").is_empty());
}

#[test]
fn gone_endpoint_enabled_while_running() {
    let behaviours = HashMap::from([("/gone".to_string(), Behaviour::Status(410))]);
    let receiver = Receiver::start(behaviours).expect("receiver");
    let endpoints = [("ep_gone", "t1", receiver.url("/gone"), r#"["*"]"#)];
    let text = config_text(&endpoints, "[retry]\nschedule_ms = [100]\n");
    let text = text.replace("timeout_ms = 5000", "timeout_ms = 5000\nmax_in_flight = 1");
    let dir = tempfile::tempdir().expect("temporary directory");
    let running = Running::start(dir.path(), &text, 2);

    let lines: Vec<String> = (0..4)
        .map(|n| event_line("t1", &format!("evt_{n}"), "a.b", "{}"))
        .collect();
    publish_lines(dir.path(), &lines, false).expect("publish");
    wait_for("the 410 disabling the endpoint", || {
        !running
            .registry
            .disabled_at_run_time()
            .expect("read disabled")
            .is_empty()
    });
    let store = StateStore::open(dir.path()).expect("state store");
    wait_for("three parked deliveries", || {
        store.parked_of("ep_gone").expect("read parked").len() == 3
    });

    // Applying the endpoint with `enabled = true` and a new URL ends the disabling and resumes
    // the parked deliveries without a restart.
    let mut back = configured(&text, "ep_gone");
    back.url = receiver.url("/back");
    running.apply(EndpointChange::Upsert(back));
    wait_for("the parked deliveries at /back", || {
        receiver.requests_to("/back").len() == 3
    });
    let disabled = running
        .registry
        .disabled_at_run_time()
        .expect("read disabled");
    running.stop();

    assert!(disabled.is_empty(), "{disabled:?}");
    let gone = ids_at(&receiver, "/gone");
    assert_eq!(gone.len(), 1, "one 410, then nothing: {gone:?}");
    let mut resumed = ids_at(&receiver, "/back");
    resumed.extend(gone);
    resumed.sort();
    assert_eq!(
        resumed,
        ["evt_0", "evt_1", "evt_2", "evt_3"],
        "every event once"
    );
}

#[test]
fn rate_limit_change_applies_next_slot() {
    let receiver = Receiver::start(HashMap::new()).expect("receiver");
    let endpoints = [("ep", "t1", receiver.url("/ep"), r#"["*"]"#)];
    let text = config_text(&endpoints, "");
    let dir = tempfile::tempdir().expect("temporary directory");
    let running = Running::start(dir.path(), &text, 2);

    publish_lines(
        dir.path(),
        &[event_line("t1", "evt_free", "a.b", "{}")],
        false,
    )
    .expect("publish");
    wait_for("the unlimited delivery", || {
        receiver.requests_to("/ep").len() == 1
    });

    // One request a minute from now on: of three new events, one goes out at once and the
    // others wait for later windows.
    let mut limited = configured(&text, "ep");
    limited.rate_limit = Some(hookflow_schemas::RateLimit {
        max_requests: 1,
        window_ms: 60_000,
    });
    let window = |at: std::time::SystemTime| {
        at.duration_since(std::time::UNIX_EPOCH)
            .expect("clock after 1970")
            .as_millis()
            / 60_000
    };
    let first_window = window(std::time::SystemTime::now());
    running.apply(EndpointChange::Upsert(limited));
    let lines: Vec<String> = (0..3)
        .map(|n| event_line("t1", &format!("evt_limited_{n}"), "a.b", "{}"))
        .collect();
    publish_lines(dir.path(), &lines, false).expect("publish");
    let store = StateStore::open(dir.path()).expect("state store");
    let limited_sent = || {
        ids_at(&receiver, "/ep")
            .iter()
            .filter(|id| id.starts_with("evt_limited"))
            .count()
    };
    wait_for(
        "every limited delivery sent or waiting for a later window",
        || {
            let waiting = store.pending().expect("read pending").len();
            waiting >= 1 && waiting + limited_sent() == 3
        },
    );
    std::thread::sleep(Duration::from_millis(300));
    running.stop();
    let last_window = window(std::time::SystemTime::now());

    // One request per aligned 60 s window: a test crossing a minute boundary may see two.
    let windows = usize::try_from(last_window - first_window + 1).expect("small");
    let sent = limited_sent();
    assert!(sent >= 1, "the first limited delivery goes out at once");
    assert!(sent <= windows, "{sent} requests in {windows} windows");
}
