//! `list-queues` and `queue-status`.

use super::{Ctx, sorted_json};
use crate::args::QueueStatusArgs;
use crate::client::seg;
use anyhow::bail;
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::process::ExitCode;

pub async fn list(ctx: &Ctx, as_json: bool) -> anyhow::Result<ExitCode> {
    let reply = ctx.client.get("/v1/agents/queues").await?;
    let queues = match reply.status {
        StatusCode::OK => reply.json()?,
        StatusCode::NO_CONTENT => json!({}),
        _ => return Err(reply.error()),
    };
    if as_json {
        println!("{}", sorted_json(&queues));
        return Ok(ExitCode::SUCCESS);
    }
    let Some(map) = queues.as_object() else {
        bail!("the server sent an unexpected queue list");
    };
    if map.is_empty() {
        println!("No queues are advertised on this server");
        return Ok(ExitCode::SUCCESS);
    }
    let mut names: Vec<&String> = map.keys().collect();
    names.sort();
    let width = names.iter().map(|n| n.len()).max().unwrap_or(0);
    println!("Advertised queues on this server:");
    for name in names {
        let desc = map.get(name).and_then(Value::as_str).unwrap_or("");
        if desc.is_empty() {
            println!("  {name}");
        } else {
            println!("  {name:<width$}  {desc}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// How the agents of a queue and its jobs split up.
#[derive(Default)]
struct Counts {
    available: u64,
    busy: u64,
    offline: u64,
    waiting: u64,
    running: u64,
    completed: u64,
    cancelled: u64,
}

pub async fn status(ctx: &Ctx, args: &QueueStatusArgs) -> anyhow::Result<ExitCode> {
    let q = &args.queue_name;
    let agents_reply = ctx
        .client
        .get(&format!("/v1/queues/{}/agents", seg(q)))
        .await?;
    let (agents, queue_known) = match agents_reply.status {
        StatusCode::OK => (agents_reply.json()?, true),
        StatusCode::NO_CONTENT => (json!([]), true),
        StatusCode::NOT_FOUND => (json!([]), false),
        _ => return Err(agents_reply.error()),
    };
    let jobs_reply = ctx
        .client
        .get(&format!("/v1/queues/{}/jobs", seg(q)))
        .await?;
    let jobs = match jobs_reply.status {
        StatusCode::OK => jobs_reply.json()?,
        StatusCode::NO_CONTENT | StatusCode::NOT_FOUND => json!([]),
        _ => return Err(jobs_reply.error()),
    };
    let agents = agents.as_array().cloned().unwrap_or_default();
    let jobs = jobs.as_array().cloned().unwrap_or_default();
    if !queue_known && jobs.is_empty() {
        let msg = agents_reply.message();
        if msg.is_empty() {
            bail!("queue '{q}' does not exist");
        }
        bail!("{msg}");
    }

    let mut c = Counts::default();
    for agent in &agents {
        match agent.get("state").and_then(Value::as_str).unwrap_or("") {
            "waiting" => c.available += 1,
            "offline" | "maintenance" | "lost" => c.offline += 1,
            _ => c.busy += 1,
        }
    }
    for job in &jobs {
        match job.get("job_state").and_then(Value::as_str).unwrap_or("") {
            "waiting" => c.waiting += 1,
            "complete" | "completed" => c.completed += 1,
            "cancelled" => c.cancelled += 1,
            _ => c.running += 1,
        }
    }

    if args.json {
        let out = json!({
            "queue": q,
            "agents": {
                "total": agents.len(),
                "available": c.available,
                "busy": c.busy,
                "offline": c.offline,
            },
            "jobs": {
                "waiting": c.waiting,
                "running": c.running,
                "completed": c.completed,
                "cancelled": c.cancelled,
            },
        });
        println!("{}", sorted_json(&out));
        return Ok(ExitCode::SUCCESS);
    }
    println!("Queue: {q}");
    println!("Agents in queue: {}", agents.len());
    println!("  Available: {}", c.available);
    println!("  Busy:      {}", c.busy);
    println!("  Offline:   {}", c.offline);
    println!("Jobs in queue:");
    println!("  Waiting:   {}", c.waiting);
    println!("  Running:   {}", c.running);
    println!("  Completed: {}", c.completed);
    println!("  Cancelled: {}", c.cancelled);
    Ok(ExitCode::SUCCESS)
}
