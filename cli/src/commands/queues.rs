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

/// The agents that serve a queue, by what they can do for a waiting job now.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct AgentCounts {
    /// Online and not running a job (`waiting`).
    pub idle: usize,
    /// Running a job (a phase state).
    pub busy: usize,
    /// `offline`, `maintenance`, `restart`, `lost`, `unknown`: take no job.
    pub unavailable: usize,
}

/// What an agent in `state` can do for a waiting job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Availability {
    Idle,
    Busy,
    Unavailable,
}

/// An agent's availability from its record: `waiting` with no `job_id` is idle (the
/// server records the job an agent claims; agents clear it when idle); `offline`,
/// `maintenance`, `restart`, `lost` and `unknown` (or no state) take no job (an agent
/// stopped cleanly records `offline`); a phase state means it runs a job.
pub fn availability(agent: &Value) -> Availability {
    let holds_job = agent
        .get("job_id")
        .and_then(Value::as_str)
        .is_some_and(|j| !j.is_empty());
    let state = agent.get("state").and_then(Value::as_str);
    if !testflinger_common::AgentState::record_takes_jobs(state) {
        return Availability::Unavailable;
    }
    match state {
        Some("waiting") if !holds_job => Availability::Idle,
        _ => Availability::Busy,
    }
}

impl AgentCounts {
    pub fn of(agents: &[Value]) -> AgentCounts {
        let mut c = AgentCounts::default();
        for a in agents {
            match availability(a) {
                Availability::Idle => c.idle += 1,
                Availability::Busy => c.busy += 1,
                Availability::Unavailable => c.unavailable += 1,
            }
        }
        c
    }
}

/// How the jobs of a queue split up.
#[derive(Default)]
struct JobCounts {
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

    let a = AgentCounts::of(&agents);
    let mut c = JobCounts::default();
    let mut waiting_ids = Vec::new();
    for job in &jobs {
        if job.get("job_state").and_then(Value::as_str) == Some("waiting")
            && let Some(id) = job.get("job_id").and_then(Value::as_str)
        {
            waiting_ids.push(id.to_string());
        }
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
                "available": a.idle,
                "busy": a.busy,
                "offline": a.unavailable,
            },
            "jobs_waiting": waiting_ids,
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
    println!("  Available: {}", a.idle);
    println!("  Busy:      {}", a.busy);
    println!("  Offline:   {}", a.unavailable);
    println!("Jobs in queue:");
    println!("  Waiting:   {}", c.waiting);
    println!("  Running:   {}", c.running);
    println!("  Completed: {}", c.completed);
    println!("  Cancelled: {}", c.cancelled);
    if args.verbose {
        println!("Agents:");
        for agent in &agents {
            println!(
                "  {}  {}{}",
                agent.get("name").and_then(Value::as_str).unwrap_or("?"),
                agent
                    .get("state")
                    .and_then(Value::as_str)
                    .unwrap_or("unknown"),
                agent
                    .get("job_id")
                    .and_then(Value::as_str)
                    .filter(|j| !j.is_empty())
                    .map(|j| format!("  job {j}"))
                    .unwrap_or_default()
            );
        }
        println!("Waiting jobs (in order):");
        for id in &waiting_ids {
            println!("  {id}");
        }
    }
    Ok(ExitCode::SUCCESS)
}
