//! `/v1/agents...`: agent records, advertised queues and images, provision logs.

use super::{ok_text, typed_body};
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;
use crate::store::now_iso;
use actix_web::http::StatusCode;
use actix_web::{HttpResponse, web};
use serde_json::{Value, json};
use std::collections::BTreeMap;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/agents/data", web::get().to(list_agents))
        .route("/v1/agents/data/{name}", web::get().to(get_agent))
        .route("/v1/agents/data/{name}", web::post().to(post_agent))
        .route("/v1/agents/queues", web::get().to(get_queues))
        .route("/v1/agents/queues", web::post().to(post_queues))
        .route("/v1/agents/images", web::post().to(post_images))
        .route("/v1/agents/images/{queue}", web::get().to(get_images))
        .route(
            "/v1/agents/provision_logs/{name}",
            web::post().to(post_provision_log),
        );
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentIn {
    identifier: Option<String>,
    job_id: Option<String>,
    location: Option<String>,
    log: Option<Vec<String>>,
    provision_type: Option<String>,
    queues: Option<Vec<String>>,
    state: Option<String>,
    comment: Option<String>,
}

fn check_name(name: &str) -> ApiResult<()> {
    if name.is_empty() || name.len() > 200 || name.chars().any(char::is_control) {
        return Err(ApiError::BadRequest(
            "agent name must be 1 to 200 printable characters".into(),
        ));
    }
    Ok(())
}

async fn post_agent(
    app: web::Data<AppState>,
    caller: crate::auth::Caller,
    name: web::Path<String>,
    body: web::Bytes,
) -> ApiResult<HttpResponse> {
    caller.require(crate::auth::ADMIN_MANAGER_AGENT)?;
    let name = name.into_inner();
    check_name(&name)?;
    caller.require_agent(&name, "write an agent record")?;
    let a: AgentIn = typed_body(&body)?;
    // An agent registers only queues it may serve, when an admin or manager set them;
    // otherwise what it registers is what it serves, and each change is logged.
    let mut queue_change: Option<String> = None;
    if let (Some(me), Some(qs)) = (caller.acting_agent(), &a.queues) {
        if let Some(allowed) = &me.queues
            && let Some(q) = qs.iter().find(|q| !allowed.contains(q))
        {
            return Err(ApiError::Json(
                StatusCode::FORBIDDEN,
                format!(
                    "agent '{name}' may not serve queue '{q}' (its queues, set by an admin or manager: {})",
                    allowed.join(", ")
                ),
            ));
        }
        let before: Vec<String> = app
            .store
            .agent_record(&name)
            .await?
            .get("queues")
            .and_then(|q| serde_json::from_str(q).ok())
            .unwrap_or_default();
        let (mut b, mut n) = (before.clone(), qs.clone());
        b.sort();
        n.sort();
        if b != n {
            tracing::info!(agent = %name, before = ?before, after = ?qs, "agent changed the queues it serves");
            queue_change = Some(format!(
                "{} queues changed by the agent's credential: [{}] -> [{}]",
                now_iso(),
                before.join(", "),
                qs.join(", ")
            ));
        }
    }
    let mut fields: Vec<(&str, String)> = Vec::new();
    for (key, v) in [
        ("identifier", &a.identifier),
        ("job_id", &a.job_id),
        ("location", &a.location),
        ("provision_type", &a.provision_type),
        ("state", &a.state),
        ("comment", &a.comment),
    ] {
        if let Some(v) = v {
            fields.push((key, v.clone()));
        }
    }
    if let Some(q) = &a.queues {
        fields.push(("queues", json!(q).to_string()));
    }
    let mut log = a.log.clone().unwrap_or_default();
    log.extend(queue_change);
    let previous = app.store.put_agent(&name, &fields, &log).await?;
    // Tell the agent only when its state enters or leaves a blocking one (its own posts
    // of phase states and `waiting` after a job need no echo).
    // Blocking: a state in which the agent takes no job (the one availability rule).
    let blocking = |s: &str| !testflinger_common::AgentState::record_takes_jobs(Some(s));
    if let Some(state) = &a.state
        && (blocking(state) || previous.as_deref().is_some_and(blocking))
        && previous.as_deref() != Some(state.as_str())
    {
        notify_state(&app, &name, state).await;
    }
    // The queues an agent serves are registered: they may get broker queues.
    if let Some(q) = &a.queues {
        app.store.register_queues(q).await?;
    }
    // With auth on (least privilege), its control queue is declared and bound here when
    // it starts (it posts its queues), so the agent's broker user needs no access to the
    // control exchange. Best effort: commands also ride the heartbeat.
    if app.auth.enabled()
        && a.queues.is_some()
        && let Err(e) = app.broker.ensure_control_queue(&name).await
    {
        tracing::warn!(agent = %name, error = %e, "control queue not declared yet");
    }
    // Upstream's cookie (`agent_name=<name>; HttpOnly; SameSite=Strict; Path=/`), which
    // its agent sends back on `GET /v1/job`; the name percent-encoded where it must be.
    let cookie = actix_web::cookie::Cookie::build("agent_name", name)
        .http_only(true)
        .same_site(actix_web::cookie::SameSite::Strict)
        .path("/")
        .finish();
    Ok(HttpResponse::Ok()
        .cookie(cookie)
        .json(json!({"status": "OK"})))
}

/// Tells a running agent at once that its state was set (an operator's offline or
/// maintenance takes effect without waiting for its next poll). Best effort.
async fn notify_state(app: &AppState, name: &str, state: &str) {
    let cmd = testflinger_common::protocol::ControlCommand::SetState {
        state: state.to_string(),
    };
    let body = serde_json::to_vec(&cmd).unwrap_or_default();
    if let Err(e) = app.broker.send_control(name, &body).await {
        tracing::debug!(agent = name, error = %e, "state command not published; the agent polls");
    }
}

async fn list_agents(app: web::Data<AppState>) -> ApiResult<HttpResponse> {
    Ok(HttpResponse::Ok().json(crate::agents::all_agents(&app.store).await?))
}

async fn get_agent(app: web::Data<AppState>, name: web::Path<String>) -> ApiResult<HttpResponse> {
    let h = app.store.agent_record(&name).await?;
    if h.is_empty() {
        return Ok(HttpResponse::NotFound().json(json!({})));
    }
    Ok(HttpResponse::Ok().json(crate::agents::agent_json(h)))
}

async fn post_queues(
    app: web::Data<AppState>,
    caller: crate::auth::Caller,
    body: web::Bytes,
) -> ApiResult<HttpResponse> {
    caller.require(crate::auth::ADMIN_MANAGER_AGENT)?;
    let m: BTreeMap<String, String> = typed_body(&body)?;
    for q in m.keys() {
        testflinger_common::queue::validate_queue_name(q).map_err(|e| {
            ApiError::Validation(testflinger_common::ValidationError::new(q.clone(), e))
        })?;
    }
    if !m.is_empty() {
        // An agent or operator advertising a queue registers it: it may get a broker queue.
        let names: Vec<String> = m.keys().cloned().collect();
        app.store.register_queues(&names).await?;
        let items: Vec<(String, String)> = m.into_iter().collect();
        app.store.advertise_queues(&items).await?;
    }
    Ok(ok_text())
}

async fn get_queues(app: web::Data<AppState>) -> ApiResult<HttpResponse> {
    // Advertised queues only (`advertised_queues` of agents, as upstream): a queue an
    // agent merely consumes is not listed.
    let m = app.store.advertised_queues().await?;
    Ok(HttpResponse::Ok().json(m))
}

async fn post_images(
    app: web::Data<AppState>,
    caller: crate::auth::Caller,
    body: web::Bytes,
) -> ApiResult<HttpResponse> {
    caller.require(crate::auth::ADMIN_MANAGER_AGENT)?;
    let m: BTreeMap<String, BTreeMap<String, String>> = typed_body(&body)?;
    let mut by_queue: Vec<(String, String)> = Vec::new();
    for (q, images) in &m {
        for name in images.keys() {
            if name.is_empty() || name.contains('.') || name.starts_with('$') {
                return Err(ApiError::Validation(
                    testflinger_common::ValidationError::new(
                        format!("{q}.{name}"),
                        "image names must be non-empty, without '.' and not start with '$'",
                    ),
                ));
            }
        }
        by_queue.push((q.clone(), json!(images).to_string()));
    }
    app.store.put_images(&by_queue).await?;
    Ok(ok_text())
}

async fn get_images(app: web::Data<AppState>, queue: web::Path<String>) -> ApiResult<HttpResponse> {
    let v = app.store.images(&queue).await?;
    let body: Value = v
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_else(|| json!({}));
    Ok(HttpResponse::Ok().json(body))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ProvisionLogIn {
    job_id: String,
    exit_code: i64,
    #[serde(default)]
    detail: Option<String>,
}

async fn post_provision_log(
    app: web::Data<AppState>,
    caller: crate::auth::Caller,
    name: web::Path<String>,
    body: web::Bytes,
) -> ApiResult<HttpResponse> {
    caller.require(crate::auth::AGENT)?;
    caller.require_agent(&name, "write a provision log")?;
    let l: ProvisionLogIn = typed_body(&body)?;
    let h = app.store.agent_record(&name).await?;
    if h.is_empty() {
        return Err(ApiError::Text(
            StatusCode::NOT_FOUND,
            "Agent not found\n".into(),
        ));
    }
    let kind = if l.exit_code == 0 { "pass" } else { "fail" };
    let count = if h.get("provision_streak_type").map(String::as_str) == Some(kind) {
        h.get("provision_streak_count")
            .and_then(|c| c.parse::<i64>().ok())
            .unwrap_or(0)
            + 1
    } else {
        1
    };
    let entry = json!({"job_id": l.job_id, "exit_code": l.exit_code, "detail": l.detail.unwrap_or_default(), "timestamp": now_iso()});
    app.store
        .add_provision_log(&name, &entry.to_string(), kind, count)
        .await?;
    Ok(ok_text())
}
