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
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;

/// Default of `TESTFLINGER_METRICS_MAX_LABEL_VALUES`.
pub const DEFAULT_MAX_LABEL_VALUES: usize = 1000;
/// The label value counting what comes past a counter's bound.
pub const OTHER: &str = "other";

/// Counters of one API replica.
#[derive(Debug, Default)]
pub struct Metrics {
    counters: Mutex<Counters>,
}

#[derive(Debug, Default)]
struct Counters {
    values: BTreeMap<(&'static str, String), u64>,
    /// Label values each counter holds, [`OTHER`] left out.
    labels: BTreeMap<&'static str, usize>,
}

const HELP: &[(&str, &str)] = &[
    ("testflinger_jobs_total", "Jobs accepted, by queue."),
    (
        "testflinger_reservations_total",
        "Accepted jobs with reserve_data, by queue.",
    ),
    ("testflinger_claims_total", "Claim answers, by outcome."),
    (
        "testflinger_reaped_total",
        "Jobs whose lease expired, by what the reaper did.",
    ),
    (
        "testflinger_broker_submissions_total",
        "Messages from the submit queue, by result.",
    ),
    (
        "testflinger_log_compactions_total",
        "Ended jobs' logs moved from Redis to the file store, by result (done, failed).",
    ),
];

impl Metrics {
    /// Adds one to counter `name` with the single label value `label`, a counter of at
    /// most [`DEFAULT_MAX_LABEL_VALUES`] values (for labels the code chooses).
    pub fn inc(&self, name: &'static str, label: &str) {
        self.inc_bounded(name, label, DEFAULT_MAX_LABEL_VALUES);
    }

    /// Adds one to counter `name` with label value `label`, or with [`OTHER`] when the
    /// counter already holds `max` other values (for labels a client chooses).
    pub fn inc_bounded(&self, name: &'static str, label: &str, max: usize) {
        let Ok(mut c) = self.counters.lock() else {
            return;
        };
        let key = (name, label.to_string());
        if let Some(v) = c.values.get_mut(&key) {
            *v += 1;
            return;
        }
        let held = c.labels.entry(name).or_insert(0);
        let key = if label == OTHER {
            key
        } else if *held < max {
            *held += 1;
            key
        } else {
            (name, OTHER.to_string())
        };
        *c.values.entry(key).or_insert(0) += 1;
    }

    fn label_key(name: &str) -> &'static str {
        match name {
            "testflinger_jobs_total" | "testflinger_reservations_total" => "queue",
            "testflinger_claims_total" => "outcome",
            "testflinger_reaped_total" => "action",
            _ => "result",
        }
    }

    fn render_counters(&self, out: &mut String) {
        let Ok(c) = self.counters.lock() else { return };
        for (name, help) in HELP {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for ((n, label), v) in c.values.iter().filter(|((n, _), _)| n == name) {
                let _ = writeln!(
                    out,
                    "{n}{{{}=\"{}\"}} {v}",
                    Self::label_key(n),
                    escape(label)
                );
            }
        }
    }

    fn queues_seen(&self) -> Vec<String> {
        self.counters
            .lock()
            .map(|c| {
                c.values
                    .keys()
                    .filter(|(n, q)| *n == "testflinger_jobs_total" && q != OTHER)
                    .map(|(_, q)| q.clone())
                    .collect()
            })
            .unwrap_or_default()
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

pub async fn metrics(app: web::Data<AppState>) -> ApiResult<HttpResponse> {
    let mut out = String::new();
    app.metrics.render_counters(&mut out);
    // Waiting jobs of every queue this replica saw or an agent advertises.
    let advertised: Vec<String> = app.store.advertised_queues().await?.into_keys().collect();
    let mut queues: Vec<String> = app.metrics.queues_seen();
    queues.extend(advertised);
    queues.sort();
    queues.dedup();
    let _ = writeln!(
        out,
        "# HELP testflinger_queue_waiting_jobs Jobs waiting in a queue.\n# TYPE testflinger_queue_waiting_jobs gauge"
    );
    if !queues.is_empty() {
        let counts = app.store.waiting_counts(&queues).await?;
        for (q, n) in queues.iter().zip(counts) {
            let _ = writeln!(
                out,
                "testflinger_queue_waiting_jobs{{queue=\"{}\"}} {n}",
                escape(q)
            );
        }
    }
    let mut by_state: BTreeMap<String, u64> = BTreeMap::new();
    for a in crate::routes::agents::all_agents(&app).await? {
        let s = a
            .get("state")
            .and_then(|s| s.as_str())
            .unwrap_or("unknown")
            .to_string();
        *by_state.entry(s).or_insert(0) += 1;
    }
    let _ = writeln!(
        out,
        "# HELP testflinger_agents Known agents, by state.\n# TYPE testflinger_agents gauge"
    );
    for (s, n) in by_state {
        let _ = writeln!(out, "testflinger_agents{{state=\"{}\"}} {n}", escape(&s));
    }
    let ev = app.events.stats();
    let _ = writeln!(
        out,
        "# HELP testflinger_events_dropped_total Job events not published because the events backlog was full.\n# TYPE testflinger_events_dropped_total counter\ntestflinger_events_dropped_total {}",
        ev.events_dropped()
    );
    let _ = writeln!(
        out,
        "# HELP testflinger_webhook_dropped_total Webhook calls not made because the webhook backlog was full.\n# TYPE testflinger_webhook_dropped_total counter\ntestflinger_webhook_dropped_total {}",
        ev.webhook_dropped()
    );
    let _ = writeln!(
        out,
        "# HELP testflinger_webhook_backlog Webhook calls waiting or being made.\n# TYPE testflinger_webhook_backlog gauge\ntestflinger_webhook_backlog {}",
        ev.webhook_waiting()
    );
    let leases = app.store.lease_count().await?;
    let _ = writeln!(
        out,
        "# HELP testflinger_running_leases Jobs held under a lease.\n# TYPE testflinger_running_leases gauge\ntestflinger_running_leases {leases}"
    );
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
        let mut out = String::new();
        m.render_counters(&mut out);
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
