//! `/v1/secrets/<client_id>/<path>`: the secrets store. A job's `test_data.secrets` maps
//! environment variable names to secret paths; when an agent claims the job the paths are
//! replaced by the values (an unknown path becomes an empty string, as upstream), so
//! values never sit in the job definition, its queue message or `GET /v1/job/<id>`.
//!
//! Without a login provider every caller is anonymous and jobs read the `anonymous`
//! namespace: write secrets to `/v1/secrets/anonymous/<path>`.

use super::{ok_text, typed_body};
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;
use actix_web::{HttpResponse, web};
use serde_json::{Value, json};

/// The namespace of jobs submitted without credentials.
pub const ANONYMOUS: &str = "anonymous";

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
    p: web::Path<(String, String)>,
    body: web::Bytes,
) -> ApiResult<HttpResponse> {
    let (client, path) = p.into_inner();
    check_path(&client, &path)?;
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
    if s.expire_after == Some(0) {
        return Err(ApiError::Validation(
            testflinger_common::ValidationError::new("expire_after", "must be at least 1"),
        ));
    }
    let key = app.store.keys.secret(&client, &path);
    let record = json!({"value": s.value, "ephemeral": s.ephemeral.unwrap_or(false)}).to_string();
    let mut c = app.store.con();
    let ttl = s.expire_after.unwrap_or(app.settings.retention);
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg(record)
        .arg("EX")
        .arg(ttl)
        .query_async(&mut c)
        .await?;
    let expires_at = s.expire_after.map(|secs| {
        (chrono::Utc::now() + chrono::Duration::seconds(secs as i64))
            .format("%Y-%m-%dT%H:%M:%SZ")
            .to_string()
    });
    Ok(HttpResponse::Ok().json(json!({"expires_at": expires_at})))
}

async fn delete_secret(
    app: web::Data<AppState>,
    p: web::Path<(String, String)>,
) -> ApiResult<HttpResponse> {
    let (client, path) = p.into_inner();
    check_path(&client, &path)?;
    let mut c = app.store.con();
    let _: i64 = redis::cmd("DEL")
        .arg(app.store.keys.secret(&client, &path))
        .query_async(&mut c)
        .await?;
    Ok(ok_text())
}

/// Replaces the secret paths of a claimed job by their values (single-use secrets are
/// consumed). Unknown paths become empty strings.
pub async fn resolve(app: &AppState, job: &mut Value, claim: &str) -> ApiResult<()> {
    let Some(secrets) = job
        .pointer_mut("/test_data/secrets")
        .and_then(Value::as_object_mut)
    else {
        return Ok(());
    };
    for (_, v) in secrets.iter_mut() {
        let path = v.as_str().unwrap_or_default().to_string();
        let raw = app.store.take_secret(ANONYMOUS, &path, claim).await?;
        let rec: Value = raw
            .and_then(|r| serde_json::from_str(&r).ok())
            .unwrap_or(Value::Null);
        *v = Value::String(rec["value"].as_str().unwrap_or_default().to_string());
    }
    Ok(())
}
