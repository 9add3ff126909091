//! The [`Caller`] of a request, read from its `Authorization` header and checked
//! against the client's record on every request (revocation, the agent identity): the
//! extractor every route and page takes.

use crate::auth::{AgentIdentity, Caller, Role};
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;
use actix_web::http::StatusCode;
use actix_web::{FromRequest, HttpRequest, dev::Payload, web};
use futures_util::future::LocalBoxFuture;

impl Caller {
    /// The caller given a raw `Authorization` header value (or none), checked against
    /// the client's record: a token of a client deleted or changed since it was issued
    /// (its generation moved) is refused with 401, as an expired one is.
    pub async fn authenticate(app: &AppState, header: Option<&str>) -> ApiResult<Caller> {
        let (mut caller, generation) = Caller::from_authorization(&app.auth, header)?;
        let Some(p) = &caller.perms else {
            return Ok(caller);
        };
        let Some(current) = app.store.client_token_state(&p.client_id).await? else {
            return Err(ApiError::Json(
                StatusCode::UNAUTHORIZED,
                format!(
                    "Token has been revoked: client '{}' no longer exists",
                    p.client_id
                ),
            ));
        };
        if current.generation != generation {
            return Err(ApiError::Json(
                StatusCode::UNAUTHORIZED,
                format!(
                    "Token has been revoked: client '{}' was changed since it was issued; get a new one at /v1/oauth2/token",
                    p.client_id
                ),
            ));
        }
        if p.role == Role::Agent {
            caller.agent = Some(AgentIdentity {
                agent_id: current.agent_id.unwrap_or_else(|| p.client_id.clone()),
                queues: current.agent_queues,
            });
        }
        Ok(caller)
    }
}

impl FromRequest for Caller {
    type Error = ApiError;
    type Future = LocalBoxFuture<'static, Result<Caller, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let Some(app) = req.app_data::<web::Data<crate::state::AppState>>().cloned() else {
            return Box::pin(async {
                Err(ApiError::Internal(anyhow::anyhow!("no application state")))
            });
        };
        let header = req
            .headers()
            .get(actix_web::http::header::AUTHORIZATION)
            .map(|v| v.to_str().unwrap_or("(not text)").to_string());
        Box::pin(async move { Caller::authenticate(&app, header.as_deref()).await })
    }
}
