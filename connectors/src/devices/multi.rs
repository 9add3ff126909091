//! `multi`: one job driving several devices. Provision submits every child job of
//! `provision_data.jobs` to the server (`testflinger_server`) with
//! `allocate_data: {allocate: true}` and `parent_job_id`, waits until each is
//! `allocated`, and writes `job_list.json` = `[{job_id, device_info}]`. Tests see
//! `DEVICE_IP_1..N`. Cleanup, and any provisioning failure, cancels the children, which
//! releases their agents.

use super::Device;
use crate::api::Api;
use crate::context::Ctx;
use crate::error::{ConnectorError, Result};
use crate::output::write_json;
use crate::stages;
use serde_json::{Value, json};
use std::path::Path;
use std::time::Duration;
use tokio::signal::unix::{SignalKind, signal};
use tokio::time::Instant;

pub struct Multi;

pub const JOB_LIST_FILE: &str = "job_list.json";
/// Upstream's default `allocation_timeout`.
pub const DEFAULT_ALLOCATION_TIMEOUT: u64 = 7200;

fn api(ctx: &Ctx) -> Result<Api> {
    let server = ctx.cfg.testflinger_server.as_deref().ok_or_else(|| {
        ConnectorError::Provisioning(
            "device config has no testflinger_server (the multi type needs it)".into(),
        )
    })?;
    Api::new(server)
}

/// The child jobs as they are submitted.
fn child_jobs(ctx: &Ctx) -> Result<Vec<Value>> {
    let bad = || {
        ConnectorError::Provisioning(
            "provision_data.jobs must be a non-empty list of job objects".into(),
        )
    };
    let jobs = ctx
        .job
        .provision_data
        .as_ref()
        .and_then(|p| p.get("jobs"))
        .and_then(Value::as_array)
        .ok_or_else(bad)?;
    if jobs.is_empty() {
        return Err(bad());
    }
    jobs.iter()
        .map(|j| {
            let mut j = j.as_object().cloned().ok_or_else(bad)?;
            j.insert("allocate_data".into(), json!({"allocate": true}));
            if let Some(parent) = &ctx.job.job_id {
                j.insert("parent_job_id".into(), json!(parent.to_string()));
            }
            Ok(Value::Object(j))
        })
        .collect()
}

fn write_job_list(dir: &Path, ids: &[String], infos: &[Option<Value>]) -> Result<()> {
    let list: Vec<Value> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            json!({"job_id": id, "device_info": infos.get(i).cloned().flatten().unwrap_or(json!({}))})
        })
        .collect();
    write_json(&dir.join(JOB_LIST_FILE), &Value::Array(list))
}

fn read_job_list(dir: &Path) -> Result<Vec<Value>> {
    let path = dir.join(JOB_LIST_FILE);
    let text = std::fs::read(&path).map_err(|e| {
        ConnectorError::Provisioning(format!(
            "{}: {e} (the multi provision stage writes it)",
            path.display()
        ))
    })?;
    match serde_json::from_slice::<Value>(&text) {
        Ok(Value::Array(a)) => Ok(a),
        _ => Err(ConnectorError::Provisioning(format!(
            "{}: not a JSON list of child jobs",
            path.display()
        ))),
    }
}

/// Submits the children (ids pushed to `ids` as they are accepted) and waits for all of
/// them to be allocated.
async fn allocate_children(
    ctx: &Ctx,
    api: &Api,
    jobs: Vec<Value>,
    ids: &mut Vec<String>,
) -> Result<()> {
    for job in &jobs {
        let id = api.submit(job).await?;
        println!("Submitted child job {id}");
        ids.push(id);
        write_job_list(&ctx.dir, ids, &[])?;
    }
    let timeout = ctx
        .job
        .allocation_timeout
        .unwrap_or(DEFAULT_ALLOCATION_TIMEOUT);
    let deadline = Instant::now() + Duration::from_secs(timeout);
    let every = ctx.cfg.poll_interval(10.0);
    let parent = ctx.job.job_id.map(|j| j.to_string());
    let mut infos: Vec<Option<Value>> = vec![None; ids.len()];
    loop {
        for (i, id) in ids.iter().enumerate() {
            if infos[i].is_some() {
                continue;
            }
            let result = match api.result(id).await {
                Ok(Some(r)) => r,
                Ok(None) => continue,
                Err(e) => {
                    eprintln!("warning: {e}; retrying");
                    continue;
                }
            };
            match result.get("job_state").and_then(Value::as_str) {
                Some("allocated") => {
                    println!("Child job {id} is allocated");
                    infos[i] = Some(result.get("device_info").cloned().unwrap_or(json!({})));
                }
                Some(s @ ("cancelled" | "complete" | "completed")) => {
                    return Err(ConnectorError::Provisioning(format!(
                        "child job {id} ended ({s}) before it was allocated"
                    )));
                }
                _ => {}
            }
        }
        if infos.iter().all(Option::is_some) {
            return write_job_list(&ctx.dir, ids, &infos);
        }
        if let Some(p) = &parent
            && let Ok(Some(s)) = api.job_state(p).await
            && matches!(s.as_str(), "cancelled" | "complete" | "completed")
        {
            return Err(ConnectorError::Provisioning(format!(
                "parent job {p} is {s}: stopping the allocation"
            )));
        }
        let now = Instant::now();
        if now >= deadline {
            let waiting = infos.iter().filter(|i| i.is_none()).count();
            return Err(ConnectorError::Provisioning(format!(
                "{waiting} child job(s) were not allocated within allocation_timeout ({timeout} s)"
            )));
        }
        tokio::time::sleep(every.min(deadline - now)).await;
    }
}

async fn cancel_all(api: &Api, ids: &[String]) {
    for id in ids {
        match api.cancel(id).await {
            Ok(()) => println!("Cancelled child job {id}"),
            Err(e) => eprintln!("warning: {e}"),
        }
    }
}

impl Device for Multi {
    async fn provision(&self, ctx: &Ctx) -> Result<i32> {
        let api = api(ctx)?;
        let jobs = child_jobs(ctx)?;
        let mut term = signal(SignalKind::terminate())
            .map_err(|e| ConnectorError::io("installing the SIGTERM handler", e))?;
        let mut ids: Vec<String> = Vec::new();
        let result = tokio::select! {
            r = allocate_children(ctx, &api, jobs, &mut ids) => r,
            _ = term.recv() => Err(ConnectorError::Provisioning(
                "terminated while waiting for the child jobs".into(),
            )),
        };
        match result {
            Ok(()) => {
                println!("All {} child jobs are allocated.", ids.len());
                Ok(0)
            }
            Err(e) => {
                cancel_all(&api, &ids).await;
                Err(e)
            }
        }
    }

    async fn runtest(&self, ctx: &Ctx) -> Result<i32> {
        let list = read_job_list(&ctx.dir)?;
        let extra: Vec<(String, String)> = list
            .iter()
            .enumerate()
            .filter_map(|(i, entry)| {
                let ip = entry.get("device_info")?.get("device_ip")?.as_str()?;
                Some((format!("DEVICE_IP_{}", i + 1), ip.to_string()))
            })
            .collect();
        stages::runtest(ctx, &extra).await
    }

    async fn cleanup(&self, ctx: &Ctx) -> Result<i32> {
        let path = ctx.dir.join(JOB_LIST_FILE);
        if !path.exists() {
            println!("No {JOB_LIST_FILE}: no child jobs to cancel.");
            return Ok(0);
        }
        let ids: Vec<String> = read_job_list(&ctx.dir)?
            .iter()
            .filter_map(|e| e.get("job_id").and_then(Value::as_str).map(str::to_string))
            .collect();
        cancel_all(&api(ctx)?, &ids).await;
        Ok(0)
    }
}
