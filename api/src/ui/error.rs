//! A page's failure ([`UiError`]), answered as an HTML error page with its status.

use super::views::{Chrome, ErrorPage};
use crate::error::ApiError;
use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use askama::Template;

/// A page's failure, shown as an HTML page with the right status.
#[derive(Debug)]
pub enum UiError {
    /// 400: a filter or id is wrong; the message names it, what was given and what is
    /// accepted.
    BadRequest(String),
    /// 404: no such job, agent or queue.
    NotFound(String),
    /// 403: the viewer may not do this.
    Forbidden(String),
    /// Redis down (503) or our fault (500).
    Api(ApiError),
}

impl std::fmt::Display for UiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UiError::BadRequest(m) | UiError::NotFound(m) | UiError::Forbidden(m) => f.write_str(m),
            UiError::Api(e) => e.fmt(f),
        }
    }
}

impl From<ApiError> for UiError {
    fn from(e: ApiError) -> Self {
        UiError::Api(e)
    }
}

/// The web UI's pages map the store's errors as the API does.
impl From<crate::store::StoreError> for UiError {
    fn from(e: crate::store::StoreError) -> Self {
        UiError::Api(e.into())
    }
}

impl From<askama::Error> for UiError {
    fn from(e: askama::Error) -> Self {
        UiError::Api(ApiError::Internal(
            anyhow::Error::new(e).context("template rendering failed"),
        ))
    }
}

impl ResponseError for UiError {
    fn status_code(&self) -> StatusCode {
        match self {
            UiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            UiError::NotFound(_) => StatusCode::NOT_FOUND,
            UiError::Forbidden(_) => StatusCode::FORBIDDEN,
            UiError::Api(e) => e.status_code(),
        }
    }

    fn error_response(&self) -> HttpResponse {
        let status = self.status_code();
        let message = match self {
            UiError::Api(ApiError::Internal(e)) => {
                tracing::error!(error = ?e, "web UI page failed");
                "Internal server error (see the server log)".to_string()
            }
            other => other.to_string(),
        };
        let page = ErrorPage {
            page: Chrome::new(""),
            status: status.as_u16(),
            reason: status.canonical_reason().unwrap_or("Error"),
            message,
        };
        match page.render() {
            Ok(body) => HttpResponse::build(status)
                .content_type("text/html; charset=utf-8")
                .body(body),
            Err(_) => HttpResponse::build(status)
                .content_type("text/plain; charset=utf-8")
                .body(page.message),
        }
    }
}
