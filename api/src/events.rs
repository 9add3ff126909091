//! Job events: every state change is published to topic exchange `testflinger.events`
//! with routing key `job.<queue>.<state>`, and delivered to the job's
//! `job_status_webhook` when its host is allowed. Neither blocks the request that
//! caused the change.

use crate::state::AppState;
use std::time::Duration;
use testflinger_broker::OutgoingMessage;
use testflinger_broker::topology::{EVENTS_EXCHANGE, event_routing_key};
use testflinger_common::protocol::JobEvent;

/// Publishes a state change in the background.
#[allow(clippy::too_many_arguments)]
pub fn emit(
    app: &AppState,
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
    let ev = JobEvent {
        job_id: job_id.to_string(),
        job_queue: queue.to_string(),
        job_state: state.to_string(),
        previous_state: previous.filter(|p| !p.is_empty()).map(str::to_string),
        attempt,
        agent_id: agent.filter(|a| !a.is_empty()).map(str::to_string),
        timestamp: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        reason: reason.filter(|r| !r.is_empty()).map(str::to_string),
    };
    let app = app.clone();
    tokio::spawn(async move {
        let body = serde_json::to_vec(&ev).unwrap_or_default();
        if app.settings.events {
            let key = event_routing_key(&ev.job_queue, &ev.job_state);
            let r = app
                .broker
                .publish(OutgoingMessage {
                    exchange: EVENTS_EXCHANGE,
                    routing_key: &key,
                    body: &body,
                    message_id: None,
                    content_type: Some("application/json"),
                    persistent: true,
                    ..OutgoingMessage::default()
                })
                .await;
            if let Err(e) = r {
                tracing::warn!(job.id = %ev.job_id, error = %e, "job event not published");
            }
        }
        if let Some(url) = webhook {
            deliver_webhook(&app, &url, &body, &ev.job_id).await;
        }
    });
}

/// Whether `url`'s host is in the server's allow-list.
pub fn webhook_allowed(app: &AppState, url: &str) -> bool {
    let Ok(u) = reqwest::Url::parse(url) else {
        return false;
    };
    let Some(host) = u.host_str() else {
        return false;
    };
    let host = host.to_ascii_lowercase();
    app.settings.webhook_hosts().iter().any(|h| {
        h == &host
            || h.split_once(':').is_some_and(|(hh, port)| {
                hh == host
                    && u.port_or_known_default().map(|p| p.to_string()).as_deref() == Some(port)
            })
    })
}

/// PUTs the event to the webhook: 5 s timeout, up to 3 tries with growing pauses.
async fn deliver_webhook(app: &AppState, url: &str, body: &[u8], job_id: &str) {
    if !webhook_allowed(app, url) {
        tracing::warn!(job.id = %job_id, "webhook host not in TESTFLINGER_WEBHOOK_ALLOWED_HOSTS; event not sent");
        return;
    }
    for attempt in 0..3u32 {
        let r = app
            .http
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
