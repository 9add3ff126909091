//! `POST /jobs/<id>/cancel`: the job page's cancel form.

use super::query::parse_job_id;
use super::{Page, UiError, Viewer, data};
use crate::state::AppState;
use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};

/// `POST /jobs/<id>/cancel` (the job page's form): cancels as the API's cancel action
/// does, then goes back to the job page (303). A cross-site form is refused (403). With
/// auth on, the caller's credentials (`Authorization` header) decide as for the API:
/// only the job's owner, a manager or an admin may cancel an owned job (401/403).
pub async fn cancel(
    app: web::Data<AppState>,
    req: HttpRequest,
    caller: crate::auth::Caller,
    id: web::Path<String>,
) -> Page {
    let viewer = Viewer::from_request(&req, &app);
    let id = parse_job_id(&id)?;
    if !same_origin(&req) {
        return Err(UiError::Forbidden(
            "Cancel refused: the form was sent from another site.".into(),
        ));
    }
    let rows = data::job_rows(&app.store, std::slice::from_ref(&id)).await?;
    let Some(r) = rows.into_iter().find(|r| viewer.may_see_queue(&r.queue)) else {
        return Err(UiError::NotFound(format!("No job with id {id}.")));
    };
    if !viewer.may_cancel(&r.queue, None) {
        return Err(UiError::Forbidden(format!("You may not cancel job {id}.")));
    }
    // Already ended: nothing to do; the job page shows how it ended.
    let job_id = id
        .parse::<testflinger_common::JobId>()
        .map_err(|_| UiError::BadRequest(format!("'{id}' is not a job id")))?;
    app.jobs.cancel(&caller, &job_id).await?;
    Ok(HttpResponse::SeeOther()
        .insert_header((header::LOCATION, format!("/jobs/{id}")))
        .finish())
}

/// No `Origin` header (same-site navigation in older browsers, curl), or one whose
/// host is the request's `Host`.
fn same_origin(req: &HttpRequest) -> bool {
    let Some(origin) = req.headers().get(header::ORIGIN) else {
        return true;
    };
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default();
    origin
        .to_str()
        .ok()
        .and_then(|o| o.split_once("://"))
        .is_some_and(|(_, h)| h == host)
}
