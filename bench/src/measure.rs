//! Measurements of this process and of latency samples: CPU time and peak resident memory
//! from `getrusage(2)`, current resident memory from `/proc/self/status`, and percentiles.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use nix::sys::resource::{getrusage, UsageWho};
use nix::sys::time::TimeValLike;
use serde::{Deserialize, Serialize};

/// Returns the CPU time (user plus system) that every thread of this process has used.
///
/// # Errors
///
/// Fails if `getrusage` fails, which Linux does only for an invalid argument.
pub fn process_cpu() -> anyhow::Result<Duration> {
    cpu_of(UsageWho::RUSAGE_SELF)
}

/// Returns the CPU time (user plus system) that the calling thread has used.
///
/// # Errors
///
/// As [`process_cpu`].
pub fn thread_cpu() -> anyhow::Result<Duration> {
    cpu_of(UsageWho::RUSAGE_THREAD)
}

fn cpu_of(who: UsageWho) -> anyhow::Result<Duration> {
    let usage = getrusage(who).context("getrusage failed")?;
    let micros = usage.user_time().num_microseconds() + usage.system_time().num_microseconds();
    Ok(Duration::from_micros(u64::try_from(micros).unwrap_or(0)))
}

/// Returns the largest resident set size this process has had, in bytes (`ru_maxrss`, which
/// Linux reports in KiB and which equals `VmHWM` in `/proc/self/status`).
///
/// # Errors
///
/// As [`process_cpu`].
pub fn peak_rss_bytes() -> anyhow::Result<u64> {
    let usage = getrusage(UsageWho::RUSAGE_SELF).context("getrusage failed")?;
    Ok(u64::try_from(usage.max_rss()).unwrap_or(0) * 1024)
}

/// Returns this process's resident set size now (`VmRSS` in `/proc/self/status`), in bytes.
///
/// # Errors
///
/// Fails if the file cannot be read or has no `VmRSS` line, as on a system without procfs.
pub fn current_rss_bytes() -> anyhow::Result<u64> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("cannot read /proc/self/status")?;
    parse_status_kib(&status, "VmRSS")
        .map(|kib| kib * 1024)
        .context("/proc/self/status has no VmRSS line")
}

/// Returns the value of a `Name:   123 kB` line of `/proc/<pid>/status`, in KiB.
fn parse_status_kib(status: &str, name: &str) -> Option<u64> {
    status.lines().find_map(|line| {
        let value = line.strip_prefix(name)?.strip_prefix(':')?;
        value.split_whitespace().next()?.parse().ok()
    })
}

/// Returns the wall-clock time in microseconds since the Unix epoch. The receiver stamps
/// arrivals with the same clock, so the two can be subtracted across processes.
pub fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Latency percentiles of a set of samples, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    /// Samples the percentiles are taken from.
    pub samples: usize,
    /// Median.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Largest sample.
    pub max_ms: f64,
}

/// Computes nearest-rank percentiles of samples given in microseconds; `None` without
/// samples. Sorts `samples_us` in place.
pub fn percentiles(samples_us: &mut [u64]) -> Option<Percentiles> {
    if samples_us.is_empty() {
        return None;
    }
    samples_us.sort_unstable();
    let count = samples_us.len();
    // The rank is computed in integers: 99.9 % of 1000 as a float rounds up to rank 1000.
    let at = |per_mille: usize| -> f64 {
        let rank = (per_mille * count).div_ceil(1000);
        samples_us[rank.clamp(1, count) - 1] as f64 / 1000.0
    };
    Some(Percentiles {
        samples: count,
        p50_ms: at(500),
        p99_ms: at(990),
        p999_ms: at(999),
        max_ms: at(1000),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let mut samples: Vec<u64> = (1..=1000).map(|ms| ms * 1000).collect();
        samples.reverse();
        let result = percentiles(&mut samples).expect("samples given");
        assert_eq!(result.samples, 1000);
        assert_eq!(result.p50_ms, 500.0);
        assert_eq!(result.p99_ms, 990.0);
        assert_eq!(result.p999_ms, 999.0);
        assert_eq!(result.max_ms, 1000.0);
    }

    #[test]
    fn percentiles_of_one_sample() {
        let result = percentiles(&mut [2500]).expect("one sample");
        assert_eq!(result.p50_ms, 2.5);
        assert_eq!(result.p999_ms, 2.5);
    }

    #[test]
    fn percentiles_of_nothing() {
        assert_eq!(percentiles(&mut []), None);
    }

    #[test]
    fn status_lines_parse() {
        let status = "Name:\thookflow-bench\nVmHWM:\t  20480 kB\nVmRSS:\t   10240 kB\n";
        assert_eq!(parse_status_kib(status, "VmRSS"), Some(10240));
        assert_eq!(parse_status_kib(status, "VmHWM"), Some(20480));
        assert_eq!(parse_status_kib(status, "VmSwap"), None);
    }

    #[test]
    fn own_process_is_measurable() {
        assert!(current_rss_bytes().expect("procfs") > 0);
        assert!(peak_rss_bytes().expect("getrusage") >= 1024);
        let thread = thread_cpu().expect("getrusage");
        assert!(process_cpu().expect("getrusage") >= thread);
    }
}
