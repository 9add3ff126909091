//! The web UI: server-rendered HTML pages on upstream's paths (`/`, `/agents`,
//! `/agents/<name>`, `/jobs`, `/jobs/<id>`, `/queues`, `/queues/<name>`), askama
//! templates under `api/templates/`, a stylesheet and one small script under
//! `api/static/` (compiled into the binary).
//!
//! Every page works without JavaScript; the script only makes a job's log live (it
//! follows `GET /v1/result/<id>/log/<type>/stream`, resuming where the server-rendered
//! tail ends) and flips the job's state without a reload. Data goes through
//! [`viewer::Viewer`], the one point that decides what a viewer may see. Reads are
//! bounded pages of sorted-set indexes ([`data`]).
//!
//! No page holds an inline script, style or event handler: every HTML answer carries a
//! strict `Content-Security-Policy` ([`headers`]).

pub mod headers;
pub mod viewer;
mod views;

use crate::error::ApiError;
use crate::state::AppState;
use crate::store::views as data;
use actix_web::http::StatusCode;
use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, ResponseError, web};
use askama::Template;
use data::JobFilter;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use testflinger_common::{AgentState, JobId, JobState, Phase};
use viewer::Viewer;
use views::*;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/", web::get().to(overview))
        .route("/agents", web::get().to(agents))
        .route("/agents/{name}", web::get().to(agent))
        .route("/jobs", web::get().to(jobs))
        .route("/jobs/{id}", web::get().to(job))
        .route("/jobs/{id}/summary.json", web::get().to(job_summary))
        .route("/jobs/{id}/cancel", web::post().to(cancel))
        .route("/queues", web::get().to(queues))
        .route("/queues/{name}", web::get().to(queue))
        .route("/static/ui.css", web::get().to(css))
        .route("/static/live-log.js", web::get().to(js));
}

const CSS: &str = include_str!("../../static/ui.css");
const JS: &str = include_str!("../../static/live-log.js");

/// Most rows a list page shows.
pub const MAX_LIMIT: usize = 200;
const DEFAULT_LIMIT: usize = 50;
/// Most log fragments, and bytes of them, a job page renders per log type (the newest);
/// the script streams what comes after.
const LOG_TAIL: usize = 1000;
const LOG_TAIL_BYTES: usize = 512 * 1024;

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

/// Parses a query string with repeated keys; 400 page naming the problem.
fn query<T: serde::de::DeserializeOwned>(req: &HttpRequest) -> Result<T, UiError> {
    crate::routes::jobs::serde_html_form(req).map_err(|e| UiError::BadRequest(e.to_string()))
}

/// Non-empty values, a comma-separated value split into its items.
fn items(v: &[String]) -> Vec<String> {
    v.iter()
        .flat_map(|s| s.split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

fn one(field: &str, v: &[String]) -> Result<Option<String>, UiError> {
    let v = items(v);
    match v.as_slice() {
        [] => Ok(None),
        [x] => Ok(Some(x.clone())),
        _ => Err(UiError::BadRequest(format!(
            "{field}: give one value, not {} ({})",
            v.len(),
            v.join(", ")
        ))),
    }
}

fn number(field: &str, v: Option<&str>, default: usize, max: usize) -> Result<usize, UiError> {
    match v.map(str::trim).filter(|s| !s.is_empty()) {
        None => Ok(default),
        Some(s) => s
            .parse::<usize>()
            .ok()
            .filter(|n| *n <= max)
            .ok_or_else(|| {
                UiError::BadRequest(format!(
                    "{field}: '{s}' is not accepted; expected a whole number from 0 to {max}"
                ))
            }),
    }
}

fn valid_queue(field: &str, q: &str) -> Result<(), UiError> {
    testflinger_common::queue::validate_queue_name(q)
        .map_err(|e| UiError::BadRequest(format!("{field}: '{q}' is not a valid queue name: {e}")))
}

fn parse_job_id(raw: &str) -> Result<String, UiError> {
    raw.parse::<JobId>()
        .map(|id| id.to_string())
        .map_err(|_| UiError::BadRequest(format!("Invalid job id '{raw}': expected a UUID")))
}

// ---------------------------------------------------------------------------- pages

async fn overview(app: web::Data<AppState>, req: HttpRequest) -> Page {
    let viewer = Viewer::from_request(&req, &app);
    let agents: Vec<_> = data::agents(&app.store)
        .await?
        .into_iter()
        .filter(|a| viewer.may_see_agent(&a.name))
        .collect();
    let running = data::running_jobs(&app.store, &agents).await?;
    let mut queues: Vec<_> = data::queues(&app.store, &agents, &running)
        .await?
        .into_iter()
        .filter(|q| viewer.may_see_queue(&q.name))
        .collect();
    let queue_count = queues.len();
    queues.sort_by(|a, b| {
        (b.waiting + b.running)
            .cmp(&(a.waiting + a.running))
            .then_with(|| a.name.cmp(&b.name))
    });
    queues.truncate(10);
    let mut by_state: BTreeMap<String, usize> = BTreeMap::new();
    for a in &agents {
        *by_state.entry(a.state.clone()).or_default() += 1;
    }
    let recent = visible_jobs(
        &viewer,
        data::job_page(
            &app.store,
            &JobFilter {
                queue: None,
                tags: Vec::new(),
                states: Vec::new(),
            },
            0,
            15,
        )
        .await?
        .rows,
    );
    html(&Overview {
        page: Chrome::new("overview"),
        agent_count: agents.len(),
        by_state: by_state.into_iter().collect(),
        queue_count,
        queues: queues.iter().map(QueueView::from).collect(),
        recent: recent.iter().map(JobView::from).collect(),
        running: running.len(),
    })
}

fn visible_jobs(viewer: &Viewer, rows: Vec<data::JobRow>) -> Vec<data::JobRow> {
    rows.into_iter()
        .filter(|r| viewer.may_see_queue(&r.queue))
        .collect()
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentsQuery {
    #[serde(default)]
    state: Vec<String>,
    #[serde(default)]
    queue: Vec<String>,
    #[serde(default)]
    location: Option<String>,
    #[serde(default)]
    sort: Option<String>,
    #[serde(default)]
    order: Option<String>,
}

const AGENT_SORTS: &[&str] = &["name", "state", "location", "job", "updated"];

async fn agents(app: web::Data<AppState>, req: HttpRequest) -> Page {
    let viewer = Viewer::from_request(&req, &app);
    let q: AgentsQuery = query(&req)?;
    let states = items(&q.state);
    for s in &states {
        s.parse::<AgentState>().map_err(|e| {
            UiError::BadRequest(format!("state: {}", e.replace("AgentState", "agent state")))
        })?;
    }
    let queue = one("queue", &q.queue)?;
    if let Some(qn) = &queue {
        valid_queue("queue", qn)?;
    }
    let location = q
        .location
        .as_deref()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string);
    let sort = q
        .sort
        .as_deref()
        .filter(|s| !s.is_empty())
        .unwrap_or("name");
    if !AGENT_SORTS.contains(&sort) {
        return Err(UiError::BadRequest(format!(
            "sort: '{sort}' is not accepted; expected one of: {}",
            AGENT_SORTS.join(", ")
        )));
    }
    let desc = match q.order.as_deref().filter(|s| !s.is_empty()) {
        None | Some("asc") => false,
        Some("desc") => true,
        Some(o) => {
            return Err(UiError::BadRequest(format!(
                "order: '{o}' is not accepted; expected asc or desc"
            )));
        }
    };
    let all: Vec<_> = data::agents(&app.store)
        .await?
        .into_iter()
        .filter(|a| viewer.may_see_agent(&a.name))
        .collect();
    let total = all.len();
    let mut locations: Vec<String> = all
        .iter()
        .map(|a| a.location.clone())
        .filter(|l| !l.is_empty())
        .collect();
    locations.sort();
    locations.dedup();
    let mut shown: Vec<_> = all
        .into_iter()
        .filter(|a| states.is_empty() || states.contains(&a.state))
        .filter(|a| queue.as_ref().is_none_or(|qn| a.queues.contains(qn)))
        .filter(|a| location.as_ref().is_none_or(|l| &a.location == l))
        .collect();
    shown.sort_by(|a, b| {
        let key = |x: &data::AgentRow| match sort {
            "state" => x.state.clone(),
            "location" => x.location.clone(),
            "job" => x.job_id.clone(),
            "updated" => x.updated_at.clone(),
            _ => x.name.clone(),
        };
        key(a).cmp(&key(b)).then_with(|| a.name.cmp(&b.name))
    });
    if desc {
        shown.reverse();
    }
    let filters = AgentFilters {
        state: states.first().cloned().unwrap_or_default(),
        queue: queue.clone().unwrap_or_default(),
        location: location.clone().unwrap_or_default(),
    };
    let columns = AGENT_SORTS
        .iter()
        .map(|c| SortColumn::new(c, sort, desc, &filters.query()))
        .collect();
    html(&AgentsPage {
        page: Chrome::new("agents"),
        total,
        agents: shown.iter().map(AgentView::from).collect(),
        states: AgentState::ALL.iter().map(|s| s.as_str()).collect(),
        locations,
        filters,
        columns,
        sort: sort.to_string(),
        order: if desc { "desc" } else { "asc" },
    })
}

async fn agent(app: web::Data<AppState>, req: HttpRequest, name: web::Path<String>) -> Page {
    let viewer = Viewer::from_request(&req, &app);
    let name = name.into_inner();
    let unknown = || UiError::NotFound(format!("No agent named '{name}' is registered."));
    if name.is_empty() || name.len() > 200 || name.chars().any(char::is_control) {
        return Err(UiError::BadRequest(format!(
            "agent name: '{}' is not accepted; expected 1 to 200 printable characters",
            name.escape_debug()
        )));
    }
    if !viewer.may_see_agent(&name) {
        return Err(unknown());
    }
    let d = data::agent_detail(&app.store, &name, 20)
        .await?
        .ok_or_else(unknown)?;
    let current = if d.agent.job_id.is_empty() {
        None
    } else {
        data::job_rows(&app.store, std::slice::from_ref(&d.agent.job_id))
            .await?
            .into_iter()
            .find(|r| !r.is_terminal() && viewer.may_see_queue(&r.queue))
    };
    html(&AgentPage {
        page: Chrome::new("agents"),
        agent: AgentView::from(&d.agent),
        current: current.as_ref().map(JobView::from),
        log: d.log,
        provisions: d.provisions,
        jobs: visible_jobs(&viewer, d.jobs)
            .iter()
            .map(JobView::from)
            .collect(),
    })
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct JobsQuery {
    #[serde(default)]
    state: Vec<String>,
    #[serde(default)]
    queue: Vec<String>,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    from: Option<String>,
    #[serde(default)]
    limit: Option<String>,
}

/// `state` filter values besides the job states.
const STATE_GROUPS: &[&str] = &["active", "running", "completed"];

async fn jobs(app: web::Data<AppState>, req: HttpRequest) -> Page {
    let viewer = Viewer::from_request(&req, &app);
    let q: JobsQuery = query(&req)?;
    let states = items(&q.state);
    for s in &states {
        if JobState::parse_lenient(s).is_none() && !STATE_GROUPS.contains(&s.as_str()) {
            let accepted: Vec<&str> = JobState::ALL
                .iter()
                .map(|s| s.as_str())
                .chain(STATE_GROUPS.iter().copied())
                .collect();
            return Err(UiError::BadRequest(format!(
                "state: '{s}' is not accepted; expected one of: {}",
                accepted.join(", ")
            )));
        }
    }
    let queue = one("queue", &q.queue)?;
    if let Some(qn) = &queue {
        valid_queue("queue", qn)?;
        if !viewer.may_see_queue(qn) {
            return Err(UiError::NotFound(format!("No queue named '{qn}'.")));
        }
    }
    let tags = items(&q.tags);
    for t in &tags {
        if t.len() > 200 || t.chars().any(char::is_control) {
            return Err(UiError::BadRequest(format!(
                "tags: '{}' is not accepted; expected tags of 1 to 200 printable characters",
                t.escape_debug()
            )));
        }
    }
    let from = number("from", q.from.as_deref(), 0, usize::MAX >> 1)?;
    let limit = number("limit", q.limit.as_deref(), DEFAULT_LIMIT, MAX_LIMIT)?.max(1);
    let filter = JobFilter {
        queue: queue.clone(),
        tags: tags.clone(),
        states: states.clone(),
    };
    let page = data::job_page(&app.store, &filter, from, limit).await?;
    let filters = JobFilters {
        state: states.join(","),
        queue: queue.unwrap_or_default(),
        tags: tags.join(","),
        limit,
    };
    let next = page
        .next
        .map(|n| format!("/jobs?{}from={n}", filters.query()));
    html(&JobsPage {
        page: Chrome::new("jobs"),
        rows: visible_jobs(&viewer, page.rows)
            .iter()
            .map(JobView::from)
            .collect(),
        total: page.total,
        scanned: page.scanned,
        capped: page.capped,
        from,
        next,
        first: (from > 0).then(|| format!("/jobs?{}", filters.query())),
        states: JobState::ALL
            .iter()
            .map(|s| s.as_str())
            .chain(STATE_GROUPS.iter().copied())
            .collect(),
        filters,
    })
}

async fn job(app: web::Data<AppState>, req: HttpRequest, id: web::Path<String>) -> Page {
    let viewer = Viewer::from_request(&req, &app);
    let id = parse_job_id(&id)?;
    let unknown = || UiError::NotFound(format!("No job with id {id}."));
    let d = data::job_detail(&app.store, &id)
        .await?
        .ok_or_else(unknown)?;
    if !viewer.may_see_queue(&d.row.queue) {
        return Err(unknown());
    }
    let terminal = d.row.is_terminal();
    let (position, eta) = if d.row.state == "waiting" {
        let pos = app.store.position(&id).await?;
        let stats = data::queue_rows(
            &app.store,
            vec![d.row.queue.clone()],
            &Default::default(),
            &[],
            &[],
        )
        .await?
        .into_iter()
        .next()
        .and_then(|q| q.wait);
        let eta = match (pos, stats) {
            (Some(p), Some(s)) => Some(format!(
                "about {} (median wait {} × {} in line)",
                human_secs(s.p50 * (p as f64 + 1.0)),
                human_secs(s.p50),
                p + 1
            )),
            _ => None,
        };
        (pos.map(|p| p + 1), eta)
    } else {
        (None, None)
    };
    let mut def = d.def.clone();
    if let Some(o) = def.as_object_mut() {
        // A resubmission with the same id would be the same job (idempotent submit).
        o.remove("job_id");
    }
    let yaml = serde_saphyr::to_string(&def).unwrap_or_else(|e| format!("# cannot render: {e}"));
    let artifact = crate::routes::jobs::open_artifact(&app, &id)
        .await
        .ok()
        .flatten()
        .is_some();
    let mut logs = Vec::new();
    for (log_type, label) in [("output", "Output"), ("serial", "Serial console")] {
        let (frags, truncated) =
            crate::logs::tail(&app, &id, log_type, LOG_TAIL, LOG_TAIL_BYTES).await?;
        logs.push(LogView::new(log_type, label, frags, truncated));
    }
    let can_cancel = !terminal && viewer.may_cancel(&d.row.queue, d.owner.as_deref());
    html(&JobPage {
        page: Chrome::new("jobs"),
        phases: phase_views(&d),
        job: JobView::from(&d.row),
        reason: d.reason.clone(),
        position,
        eta,
        yaml,
        artifact,
        logs,
        can_cancel,
        terminal,
        device_info: d
            .device_info
            .as_ref()
            .and_then(|v| serde_json::to_string_pretty(v).ok()),
        owner: d.owner.clone().unwrap_or_default(),
    })
}

/// The phases a job went through: exit status (from the agent's result) and how long
/// each ran (from when each state began in the current attempt).
fn phase_views(d: &data::JobDetail) -> Vec<PhaseView> {
    let started_ms = chrono::DateTime::parse_from_rfc3339(&d.row.started_at)
        .map(|t| t.timestamp_millis() - 1000)
        .unwrap_or(0);
    let times: Vec<&(String, i64)> = d
        .state_times
        .iter()
        .filter(|(_, t)| *t >= started_ms)
        .collect();
    let now = crate::store::now_ms();
    let terminal = d.row.is_terminal();
    let mut out = Vec::new();
    for p in Phase::ALL {
        let name = p.job_state().as_str();
        let began = times.iter().position(|(s, _)| s == name);
        let status = d.status.get(p.as_str()).and_then(Value::as_i64);
        if began.is_none() && status.is_none() {
            continue;
        }
        let (duration, current) = match began {
            Some(i) => match times.get(i + 1) {
                Some((_, end)) => (Some(end - times[i].1), false),
                None if !terminal => (Some(now - times[i].1), true),
                None => (None, false),
            },
            None => (None, false),
        };
        let (outcome, label) = match (status, current) {
            (_, true) => ("running", "running".to_string()),
            (Some(0), _) => ("pass", "exit 0".to_string()),
            (Some(c), _) => ("fail", format!("exit {c}")),
            // The agent reports exit statuses at the end; a phase without one then
            // had nothing to run.
            (None, _) if d.row.state == "complete" => ("none", "skipped".to_string()),
            (None, _) if terminal => ("none", "no status".to_string()),
            (None, _) => ("none", "done".to_string()),
        };
        out.push(PhaseView {
            name: p.as_str(),
            outcome,
            label,
            duration: duration
                .map(|ms| human_secs(ms as f64 / 1000.0))
                .unwrap_or_else(|| "–".into()),
        });
    }
    out
}

/// `GET /jobs/<id>/summary.json`: what the job page's script polls to update the state
/// without a reload: `{"job_state", "attempt", "agent", "terminal"}`; 404 when unknown.
async fn job_summary(app: web::Data<AppState>, req: HttpRequest, id: web::Path<String>) -> Page {
    let viewer = Viewer::from_request(&req, &app);
    let id = parse_job_id(&id)?;
    let rows = data::job_rows(&app.store, std::slice::from_ref(&id)).await?;
    let Some(r) = rows.into_iter().find(|r| viewer.may_see_queue(&r.queue)) else {
        return Ok(
            HttpResponse::NotFound().json(json!({"message": format!("No job with id {id}.")}))
        );
    };
    Ok(HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .json(json!({
            "job_state": r.state,
            "attempt": r.attempt,
            "agent": r.agent,
            "terminal": r.is_terminal(),
        })))
}

/// `POST /jobs/<id>/cancel` (the job page's form): cancels as the API's cancel action
/// does, then goes back to the job page (303). A cross-site form is refused (403). With
/// auth on, the caller's credentials (`Authorization` header) decide as for the API:
/// only the job's owner, a manager or an admin may cancel an owned job (401/403).
async fn cancel(
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
    crate::routes::jobs::cancel_job(&app, &caller, &id).await?;
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

async fn queues(app: web::Data<AppState>, req: HttpRequest) -> Page {
    let viewer = Viewer::from_request(&req, &app);
    let agents: Vec<_> = data::agents(&app.store)
        .await?
        .into_iter()
        .filter(|a| viewer.may_see_agent(&a.name))
        .collect();
    let running = data::running_jobs(&app.store, &agents).await?;
    let queues: Vec<_> = data::queues(&app.store, &agents, &running)
        .await?
        .into_iter()
        .filter(|q| viewer.may_see_queue(&q.name))
        .collect();
    html(&QueuesPage {
        page: Chrome::new("queues"),
        queues: queues.iter().map(QueueView::from).collect(),
    })
}

async fn queue(app: web::Data<AppState>, req: HttpRequest, name: web::Path<String>) -> Page {
    let viewer = Viewer::from_request(&req, &app);
    let name = name.into_inner();
    valid_queue("queue", &name)?;
    let unknown = || {
        UiError::NotFound(format!(
            "No queue named '{name}' is known: no agent serves it, none advertises it and no job was submitted to it."
        ))
    };
    if !viewer.may_see_queue(&name) {
        return Err(unknown());
    }
    let agents: Vec<_> = data::agents(&app.store)
        .await?
        .into_iter()
        .filter(|a| viewer.may_see_agent(&a.name))
        .collect();
    let d = data::queue_detail(&app.store, &name, &agents, 50, 20).await?;
    if !d.known {
        return Err(unknown());
    }
    let serving: Vec<_> = agents
        .iter()
        .filter(|a| a.queues.contains(&name))
        .cloned()
        .collect();
    let running = data::running_jobs(&app.store, &serving).await?;
    let running: Vec<_> = running.into_iter().filter(|r| r.queue == name).collect();
    let described = [(name.clone(), d.description.clone())]
        .into_iter()
        .collect();
    let row = data::queue_rows(
        &app.store,
        vec![name.clone()],
        &described,
        &serving,
        &running,
    )
    .await?
    .into_iter()
    .next()
    .unwrap_or_default();
    let eta = next_eta(&row);
    let median = row.wait.as_ref().map(|w| w.p50);
    html(&QueuePage {
        page: Chrome::new("queues"),
        queue: QueueView::from(&row),
        eta,
        waiting: d
            .waiting
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let mut v = JobView::from(r);
                v.eta = median
                    .map(|m| format!("~{}", human_secs(m * (i as f64 + 1.0))))
                    .unwrap_or_else(|| "–".into());
                v
            })
            .collect(),
        running: running.iter().map(JobView::from).collect(),
        recent: visible_jobs(&viewer, d.recent)
            .iter()
            .map(JobView::from)
            .collect(),
        agents: serving.iter().map(AgentView::from).collect(),
    })
}

/// When the next waiting job of a queue should start, in words.
fn next_eta(q: &data::QueueRow) -> String {
    if q.agents == 0 {
        return "no agent serves this queue: waiting jobs will not start".into();
    }
    if q.waiting == 0 {
        return if q.idle > 0 {
            format!("a new job starts at once ({} idle agent(s))", q.idle)
        } else {
            "nothing waiting; a new job waits for a busy agent".into()
        };
    }
    match &q.wait {
        Some(w) => format!(
            "about {} (median wait of the last {} starts)",
            human_secs(w.p50),
            w.samples
        ),
        None => "no wait-time data for an estimate yet".into(),
    }
}

/// Seconds in words: `42 s`, `3 min 5 s`, `2 h 10 min`.
pub fn human_secs(s: f64) -> String {
    let s = if s.is_finite() && s > 0.0 {
        s.round() as u64
    } else {
        0
    };
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min {} s", s / 60, s % 60),
        _ => format!("{} h {} min", s / 3600, (s % 3600) / 60),
    }
}
