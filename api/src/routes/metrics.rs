//! `GET /metrics`: this replica's counters ([`crate::metrics::Metrics`]) and gauges read
//! from Redis at scrape time, through the `prometheus` crate's registry and encoder.

use crate::error::ApiResult;
use crate::state::AppState;
use actix_web::{HttpResponse, web};
use prometheus::{Encoder, IntCounter, IntGauge, IntGaugeVec, Opts, Registry};
use std::collections::BTreeMap;

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
    for a in crate::agents::all_agents(&app.store).await? {
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
