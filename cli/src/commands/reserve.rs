//! `reserve`: build a reservation job from the flags, then submit and follow it.

use super::{Ctx, poll, submit};
use crate::args::{PollArgs, ReserveArgs};
use crate::client::seg;
use anyhow::{Context, bail};
use reqwest::StatusCode;
use serde_json::{Map, Value, json};
use std::process::ExitCode;

pub async fn run(ctx: &Ctx, args: &ReserveArgs) -> anyhow::Result<ExitCode> {
    let mut job = Map::new();
    job.insert("job_queue".into(), json!(args.queue));
    if let Some(image) = &args.image {
        job.insert(
            "provision_data".into(),
            image_provision_data(ctx, args, image).await?,
        );
    } else if let Some(distro) = &args.distro {
        job.insert("provision_data".into(), json!({"distro": distro}));
    }
    let timeout = match args.timeout.trim().parse::<u64>() {
        Ok(secs) => json!(secs),
        // Durations such as `2h` go to the server as written.
        Err(_) => json!(args.timeout.trim()),
    };
    let mut reserve = Map::new();
    if !args.keys.is_empty() {
        reserve.insert("ssh_keys".into(), json!(args.keys));
    }
    reserve.insert("timeout".into(), timeout);
    job.insert("reserve_data".into(), Value::Object(reserve));
    let job = Value::Object(job);

    let mut yaml = serde_saphyr::to_string(&job).context("cannot render the job as YAML")?;
    if !yaml.ends_with('\n') {
        yaml.push('\n');
    }
    if args.dry_run {
        print!("{yaml}");
        return Ok(ExitCode::SUCCESS);
    }
    if !args.yes {
        println!("The following reservation job will be submitted:\n{yaml}");
        eprint!("Submit it? [y/N] ");
        let mut answer = String::new();
        std::io::stdin()
            .read_line(&mut answer)
            .context("cannot read the answer")?;
        if !matches!(answer.trim().to_lowercase().as_str(), "y" | "yes") {
            bail!("reservation not submitted");
        }
    }
    let cwd = std::env::current_dir().unwrap_or_else(|_| ".".into());
    let job_id = submit::submit(ctx, job, &cwd, false).await?;
    println!("job_id: {job_id}");
    let poll_args = PollArgs {
        job_id,
        oneshot: false,
        start_fragment: 0,
        start_timestamp: None,
        phase: None,
        json: false,
    };
    poll::run(ctx, &poll_args, testflinger_common::LogType::Output).await
}

/// The provision data of an advertised image: the server stores it as a YAML string
/// (`url: http://...`); a bare string is taken as the URL.
async fn image_provision_data(ctx: &Ctx, args: &ReserveArgs, image: &str) -> anyhow::Result<Value> {
    let reply = ctx
        .client
        .get(&format!("/v1/agents/images/{}", seg(&args.queue)))
        .await?;
    let images = match reply.status {
        StatusCode::OK => reply.json()?,
        StatusCode::NO_CONTENT => json!({}),
        _ => return Err(reply.error()),
    };
    let Some(data) = images.get(image) else {
        let mut names: Vec<&String> = images
            .as_object()
            .map(|m| m.keys().collect())
            .unwrap_or_default();
        names.sort();
        if names.is_empty() {
            bail!("queue '{}' advertises no images", args.queue);
        }
        let names: Vec<&str> = names.iter().map(|s| s.as_str()).collect();
        bail!(
            "image '{image}' is not advertised on queue '{}'; available: {}",
            args.queue,
            names.join(", ")
        );
    };
    Ok(match data {
        Value::String(s) => match serde_saphyr::from_str::<Value>(s) {
            Ok(v @ Value::Object(_)) => v,
            _ => json!({"url": s}),
        },
        other => other.clone(),
    })
}
