//! The v1 HTTP API: upstream Testflinger's routes, plus our lease routes and live log
//! stream beside them.

pub mod agents;
pub mod auth;
pub mod docs;
pub mod jobs;
pub mod lease;
pub mod metrics;
pub mod queues;
pub mod results;
pub mod secrets;

use crate::error::{ApiError, ApiResult};
use crate::state::AppState;
use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use testflinger_common::JobId;
use testflinger_common::protocol::{FenceToken, TOKEN_HEADER};
use tokio_util::io::ReaderStream;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1", web::get().to(identity))
        .route("/v1/", web::get().to(identity))
        .route("/healthz", web::get().to(healthz))
        .route("/readyz", web::get().to(readyz))
        // Upstream's CLI probes this: a 404 tells it the server has no login provider.
        .route("/oidc/auth-init", web::post().to(no_oidc))
        .configure(jobs::configure)
        .configure(lease::configure)
        .configure(results::configure)
        .configure(agents::configure)
        .configure(queues::configure)
        .configure(secrets::configure)
        .configure(auth::configure)
        .configure(docs::configure);
}

async fn identity() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; charset=utf-8")
        .body(format!("Testflinger Server v{}", env!("CARGO_PKG_VERSION")))
}

async fn healthz() -> HttpResponse {
    ok_text()
}

/// Ready when both Redis and RabbitMQ answer.
async fn readyz(app: web::Data<crate::state::AppState>) -> ApiResult<HttpResponse> {
    app.store.ping().await?;
    app.broker
        .ready()
        .await
        .map_err(|e| ApiError::Unavailable(e.to_string()))?;
    Ok(ok_text())
}

async fn no_oidc() -> HttpResponse {
    HttpResponse::NotFound()
        .content_type("text/plain; charset=utf-8")
        .body("Not found: no login provider is configured on this server\n")
}

/// Fallback for unknown routes: upstream's plain-text 404; for a documented path asked
/// with a method it does not serve, 405 with `Allow` listing the methods it does
/// (RFC 9110 section 15.5.6).
pub async fn not_found(req: HttpRequest) -> HttpResponse {
    if let Some(allow) = allowed_methods(req.path()) {
        return HttpResponse::MethodNotAllowed()
            .insert_header((actix_web::http::header::ALLOW, allow.clone()))
            .content_type("text/plain; charset=utf-8")
            .body(format!(
                "Method not allowed: {} {} (allowed: {allow})\n",
                req.method(),
                req.path()
            ));
    }
    HttpResponse::NotFound()
        .content_type("text/plain; charset=utf-8")
        .body(format!("Not found: {} {}\n", req.method(), req.path()))
}

/// The methods served on `path` (comma-separated, as in `Allow`), or `None` when no API
/// route has this path. Read from the OpenAPI document (`api/openapi.json`), which
/// `tests/api/openapi.rs` keeps equal to the registered routes; its `{path}` parameter of
/// the secrets routes spans slashes, as the route's `{path:.*}` does.
fn allowed_methods(path: &str) -> Option<&'static String> {
    use actix_web::dev::ResourceDef;
    use std::sync::OnceLock;
    static ROUTES: OnceLock<Vec<(ResourceDef, String)>> = OnceLock::new();
    let routes = ROUTES.get_or_init(|| {
        let doc: serde_json::Value =
            serde_json::from_str(docs::OPENAPI_JSON).unwrap_or(serde_json::Value::Null);
        let Some(paths) = doc.get("paths").and_then(|p| p.as_object()) else {
            return Vec::new();
        };
        paths
            .iter()
            .map(|(pattern, item)| {
                let methods: Vec<String> = ["get", "put", "post", "delete", "patch"]
                    .iter()
                    .filter(|m| item.get(**m).is_some())
                    .map(|m| m.to_ascii_uppercase())
                    .collect();
                let pattern = pattern.replace("{path}", "{path:.*}");
                (ResourceDef::new(pattern), methods.join(", "))
            })
            .collect()
    });
    routes
        .iter()
        .find(|(def, methods)| !methods.is_empty() && def.is_match(path))
        .map(|(_, methods)| methods)
}

/// Parses a job id from the path; `text` picks upstream's plain-text 400 body.
pub fn parse_id(raw: &str, text: bool) -> ApiResult<JobId> {
    raw.parse::<JobId>().map_err(|_| {
        if text {
            ApiError::Text(StatusCode::BAD_REQUEST, "Invalid job id\n".into())
        } else {
            ApiError::BadRequest(format!("Invalid job id '{raw}': expected a UUID"))
        }
    })
}

/// The fencing token of an agent write, when it carries one; 400 naming the header
/// when it is not 32 hexadecimal digits.
pub fn token(req: &HttpRequest) -> ApiResult<Option<FenceToken>> {
    match req.headers().get(TOKEN_HEADER) {
        None => Ok(None),
        Some(v) => {
            let raw = v.to_str().unwrap_or("(not text)");
            raw.parse::<FenceToken>()
                .map(Some)
                .map_err(|e| ApiError::BadRequest(format!("{TOKEN_HEADER}: {e}")))
        }
    }
}

/// The queues the calling agent may serve (DESIGN.md "Who may do what"), or `None`
/// when not checked (auth off, or an admin or manager acting for any agent): those an
/// admin or manager set for its credential (`agent_queues`), else those its own agent
/// record lists (what it registered).
pub async fn served_queues(
    app: &AppState,
    caller: &crate::auth::Caller,
) -> ApiResult<Option<Vec<String>>> {
    let Some(me) = caller.acting_agent() else {
        return Ok(None);
    };
    if let Some(q) = &me.queues {
        return Ok(Some(q.clone()));
    }
    let rec = app.store.agent_record(&me.agent_id).await?;
    Ok(Some(
        rec.get("queues")
            .and_then(|q| serde_json::from_str::<Vec<String>>(q).ok())
            .unwrap_or_default(),
    ))
}

/// The caller's agent identity when it is checked (an `agent` token with auth on).
pub fn acting_agent_id(caller: &crate::auth::Caller) -> Option<&str> {
    caller.acting_agent().map(|a| a.agent_id.as_str())
}

/// Parses a query string into `T` with `serde_html_form` (a well-kept parser: `+` and
/// `%XX` decoding, repeated keys `?tags=a&tags=b` into lists); single-valued fields are
/// read with [`last`]. 400 naming the problem.
pub fn serde_html_form<T: serde::de::DeserializeOwned>(req: &HttpRequest) -> ApiResult<T> {
    serde_html_form::from_str(req.query_string())
        .map_err(|e| ApiError::BadRequest(format!("invalid query: {e}")))
}

/// A single-valued query field (`#[serde(default, deserialize_with = "last")]`): when its
/// key is repeated, the last value counts (as before: clients append overrides).
pub fn last<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    use serde::Deserialize;
    Ok(Vec::<String>::deserialize(d)?.pop())
}

/// Streams a stored file, or 204 when there is none.
pub async fn stream_file(
    app: &AppState,
    kind: crate::files::Kind,
    id: &str,
    content_type: &str,
    content_encoding: Option<&str>,
) -> ApiResult<HttpResponse> {
    let file = match tokio::fs::File::open(app.files.path(kind, id)).await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(ApiError::NoContent),
        Err(e) => return Err(e.into()),
    };
    stream_open_file(file, content_type, content_encoding).await
}

/// Streams job `id`'s artifact (gzip tar, sent undecoded as upstream does), or 204.
pub async fn stream_artifact(app: &AppState, id: &str) -> ApiResult<HttpResponse> {
    let file = app
        .files
        .open_artifact(&app.store, id)
        .await?
        .ok_or(ApiError::NoContent)?;
    stream_open_file(file, "application/x-tar", Some("gzip")).await
}

async fn stream_open_file(
    file: tokio::fs::File,
    content_type: &str,
    content_encoding: Option<&str>,
) -> ApiResult<HttpResponse> {
    let len = file.metadata().await?.len();
    let mut resp = HttpResponse::Ok();
    resp.content_type(content_type.to_string());
    if let Some(enc) = content_encoding {
        resp.insert_header(("Content-Encoding", enc.to_string()));
    }
    resp.no_chunking(len);
    Ok(resp.streaming(ReaderStream::with_capacity(file, 256 * 1024)))
}

/// Parses a JSON body with a clear 400 for malformed JSON.
pub fn json_body(body: &[u8]) -> ApiResult<serde_json::Value> {
    if body.is_empty() {
        return Err(ApiError::BadRequest(
            "request body is empty; expected JSON".into(),
        ));
    }
    serde_json::from_slice(body).map_err(|e| ApiError::BadRequest(format!("malformed JSON: {e}")))
}

/// Deserializes a JSON body into `T`, answering 422 in upstream's shape with the field.
/// Every typed body is a JSON object: anything else is refused here, as serde would
/// otherwise read a struct from an array, field by field in order.
pub fn typed_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> ApiResult<T> {
    let value = json_body(body)?;
    if !value.is_object() {
        return Err(ApiError::Validation(
            testflinger_common::ValidationError::new(
                "",
                format!(
                    "the body must be a JSON object, got {}",
                    testflinger_common::job::kind_of(&value)
                ),
            ),
        ));
    }
    testflinger_common::job::deserialize(value).map_err(ApiError::Validation)
}

pub fn ok_text() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; charset=utf-8")
        .body("OK")
}
