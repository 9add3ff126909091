//! `/v1/queues...`: agents and jobs of a queue, wait-time statistics.

use crate::error::{ApiError, ApiResult};
use crate::state::AppState;
use crate::store::percentile;
use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use serde_json::{Map, Value, json};

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/queues/wait_times", web::get().to(wait_times))
        .route("/v1/queues/{queue}/agents", web::get().to(queue_agents))
        .route("/v1/queues/{queue}/jobs", web::get().to(queue_jobs));
}

async fn queue_agents(
    app: web::Data<AppState>,
    queue: web::Path<String>,
) -> ApiResult<HttpResponse> {
    let agents = crate::agents::agents_on_queue(&app.store, &queue).await?;
    if agents.is_empty() {
        return Err(ApiError::Json(
            StatusCode::NOT_FOUND,
            format!("Queue '{queue}' does not exist."),
        ));
    }
    let keep = [
        "name",
        "state",
        "queues",
        "location",
        "provision_type",
        "job_id",
        "comment",
        "restricted_to",
    ];
    let out: Vec<Value> = agents
        .into_iter()
        .map(|a| {
            let o: Map<String, Value> = a
                .as_object()
                .map(|o| {
                    o.iter()
                        .filter(|(k, _)| keep.contains(&k.as_str()))
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect()
                })
                .unwrap_or_default();
            Value::Object(o)
        })
        .collect();
    Ok(HttpResponse::Ok().json(out))
}

async fn queue_jobs(app: web::Data<AppState>, queue: web::Path<String>) -> ApiResult<HttpResponse> {
    let out: Vec<Value> = app
        .store
        .queue_jobs(&queue)
        .await?
        .into_iter()
        .map(|(id, state, created)| {
            json!({"job_id": id, "created_at": created, "job_state": state, "job_queue": queue.as_str()})
        })
        .collect();
    if out.is_empty() {
        return Ok(HttpResponse::NoContent().finish());
    }
    Ok(HttpResponse::Ok().json(out))
}

#[derive(serde::Deserialize)]
struct WaitQuery {
    #[serde(default)]
    queue: Vec<String>,
}

async fn wait_times(app: web::Data<AppState>, req: HttpRequest) -> ApiResult<HttpResponse> {
    let q: WaitQuery = super::serde_html_form(&req)?;
    let samples = app.store.wait_samples(q.queue).await?;
    if samples.is_empty() {
        return Ok(HttpResponse::Ok().json(json!({})));
    }
    let mut out = Map::new();
    for (queue, mut s) in samples {
        if s.is_empty() {
            out.insert(queue, json!({}));
            continue;
        }
        s.sort_by(f64::total_cmp);
        let mut m = Map::new();
        for pct in [5, 10, 50, 90, 95] {
            m.insert(pct.to_string(), json!(percentile(&s, f64::from(pct))));
        }
        out.insert(queue, Value::Object(m));
    }
    Ok(HttpResponse::Ok().json(out))
}
