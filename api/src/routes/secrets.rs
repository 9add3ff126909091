//! `/v1/secrets/<client_id>/<path>`: the secrets store. A job's `test_data.secrets` maps
//! environment variable names to secret paths; when an agent claims the job the paths are
//! replaced by the values (an unknown path becomes an empty string, as upstream), so
//! values never sit in the job definition, its queue message or `GET /v1/job/<id>`.
//!
//! With auth on (`JWT_SIGNING_KEY`), secrets are namespaced by the authenticated client:
//! a client writes only under its own id (403 otherwise, 401 anonymous), and a job reads
//! its owner's namespace. With auth off every caller is anonymous and jobs read the
//! `anonymous` namespace: write secrets to `/v1/secrets/anonymous/<path>`.

use super::{ok_text, typed_body};
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;
use actix_web::{HttpResponse, web};
use serde_json::json;

pub use crate::jobs::claim::ANONYMOUS;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route(
        "/v1/secrets/{client_id}/{path:.*}",
        web::put().to(put_secret),
    )
    .route(
        "/v1/secrets/{client_id}/{path:.*}",
        web::delete().to(delete_secret),
    );
}

/// Longest `expire_after` accepted, in seconds (ten years of 365 days): a bound of ours,
/// so that the expiry time is always a representable date.
pub const MAX_EXPIRE_AFTER: u64 = 10 * 365 * 24 * 3600;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SecretIn {
    value: String,
    #[serde(default)]
    expire_after: Option<u64>,
    #[serde(default)]
    ephemeral: Option<bool>,
}

fn check_path(client: &str, path: &str) -> ApiResult<()> {
    let seg_ok = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    };
    if !seg_ok(client) {
        return Err(ApiError::Validation(
            testflinger_common::ValidationError::new(
                "client_id",
                "letters, digits, '_' and '-' only",
            ),
        ));
    }
    if !path.split('/').all(seg_ok) {
        return Err(ApiError::Validation(
            testflinger_common::ValidationError::new(
                "path",
                format!(
                    "'{path}' is not a valid secret path (segments of letters, digits, '_' and '-')"
                ),
            ),
        ));
    }
    Ok(())
}

async fn put_secret(
    app: web::Data<AppState>,
    caller: crate::auth::Caller,
    p: web::Path<(String, String)>,
    body: web::Bytes,
) -> ApiResult<HttpResponse> {
    caller.require(crate::auth::USERS)?;
    let (client, path) = p.into_inner();
    check_path(&client, &path)?;
    check_namespace(&caller, &client)?;
    let s: SecretIn = typed_body(&body)?;
    if s.value.is_empty() {
        return Err(ApiError::Validation(
            testflinger_common::ValidationError::new("value", "must not be empty"),
        ));
    }
    if s.expire_after.is_some() && s.ephemeral == Some(true) {
        return Err(ApiError::Validation(
            testflinger_common::ValidationError::new(
                "expire_after",
                "cannot be combined with ephemeral",
            ),
        ));
    }
    if let Some(secs) = s.expire_after
        && !(1..=MAX_EXPIRE_AFTER).contains(&secs)
    {
        return Err(ApiError::Validation(
            testflinger_common::ValidationError::new(
                "expire_after",
                format!("got {secs}; accepted: 1 to {MAX_EXPIRE_AFTER} seconds (ten years)"),
            ),
        ));
    }
    let record = json!({"value": s.value, "ephemeral": s.ephemeral.unwrap_or(false)}).to_string();
    let ttl = s.expire_after.unwrap_or(app.settings.retention);
    app.store.put_secret(&client, &path, &record, ttl).await?;
    let expires_at = s.expire_after.map(|secs| {
        (chrono::Utc::now() + chrono::Duration::seconds(secs as i64))
            .format("%Y-%m-%dT%H:%M:%SZ")
            .to_string()
    });
    Ok(HttpResponse::Ok().json(json!({"expires_at": expires_at})))
}

async fn delete_secret(
    app: web::Data<AppState>,
    caller: crate::auth::Caller,
    p: web::Path<(String, String)>,
) -> ApiResult<HttpResponse> {
    caller.require(crate::auth::USERS)?;
    let (client, path) = p.into_inner();
    check_path(&client, &path)?;
    check_namespace(&caller, &client)?;
    app.store.delete_secret(&client, &path).await?;
    Ok(ok_text())
}

/// With auth on, a client writes only its own namespace (upstream: 403 otherwise).
fn check_namespace(caller: &crate::auth::Caller, client: &str) -> ApiResult<()> {
    if !caller.enabled || caller.client_id() == Some(client) {
        return Ok(());
    }
    if caller.client_id().is_none() {
        return Err(ApiError::Json(
            actix_web::http::StatusCode::UNAUTHORIZED,
            "writing secrets needs an authenticated client (get a token at /v1/oauth2/token)"
                .into(),
        ));
    }
    Err(ApiError::Json(
        actix_web::http::StatusCode::FORBIDDEN,
        format!(
            "secrets of client '{client}' may be written only by that client (you are '{}')",
            caller.client_id().unwrap_or("anonymous")
        ),
    ))
}
