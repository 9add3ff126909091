//! Our additions for push-dispatched agents: claim a delivered job (lease + fencing
//! token), renew the lease, give the job back. See `testflinger_common::protocol`.

use super::{parse_id, typed_body};
use crate::error::{ApiError, ApiResult};
use crate::jobs::requeue::Cause;
use crate::state::AppState;
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
    let job_id = parse_id(&id, false)?;
    let r: ClaimRequest = typed_body(&body)?;
    if r.agent_id.is_empty() {
        return Err(ApiError::BadRequest("agent_id must not be empty".into()));
    }
    tracing::Span::current().record("agent", r.agent_id.as_str());
    caller.require_agent(&r.agent_id, "claim")?;
    let served = super::served_queues(&app, &caller).await?;
    let c = app
        .jobs
        .claim(
            &job_id,
            &r.agent_id,
            app.lease_ms(),
            false,
            served.as_deref(),
        )
        .await?;
    let granted = c.outcome == ClaimOutcome::Granted;
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
    let job_id = parse_id(&id, false)?;
    let r: LeaseRequest = typed_body(&body)?;
    caller.require_agent(&r.agent_id, "release")?;
    let reason = r
        .reason
        .clone()
        .unwrap_or_else(|| format!("released by agent {}", r.agent_id));
    app.jobs
        .requeue(
            &job_id,
            Cause::Released {
                token: r.token,
                agent: super::acting_agent_id(&caller),
                reason,
            },
        )
        .await?;
    Ok(super::ok_text())
}
