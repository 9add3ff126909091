//! `GET /`: the overview (agents by state, the busiest queues, the latest jobs).

use super::views::{Chrome, JobView, Overview, QueueView};
use super::{Page, Viewer, data, html, visible_agents, visible_jobs};
use crate::state::AppState;

use actix_web::{HttpRequest, web};
use data::JobFilter;
use std::collections::BTreeMap;

/// How many queues (the busiest) and jobs (the latest) the overview lists.
const TOP_QUEUES: usize = 10;
const RECENT_JOBS: usize = 15;

pub async fn overview(app: web::Data<AppState>, req: HttpRequest) -> Page {
    let viewer = Viewer::from_request(&req, &app);
    let agents = visible_agents(&app, &viewer).await?;
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
    queues.truncate(TOP_QUEUES);
    let mut by_state: BTreeMap<String, usize> = BTreeMap::new();
    for a in &agents {
        *by_state.entry(a.state.clone()).or_default() += 1;
    }
    let all = JobFilter {
        queue: None,
        tags: Vec::new(),
        states: Vec::new(),
    };
    let recent = data::job_page(&app.store, &all, 0, RECENT_JOBS).await?.rows;
    let recent = visible_jobs(&viewer, recent);
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
