//! A reader of Prometheus text expositions for tests, on the `prometheus-parse` parser. The
//! metrics unit tests and the monitoring tests of both test crates share it.

// Each includer uses a part of this file.
#![allow(dead_code)]

use prometheus_parse::{Sample, Scrape, Value};

/// Parses the text of a scrape, failing the test when it is not a valid exposition.
pub fn parse(text: &str) -> Scrape {
    Scrape::parse(text.lines().map(|line| Ok(line.to_string())))
        .expect("a valid Prometheus text exposition")
}

/// Returns the value of the first sample of `name` whose labels include `labels`. A histogram
/// gives its observation count.
pub fn value(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape
        .samples
        .iter()
        .find(|sample| matches(sample, name, labels))
        .and_then(sample_value)
}

/// Sums the samples of `name` whose labels include `labels`. A histogram counts its
/// observations.
pub fn sum(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|sample| matches(sample, name, labels))
        .filter_map(sample_value)
        .sum()
}

fn matches(sample: &Sample, name: &str, labels: &[(&str, &str)]) -> bool {
    sample.metric == name
        && labels
            .iter()
            .all(|(key, value)| sample.labels.get(key) == Some(*value))
}

fn sample_value(sample: &Sample) -> Option<f64> {
    match &sample.value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => Some(*v),
        Value::Histogram(buckets) => buckets.last().map(|bucket| bucket.count),
        Value::Summary(_) => None,
    }
}
