//! `submit`: pre-check the queue, pack attachments, `POST /v1/job`, upload the
//! attachments, remember the job, and optionally follow it.

use super::{Ctx, job, poll};
use crate::args::{PollArgs, SubmitArgs};
use crate::client::{TimedOut, seg};
use crate::history::History;
use crate::jobfile;
use anyhow::{Context, anyhow, bail};
use reqwest::{Method, StatusCode};
use serde_json::Value;
use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

pub async fn run(ctx: &Ctx, args: &SubmitArgs) -> anyhow::Result<ExitCode> {
    let (text, origin, dir) = if args.filename == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("cannot read the job from stdin")?;
        (text, "<stdin>".to_string(), std::env::current_dir().ok())
    } else {
        let path = PathBuf::from(&args.filename);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read job file {}", path.display()))?;
        let dir = path
            .parent()
            .map(|p| {
                if p.as_os_str().is_empty() {
                    PathBuf::from(".")
                } else {
                    p.to_path_buf()
                }
            })
            .and_then(|p| std::fs::canonicalize(p).ok());
        (text, args.filename.clone(), dir)
    };
    let job = jobfile::parse(&text, &origin)?;
    let relative_to = match &args.attachments_relative_to {
        Some(d) => d.clone(),
        None => dir.unwrap_or_else(|| PathBuf::from(".")),
    };
    let job_id = submit(ctx, job, &relative_to, args.wait_for_available_agents).await?;
    if args.quiet {
        println!("{job_id}");
    } else {
        println!("job_id: {job_id}");
    }
    if args.poll {
        let poll_args = PollArgs {
            job_id,
            oneshot: false,
            start_fragment: 0,
            start_timestamp: None,
            phase: None,
            json: false,
        };
        return poll::run(ctx, &poll_args, testflinger_common::LogType::Output).await;
    }
    Ok(ExitCode::SUCCESS)
}

/// Submits a parsed job and returns its id. The job is sent as written: the server
/// decides what is valid.
pub async fn submit(
    ctx: &Ctx,
    mut job: Value,
    relative_to: &std::path::Path,
    wait_for_agents: bool,
) -> anyhow::Result<String> {
    let queue = job
        .get("job_queue")
        .and_then(Value::as_str)
        .map(str::to_string);
    if let Some(queue) = &queue {
        check_agents(ctx, queue, &job, wait_for_agents).await?;
    }
    let attachments = jobfile::pack_attachments(&mut job, relative_to)?;

    let reply = ctx.client.post_json("/v1/job", &job).await?;
    if !reply.ok() {
        let msg = reply.message();
        return Err(match reply.status {
            StatusCode::UNAUTHORIZED => anyhow!("the server requires authentication: {msg}"),
            StatusCode::FORBIDDEN => anyhow!("not allowed to submit this job: {msg}"),
            status => anyhow!("the server rejected the job ({status}): {msg}"),
        });
    }
    let job_id = reply
        .json()?
        .get("job_id")
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| anyhow!("the server accepted the job but sent no job_id"))?;

    if let Some(archive) = attachments
        && let Err(e) = upload_attachments(ctx, &job_id, archive).await
    {
        // A job that waits for attachments that never come would hold its place.
        let cancelled = job::cancel_job(ctx, &job_id).await.is_ok();
        let what = if cancelled {
            "the job was cancelled"
        } else {
            "the job could not be cancelled"
        };
        return Err(e.context(format!(
            "cannot upload the attachments of job {job_id} ({what})"
        )));
    }

    let mut history = History::load();
    history.add(&job_id, queue.as_deref().unwrap_or(""));
    if let Err(e) = history.save() {
        eprintln!("warning: {e:#}");
    }
    Ok(job_id)
}

/// Refuses to submit to a queue that no agent can serve now (upstream's pre-check).
async fn check_agents(
    ctx: &Ctx,
    queue: &str,
    job: &Value,
    wait_for_agents: bool,
) -> anyhow::Result<()> {
    let reply = ctx
        .client
        .get(&format!("/v1/queues/{}/agents", seg(queue)))
        .await?;
    let agents = match reply.status {
        StatusCode::OK => reply
            .json()
            .ok()
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default(),
        StatusCode::NOT_FOUND => {
            let msg = reply.message();
            let msg = if msg.is_empty() {
                format!("Queue '{queue}' does not exist.")
            } else {
                msg
            };
            if wait_for_agents {
                eprintln!("warning: {msg} Submitting anyway (--wait-for-available-agents).");
                return Ok(());
            }
            bail!("{msg} Use --wait-for-available-agents to submit anyway");
        }
        _ => Vec::new(),
    };
    let excluded: Vec<&str> = job
        .get("exclude_agents")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    // Busy agents count (the job waits for them); offline, maintenance, lost or
    // stopped ones do not.
    let available = agents.iter().any(|a| {
        let name = a.get("name").and_then(Value::as_str).unwrap_or("");
        super::queues::availability(a) != super::queues::Availability::Unavailable
            && !excluded.contains(&name)
    });
    if !available {
        if wait_for_agents {
            eprintln!(
                "warning: no online agents are available for queue '{queue}'; the job will wait"
            );
        } else {
            bail!(
                "no online agents are available for queue '{queue}'; use --wait-for-available-agents to submit anyway"
            );
        }
    }
    Ok(())
}

fn config_number(ctx: &Ctx, key: &str, default: u64) -> u64 {
    ctx.config
        .get(key)
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `POST /v1/job/<id>/attachments`, retried on timeouts.
async fn upload_attachments(ctx: &Ctx, job_id: &str, archive: Vec<u8>) -> anyhow::Result<()> {
    let tries = config_number(ctx, "attachments_tries", 3).max(1);
    let timeout = Duration::from_secs(config_number(ctx, "attachments_timeout", 600));
    let retry_wait = Duration::from_secs(config_number(ctx, "attachments_retry_wait", 10));
    let path = format!("/v1/job/{}/attachments", seg(job_id));
    let archive = bytes::Bytes::from(archive);
    let mut attempt = 0;
    loop {
        attempt += 1;
        let part = reqwest::multipart::Part::stream(archive.clone())
            .file_name("attachments.tar.gz")
            .mime_str("application/x-gzip")
            .context("cannot build the upload")?;
        let form = reqwest::multipart::Form::new().part("file", part);
        let result = ctx
            .client
            .send(Method::POST, &path, |r| r.multipart(form).timeout(timeout))
            .await;
        match result {
            Ok(reply) if reply.ok() => return Ok(()),
            Ok(reply) => return Err(reply.error()),
            Err(e) if attempt < tries && e.is::<TimedOut>() => {
                eprintln!("warning: attachment upload timed out, retrying ({attempt}/{tries})");
                tokio::time::sleep(retry_wait).await;
            }
            Err(e) => return Err(e),
        }
    }
}
