//! Upstream's auth routes (reference §1.4): `/v1/oauth2/{token,refresh,revoke}`,
//! `/v1/client-permissions[/<id>]`, `/v1/restricted-queues[/<q>]`.

use super::{ok_text, typed_body};
use crate::auth::{self, Caller, Role};
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;
use crate::store::{ClientRecord, ClientUpdate};
use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use testflinger_common::ValidationError;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/oauth2/token", web::post().to(token))
        .route("/v1/oauth2/refresh", web::post().to(refresh))
        .route("/v1/oauth2/revoke", web::post().to(revoke))
        .route("/v1/client-permissions", web::get().to(list_clients))
        .route(
            "/v1/client-permissions/{client_id}",
            web::get().to(get_client),
        )
        .route(
            "/v1/client-permissions/{client_id}",
            web::put().to(put_client),
        )
        .route(
            "/v1/client-permissions/{client_id}",
            web::delete().to(delete_client),
        )
        .route("/v1/restricted-queues", web::get().to(list_restricted))
        .route(
            "/v1/restricted-queues/{queue}",
            web::get().to(get_restricted),
        )
        .route(
            "/v1/restricted-queues/{queue}",
            web::post().to(post_restricted),
        )
        .route(
            "/v1/restricted-queues/{queue}",
            web::delete().to(delete_restricted),
        );
}

fn unauthorized_text(msg: &str) -> ApiError {
    ApiError::Text(StatusCode::UNAUTHORIZED, format!("{msg}\n"))
}

/// `Authorization: Basic base64(client_id:client_secret)`.
fn basic_credentials(req: &HttpRequest) -> ApiResult<(String, String)> {
    use base64::Engine;
    let h = req
        .headers()
        .get(actix_web::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            unauthorized_text(
                "Missing Authorization header: use HTTP Basic with client_id and client_secret",
            )
        })?;
    let b64 = h
        .strip_prefix("Basic ")
        .ok_or_else(|| unauthorized_text("Authorization must be HTTP Basic"))?;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(|| unauthorized_text("Authorization: malformed Basic credentials"))?;
    let (id, secret) = raw.split_once(':').ok_or_else(|| {
        unauthorized_text("Authorization: Basic credentials need 'client_id:client_secret'")
    })?;
    Ok((id.to_string(), secret.to_string()))
}

/// `POST /v1/oauth2/token` (HTTP Basic) → access and refresh tokens.
///
/// Rate-limited (our rule, DESIGN.md "Who may do what"): at most
/// `TESTFLINGER_LOGIN_ATTEMPTS_PER_ADDRESS` tries per client address and
/// `TESTFLINGER_LOGIN_FAILURES_PER_CLIENT` failures per client id in each
/// `TESTFLINGER_LOGIN_WINDOW`; past either, 429 with `Retry-After` and no hash is
/// computed. An unknown id costs the same hash as a known one (a decoy), so answers do
/// not tell which ids exist.
async fn token(app: web::Data<AppState>, req: HttpRequest) -> ApiResult<HttpResponse> {
    let (id, secret) = basic_credentials(&req)?;
    let s = &app.settings;
    let addr = req
        .peer_addr()
        .map(|a| a.ip().to_string())
        .unwrap_or_else(|| "unknown".into());
    let too_many = |what: String, allowed: u64, setting: &str, left: u64| {
        ApiError::TooManyRequests(
            left,
            format!(
                "Too many {what}: {allowed} per {} s allowed ({setting}); retry in {left} s",
                s.login_window
            ),
        )
    };
    let (tries, left) = app.store.count_login_attempt(&addr, s.login_window).await?;
    if tries > s.login_attempts_per_address {
        return Err(too_many(
            format!("logins from {addr}"),
            s.login_attempts_per_address,
            "TESTFLINGER_LOGIN_ATTEMPTS_PER_ADDRESS",
            left,
        ));
    }
    // One login per address at a time; then the attempt counts against the client id
    // until it succeeds (so parallel guesses cannot all pass the check before any fails).
    let _turn = app.auth.login_turn(&addr).await;
    let (failures, left) = app.store.count_login_failure(&id, s.login_window).await?;
    if failures > s.login_failures_per_client {
        return Err(too_many(
            "failed logins for this client id".into(),
            s.login_failures_per_client,
            "TESTFLINGER_LOGIN_FAILURES_PER_CLIENT",
            left,
        ));
    }
    let rec = app.store.client(&id).await?;
    let stored = rec
        .as_ref()
        .map(|r| r.secret_hash.clone())
        .filter(|h| !h.is_empty());
    let ok = app.auth.check_secret(secret, stored).await?;
    let Some(rec) = rec.filter(|_| ok) else {
        return Err(unauthorized_text("Invalid client id or secret"));
    };
    // A good login does not count as a failure.
    app.store.forgive_login(&id).await?;
    let access = app.auth.issue(rec.permissions.clone(), rec.generation)?;
    let refresh = auth::new_refresh_token()?;
    app.store
        .put_refresh(
            &auth::token_digest(&refresh),
            &id,
            rec.generation,
            auth::REFRESH_TTL,
        )
        .await?;
    Ok(HttpResponse::Ok().json(json!({
        "access_token": access,
        "token_type": "Bearer",
        "expires_in": app.auth.access_ttl(),
        "refresh_token": refresh,
    })))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RefreshIn {
    refresh_token: String,
}

fn refresh_body(body: &[u8]) -> ApiResult<String> {
    let r: RefreshIn = typed_body(body)?;
    if r.refresh_token.is_empty() {
        return Err(ApiError::Validation(ValidationError::new(
            "refresh_token",
            "must not be empty",
        )));
    }
    Ok(r.refresh_token)
}

/// `POST /v1/oauth2/refresh` `{"refresh_token"}` → a new access token.
async fn refresh(app: web::Data<AppState>, body: web::Bytes) -> ApiResult<HttpResponse> {
    let t = refresh_body(&body)?;
    let invalid =
        || ApiError::BadRequest("Invalid refresh token: unknown, revoked or expired".into());
    let (id, generation) = app
        .store
        .refresh_owner(&auth::token_digest(&t))
        .await?
        .ok_or_else(invalid)?;
    // A token of a client deleted, re-created or changed since it was issued is dead.
    let rec = app
        .store
        .client(&id)
        .await?
        .filter(|r| r.generation == generation)
        .ok_or_else(invalid)?;
    // A refresh token in use stays valid: it expires after REFRESH_TTL unused.
    app.store
        .put_refresh(&auth::token_digest(&t), &id, generation, auth::REFRESH_TTL)
        .await?;
    let access = app.auth.issue(rec.permissions, generation)?;
    Ok(HttpResponse::Ok().json(json!({
        "access_token": access,
        "token_type": "Bearer",
        "expires_in": app.auth.access_ttl(),
    })))
}

/// `POST /v1/oauth2/revoke` (admin) `{"refresh_token"}`.
async fn revoke(
    app: web::Data<AppState>,
    caller: Caller,
    body: web::Bytes,
) -> ApiResult<HttpResponse> {
    caller.require(auth::ADMIN)?;
    let t = refresh_body(&body)?;
    if !app.store.revoke_refresh(&auth::token_digest(&t)).await? {
        return Err(ApiError::BadRequest(
            "Invalid refresh token: unknown or already revoked".into(),
        ));
    }
    Ok(HttpResponse::Ok().json(json!({"status": "OK"})))
}

fn client_out(r: &ClientRecord) -> Value {
    let p = &r.permissions;
    let mut out = json!({
        "client_id": p.client_id,
        "role": p.role,
        "max_priority": p.max_priority,
        "allowed_queues": p.allowed_queues,
        "max_reservation_time": p.max_reservation_time,
        "email": r.email,
    });
    // Our additions, for agent clients only.
    if p.role == Role::Agent {
        out["agent_id"] = json!(r.agent_id.as_deref().unwrap_or(&p.client_id));
        out["agent_queues"] = json!(r.agent_queues);
    }
    out
}

fn check_client_id(id: &str) -> ApiResult<()> {
    let ok = !id.is_empty()
        && id.len() <= 200
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.@".contains(c));
    if ok {
        Ok(())
    } else {
        Err(ApiError::Validation(ValidationError::new(
            "client_id",
            format!(
                "'{id}' is not a valid client id: 1 to 200 letters, digits, '_', '-', '.', '@'"
            ),
        )))
    }
}

async fn list_clients(app: web::Data<AppState>, caller: Caller) -> ApiResult<HttpResponse> {
    caller.require(auth::ADMIN_MANAGER)?;
    let mut out = Vec::new();
    for id in app.store.client_ids().await? {
        if let Some(r) = app.store.client(&id).await? {
            out.push(client_out(&r));
        }
    }
    Ok(HttpResponse::Ok().json(out))
}

fn no_client(id: &str) -> ApiError {
    ApiError::Json(StatusCode::NOT_FOUND, format!("Client '{id}' not found"))
}

async fn get_client(
    app: web::Data<AppState>,
    caller: Caller,
    id: web::Path<String>,
) -> ApiResult<HttpResponse> {
    caller.require(auth::ADMIN_MANAGER)?;
    let r = app.store.client(&id).await?.ok_or_else(|| no_client(&id))?;
    Ok(HttpResponse::Ok().json(client_out(&r)))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientIn {
    client_secret: Option<String>,
    max_priority: Option<BTreeMap<String, i64>>,
    max_reservation_time: Option<BTreeMap<String, u64>>,
    role: Option<String>,
    email: Option<String>,
    /// Ours: the agent an agent client stands for (default: the client id).
    agent_id: Option<String>,
    /// Ours: the queues an agent client may serve (default: those it registers).
    agent_queues: Option<Vec<String>>,
}

/// `PUT /v1/client-permissions/<id>` (admin, manager): creates or updates a client.
async fn put_client(
    app: web::Data<AppState>,
    caller: Caller,
    id: web::Path<String>,
    body: web::Bytes,
) -> ApiResult<HttpResponse> {
    caller.require(auth::ADMIN_MANAGER)?;
    let id = id.into_inner();
    check_client_id(&id)?;
    let c: ClientIn = typed_body(&body)?;
    if id == app.settings.admin_id {
        return Err(ApiError::Json(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "Cannot edit the bootstrap administrator '{id}' (set TESTFLINGER_ADMIN_SECRET instead)"
            ),
        ));
    }
    let role = match c.role.as_deref() {
        Some(r) => Some(
            r.parse::<Role>()
                .map_err(|e| ApiError::Validation(ValidationError::new("role", e)))?,
        ),
        None => None,
    };
    if let Some(s) = &c.client_secret
        && s.chars().count() < 15
    {
        return Err(ApiError::Validation(ValidationError::new(
            "client_secret",
            format!(
                "is {} characters long; at least 15 are needed",
                s.chars().count()
            ),
        )));
    }
    if let Some(e) = &c.email
        && (!e.contains('@') || e.chars().any(char::is_whitespace))
    {
        return Err(ApiError::Validation(ValidationError::new(
            "email",
            format!("'{e}' is not an email address"),
        )));
    }
    let existing = app.store.client(&id).await?;
    let mine = caller.role();
    if caller.enabled {
        if let Some(r) = role
            && !mine.may_grant(r)
        {
            return Err(ApiError::Json(
                StatusCode::FORBIDDEN,
                format!("a {} cannot grant the role {}", mine.as_str(), r.as_str()),
            ));
        }
        if let Some(e) = &existing
            && !mine.may_grant(e.permissions.role)
        {
            return Err(ApiError::Json(
                StatusCode::FORBIDDEN,
                format!(
                    "a {} cannot edit a client whose role is {}",
                    mine.as_str(),
                    e.permissions.role.as_str()
                ),
            ));
        }
    }
    if existing.is_none() && c.client_secret.is_none() {
        return Err(ApiError::Validation(ValidationError::new(
            "client_secret",
            "is required when creating a client",
        )));
    }
    let final_role = role
        .or(existing.as_ref().map(|e| e.permissions.role))
        .unwrap_or(Role::Contributor);
    if (c.agent_id.is_some() || c.agent_queues.is_some()) && final_role != Role::Agent {
        return Err(ApiError::Validation(ValidationError::new(
            if c.agent_id.is_some() {
                "agent_id"
            } else {
                "agent_queues"
            },
            format!(
                "only an agent client has an agent identity; this client's role is {}",
                final_role.as_str()
            ),
        )));
    }
    if let Some(a) = &c.agent_id
        && (a.len() > 200 || a.chars().any(char::is_control))
    {
        return Err(ApiError::Validation(ValidationError::new(
            "agent_id",
            "must be at most 200 printable characters (empty: the client id)",
        )));
    }
    if let Some(qs) = &c.agent_queues {
        for q in qs {
            testflinger_common::queue::validate_queue_name(q).map_err(|e| {
                ApiError::Validation(ValidationError::new("agent_queues", format!("'{q}': {e}")))
            })?;
        }
    }
    // Only an admin records which agent a credential stands for (a manager could
    // otherwise hand an agent token another device's identity).
    if caller.enabled && c.agent_id.is_some() && mine != Role::Admin {
        return Err(ApiError::Json(
            StatusCode::FORBIDDEN,
            "only an admin may record the agent_id of an agent client".into(),
        ));
    }
    let secret_hash = match c.client_secret {
        Some(s) => Some(app.auth.hash(s).await?),
        None => None,
    };
    let update = ClientUpdate {
        secret_hash,
        role: role.or(existing.is_none().then_some(Role::Contributor)),
        max_priority: c.max_priority,
        max_reservation_time: c.max_reservation_time,
        email: c.email,
        agent_id: c.agent_id,
        agent_queues: c.agent_queues,
    };
    app.store.put_client(&id, &update).await?;
    tracing::info!(client_id = %id, by = caller.client_id().unwrap_or("anonymous"), "client created or changed: its earlier tokens are revoked");
    let verb = if existing.is_some() {
        "Updated"
    } else {
        "Created"
    };
    Ok(HttpResponse::Ok()
        .content_type("text/plain; charset=utf-8")
        .body(format!("{verb} permissions for client '{id}'")))
}

/// `DELETE /v1/client-permissions/<id>` (admin).
async fn delete_client(
    app: web::Data<AppState>,
    caller: Caller,
    id: web::Path<String>,
) -> ApiResult<HttpResponse> {
    caller.require(auth::ADMIN)?;
    if *id == app.settings.admin_id {
        return Err(ApiError::Json(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("Cannot delete the bootstrap administrator '{id}'"),
        ));
    }
    if !app.store.delete_client(&id).await? {
        return Err(no_client(&id));
    }
    Ok(ok_text())
}

async fn list_restricted(app: web::Data<AppState>) -> ApiResult<HttpResponse> {
    let out: Vec<Value> = app
        .store
        .restricted_queues()
        .await?
        .into_iter()
        .map(|(q, owners)| json!({"queue": q, "owners": owners}))
        .collect();
    Ok(HttpResponse::Ok().json(out))
}

fn not_restricted(q: &str) -> ApiError {
    ApiError::Json(
        StatusCode::NOT_FOUND,
        format!("Restricted queue '{q}' not found"),
    )
}

async fn get_restricted(app: web::Data<AppState>, q: web::Path<String>) -> ApiResult<HttpResponse> {
    if !app.store.is_restricted(&q).await? {
        return Err(not_restricted(&q));
    }
    let owners = app.store.restricted_owners(&q).await?;
    Ok(HttpResponse::Ok().json(json!({"queue": *q, "owners": owners})))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RestrictIn {
    client_id: String,
}

fn restrict_body(body: &[u8]) -> ApiResult<String> {
    let r: RestrictIn = typed_body(body)?;
    if r.client_id.is_empty() {
        return Err(ApiError::BadRequest("client_id must not be empty".into()));
    }
    Ok(r.client_id)
}

/// `POST /v1/restricted-queues/<q>` (admin, manager) `{"client_id"}`: restricts the
/// queue and lets that client use it. 404 if the client is unknown or no agent serves
/// the queue.
async fn post_restricted(
    app: web::Data<AppState>,
    caller: Caller,
    q: web::Path<String>,
    body: web::Bytes,
) -> ApiResult<HttpResponse> {
    caller.require(auth::ADMIN_MANAGER)?;
    let client = restrict_body(&body)?;
    if app.store.client(&client).await?.is_none() {
        return Err(no_client(&client));
    }
    if crate::agents::agents_on_queue(&app.store, &q)
        .await?
        .is_empty()
    {
        return Err(ApiError::Json(
            StatusCode::NOT_FOUND,
            format!("Queue '{q}' does not exist: no agent serves it"),
        ));
    }
    app.store.restrict_queue(&q, &client).await?;
    Ok(ok_text())
}

/// `DELETE /v1/restricted-queues/<q>` (admin, manager): lifts the restriction.
async fn delete_restricted(
    app: web::Data<AppState>,
    caller: Caller,
    q: web::Path<String>,
    body: web::Bytes,
) -> ApiResult<HttpResponse> {
    caller.require(auth::ADMIN_MANAGER)?;
    restrict_body(&body)?;
    if !app.store.unrestrict_queue(&q).await? {
        return Err(not_restricted(&q));
    }
    Ok(ok_text())
}
