//! Prometheus metrics at `GET /metrics` (text format 0.0.4): counters kept in memory by
//! this replica, and gauges read from Redis at scrape time (shared by all replicas).
//!
//! A counter's label values come from clients (a queue name is whatever a job names), so
//! each counter keeps at most `TESTFLINGER_METRICS_MAX_LABEL_VALUES` of them (first come,
//! first kept); later values are counted under [`OTHER`]. The map never holds more than
//! that many series per counter, plus `other`, whatever clients send.

use prometheus::{Encoder, IntCounterVec, Opts, Registry};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

pub use crate::settings::DEFAULT_MAX_LABEL_VALUES;
/// The label value counting what comes past a counter's bound.
pub const OTHER: &str = "other";

/// The counters of one API replica: name, help, label.
const COUNTERS: &[(&str, &str, &str)] = &[
    (
        "testflinger_jobs_total",
        "Jobs accepted, by queue.",
        "queue",
    ),
    (
        "testflinger_reservations_total",
        "Accepted jobs with reserve_data, by queue.",
        "queue",
    ),
    (
        "testflinger_claims_total",
        "Claim answers, by outcome.",
        "outcome",
    ),
    (
        "testflinger_reaped_total",
        "Jobs whose lease expired, by what the reaper did.",
        "action",
    ),
    (
        "testflinger_broker_submissions_total",
        "Messages from the submit queue, by result.",
        "result",
    ),
    (
        "testflinger_log_compactions_total",
        "Ended jobs' logs moved from Redis to the file store, by result (done, failed).",
        "result",
    ),
];

/// Counters of one API replica, kept by the `prometheus` crate (its registry and text
/// encoder: the exposition format is theirs, not ours).
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    counters: BTreeMap<&'static str, IntCounterVec>,
    /// Label values each counter holds, [`OTHER`] left out (the bound).
    labels: Mutex<BTreeMap<&'static str, BTreeSet<String>>>,
}

impl Default for Metrics {
    fn default() -> Metrics {
        let registry = Registry::new();
        let mut counters = BTreeMap::new();
        for (name, help, label) in COUNTERS {
            // A name, help and label of ours: always valid.
            if let Ok(c) = IntCounterVec::new(Opts::new(*name, *help), &[label])
                && registry.register(Box::new(c.clone())).is_ok()
            {
                counters.insert(*name, c);
            }
        }
        Metrics {
            registry,
            counters,
            labels: Mutex::default(),
        }
    }
}

impl Metrics {
    /// Adds one to counter `name` with the single label value `label`, a counter of at
    /// most [`DEFAULT_MAX_LABEL_VALUES`] values (for labels the code chooses).
    pub fn inc(&self, name: &'static str, label: &str) {
        self.inc_bounded(name, label, DEFAULT_MAX_LABEL_VALUES);
    }

    /// Adds one to counter `name` with label value `label`, or with [`OTHER`] when the
    /// counter already holds `max` other values (for labels a client chooses).
    pub fn inc_bounded(&self, name: &'static str, label: &str, max: usize) {
        let Some(counter) = self.counters.get(name) else {
            tracing::debug!(name, "no such counter");
            return;
        };
        let Ok(mut labels) = self.labels.lock() else {
            return;
        };
        let held = labels.entry(name).or_default();
        let label = if label == OTHER || held.contains(label) {
            label
        } else if held.len() < max {
            held.insert(label.to_string());
            label
        } else {
            OTHER
        };
        counter.with_label_values(&[label]).inc();
    }

    /// The queues this replica counted jobs for ([`OTHER`] left out).
    pub fn queues_seen(&self) -> Vec<String> {
        self.labels
            .lock()
            .map(|l| {
                l.get("testflinger_jobs_total")
                    .map(|s| s.iter().cloned().collect())
                    .unwrap_or_default()
            })
            .unwrap_or_default()
    }

    /// The counters in the Prometheus text format.
    pub fn render_counters(&self, out: &mut Vec<u8>) {
        let _ = prometheus::TextEncoder::new().encode(&self.registry.gather(), out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_bounded_then_counted_as_other() {
        let m = Metrics::default();
        for i in 0..50 {
            m.inc_bounded("testflinger_jobs_total", &format!("q{i}"), 10);
        }
        m.inc_bounded("testflinger_jobs_total", "q3", 10);
        m.inc("testflinger_claims_total", "granted");
        let mut out = Vec::new();
        m.render_counters(&mut out);
        let out = String::from_utf8(out).unwrap_or_default();
        let series: Vec<&str> = out
            .lines()
            .filter(|l| l.starts_with("testflinger_jobs_total{"))
            .collect();
        assert_eq!(series.len(), 11, "{out}");
        assert!(
            out.contains("testflinger_jobs_total{queue=\"other\"} 40"),
            "{out}"
        );
        assert!(
            out.contains("testflinger_jobs_total{queue=\"q3\"} 2"),
            "{out}"
        );
        assert!(
            out.contains("testflinger_claims_total{outcome=\"granted\"} 1"),
            "{out}"
        );
        assert_eq!(m.queues_seen().len(), 10);
    }
}
