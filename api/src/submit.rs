//! Admission of a job: the one path shared by `POST /v1/job` and the broker-native
//! submission queue.
//!
//! Order: validate; write the record and position entry; publish and await the confirm;
//! only then answer. A broker failure removes the record again, so a success always
//! means durably queued and a failure leaves nothing behind.

use crate::error::{ApiError, ApiResult};
use crate::events;
use crate::state::AppState;
use serde_json::Value;
use testflinger_common::{Job, JobId};

/// Validates and queues a job; returns its id. `forced_id` (a broker `message_id`)
/// takes precedence over a `job_id` in the body.
pub async fn admit(app: &AppState, body: Value, forced_id: Option<JobId>) -> ApiResult<JobId> {
    let job = Job::from_value(body).map_err(ApiError::Validation)?;
    check_exclusions(app, &job).await?;
    let id = forced_id.or(job.job_id).unwrap_or_default();
    let id_str = id.to_string();
    let mut def = job.to_value();
    if let Some(o) = def.as_object_mut() {
        o.insert("job_id".into(), Value::String(id_str.clone()));
    }
    let tags = job.tags.clone().unwrap_or_default();
    let attach = job.has_attachments();
    let (created, state) = app
        .store
        .create_job(&id_str, &def, &job.job_queue, job.priority(), attach, &tags)
        .await?;
    if !created {
        // Resubmission of a known id: idempotent. If the job still waits, publish again
        // (a duplicate message is dropped at claim time), in case the first publish
        // never completed.
        if state == "waiting" {
            let rec = app.store.job_fields(&id_str, &["attach"]).await?;
            let attach_waiting = rec.first().cloned().flatten().as_deref() == Some("waiting");
            if !attach_waiting {
                publish(app, &id_str, &job.job_queue, job.priority(), &def).await?;
            }
        }
        return Ok(id);
    }
    if !attach && let Err(e) = publish(app, &id_str, &job.job_queue, job.priority(), &def).await {
        if let Err(cleanup) = app.store.delete_job(&id_str, &job.job_queue, &tags).await {
            tracing::error!(job.id = %id_str, error = %cleanup, "could not remove unqueued job");
        }
        return Err(e);
    }
    app.metrics.inc("testflinger_jobs_total", &job.job_queue);
    if job.reserve_data.is_some() {
        app.metrics
            .inc("testflinger_reservations_total", &job.job_queue);
    }
    events::emit(
        app,
        &id_str,
        &job.job_queue,
        "waiting",
        None,
        0,
        None,
        None,
        job.job_status_webhook.clone(),
    );
    Ok(id)
}

/// Publishes a job's message to its queue, waiting for the broker's confirm.
pub async fn publish(
    app: &AppState,
    id: &str,
    queue: &str,
    priority: i64,
    def: &Value,
) -> ApiResult<()> {
    let body = serde_json::to_vec(def).map_err(|e| ApiError::Internal(e.into()))?;
    app.broker
        .publish_job(queue, id, priority, &body)
        .await
        .map_err(ApiError::from)
}

/// Upstream's rule: with `exclude_agents`, some registered agent of the queue must be
/// allowed to run the job.
async fn check_exclusions(app: &AppState, job: &Job) -> ApiResult<()> {
    if job.exclude_agents.is_empty() {
        return Ok(());
    }
    let agents = crate::routes::agents::agents_on_queue(app, &job.job_queue).await?;
    let allowed = agents.iter().any(|a| {
        a.get("name")
            .and_then(Value::as_str)
            .is_some_and(|n| !job.exclude_agents.iter().any(|x| x == n))
    });
    if allowed {
        Ok(())
    } else {
        Err(ApiError::Json(
            actix_web::http::StatusCode::UNPROCESSABLE_ENTITY,
            "There are no agents on the specified queue that are allowed to run this job".into(),
        ))
    }
}
