//! Starting the receiver process and talking to its control paths from the benchmark's other
//! processes.

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};

use crate::receiver::{Arrival, ReceiverStats};

/// How long a control request may take; `/__arrivals` of a million arrivals takes well under
/// a second on loopback.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(60);

/// A client of the receiver's control paths, usable from synchronous code.
pub struct ReceiverControl {
    base_url: String,
    runtime: tokio::runtime::Runtime,
    client: reqwest::Client,
}

impl ReceiverControl {
    /// Creates a client of the receiver at `base_url` (`http://127.0.0.1:PORT`).
    ///
    /// # Errors
    ///
    /// Fails if the runtime or the HTTP client cannot be built.
    pub fn new(base_url: &str) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the control client's runtime")?;
        let client = reqwest::Client::builder()
            .timeout(CONTROL_TIMEOUT)
            .no_proxy()
            .build()
            .context("cannot build the control client")?;
        Ok(ReceiverControl {
            base_url: base_url.to_string(),
            runtime,
            client,
        })
    }

    /// Returns the receiver's base URL, `http://127.0.0.1:PORT`.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// Returns the receiver's counts since the last reset.
    ///
    /// # Errors
    ///
    /// Fails if the request fails or the response is not the expected JSON.
    pub fn stats(&self) -> anyhow::Result<ReceiverStats> {
        let url = format!("{}/__stats", self.base_url);
        self.runtime
            .block_on(async {
                let response = self.client.get(&url).send().await?.error_for_status()?;
                let body = response.bytes().await?;
                anyhow::Ok(serde_json::from_slice(&body)?)
            })
            .with_context(|| format!("GET {url} failed"))
    }

    /// Returns every arrival since the last reset, in arrival order.
    ///
    /// # Errors
    ///
    /// Fails if the request fails or a line does not parse.
    pub fn arrivals(&self) -> anyhow::Result<Vec<Arrival>> {
        let url = format!("{}/__arrivals", self.base_url);
        let text = self
            .runtime
            .block_on(async {
                let response = self.client.get(&url).send().await?.error_for_status()?;
                response.text().await
            })
            .with_context(|| format!("GET {url} failed"))?;
        text.lines()
            .map(|line| {
                Arrival::parse_line(line)
                    .with_context(|| format!("invalid arrival line {line:?} from {url}"))
            })
            .collect()
    }

    /// Makes the receiver forget every arrival.
    ///
    /// # Errors
    ///
    /// Fails if the request fails.
    pub fn reset(&self) -> anyhow::Result<()> {
        let url = format!("{}/__reset", self.base_url);
        self.runtime
            .block_on(async { self.client.post(&url).send().await?.error_for_status() })
            .with_context(|| format!("POST {url} failed"))?;
        Ok(())
    }
}

/// The receiver running as a child process; dropping it ends the process.
pub struct ReceiverProcess {
    child: Child,
    /// The write end of the child's standard input; the child exits when it closes.
    stdin: Option<ChildStdin>,
    control: ReceiverControl,
}

impl ReceiverProcess {
    /// Starts `hookflow-bench receiver` with `threads` tokio threads and waits for its port.
    ///
    /// # Errors
    ///
    /// Fails if this executable cannot be found or started, or if the child does not print
    /// its address.
    pub fn start(threads: usize) -> anyhow::Result<Self> {
        let executable = std::env::current_exe().context("cannot locate hookflow-bench")?;
        let mut child = Command::new(&executable)
            .arg("receiver")
            .arg("--threads")
            .arg(threads.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("cannot start {} receiver", executable.display()))?;
        let stdin = child.stdin.take();

        let first_line = match child.stdout.take() {
            Some(stdout) => {
                let mut line = String::new();
                BufReader::new(stdout)
                    .read_line(&mut line)
                    .context("cannot read the receiver's address")?;
                line
            }
            None => String::new(),
        };
        let Some(address) = first_line.trim().strip_prefix("listening on ") else {
            let _ = child.kill();
            let _ = child.wait();
            bail!("the receiver printed {first_line:?} instead of `listening on ADDRESS`");
        };
        if !address.starts_with("127.0.0.1:") {
            let _ = child.kill();
            let _ = child.wait();
            bail!("the receiver listens on {address}, not on 127.0.0.1");
        }
        let control = ReceiverControl::new(&format!("http://{address}"))?;
        Ok(ReceiverProcess {
            child,
            stdin,
            control,
        })
    }

    /// Returns the client of the receiver's control paths.
    pub fn control(&self) -> &ReceiverControl {
        &self.control
    }

    /// Returns the receiver's process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for ReceiverProcess {
    fn drop(&mut self) {
        // The receiver exits when its stdin closes. It keeps no state worth a graceful end,
        // so it is killed if it has not exited within a second.
        drop(self.stdin.take());
        for _ in 0..20 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if let Err(error) = self.child.kill() {
            tracing::warn!(%error, pid = self.child.id(), "Cannot kill the receiver process.");
        }
        let _ = self.child.wait();
    }
}
