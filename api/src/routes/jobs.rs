//! `/v1/job...`: submit, look up, position, cancel, attachments, search, and the
//! legacy HTTP pull for upstream agents.

use super::{json_body, ok_text, parse_id};
use crate::error::{ApiError, ApiResult};
use crate::files::Kind;
use crate::state::AppState;
use actix_multipart::Multipart;
use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use serde_json::{Value, json};
use testflinger_common::JobState;
use testflinger_common::protocol::ClaimOutcome;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/job", web::post().to(submit_job))
        .route("/v1/job", web::get().to(legacy_next_job))
        .route("/v1/job/search", web::get().to(search))
        .route("/v1/job/{id}", web::get().to(get_job))
        .route("/v1/job/{id}/position", web::get().to(position))
        .route("/v1/job/{id}/action", web::post().to(action))
        .route("/v1/job/{id}/attachments", web::post().to(post_attachments))
        .route("/v1/job/{id}/attachments", web::get().to(get_attachments))
        .route("/v1/job/{id}/events", web::post().to(post_events));
}

#[tracing::instrument(skip_all, fields(job.id))]
async fn submit_job(
    app: web::Data<AppState>,
    caller: crate::auth::Caller,
    body: web::Bytes,
) -> ApiResult<HttpResponse> {
    // Before the body is built into JSON: a job of 200 000 tags is refused at its size.
    app.jobs.check_bounds(&body)?;
    let value = json_body(&body)?;
    if let Some(raw) = value.get("job_id")
        && raw
            .as_str()
            .is_none_or(|s| s.parse::<testflinger_common::JobId>().is_err())
    {
        return Err(ApiError::BadRequest("Invalid job_id specified".into()));
    }
    let id = app.jobs.admit(value, None, &caller).await?;
    tracing::Span::current().record("job.id", tracing::field::display(&id));
    Ok(HttpResponse::Ok().json(json!({"job_id": id.to_string()})))
}

#[tracing::instrument(skip_all, fields(job.id = %id))]
async fn get_job(app: web::Data<AppState>, id: web::Path<String>) -> ApiResult<HttpResponse> {
    let id = parse_id(&id, false)?;
    let rec = app
        .store
        .get_job(&id.to_string())
        .await?
        .ok_or(ApiError::NoContent)?;
    Ok(HttpResponse::Ok().json(rec.def))
}

#[tracing::instrument(skip_all, fields(job.id = %id))]
async fn position(app: web::Data<AppState>, id: web::Path<String>) -> ApiResult<HttpResponse> {
    let id = parse_id(&id, true)?.to_string();
    let gone = || {
        ApiError::Text(
            StatusCode::GONE,
            "Job not found or already started\n".into(),
        )
    };
    // One round trip: the record's queue and state and the rank, in one script.
    let rank = app.store.position(&id).await?;
    let rank = rank.ok_or_else(gone)?;
    Ok(HttpResponse::Ok()
        .content_type("text/plain; charset=utf-8")
        .body(rank.to_string()))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ActionIn {
    action: String,
}

#[tracing::instrument(skip_all, fields(job.id = %id))]
async fn action(
    app: web::Data<AppState>,
    caller: crate::auth::Caller,
    id: web::Path<String>,
    body: web::Bytes,
) -> ApiResult<HttpResponse> {
    let job_id = parse_id(&id, true)?;
    let a: ActionIn = super::typed_body(&body)?;
    if a.action != "cancel" {
        return Err(ApiError::Validation(
            testflinger_common::ValidationError::new(
                "action",
                format!(
                    "'{}' is not a valid action; the only action is 'cancel'",
                    a.action
                ),
            ),
        ));
    }
    if app.jobs.cancel(&caller, &job_id).await? {
        Ok(ok_text())
    } else {
        Err(ApiError::Text(
            StatusCode::BAD_REQUEST,
            "The job is already completed or cancelled".into(),
        ))
    }
}

#[tracing::instrument(skip_all, fields(job.id = %id))]
async fn post_attachments(
    app: web::Data<AppState>,
    caller: crate::auth::Caller,
    id: web::Path<String>,
    payload: Multipart,
) -> ApiResult<HttpResponse> {
    let job_id = parse_id(&id, true)?;
    let id = job_id.to_string();
    let Some(job) = app.jobs.attachments_expected(&caller, &job_id).await? else {
        return Ok(ok_text());
    };
    app.files
        .save_upload(Kind::Attachments, &id, payload)
        .await?;
    app.jobs.attachments_received(&job_id, &job).await?;
    Ok(ok_text())
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsIn {
    #[serde(default)]
    agent_id: Option<String>,
    #[serde(default)]
    job_queue: Option<String>,
    job_status_webhook: String,
    #[serde(default)]
    events: Vec<crate::events::AgentEvent>,
}

/// `POST /v1/job/<id>/events`: upstream agents post the cumulative list of a job's phase
/// events after each one. New events go to `testflinger.events`; the post (without
/// `job_status_webhook`) goes to the job's webhook, as upstream relays it. The webhook
/// must be the job's own `job_status_webhook` (403 otherwise: the route relays to no
/// other address); its host must be in `TESTFLINGER_WEBHOOK_ALLOWED_HOSTS` to be called.
/// With auth on, only agents may post (401 anonymous, 403 another role).
#[tracing::instrument(skip_all, fields(job.id = %id))]
async fn post_events(
    app: web::Data<AppState>,
    caller: crate::auth::Caller,
    id: web::Path<String>,
    body: web::Bytes,
) -> ApiResult<HttpResponse> {
    caller.require(crate::auth::AGENT)?;
    let id = parse_id(&id, true)?.to_string();
    let value = json_body(&body)?;
    let e: EventsIn =
        testflinger_common::job::deserialize(value.clone()).map_err(ApiError::Validation)?;
    let Some(job) = app.store.job_summary(&id).await? else {
        return Err(ApiError::JobNotFound(id));
    };
    // An agent relays the events of a job it holds only.
    if let Some(me) = super::acting_agent_id(&caller)
        && job.agent.as_deref() != Some(me)
    {
        return Err(crate::store::not_holder(&id, Some(me)).into());
    }
    if job.webhook().as_deref() != Some(e.job_status_webhook.as_str()) {
        return Err(ApiError::Json(
            StatusCode::FORBIDDEN,
            "job_status_webhook: not this job's job_status_webhook; events are relayed to the job's own webhook only".into(),
        ));
    }
    let Some(seen) = app
        .store
        .advance_agent_events(&id, e.events.len() as u64)
        .await?
    else {
        return Err(ApiError::Text(
            StatusCode::NOT_FOUND,
            format!("Job {id} not found\n"),
        ));
    };
    let new = e.events.get(seen as usize..).unwrap_or_default();
    let mut forward = value;
    if let Some(o) = forward.as_object_mut() {
        o.remove("job_status_webhook");
    }
    let agent = e.agent_id.clone().or(job.agent);
    let queue = e
        .job_queue
        .clone()
        .filter(|q| *q == job.queue)
        .unwrap_or(job.queue);
    crate::events::relay_agent_events(
        &app.events,
        &id,
        &queue,
        agent.as_deref(),
        new,
        (!new.is_empty()).then(|| {
            (
                e.job_status_webhook.clone(),
                serde_json::to_vec(&forward).unwrap_or_default(),
            )
        }),
    );
    Ok(ok_text())
}

#[tracing::instrument(skip_all, fields(job.id = %id))]
async fn get_attachments(
    app: web::Data<AppState>,
    caller: crate::auth::Caller,
    id: web::Path<String>,
) -> ApiResult<HttpResponse> {
    caller.require(crate::auth::AGENT)?;
    let id = parse_id(&id, true)?.to_string();
    // An agent reads the attachments of a job it holds only.
    if let Some(me) = super::acting_agent_id(&caller)
        && app.store.job_agent(&id).await?.as_deref() != Some(me)
    {
        return Err(crate::store::not_holder(&id, Some(me)).into());
    }
    super::stream_file(&app, Kind::Attachments, &id, "application/gzip", None).await
}

#[derive(serde::Deserialize)]
struct SearchQuery {
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default, rename = "match", deserialize_with = "super::last")]
    match_: Option<String>,
    #[serde(default)]
    state: Vec<String>,
}

const SEARCH_LIMIT: usize = 5000;

async fn search(app: web::Data<AppState>, req: HttpRequest) -> ApiResult<HttpResponse> {
    let q: SearchQuery = super::serde_html_form(&req)?;
    let all = q.match_.as_deref().unwrap_or("any") == "all";
    if let Some(m) = q.match_.as_deref()
        && m != "any"
        && m != "all"
    {
        return Err(query_error(
            "match",
            &format!("'{m}' must be 'any' or 'all'"),
        ));
    }
    for s in &q.state {
        // Upstream's search accepts every job state (from the one list, in `common`),
        // its spelling `completed`, and `active` (any state but the terminal ones).
        let known = JobState::parse_lenient(s).is_some() || s == "active";
        if !known {
            return Err(query_error("state", &format!("'{s}' is not a valid state")));
        }
    }
    let rows = app.store.search_jobs(&q.tags, all).await?;
    let mut out: Vec<(i64, Value)> = Vec::new();
    for (id, state, created_at, created) in rows {
        let keep = q.state.is_empty()
            || q.state.iter().any(|s| match s.as_str() {
                "active" => state != "cancelled" && state != "complete",
                "completed" | "complete" => state == "complete",
                other => other == state,
            });
        if keep {
            out.push((
                created,
                json!({"job_id": id, "created_at": created_at, "job_state": state}),
            ));
        }
    }
    out.sort_by_key(|x| std::cmp::Reverse(x.0));
    out.truncate(SEARCH_LIMIT);
    Ok(HttpResponse::Ok().json(out.into_iter().map(|(_, v)| v).collect::<Vec<_>>()))
}

fn query_error(field: &str, msg: &str) -> ApiError {
    ApiError::Json(
        StatusCode::UNPROCESSABLE_ENTITY,
        format!("Validation error: {field}: {msg}"),
    )
}

/// The `agent_name` cookie (set by `POST /v1/agents/data/<name>`), read by actix-web's
/// cookie support (percent-decoded).
fn agent_cookie(req: &HttpRequest) -> Option<String> {
    req.cookie("agent_name")
        .map(|c| c.value().to_string())
        .filter(|v| !v.is_empty())
}

#[derive(serde::Deserialize)]
struct LegacyQuery {
    #[serde(default)]
    queue: Vec<String>,
}

/// `GET /v1/job?queue=A&queue=B`: for upstream HTTP-polling agents. Takes the
/// best waiting job of those queues from RabbitMQ (basic.get), claims it for the
/// calling agent, acks it, and returns it; 204 when there is none.
#[tracing::instrument(skip_all, fields(agent))]
async fn legacy_next_job(
    app: web::Data<AppState>,
    caller: crate::auth::Caller,
    req: HttpRequest,
) -> ApiResult<HttpResponse> {
    caller.require(crate::auth::AGENT)?;
    let q: LegacyQuery = super::serde_html_form(&req)?;
    if q.queue.is_empty() {
        return Err(ApiError::BadRequest(
            "No queue(s) specified in request".into(),
        ));
    }
    let agent = agent_cookie(&req)
        .ok_or_else(|| ApiError::Text(StatusCode::UNAUTHORIZED, "Agent not identified".into()))?;
    tracing::Span::current().record("agent", agent.as_str());
    caller.require_agent(&agent, "take a job (cookie agent_name)")?;
    if let Some(served) = super::served_queues(&app, &caller).await?
        && let Some(q) = q.queue.iter().find(|q| !served.contains(q))
    {
        return Err(ApiError::Json(
            StatusCode::FORBIDDEN,
            format!(
                "agent '{agent}' may not serve queue '{q}' (its queues: {}); an admin or manager sets them with agent_queues in /v1/client-permissions",
                served.join(", ")
            ),
        ));
    }
    // Visit queues in the order of their best waiting job (priority, then age).
    let heads = app.store.queue_heads(&q.queue).await?;
    let mut order: Vec<(f64, &String)> = heads.into_iter().zip(q.queue.iter()).collect();
    order.sort_by(|a, b| a.0.total_cmp(&b.0));
    for (_, queue) in order {
        if testflinger_common::queue::validate_queue_name(queue).is_err() {
            continue;
        }
        // Bounded: stale messages (cancelled, finished) are dropped as we go.
        for _ in 0..100 {
            let Some(msg) = app.broker.get(queue).await? else {
                break;
            };
            let Some(job_id) = msg
                .message_id
                .clone()
                .or_else(|| message_job_id(&msg.body))
                .and_then(|m| m.parse::<testflinger_common::JobId>().ok())
            else {
                msg.reject().await?;
                continue;
            };
            let id = job_id.to_string();
            // The definition gives the lease and, once granted, the webhook.
            let def = app.store.job_def(&id).await?.unwrap_or(Value::Null);
            let lease_ms = legacy_lease_ms(&app, &def);
            let claim = app
                .jobs
                .claim(&job_id, &agent, lease_ms, true, None)
                .await?;
            match claim.outcome {
                ClaimOutcome::Granted => {
                    msg.ack().await?;
                    return Ok(HttpResponse::Ok().json(claim.job.unwrap_or(Value::Null)));
                }
                ClaimOutcome::Excluded => {
                    msg.requeue().await?;
                    break;
                }
                ClaimOutcome::Unknown => {
                    // Published raw: a legacy agent cannot register it; leave it for ours.
                    msg.requeue().await?;
                    break;
                }
                _ => msg.ack().await?,
            }
        }
    }
    Ok(HttpResponse::NoContent().finish())
}

/// The lease of a job taken by an upstream HTTP-polling agent. Such an agent sends no
/// heartbeat; its writes renew the lease. It may stay silent for as long as the job's
/// own timeouts allow (upstream's defaults: `global_timeout` 4 h, `output_timeout` 15
/// min, plus a reservation's `timeout`), so the lease spans those: past them the agent is
/// surely gone and the reaper requeues the job.
fn legacy_lease_ms(app: &AppState, def: &Value) -> u64 {
    let secs = |v: Option<&Value>, default: u64| v.and_then(Value::as_u64).unwrap_or(default);
    let global = secs(def.get("global_timeout"), 4 * 3600);
    let output = secs(def.get("output_timeout"), 15 * 60);
    let reserve = def
        .get("reserve_data")
        .map(|r| secs(r.get("timeout"), 3600))
        .unwrap_or(0);
    (global + output + reserve).max(app.settings.lease_ttl) * 1000
}

fn message_job_id(body: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(body).ok()?;
    v.get("job_id")?.as_str().map(str::to_string)
}
