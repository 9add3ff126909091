//! Our additions for push-dispatched agents: claim a delivered job (lease + fencing
//! token), renew the lease, give the job back. See `testflinger_common::protocol`.

use super::{parse_id, typed_body};
use crate::error::{ApiError, ApiResult};
use crate::events;
use crate::state::AppState;
use crate::store::Requeue;
use actix_web::{HttpResponse, web};
use testflinger_common::protocol::{
    ClaimOutcome, ClaimRequest, ClaimResponse, HeartbeatResponse, LeaseRequest,
};

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/job/{id}/claim", web::post().to(claim))
        .route("/v1/job/{id}/heartbeat", web::post().to(heartbeat))
        .route("/v1/job/{id}/release", web::post().to(release));
}

#[tracing::instrument(skip_all, fields(job.id = %id, agent))]
async fn claim(
    app: web::Data<AppState>,
    caller: crate::auth::Caller,
    id: web::Path<String>,
    body: web::Bytes,
) -> ApiResult<HttpResponse> {
    caller.require(crate::auth::AGENT)?;
    let id = parse_id(&id, false)?.to_string();
    let r: ClaimRequest = typed_body(&body)?;
    if r.agent_id.is_empty() {
        return Err(ApiError::BadRequest("agent_id must not be empty".into()));
    }
    tracing::Span::current().record("agent", r.agent_id.as_str());
    caller.require_agent(&r.agent_id, "claim")?;
    let served = super::served_queues(&app, &caller).await?;
    let mut c = app
        .store
        .claim(&id, &r.agent_id, app.lease_ms(), false, served.as_deref())
        .await?;
    if let Some(job) = c.job.as_mut() {
        super::secrets::resolve(&app, job, &id, &format!("{id}:{}", c.attempt)).await?;
    }
    if c.outcome == ClaimOutcome::Excluded {
        // The agent drops its delivery; the outbox publishes the job again shortly, at
        // the back, so the excluded agent does not get it straight back.
        app.store.outbox_add(&id).await?;
    }
    if c.outcome == ClaimOutcome::Granted {
        let job = app.store.job_summary(&id).await?;
        let queue = job.as_ref().map(|j| j.queue.as_str()).unwrap_or_default();
        // Shown in the agent's record, if it registered (a zombie must not invent one).
        app.store
            .update_agent_if_known(&r.agent_id, &[("job_id", &id)])
            .await?;
        app.store.note_agent_job(&r.agent_id, &id).await?;
        events::emit(
            &app,
            &id,
            queue,
            "running",
            Some("waiting"),
            c.attempt,
            Some(&r.agent_id),
            None,
            job.as_ref().and_then(|j| j.webhook()),
        );
    }
    let granted = c.outcome == ClaimOutcome::Granted;
    let outcome = serde_json::to_value(c.outcome).ok();
    app.metrics.inc(
        "testflinger_claims_total",
        outcome
            .as_ref()
            .and_then(|o| o.as_str())
            .unwrap_or("unknown"),
    );
    Ok(HttpResponse::Ok().json(ClaimResponse {
        outcome: c.outcome,
        token: granted.then_some(c.token),
        attempt: granted.then_some(c.attempt),
        lease_ttl: granted.then_some(app.settings.lease_ttl),
        job: c.job,
    }))
}

#[tracing::instrument(skip_all, fields(job.id = %id))]
async fn heartbeat(
    app: web::Data<AppState>,
    caller: crate::auth::Caller,
    id: web::Path<String>,
    body: web::Bytes,
) -> ApiResult<HttpResponse> {
    caller.require(crate::auth::AGENT)?;
    let id = parse_id(&id, false)?.to_string();
    let r: LeaseRequest = typed_body(&body)?;
    caller.require_agent(&r.agent_id, "heartbeat")?;
    let me = super::acting_agent_id(&caller);
    match app
        .store
        .heartbeat(&id, r.token, app.lease_ms(), me)
        .await?
    {
        Some(cancel) => Ok(HttpResponse::Ok().json(HeartbeatResponse {
            cancel_requested: cancel,
            lease_ttl: app.settings.lease_ttl,
        })),
        None => Err(ApiError::Stale(crate::store::stale_message(&id))),
    }
}

#[tracing::instrument(skip_all, fields(job.id = %id))]
async fn release(
    app: web::Data<AppState>,
    caller: crate::auth::Caller,
    id: web::Path<String>,
    body: web::Bytes,
) -> ApiResult<HttpResponse> {
    caller.require(crate::auth::AGENT)?;
    let id = parse_id(&id, false)?.to_string();
    let r: LeaseRequest = typed_body(&body)?;
    caller.require_agent(&r.agent_id, "release")?;
    let Some(job) = app.store.job_summary(&id).await? else {
        return Err(ApiError::JobNotFound(id));
    };
    let queue = &job.queue;
    let reason = r
        .reason
        .clone()
        .unwrap_or_else(|| format!("released by agent {}", r.agent_id));
    match app
        .store
        .requeue(
            &id,
            queue,
            app.settings.max_attempts,
            &reason,
            Some(r.token),
            super::acting_agent_id(&caller),
        )
        .await?
    {
        Requeue::Stale => Err(ApiError::Stale(crate::store::stale_message(&id))),
        Requeue::Requeued {
            previous,
            attempt,
            agent,
            reason,
        } => {
            if let Err(e) = crate::reaper::republish(&app, &id).await {
                tracing::warn!(job.id = %id, error = %e, "released job not yet republished; the outbox keeps it");
            }
            events::emit(
                &app,
                &id,
                queue,
                "waiting",
                Some(previous.as_str()),
                attempt,
                Some(&agent),
                Some(&reason),
                job.webhook(),
            );
            Ok(super::ok_text())
        }
        // A release counts as a run: after `max_attempts` the job ends with the reason.
        Requeue::Ended {
            previous,
            attempt,
            agent,
            reason,
        } => {
            events::emit(
                &app,
                &id,
                queue,
                "complete",
                Some(previous.as_str()),
                attempt,
                Some(&agent),
                Some(&reason),
                job.webhook(),
            );
            Ok(super::ok_text())
        }
        _ => Ok(super::ok_text()),
    }
}
