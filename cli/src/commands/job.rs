//! `status`, `results`, `artifacts`, `show`, `cancel`: one job, one request.

use super::{Ctx, sorted_json};
use crate::args::{ArtifactsArgs, ShowArgs};
use crate::client::{Reply, seg};
use crate::history::History;
use anyhow::{Context, anyhow, bail};
use futures_util::StreamExt;
use reqwest::StatusCode;
use std::process::ExitCode;
use tokio::io::AsyncWriteExt;

/// The error for the answers every job route shares: 204 (unknown job) and 400.
pub fn job_error(reply: &Reply, job_id: &str) -> anyhow::Error {
    match reply.status {
        StatusCode::NO_CONTENT | StatusCode::NOT_FOUND => anyhow!("job {job_id} not found"),
        StatusCode::BAD_REQUEST => {
            let msg = reply.message();
            if msg.is_empty() {
                anyhow!("invalid job id '{job_id}'")
            } else {
                anyhow!("invalid job id '{job_id}': {msg}")
            }
        }
        _ => reply.error(),
    }
}

/// `GET /v1/result/<id>`, the result object of a job.
pub async fn fetch_results(ctx: &Ctx, job_id: &str) -> anyhow::Result<serde_json::Value> {
    let reply = ctx
        .client
        .get(&format!("/v1/result/{}", seg(job_id)))
        .await?;
    if !reply.ok() {
        return Err(job_error(&reply, job_id));
    }
    reply.json()
}

pub async fn status(ctx: &Ctx, job_id: &str) -> anyhow::Result<ExitCode> {
    let results = fetch_results(ctx, job_id).await?;
    let state = results
        .get("job_state")
        .and_then(|s| s.as_str())
        .ok_or_else(|| anyhow!("the server sent no job_state for job {job_id}"))?;
    println!("{state}");
    let mut history = History::load();
    if history.jobs.iter().any(|(id, _)| id == job_id) {
        history.set_state(job_id, state);
        let _ = history.save();
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn results(ctx: &Ctx, job_id: &str) -> anyhow::Result<ExitCode> {
    let reply = ctx
        .client
        .get(&format!("/v1/result/{}", seg(job_id)))
        .await?;
    match reply.status {
        StatusCode::OK => {
            println!("{}", sorted_json(&reply.json()?));
            Ok(ExitCode::SUCCESS)
        }
        StatusCode::NO_CONTENT => bail!("no results found: job {job_id} not found"),
        _ => Err(job_error(&reply, job_id)),
    }
}

pub async fn show(ctx: &Ctx, args: &ShowArgs) -> anyhow::Result<ExitCode> {
    let reply = ctx
        .client
        .get(&format!("/v1/job/{}", seg(&args.job_id)))
        .await?;
    if !reply.ok() {
        return Err(job_error(&reply, &args.job_id));
    }
    let job = reply.json()?;
    if args.yaml {
        let text = serde_saphyr::to_string(&job).context("cannot render the job as YAML")?;
        print!("{text}");
        if !text.ends_with('\n') {
            println!();
        }
    } else {
        println!("{}", sorted_json(&job));
    }
    Ok(ExitCode::SUCCESS)
}

/// `POST /v1/job/<id>/action {"action": "cancel"}`.
pub async fn cancel_job(ctx: &Ctx, job_id: &str) -> anyhow::Result<()> {
    let reply = ctx
        .client
        .post_json(
            &format!("/v1/job/{}/action", seg(job_id)),
            &serde_json::json!({"action": "cancel"}),
        )
        .await?;
    match reply.status {
        StatusCode::OK => Ok(()),
        StatusCode::BAD_REQUEST => {
            let msg = reply.message();
            if msg.to_lowercase().contains("invalid") {
                bail!("invalid job id '{job_id}': {msg}")
            }
            bail!("job {job_id} cannot be cancelled: it is already completed or cancelled")
        }
        _ => Err(job_error(&reply, job_id)),
    }
}

pub async fn cancel(ctx: &Ctx, job_id: &str) -> anyhow::Result<ExitCode> {
    cancel_job(ctx, job_id).await?;
    println!("Job {job_id} cancelled");
    let mut history = History::load();
    if history.jobs.iter().any(|(id, _)| id == job_id) {
        history.set_state(job_id, "cancelled");
        let _ = history.save();
    }
    Ok(ExitCode::SUCCESS)
}

/// Saves the archive exactly as the server sent it (no content decoding), through a
/// `.part` file so that a failed download leaves nothing that looks complete.
pub async fn artifacts(ctx: &Ctx, args: &ArtifactsArgs) -> anyhow::Result<ExitCode> {
    let path = format!("/v1/result/{}/artifact", seg(&args.job_id));
    let resp = ctx.client.open(&path, |r| r).await?;
    match resp.status() {
        StatusCode::OK => {}
        StatusCode::NO_CONTENT => {
            // 204 is also the answer for an unknown job: tell the two apart.
            fetch_results(ctx, &args.job_id).await?;
            bail!("no artifacts found for job {}", args.job_id)
        }
        status => {
            let body = resp.bytes().await.unwrap_or_default();
            let reply = Reply::from_parts(status, body, format!("GET {path}"));
            return Err(job_error(&reply, &args.job_id));
        }
    }
    let target = &args.filename;
    let mut part_name = target.as_os_str().to_owned();
    part_name.push(".part");
    let part = std::path::PathBuf::from(part_name);
    let mut file = tokio::fs::File::create(&part)
        .await
        .with_context(|| format!("cannot create {}", part.display()))?;
    let mut body = resp.bytes_stream();
    let mut written: u64 = 0;
    while let Some(chunk) = body.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => {
                let _ = tokio::fs::remove_file(&part).await;
                return Err(ctx.client.transport_error(e));
            }
        };
        written += chunk.len() as u64;
        if let Err(e) = file.write_all(&chunk).await {
            let _ = tokio::fs::remove_file(&part).await;
            return Err(e).with_context(|| format!("cannot write {}", part.display()));
        }
    }
    file.flush()
        .await
        .with_context(|| format!("cannot write {}", part.display()))?;
    drop(file);
    tokio::fs::rename(&part, target)
        .await
        .with_context(|| format!("cannot write {}", target.display()))?;
    println!("Artifacts saved to {} ({written} bytes)", target.display());
    Ok(ExitCode::SUCCESS)
}
