//! Prometheus metrics at `GET /metrics` (text format 0.0.4): counters kept in memory by
//! this replica, and gauges read from Redis at scrape time (shared by all replicas).
//!
//! A counter's label values come from clients (a queue name is whatever a job names), so
//! each counter keeps at most `TESTFLINGER_METRICS_MAX_LABEL_VALUES` of them (first come,
//! first kept); later values are counted under [`OTHER`]. The map never holds more than
//! that many series per counter, plus `other`, whatever clients send.

use crate::error::ApiResult;
use crate::state::AppState;
use actix_web::{HttpResponse, web};
use prometheus::{Encoder, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

/// Default of `TESTFLINGER_METRICS_MAX_LABEL_VALUES`.
pub const DEFAULT_MAX_LABEL_VALUES: usize = 1000;
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
    fn queues_seen(&self) -> Vec<String> {
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
    fn render_counters(&self, out: &mut Vec<u8>) {
        let _ = prometheus::TextEncoder::new().encode(&self.registry.gather(), out);
    }
}

/// Registers a metric of a scrape's own registry (a name and help of ours: always valid).
fn scrape_metric<M: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    metric: prometheus::Result<M>,
) -> Option<M> {
    let m = metric.ok()?;
    registry.register(Box::new(m.clone())).ok()?;
    Some(m)
}

/// `GET /metrics`: this replica's counters, then gauges read from Redis now (shared by
/// all replicas), in the Prometheus text format 0.0.4.
pub async fn metrics(app: web::Data<AppState>) -> ApiResult<HttpResponse> {
    let scrape = Registry::new();
    // Waiting jobs of every queue this replica saw or an agent advertises.
    let advertised: Vec<String> = app.store.advertised_queues().await?.into_keys().collect();
    let mut queues: Vec<String> = app.metrics.queues_seen();
    queues.extend(advertised);
    queues.sort();
    queues.dedup();
    if let Some(g) = scrape_metric(
        &scrape,
        IntGaugeVec::new(
            Opts::new("testflinger_queue_waiting_jobs", "Jobs waiting in a queue."),
            &["queue"],
        ),
    ) && !queues.is_empty()
    {
        let counts = app.store.waiting_counts(&queues).await?;
        for (q, n) in queues.iter().zip(counts) {
            g.with_label_values(&[q.as_str()]).set(n as i64);
        }
    }
    let mut by_state: BTreeMap<String, i64> = BTreeMap::new();
    for a in crate::routes::agents::all_agents(&app).await? {
        let s = a
            .get("state")
            .and_then(|s| s.as_str())
            .unwrap_or("unknown")
            .to_string();
        *by_state.entry(s).or_insert(0) += 1;
    }
    if let Some(g) = scrape_metric(
        &scrape,
        IntGaugeVec::new(
            Opts::new("testflinger_agents", "Known agents, by state."),
            &["state"],
        ),
    ) {
        for (s, n) in by_state {
            g.with_label_values(&[s.as_str()]).set(n);
        }
    }
    let ev = app.events.stats();
    for (name, help, value) in [
        (
            "testflinger_events_dropped_total",
            "Job events not published because the events backlog was full.",
            ev.events_dropped(),
        ),
        (
            "testflinger_webhook_dropped_total",
            "Webhook calls not made because the webhook backlog was full.",
            ev.webhook_dropped(),
        ),
    ] {
        if let Some(c) = scrape_metric(&scrape, IntCounter::new(name, help)) {
            c.inc_by(value);
        }
    }
    let leases = app.store.lease_count().await?;
    for (name, help, value) in [
        (
            "testflinger_webhook_backlog",
            "Webhook calls waiting or being made.",
            ev.webhook_waiting() as i64,
        ),
        (
            "testflinger_running_leases",
            "Jobs held under a lease.",
            leases as i64,
        ),
    ] {
        if let Some(g) = scrape_metric(&scrape, IntGauge::new(name, help)) {
            g.set(value);
        }
    }
    let mut out = Vec::new();
    app.metrics.render_counters(&mut out);
    let _ = prometheus::TextEncoder::new().encode(&scrape.gather(), &mut out);
    Ok(HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(out))
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
