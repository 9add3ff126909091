//! `GET /queues` (every queue: agents, waiting and running jobs, wait times) and
//! `GET /queues/<name>` (a queue's page: its waiting line, running jobs, agents).

use super::query::valid_queue;
use super::views::{AgentView, Chrome, JobView, QueuePage, QueueView, QueuesPage, human_secs};
use super::{Page, UiError, Viewer, data, html, visible_agents, visible_jobs};
use crate::state::AppState;
use actix_web::{HttpRequest, web};

pub async fn queues(app: web::Data<AppState>, req: HttpRequest) -> Page {
    let viewer = Viewer::from_request(&req, &app);
    let agents = visible_agents(&app, &viewer).await?;
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

pub async fn queue(app: web::Data<AppState>, req: HttpRequest, name: web::Path<String>) -> Page {
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
    let agents = visible_agents(&app, &viewer).await?;
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
    html(&QueuePage {
        page: Chrome::new("queues"),
        queue: QueueView::from(&row),
        eta: next_eta(&row),
        waiting: waiting_views(&d.waiting, row.wait.as_ref().map(|w| w.p50)),
        running: running.iter().map(JobView::from).collect(),
        recent: visible_jobs(&viewer, d.recent)
            .iter()
            .map(JobView::from)
            .collect(),
        agents: serving.iter().map(AgentView::from).collect(),
    })
}

/// The waiting line, each job with when it should start (from the queue's median wait,
/// when known).
fn waiting_views(waiting: &[data::JobRow], median: Option<f64>) -> Vec<JobView> {
    waiting
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let mut v = JobView::from(r);
            v.eta = median
                .map(|m| format!("~{}", human_secs(m * (i as f64 + 1.0))))
                .unwrap_or_else(|| "–".into());
            v
        })
        .collect()
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
