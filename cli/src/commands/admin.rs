//! `login`, `secret write|delete` and `admin set|get|delete ...`.

use super::{Ctx, sorted_json};
use crate::args::{AdminCmd, AdminDelete, AdminGet, AdminSet, SecretCmd};
use crate::client::seg;
use anyhow::bail;
use reqwest::Method;
use serde_json::{Map, Value, json};
use std::process::ExitCode;

pub async fn login(ctx: &Ctx) -> anyhow::Result<ExitCode> {
    let id = ctx.client.login().await?;
    println!("Logged in as '{id}'");
    Ok(ExitCode::SUCCESS)
}

/// A secret path as the server takes it, checked here for a clear message.
fn secret_path(path: &str) -> anyhow::Result<String> {
    let ok = !path.is_empty()
        && path.split('/').all(|s| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        });
    if !ok {
        bail!(
            "'{path}' is not a valid secret path: segments of letters, digits, '_' and '-' separated by '/'"
        );
    }
    Ok(path.split('/').map(seg).collect::<Vec<_>>().join("/"))
}

pub async fn secret(ctx: &Ctx, cmd: SecretCmd) -> anyhow::Result<ExitCode> {
    // Without a login provider on the server, secrets live in the `anonymous` namespace.
    let client = ctx
        .client
        .client_id()
        .await
        .unwrap_or_else(|| "anonymous".to_string());
    match cmd {
        SecretCmd::Write {
            path,
            value,
            expire_after,
            single_use,
        } => {
            let p = format!("/v1/secrets/{}/{}", seg(&client), secret_path(&path)?);
            let mut body = json!({"value": value});
            if let Some(n) = expire_after {
                body["expire_after"] = json!(n);
            }
            if single_use {
                body["ephemeral"] = json!(true);
            }
            let r = ctx.client.send(Method::PUT, &p, |r| r.json(&body)).await?;
            if !r.ok() {
                return Err(r.error());
            }
            println!("Secret '{path}' written for client '{client}'");
        }
        SecretCmd::Delete { path } => {
            let p = format!("/v1/secrets/{}/{}", seg(&client), secret_path(&path)?);
            let r = ctx.client.send(Method::DELETE, &p, |r| r).await?;
            if !r.ok() {
                return Err(r.error());
            }
            println!("Secret '{path}' deleted for client '{client}'");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `QUEUE=N` pairs into a JSON object; `what` names the option in errors.
fn pairs(items: &[String], what: &str) -> anyhow::Result<Option<Value>> {
    if items.is_empty() {
        return Ok(None);
    }
    let mut m = Map::new();
    for item in items {
        let Some((q, n)) = item.split_once('=') else {
            bail!("--{what} '{item}': expected QUEUE=NUMBER (or *=NUMBER)");
        };
        let Ok(n) = n.trim().parse::<i64>() else {
            bail!("--{what} '{item}': '{n}' is not a whole number");
        };
        m.insert(q.trim().to_string(), json!(n));
    }
    Ok(Some(Value::Object(m)))
}

fn print_ok(r: crate::client::Reply) -> anyhow::Result<ExitCode> {
    if !r.ok() {
        return Err(r.error());
    }
    match r.json() {
        Ok(v) if !v.is_string() => println!("{}", sorted_json(&v)),
        _ => println!("{}", r.text()),
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn admin(ctx: &Ctx, cmd: AdminCmd) -> anyhow::Result<ExitCode> {
    let c = &ctx.client;
    match cmd {
        AdminCmd::Set(AdminSet::AgentStatus {
            status,
            agents,
            comment,
        }) => {
            let state = match status.as_str() {
                "online" | "waiting" => "waiting",
                "offline" => "offline",
                "maintenance" => "maintenance",
                other => bail!("--status '{other}': expected online, offline or maintenance"),
            };
            for a in &agents {
                let path = format!("/v1/agents/data/{}", seg(a));
                let known = c.get(&path).await?;
                if !known.ok() {
                    bail!("agent '{a}' does not exist");
                }
                let r = c
                    .post_json(&path, &json!({"state": state, "comment": comment}))
                    .await?;
                if !r.ok() {
                    return Err(r.error());
                }
                println!("Agent '{a}' set to {state}");
            }
            Ok(ExitCode::SUCCESS)
        }
        AdminCmd::Set(AdminSet::ClientPermissions {
            client,
            client_secret,
            role,
            max_priority,
            max_reservation_time,
            email,
            agent_id,
            agent_queues,
        }) => {
            let mut body = Map::new();
            if let Some(a) = agent_id {
                body.insert("agent_id".into(), json!(a));
            }
            if !agent_queues.is_empty() {
                let qs: Vec<&String> = agent_queues.iter().filter(|q| !q.is_empty()).collect();
                body.insert("agent_queues".into(), json!(qs));
            }
            if let Some(s) = client_secret {
                body.insert("client_secret".into(), json!(s));
            }
            if let Some(r) = role {
                body.insert("role".into(), json!(r));
            }
            if let Some(m) = pairs(&max_priority, "max-priority")? {
                body.insert("max_priority".into(), m);
            }
            if let Some(m) = pairs(&max_reservation_time, "max-reservation-time")? {
                body.insert("max_reservation_time".into(), m);
            }
            if let Some(e) = email {
                body.insert("email".into(), json!(e));
            }
            let body = Value::Object(body);
            let path = format!("/v1/client-permissions/{}", seg(&client));
            print_ok(c.send(Method::PUT, &path, |r| r.json(&body)).await?)
        }
        AdminCmd::Set(AdminSet::RestrictedQueue { queue, owner }) => {
            let path = format!("/v1/restricted-queues/{}", seg(&queue));
            print_ok(c.post_json(&path, &json!({"client_id": owner})).await?)
        }
        AdminCmd::Get(AdminGet::ClientPermissions { client }) => {
            let path = match client {
                Some(id) => format!("/v1/client-permissions/{}", seg(&id)),
                None => "/v1/client-permissions".into(),
            };
            print_ok(c.get(&path).await?)
        }
        AdminCmd::Get(AdminGet::RestrictedQueues { queue }) => {
            let path = match queue {
                Some(q) => format!("/v1/restricted-queues/{}", seg(&q)),
                None => "/v1/restricted-queues".into(),
            };
            print_ok(c.get(&path).await?)
        }
        AdminCmd::Delete(AdminDelete::ClientPermissions { client }) => {
            let path = format!("/v1/client-permissions/{}", seg(&client));
            print_ok(c.send(Method::DELETE, &path, |r| r).await?)
        }
        AdminCmd::Delete(AdminDelete::RestrictedQueue { queue, owner }) => {
            let path = format!("/v1/restricted-queues/{}", seg(&queue));
            let body = json!({"client_id": owner});
            print_ok(c.send(Method::DELETE, &path, |r| r.json(&body)).await?)
        }
    }
}
