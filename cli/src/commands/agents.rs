//! `list-agents` and `agent-status`.

use super::{Ctx, sorted_json};
use crate::args::AgentStatusArgs;
use crate::client::seg;
use anyhow::bail;
use reqwest::StatusCode;
use serde_json::Value;
use std::process::ExitCode;

fn field(agent: &Value, key: &str) -> String {
    match agent.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| v.to_string())
            })
            .collect::<Vec<_>>()
            .join(", "),
        Some(Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    }
}

pub async fn list(ctx: &Ctx, as_json: bool) -> anyhow::Result<ExitCode> {
    let reply = ctx.client.get("/v1/agents/data").await?;
    let agents = match reply.status {
        StatusCode::OK => reply.json()?,
        StatusCode::NO_CONTENT => Value::Array(Vec::new()),
        _ => return Err(reply.error()),
    };
    if as_json {
        println!("{}", sorted_json(&agents));
        return Ok(ExitCode::SUCCESS);
    }
    let mut agents = agents.as_array().cloned().unwrap_or_default();
    if agents.is_empty() {
        println!("No agents found");
        return Ok(ExitCode::SUCCESS);
    }
    agents.sort_by_key(|a| field(a, "name"));
    let rows: Vec<[String; 4]> = agents
        .iter()
        .map(|a| {
            [
                field(a, "name"),
                field(a, "state"),
                field(a, "job_id"),
                field(a, "queues"),
            ]
        })
        .collect();
    let header = ["Name", "State", "Job", "Queues"];
    let widths: Vec<usize> = (0..3)
        .map(|i| {
            rows.iter()
                .map(|r| r[i].len())
                .chain([header[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |r: [&str; 4]| {
        format!(
            "{:<w0$}  {:<w1$}  {:<w2$}  {}",
            r[0],
            r[1],
            r[2],
            r[3],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2]
        )
        .trim_end()
        .to_string()
    };
    println!("{}", line(header));
    for r in &rows {
        println!("{}", line([&r[0], &r[1], &r[2], &r[3]]));
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn status(ctx: &Ctx, args: &AgentStatusArgs) -> anyhow::Result<ExitCode> {
    let name = &args.agent_name;
    let reply = ctx
        .client
        .get(&format!("/v1/agents/data/{}", seg(name)))
        .await?;
    match reply.status {
        StatusCode::OK => {}
        StatusCode::NOT_FOUND | StatusCode::NO_CONTENT => {
            bail!("agent '{name}' does not exist")
        }
        _ => return Err(reply.error()),
    }
    let agent = reply.json()?;
    if args.json {
        println!("{}", sorted_json(&agent));
        return Ok(ExitCode::SUCCESS);
    }
    for (label, key) in [
        ("Agent", "name"),
        ("State", "state"),
        ("Queues", "queues"),
        ("Job", "job_id"),
        ("Location", "location"),
        ("Provision type", "provision_type"),
        ("Comment", "comment"),
        ("Updated", "updated_at"),
    ] {
        let value = field(&agent, key);
        if !value.is_empty() {
            println!("{:<15} {value}", format!("{label}:"));
        }
    }
    Ok(ExitCode::SUCCESS)
}
