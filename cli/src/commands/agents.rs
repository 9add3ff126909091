//! `list-agents` and `agent-status`.

use super::{Ctx, sorted_json};
use crate::args::{AgentStatusArgs, ListAgentsArgs};
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

/// The columns `list-agents --fields` may name.
const FIELDS: &[&str] = &[
    "name",
    "state",
    "location",
    "provision_type",
    "comment",
    "job_id",
    "queues",
];

pub async fn list(ctx: &Ctx, args: &ListAgentsArgs) -> anyhow::Result<ExitCode> {
    for f in &args.fields {
        if !FIELDS.contains(&f.as_str()) {
            bail!(
                "--fields: '{f}' is not a field; accepted: {}",
                FIELDS.join(", ")
            );
        }
    }
    let name_re = match &args.filter_name {
        Some(re) => Some(regex_lite::Regex::new(re).map_err(|e| {
            anyhow::anyhow!("--filter-name: '{re}' is not a regular expression: {e}")
        })?),
        None => None,
    };
    let reply = ctx.client.get("/v1/agents/data").await?;
    let agents = match reply.status {
        StatusCode::OK => reply.json()?,
        StatusCode::NO_CONTENT => Value::Array(Vec::new()),
        _ => return Err(reply.error()),
    };
    let mut agents: Vec<Value> = agents
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|a| {
            (args.filter_status.is_empty()
                || args.filter_status.iter().any(|s| *s == field(a, "state")))
                && name_re
                    .as_ref()
                    .is_none_or(|re| re.is_match(&field(a, "name")))
                && args
                    .filter_location
                    .as_ref()
                    .is_none_or(|l| *l == field(a, "location"))
                && args.filter_queue.as_ref().is_none_or(|q| {
                    a.get("queues")
                        .and_then(Value::as_array)
                        .is_some_and(|qs| qs.iter().any(|x| x.as_str() == Some(q.as_str())))
                })
        })
        .collect();
    agents.sort_by_key(|a| field(a, "name"));
    if args.json {
        println!("{}", sorted_json(&Value::Array(agents)));
        return Ok(ExitCode::SUCCESS);
    }
    if args.one_per_line {
        for a in &agents {
            println!("{}", field(a, "name"));
        }
        return Ok(ExitCode::SUCCESS);
    }
    if args.summary {
        let mut by_state: std::collections::BTreeMap<String, usize> = Default::default();
        for a in &agents {
            *by_state.entry(field(a, "state")).or_default() += 1;
        }
        println!("Agents: {}", agents.len());
        for (state, n) in by_state {
            println!("  {state}: {n}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    if agents.is_empty() {
        println!("No agents found");
        return Ok(ExitCode::SUCCESS);
    }
    let columns: Vec<&str> = if args.fields.is_empty() {
        vec!["name", "state", "job_id", "queues"]
    } else {
        args.fields.iter().map(String::as_str).collect()
    };
    let header: Vec<String> = columns.iter().map(|c| heading(c)).collect();
    let rows: Vec<Vec<String>> = agents
        .iter()
        .map(|a| columns.iter().map(|c| field(a, c)).collect())
        .collect();
    let widths: Vec<usize> = (0..columns.len())
        .map(|i| {
            rows.iter()
                .map(|r| r[i].len())
                .chain([header[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |r: &[String]| {
        r.iter()
            .zip(&widths)
            .map(|(v, w)| format!("{v:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    println!("{}", line(&header));
    for r in &rows {
        println!("{}", line(r));
    }
    Ok(ExitCode::SUCCESS)
}

fn heading(field: &str) -> String {
    match field {
        "job_id" => "Job".to_string(),
        "provision_type" => "Provision type".to_string(),
        other => {
            let mut c = other.chars();
            c.next()
                .map(|f| f.to_uppercase().collect::<String>() + c.as_str())
                .unwrap_or_default()
        }
    }
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
