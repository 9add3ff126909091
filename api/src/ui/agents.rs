//! `GET /agents` (the list: filters by state, queue and location, sortable columns) and
//! `GET /agents/<name>` (an agent's page).

use super::query::{items, last, one, query, valid_queue};
use super::views::{AgentFilters, AgentPage, AgentView, AgentsPage, Chrome, JobView, SortColumn};
use super::{Page, UiError, Viewer, data, html, visible_agents, visible_jobs};
use crate::state::AppState;
use actix_web::{HttpRequest, web};
use testflinger_common::AgentState;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentsQuery {
    #[serde(default)]
    state: Vec<String>,
    #[serde(default)]
    queue: Vec<String>,
    #[serde(default, deserialize_with = "last")]
    location: Option<String>,
    #[serde(default, deserialize_with = "last")]
    sort: Option<String>,
    #[serde(default, deserialize_with = "last")]
    order: Option<String>,
}

const AGENT_SORTS: &[&str] = &["name", "state", "location", "job", "updated"];

/// The list's filters and order, checked.
struct AgentsParams {
    states: Vec<String>,
    queue: Option<String>,
    location: Option<String>,
    sort: &'static str,
    desc: bool,
}

impl AgentsParams {
    fn parse(q: AgentsQuery) -> Result<AgentsParams, UiError> {
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
        let Some(sort) = AGENT_SORTS.iter().copied().find(|s| *s == sort) else {
            return Err(UiError::BadRequest(format!(
                "sort: '{sort}' is not accepted; expected one of: {}",
                AGENT_SORTS.join(", ")
            )));
        };
        let desc = match q.order.as_deref().filter(|s| !s.is_empty()) {
            None | Some("asc") => false,
            Some("desc") => true,
            Some(o) => {
                return Err(UiError::BadRequest(format!(
                    "order: '{o}' is not accepted; expected asc or desc"
                )));
            }
        };
        Ok(AgentsParams {
            states,
            queue,
            location,
            sort,
            desc,
        })
    }

    fn shows(&self, a: &data::AgentRow) -> bool {
        (self.states.is_empty() || self.states.contains(&a.state))
            && self.queue.as_ref().is_none_or(|qn| a.queues.contains(qn))
            && self.location.as_ref().is_none_or(|l| &a.location == l)
    }

    /// Sorts by the chosen column, then by name; reversed for `desc`.
    fn sort(&self, agents: &mut [data::AgentRow]) {
        agents.sort_by(|a, b| {
            let key = |x: &data::AgentRow| match self.sort {
                "state" => x.state.clone(),
                "location" => x.location.clone(),
                "job" => x.job_id.clone(),
                "updated" => x.updated_at.clone(),
                _ => x.name.clone(),
            };
            key(a).cmp(&key(b)).then_with(|| a.name.cmp(&b.name))
        });
        if self.desc {
            agents.reverse();
        }
    }
}

pub async fn agents(app: web::Data<AppState>, req: HttpRequest) -> Page {
    let viewer = Viewer::from_request(&req, &app);
    let p = AgentsParams::parse(query(&req)?)?;
    let all = visible_agents(&app, &viewer).await?;
    let total = all.len();
    let mut locations: Vec<String> = all
        .iter()
        .map(|a| a.location.clone())
        .filter(|l| !l.is_empty())
        .collect();
    locations.sort();
    locations.dedup();
    let mut shown: Vec<_> = all.into_iter().filter(|a| p.shows(a)).collect();
    p.sort(&mut shown);
    let filters = AgentFilters {
        state: p.states.first().cloned().unwrap_or_default(),
        queue: p.queue.clone().unwrap_or_default(),
        location: p.location.clone().unwrap_or_default(),
    };
    let columns = AGENT_SORTS
        .iter()
        .map(|c| SortColumn::new(c, p.sort, p.desc, &filters.query()))
        .collect();
    html(&AgentsPage {
        page: Chrome::new("agents"),
        total,
        agents: shown.iter().map(AgentView::from).collect(),
        states: AgentState::ALL.iter().map(|s| s.as_str()).collect(),
        locations,
        filters,
        columns,
        sort: p.sort.to_string(),
        order: if p.desc { "desc" } else { "asc" },
    })
}

pub async fn agent(app: web::Data<AppState>, req: HttpRequest, name: web::Path<String>) -> Page {
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
