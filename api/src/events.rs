//! Job events: every state change is published to topic exchange `testflinger.events`
//! with routing key `job.<queue>.<state>`, and PUT to the job's `job_status_webhook` when
//! its host is allowed. Neither blocks the request that caused the change.
//!
//! Order: [`emit`] queues the event before the request answers, and one task publishes
//! the queue in order on one channel, so a subscriber sees one job's events in the order
//! the changes happened (per API replica). Webhook calls are serialised per job, so a
//! receiver gets the same order; a slow receiver delays only its own job's events.

use crate::settings::Settings;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use testflinger_broker::topology::{EVENTS_EXCHANGE, event_routing_key};
use testflinger_broker::{Broker, OutgoingMessage};
use testflinger_common::protocol::JobEvent;
use tokio::sync::mpsc;

/// Most events waiting to be published before new ones are dropped (with a warning).
const BACKLOG: usize = 100_000;
/// Publisher slot used for events, so they share one channel and keep their order.
const EVENTS_SLOT: usize = 0;

struct Queued {
    event: JobEvent,
    webhook: Option<String>,
}

/// Where state changes are reported. Cheap to clone.
#[derive(Clone, Debug)]
pub struct EventSink {
    tx: mpsc::Sender<Queued>,
}

impl EventSink {
    /// Starts the publishing task; it ends when every sink is dropped.
    pub fn start(
        broker: Broker,
        http: reqwest::Client,
        settings: Arc<Settings>,
    ) -> (EventSink, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(BACKLOG);
        let task = tokio::spawn(run(rx, broker, http, settings));
        (EventSink { tx }, task)
    }
}

/// Reports a state change. Never blocks; drops the event (logged) if the backlog is full.
#[allow(clippy::too_many_arguments)]
pub fn emit(
    app: &crate::state::AppState,
    job_id: &str,
    queue: &str,
    state: &str,
    previous: Option<&str>,
    attempt: u64,
    agent: Option<&str>,
    reason: Option<&str>,
    webhook: Option<String>,
) {
    if !app.settings.events && webhook.is_none() {
        return;
    }
    let event = JobEvent {
        job_id: job_id.to_string(),
        job_queue: queue.to_string(),
        job_state: state.to_string(),
        previous_state: previous.filter(|p| !p.is_empty()).map(str::to_string),
        attempt,
        agent_id: agent.filter(|a| !a.is_empty()).map(str::to_string),
        timestamp: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        reason: reason.filter(|r| !r.is_empty()).map(str::to_string),
    };
    if let Err(e) = app.events.tx.try_send(Queued { event, webhook }) {
        tracing::warn!(job.id = %job_id, error = %e, "job event dropped");
    }
}

async fn run(
    mut rx: mpsc::Receiver<Queued>,
    broker: Broker,
    http: reqwest::Client,
    settings: Arc<Settings>,
) {
    let allowed = settings.webhook_hosts();
    let mut hooks: HashMap<String, mpsc::UnboundedSender<(String, Vec<u8>)>> = HashMap::new();
    let mut batch: Vec<Queued> = Vec::with_capacity(256);
    while rx.recv_many(&mut batch, 256).await > 0 {
        let bodies: Vec<(String, Vec<u8>)> = batch
            .iter()
            .map(|q| {
                (
                    event_routing_key(&q.event.job_queue, &q.event.job_state),
                    serde_json::to_vec(&q.event).unwrap_or_default(),
                )
            })
            .collect();
        if settings.events {
            let msgs: Vec<OutgoingMessage<'_>> = bodies
                .iter()
                .map(|(key, body)| OutgoingMessage {
                    exchange: EVENTS_EXCHANGE,
                    routing_key: key,
                    body,
                    content_type: Some("application/json"),
                    persistent: true,
                    ..OutgoingMessage::default()
                })
                .collect();
            if let Err(e) = broker.publish_in_order(EVENTS_SLOT, &msgs).await {
                tracing::warn!(error = %e, count = msgs.len(), "job events not published");
            }
        }
        for (q, (_, body)) in batch.drain(..).zip(bodies) {
            let Some(url) = q.webhook else { continue };
            if !webhook_allowed(&allowed, &url) {
                tracing::warn!(job.id = %q.event.job_id, "webhook host not in TESTFLINGER_WEBHOOK_ALLOWED_HOSTS; event not sent");
                continue;
            }
            let terminal = matches!(q.event.job_state.as_str(), "complete" | "cancelled");
            let job = q.event.job_id.clone();
            let tx = hooks.entry(job.clone()).or_insert_with(|| {
                let (tx, rx) = mpsc::unbounded_channel();
                tokio::spawn(deliver_in_order(http.clone(), job.clone(), rx));
                tx
            });
            if tx.send((url, body)).is_err() {
                hooks.remove(&job);
            } else if terminal {
                // Dropping the sender lets the job's task finish after its last event.
                hooks.remove(&job);
            }
        }
    }
}

/// Whether `url`'s host (or `host:port`) is in the allow-list.
pub fn webhook_allowed(allowed: &[String], url: &str) -> bool {
    let Ok(u) = reqwest::Url::parse(url) else {
        return false;
    };
    let Some(host) = u.host_str().map(str::to_ascii_lowercase) else {
        return false;
    };
    let port = u
        .port_or_known_default()
        .map(|p| p.to_string())
        .unwrap_or_default();
    allowed.iter().any(|h| match h.rsplit_once(':') {
        Some((hh, p)) if p.chars().all(|c| c.is_ascii_digit()) => hh == host && p == port,
        _ => h == &host,
    })
}

async fn deliver_in_order(
    http: reqwest::Client,
    job: String,
    mut rx: mpsc::UnboundedReceiver<(String, Vec<u8>)>,
) {
    while let Some((url, body)) = rx.recv().await {
        deliver(&http, &url, &body, &job).await;
    }
}

/// PUTs one event: 5 s timeout, up to 3 tries with growing pauses; a 4xx is final.
async fn deliver(http: &reqwest::Client, url: &str, body: &[u8], job_id: &str) {
    for attempt in 0..3u32 {
        let r = http
            .put(url)
            .header("content-type", "application/json")
            .timeout(Duration::from_secs(5))
            .body(body.to_vec())
            .send()
            .await;
        match r {
            Ok(resp) if resp.status().is_success() => return,
            Ok(resp) if resp.status().is_client_error() => {
                tracing::warn!(job.id = %job_id, status = %resp.status(), "webhook refused the event");
                return;
            }
            Ok(resp) => tracing::warn!(job.id = %job_id, status = %resp.status(), "webhook failed"),
            Err(e) => tracing::warn!(job.id = %job_id, error = %e, "webhook unreachable"),
        }
        tokio::time::sleep(Duration::from_millis(500 << attempt)).await;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn allow_list() {
        let allowed = vec!["ci.example".to_string(), "127.0.0.1:8080".to_string()];
        assert!(super::webhook_allowed(&allowed, "https://ci.example/hook"));
        assert!(super::webhook_allowed(&allowed, "http://127.0.0.1:8080/x"));
        assert!(!super::webhook_allowed(&allowed, "http://127.0.0.1:9090/x"));
        assert!(!super::webhook_allowed(&allowed, "http://evil.example/x"));
        assert!(!super::webhook_allowed(&allowed, "not a url"));
    }
}
