//! Prometheus metrics at `GET /metrics` (text format 0.0.4): counters kept in memory by
//! this replica, and gauges read from Redis at scrape time (shared by all replicas).

use crate::error::ApiResult;
use crate::state::AppState;
use actix_web::{HttpResponse, web};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;

/// Counters of one API replica.
#[derive(Debug, Default)]
pub struct Metrics {
    counters: Mutex<BTreeMap<(&'static str, String), u64>>,
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
    /// Adds one to counter `name` with the single label value `label`.
    pub fn inc(&self, name: &'static str, label: &str) {
        if let Ok(mut c) = self.counters.lock() {
            *c.entry((name, label.to_string())).or_insert(0) += 1;
        }
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
            for ((n, label), v) in c.iter().filter(|((n, _), _)| n == name) {
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
                c.keys()
                    .filter(|(n, _)| *n == "testflinger_jobs_total")
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
    let leases = app.store.lease_count().await?;
    let _ = writeln!(
        out,
        "# HELP testflinger_running_leases Jobs held under a lease.\n# TYPE testflinger_running_leases gauge\ntestflinger_running_leases {leases}"
    );
    Ok(HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(out))
}
