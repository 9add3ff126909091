//! Errors at the HTTP edge, sorted by what the caller can do about them.

use crate::store::StoreError;
use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde_json::json;
use testflinger_broker::BrokerError;
use testflinger_common::ValidationError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is wrong: fix it (400, JSON body).
    #[error("{0}")]
    BadRequest(String),
    /// The body failed schema validation (422, upstream's shape).
    #[error("validation error: {0}")]
    Validation(ValidationError),
    /// A plain-text answer with the given status, as upstream sends on some routes.
    #[error("{1}")]
    Text(StatusCode, String),
    /// JSON `{"message": ..}` with the given status.
    #[error("{1}")]
    Json(StatusCode, String),
    /// Nothing here (204, as upstream answers for unknown ids).
    #[error("no content")]
    NoContent,
    /// The fencing token is stale: the job has moved on (409).
    #[error("{0}")]
    Stale(String),
    /// A body larger than allowed (413).
    #[error("{0}")]
    TooLarge(String),
    /// Too many requests of this kind from this caller: retry after the given seconds
    /// (429 with `Retry-After`).
    #[error("{1}")]
    TooManyRequests(u64, String),
    /// A dependency is down: retry later (503). Nothing was written.
    #[error("{0}")]
    Unavailable(String),
    /// A message was sent to the broker but not confirmed: it may be queued. Callers
    /// that recorded the job keep it and let the outbox publish it again; elsewhere 503.
    #[error("{0}")]
    Unconfirmed(String),
    /// A write names a job this server does not have (404).
    #[error(
        "Job {0} not found: this server has no such job (never submitted, or removed after TESTFLINGER_RETENTION); the write was not stored"
    )]
    JobNotFound(String),
    /// Our fault: opaque to the caller, cause kept in the log (500).
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

/// The one mapping of the store's errors to answers, at the edge: each keeps the status
/// and message the API gave when the store built them itself.
impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(_) => ApiError::Unavailable(e.to_string()),
            StoreError::Redis(r) => {
                ApiError::Internal(anyhow::Error::new(r).context("redis command failed"))
            }
            StoreError::JobNotFound(id) => ApiError::JobNotFound(id),
            StoreError::Stale(_) | StoreError::TokenRequired(_) => ApiError::Stale(e.to_string()),
            StoreError::NotHolder { .. } | StoreError::QueueNotServed { .. } => {
                ApiError::Json(StatusCode::FORBIDDEN, e.to_string())
            }
            StoreError::BadState(v) => ApiError::Validation(v),
            StoreError::UnexpectedReply { .. }
            | StoreError::BadRecord { .. }
            | StoreError::Random
            | StoreError::Serialization(_) => ApiError::Internal(anyhow::Error::new(e)),
        }
    }
}

impl From<BrokerError> for ApiError {
    fn from(e: BrokerError) -> Self {
        match e {
            BrokerError::Unavailable(_) | BrokerError::Refused(_) => {
                ApiError::Unavailable(format!("job not queued: {e}"))
            }
            BrokerError::Unconfirmed(_) => ApiError::Unconfirmed(format!("job not confirmed: {e}")),
            BrokerError::Protocol(_) => {
                ApiError::Internal(anyhow::Error::new(e).context("broker protocol error"))
            }
        }
    }
}

impl From<std::io::Error> for ApiError {
    fn from(e: std::io::Error) -> Self {
        ApiError::Internal(anyhow::Error::new(e).context("file store"))
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Validation(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Text(s, _) | ApiError::Json(s, _) => *s,
            ApiError::NoContent => StatusCode::NO_CONTENT,
            ApiError::JobNotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Stale(_) => StatusCode::CONFLICT,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::TooManyRequests(..) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable(_) | ApiError::Unconfirmed(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let status = self.status_code();
        match self {
            ApiError::NoContent => HttpResponse::NoContent().finish(),
            ApiError::Text(_, t) => HttpResponse::build(status)
                .content_type("text/plain; charset=utf-8")
                .body(t.clone()),
            ApiError::Validation(v) => HttpResponse::build(status).json(json!({
                "detail": v.detail(),
                "message": format!("Validation error: {v}"),
            })),
            ApiError::TooManyRequests(secs, m) => HttpResponse::build(status)
                .insert_header((
                    actix_web::http::header::RETRY_AFTER,
                    secs.max(&1).to_string(),
                ))
                .json(json!({"detail": {}, "message": m})),
            ApiError::Internal(e) => {
                tracing::error!(error = ?e, "internal error");
                HttpResponse::build(status).json(json!({
                    "detail": {}, "message": "Internal server error (see the server log)"
                }))
            }
            other => HttpResponse::build(status).json(json!({
                "detail": {}, "message": other.to_string()
            })),
        }
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
