//! Admission of jobs published to `testflinger.submit` (`TESTFLINGER_SUBMIT_QUEUE`) (see README "Publishing jobs to
//! RabbitMQ"). Every API replica consumes the queue (competing consumers); each message
//! goes through [`crate::submit::admit`], exactly like `POST /v1/job`.

use crate::error::ApiError;
use crate::state::AppState;
use serde_json::{Value, json};
use std::time::Duration;
use testflinger_broker::topology::REJECTED_QUEUE;
use testflinger_broker::{Incoming, OutgoingMessage};
use testflinger_common::JobId;

/// Consumes the submit queue until the task is dropped, reconnecting with back-off.
pub async fn run(app: AppState, shutdown: tokio_util::sync::CancellationToken) {
    let mut backoff = Duration::from_millis(200);
    loop {
        match app
            .broker
            .consume_shared(&app.settings.submit_queue, 32, "admission")
            .await
        {
            Ok(mut consumer) => {
                backoff = Duration::from_millis(200);
                loop {
                    // At shutdown the message in hand is finished (admitted and acked);
                    // unacked ones go back to the queue when the channel closes.
                    let item = tokio::select! {
                        _ = shutdown.cancelled() => None,
                        item = consumer.next() => item,
                    };
                    match item {
                        Some(Ok(msg)) => handle(&app, msg).await,
                        Some(Err(e)) => {
                            tracing::warn!(error = %e, "submit consumer error");
                            break;
                        }
                        None => break,
                    }
                }
                consumer.close().await;
                if shutdown.is_cancelled() {
                    return;
                }
            }
            Err(e) => tracing::debug!(error = %e, "submit queue not consumable yet"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

async fn handle(app: &AppState, msg: Incoming) {
    let outcome = admit_message(app, &msg).await;
    match outcome {
        Ok(id) => {
            app.metrics
                .inc("testflinger_broker_submissions_total", "admitted");
            reply(app, &msg, json!({"job_id": id.to_string()})).await;
            settle(msg.ack().await);
        }
        Err(ApiError::Unavailable(e)) => {
            app.metrics
                .inc("testflinger_broker_submissions_total", "deferred");
            // Not our fault and not the publisher's: keep the message for later.
            tracing::warn!(error = %e, "submission deferred: dependency unavailable");
            tokio::time::sleep(Duration::from_millis(500)).await;
            settle(msg.requeue().await);
        }
        Err(e) => {
            app.metrics
                .inc("testflinger_broker_submissions_total", "rejected");
            let (error, detail) = describe(&e);
            tracing::info!(error = %error, "broker submission rejected");
            reply(app, &msg, json!({"error": error, "detail": detail})).await;
            let r = app
                .broker
                .publish(OutgoingMessage {
                    exchange: "",
                    routing_key: REJECTED_QUEUE,
                    body: &msg.body,
                    message_id: msg.message_id.as_deref(),
                    correlation_id: msg.correlation_id.as_deref(),
                    content_type: msg.content_type.as_deref(),
                    persistent: true,
                    headers: vec![("x-rejection-reason", error.clone())],
                    ..OutgoingMessage::default()
                })
                .await;
            if let Err(e) = r {
                tracing::warn!(error = %e, "could not copy rejected submission; requeueing");
                settle(msg.requeue().await);
                return;
            }
            settle(msg.ack().await);
        }
    }
}

fn settle(r: Result<(), testflinger_broker::BrokerError>) {
    if let Err(e) = r {
        tracing::warn!(error = %e, "could not settle submission message; the broker will redeliver it");
    }
}

async fn admit_message(app: &AppState, msg: &Incoming) -> Result<JobId, ApiError> {
    let ct = msg.content_type.as_deref().unwrap_or("application/json");
    if !(ct.starts_with("application/json") || ct.starts_with("text/plain")) {
        return Err(ApiError::BadRequest(format!(
            "content type '{ct}' is not supported; publish JSON as application/json or text/plain"
        )));
    }
    let value: Value = serde_json::from_slice(&msg.body)
        .map_err(|e| ApiError::BadRequest(format!("malformed JSON: {e}")))?;
    let forced = match msg.message_id.as_deref() {
        Some(m) => m.parse::<JobId>().ok(),
        None => None,
    };
    // A broker submission has no HTTP identity: it is anonymous unless the message
    // carries an `Authorization: Bearer <access token>` header (checked like HTTP's).
    let header = msg
        .headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("authorization"))
        .map(|(_, v)| v.as_str());
    let caller = crate::auth::Caller::authenticate(app, header).await?;
    app.jobs.admit(value, forced, &caller).await
}

fn describe(e: &ApiError) -> (String, Value) {
    match e {
        ApiError::Validation(v) => (format!("Validation error: {v}"), v.detail()),
        other => (other.to_string(), json!({})),
    }
}

async fn reply(app: &AppState, msg: &Incoming, body: Value) {
    let Some(to) = msg.reply_to.as_deref() else {
        return;
    };
    let bytes = body.to_string().into_bytes();
    let r = app
        .broker
        .publish(OutgoingMessage {
            exchange: "",
            routing_key: to,
            body: &bytes,
            correlation_id: msg.correlation_id.as_deref(),
            content_type: Some("application/json"),
            ..OutgoingMessage::default()
        })
        .await;
    if let Err(e) = r {
        tracing::warn!(error = %e, reply_to = to, "could not send submission reply");
    }
}
