//! The web UI: server-rendered HTML pages on upstream's paths (`/`, `/agents`,
//! `/agents/<name>`, `/jobs`, `/jobs/<id>`, `/queues`, `/queues/<name>`), askama
//! templates under `api/templates/`, a stylesheet and one small script under
//! `api/static/` (compiled into the binary).
//!
//! Every page works without JavaScript; the script only makes a job's log live (it
//! follows `GET /v1/result/<id>/log/<type>/stream`, resuming where the server-rendered
//! tail ends) and flips the job's state without a reload. Data goes through
//! [`viewer::Viewer`], the one point that decides what a viewer may see. Reads are
//! bounded pages of sorted-set indexes ([`crate::store::views`]).
//!
//! No page holds an inline script, style or event handler: every HTML answer carries a
//! strict `Content-Security-Policy` ([`headers`]).
//!
//! One file per concern: [`overview`], [`agents`], [`jobs`] (the list, a job's page and
//! the summary its script polls), [`queues`], [`cancel`] (the job page's form), [`query`]
//! (query strings and ids, the 400s), [`error`] (the error pages) and [`views`] (what
//! the templates get).

mod agents;
mod cancel;
mod error;
pub mod headers;
mod jobs;
mod overview;
mod query;
mod queues;
pub mod viewer;
mod views;

pub use error::UiError;
pub use views::human_secs;

use crate::store::views as data;
use actix_web::http::header;
use actix_web::{HttpResponse, web};
use askama::Template;
use viewer::Viewer;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/", web::get().to(overview::overview))
        .route("/agents", web::get().to(agents::agents))
        .route("/agents/{name}", web::get().to(agents::agent))
        .route("/jobs", web::get().to(jobs::jobs))
        .route("/jobs/{id}", web::get().to(jobs::job))
        .route("/jobs/{id}/summary.json", web::get().to(jobs::job_summary))
        .route("/jobs/{id}/cancel", web::post().to(cancel::cancel))
        .route("/queues", web::get().to(queues::queues))
        .route("/queues/{name}", web::get().to(queues::queue))
        .route("/static/ui.css", web::get().to(css))
        .route("/static/live-log.js", web::get().to(js));
}

const CSS: &str = include_str!("../../static/ui.css");
const JS: &str = include_str!("../../static/live-log.js");

/// Most rows a list page shows.
pub const MAX_LIMIT: usize = 200;
const DEFAULT_LIMIT: usize = 50;

type Page = Result<HttpResponse, UiError>;

fn html(t: &impl Template) -> Page {
    Ok(HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .body(t.render()?))
}

async fn css() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/css; charset=utf-8")
        .insert_header((header::CACHE_CONTROL, "public, max-age=300"))
        .body(CSS)
}

async fn js() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/javascript; charset=utf-8")
        .insert_header((header::CACHE_CONTROL, "public, max-age=300"))
        .body(JS)
}

/// The rows of jobs whose queue the viewer may see.
fn visible_jobs(viewer: &Viewer, rows: Vec<data::JobRow>) -> Vec<data::JobRow> {
    rows.into_iter()
        .filter(|r| viewer.may_see_queue(&r.queue))
        .collect()
}

/// The agents the viewer may see.
async fn visible_agents(
    app: &crate::state::AppState,
    viewer: &Viewer,
) -> Result<Vec<data::AgentRow>, UiError> {
    Ok(data::agents(&app.store)
        .await?
        .into_iter()
        .filter(|a| viewer.may_see_agent(&a.name))
        .collect())
}
