//! `GET /jobs` (the list: filters by state, queue and tags, paged), `GET /jobs/<id>`
//! (a job's page: phases, position, definition, log tails) and
//! `GET /jobs/<id>/summary.json` (what that page's script polls).

use super::query::{items, last, number, one, parse_job_id, query, valid_queue};
use super::views::{
    Chrome, JobFilters, JobPage, JobView, JobsPage, LogView, PhaseView, human_secs,
};
use super::{DEFAULT_LIMIT, MAX_LIMIT, Page, UiError, Viewer, data, html, visible_jobs};
use crate::state::AppState;
use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use data::JobFilter;
use serde_json::{Value, json};
use testflinger_common::{JobState, Phase};

/// Most log fragments, and bytes of them, a job page renders per log type (the newest);
/// the script streams what comes after.
const LOG_TAIL: usize = 1000;
const LOG_TAIL_BYTES: usize = 512 * 1024;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct JobsQuery {
    #[serde(default)]
    state: Vec<String>,
    #[serde(default)]
    queue: Vec<String>,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default, deserialize_with = "last")]
    from: Option<String>,
    #[serde(default, deserialize_with = "last")]
    limit: Option<String>,
}

/// `state` filter values besides the job states.
const STATE_GROUPS: &[&str] = &["active", "running", "completed"];

/// Every accepted `state` filter value: the job states, then the groups.
fn state_choices() -> Vec<&'static str> {
    JobState::ALL
        .iter()
        .map(|s| s.as_str())
        .chain(STATE_GROUPS.iter().copied())
        .collect()
}

/// The list's filter and page, checked; a queue the viewer may not see is unknown.
fn jobs_params(q: JobsQuery, viewer: &Viewer) -> Result<(JobFilter, usize, usize), UiError> {
    let states = items(&q.state);
    for s in &states {
        if JobState::parse_lenient(s).is_none() && !STATE_GROUPS.contains(&s.as_str()) {
            return Err(UiError::BadRequest(format!(
                "state: '{s}' is not accepted; expected one of: {}",
                state_choices().join(", ")
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
        queue,
        tags,
        states,
    };
    Ok((filter, from, limit))
}

pub async fn jobs(app: web::Data<AppState>, req: HttpRequest) -> Page {
    let viewer = Viewer::from_request(&req, &app);
    let (filter, from, limit) = jobs_params(query(&req)?, &viewer)?;
    let page = data::job_page(&app.store, &filter, from, limit).await?;
    let filters = JobFilters {
        state: filter.states.join(","),
        queue: filter.queue.unwrap_or_default(),
        tags: filter.tags.join(","),
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
        states: state_choices(),
        filters,
    })
}

pub async fn job(app: web::Data<AppState>, req: HttpRequest, id: web::Path<String>) -> Page {
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
        waiting_eta(&app, &id, &d.row.queue).await?
    } else {
        (None, None)
    };
    let mut def = d.def.clone();
    if let Some(o) = def.as_object_mut() {
        // A resubmission with the same id would be the same job (idempotent submit).
        o.remove("job_id");
    }
    let yaml = serde_saphyr::to_string(&def).unwrap_or_else(|e| format!("# cannot render: {e}"));
    let artifact = app
        .files
        .open_artifact(&app.store, &id)
        .await
        .ok()
        .flatten()
        .is_some();
    let mut logs = Vec::new();
    for (log_type, label) in [("output", "Output"), ("serial", "Serial console")] {
        let (frags, truncated) = crate::logs::tail(
            &app.store,
            &app.files,
            &id,
            log_type,
            LOG_TAIL,
            LOG_TAIL_BYTES,
        )
        .await?;
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

/// A waiting job's place in its queue (from 1) and when it should start, in words
/// (from the queue's median wait), when known.
async fn waiting_eta(
    app: &AppState,
    id: &str,
    queue: &str,
) -> Result<(Option<i64>, Option<String>), UiError> {
    let pos = app.store.position(id).await?;
    let stats = data::queue_rows(
        &app.store,
        vec![queue.to_string()],
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
    Ok((pos.map(|p| p + 1), eta))
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
pub async fn job_summary(
    app: web::Data<AppState>,
    req: HttpRequest,
    id: web::Path<String>,
) -> Page {
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
