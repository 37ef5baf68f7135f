//! The raw ceiling: a plain reqwest client posting the benchmark's payloads straight to the
//! receiver at a fixed concurrency, with no pipeline, no signature and no archive.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::measure::process_cpu;
use crate::workload::payload;

/// Threads of the client's tokio runtime: the pipeline's HTTP runtime has two as well.
pub const CLIENT_THREADS: usize = 2;

/// The raw client's measurements.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RawCeiling {
    /// Requests sent.
    pub requests: usize,
    /// Requests with a response status other than 200, or without a response.
    pub failures: usize,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// Wall time from the first request to the last response, in seconds.
    pub seconds: f64,
    /// Requests with a 200 response per second.
    pub per_second: f64,
    /// CPU time of the client process per 1,000 requests, in seconds.
    pub cpu_seconds_per_1000: f64,
}

/// Posts `requests` payloads of [`PAYLOAD_BYTES`](crate::workload::PAYLOAD_BYTES) to `url`,
/// `concurrency` at a time, and measures the rate.
///
/// # Errors
///
/// Fails if the runtime or the client cannot be built; failed requests are counted instead.
pub fn measure(url: &str, requests: usize, concurrency: usize) -> anyhow::Result<RawCeiling> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(CLIENT_THREADS)
        .thread_name("raw-client")
        .enable_all()
        .build()
        .context("cannot start the raw client's runtime")?;
    let client = reqwest::Client::builder()
        .no_proxy()
        .build()
        .context("cannot build the raw client")?;
    let bodies: Arc<Vec<Vec<u8>>> = Arc::new(
        (0..requests as u64)
            .map(|n| payload(n).into_bytes())
            .collect(),
    );
    let next = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(AtomicUsize::new(0));

    let cpu_before = process_cpu()?;
    let started = Instant::now();
    runtime.block_on(async {
        let mut tasks = Vec::with_capacity(concurrency);
        for _ in 0..concurrency.max(1) {
            let (client, bodies, next, failures) = (
                client.clone(),
                bodies.clone(),
                next.clone(),
                failures.clone(),
            );
            let url = url.to_string();
            tasks.push(tokio::spawn(async move {
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    let Some(body) = bodies.get(n) else { break };
                    let sent = client
                        .post(&url)
                        .header("content-type", "application/json")
                        .header("webhook-id", format!("raw_{n}"))
                        .body(body.clone())
                        .send()
                        .await;
                    let delivered = match sent {
                        Ok(response) => {
                            let status = response.status();
                            // Reading the (empty) body returns the connection to the pool.
                            response.bytes().await.is_ok() && status.as_u16() == 200
                        }
                        Err(_) => false,
                    };
                    if !delivered {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
        for task in tasks {
            if let Err(error) = task.await {
                tracing::error!(%error, "A raw client task failed.");
            }
        }
    });
    let seconds = started.elapsed().as_secs_f64();
    let cpu = process_cpu()?.saturating_sub(cpu_before);

    let failures = failures.load(Ordering::Relaxed);
    let delivered = requests.saturating_sub(failures);
    Ok(RawCeiling {
        requests,
        failures,
        concurrency,
        seconds,
        per_second: delivered as f64 / seconds.max(1e-9),
        cpu_seconds_per_1000: cpu.as_secs_f64() * 1000.0 / requests.max(1) as f64,
    })
}
