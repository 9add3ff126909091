//! `reserve`: build a reservation job from the flags, then submit and follow it.

use super::{Ctx, poll, submit};
use crate::args::{PollArgs, ReserveArgs};
use crate::client::seg;
use anyhow::{Context, bail};
use reqwest::StatusCode;
use serde_json::{Map, Value, json};
use std::process::ExitCode;

pub async fn run(ctx: &Ctx, args: &ReserveArgs) -> anyhow::Result<ExitCode> {
    let queue = match &args.queue {
        Some(q) => q.clone(),
        None => ask_queue(ctx).await?,
    };
    let mut job = Map::new();
    job.insert("job_queue".into(), json!(queue));
    if let Some(image) = &args.image {
        job.insert(
            "provision_data".into(),
            image_provision_data(ctx, &queue, image).await?,
        );
    } else if let Some(distro) = &args.distro {
        let mut pd = json!({"distro": distro});
        if args.ephemeral {
            pd["ephemeral"] = json!(true);
        }
        job.insert("provision_data".into(), pd);
    }
    let keys = args
        .keys
        .iter()
        .map(|k| key_argument(k))
        .collect::<anyhow::Result<Vec<String>>>()?;
    let timeout = match args.timeout.trim().parse::<u64>() {
        Ok(secs) => json!(secs),
        // Durations such as `2h` go to the server as written.
        Err(_) => json!(args.timeout.trim()),
    };
    let mut reserve = Map::new();
    if !keys.is_empty() {
        reserve.insert("ssh_keys".into(), json!(keys));
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
async fn image_provision_data(ctx: &Ctx, queue: &str, image: &str) -> anyhow::Result<Value> {
    let reply = ctx
        .client
        .get(&format!("/v1/agents/images/{}", seg(queue)))
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
            bail!("queue '{queue}' advertises no images");
        }
        let names: Vec<&str> = names.iter().map(|s| s.as_str()).collect();
        bail!(
            "image '{image}' is not advertised on queue '{queue}'; available: {}",
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

/// A `-k` value as the job carries it: `lp:`/`gh:` and OpenSSH key lines as given; a
/// path (it names an existing file, or looks like one) is read and must hold one public
/// key line.
fn key_argument(k: &str) -> anyhow::Result<String> {
    let k = k.trim();
    if k.starts_with("lp:") || k.starts_with("gh:") {
        return Ok(k.to_string());
    }
    let path = std::path::Path::new(k);
    let looks_like_path = k.contains('/') || k.ends_with(".pub") || path.is_file();
    if k.split_whitespace().count() >= 2 && !path.is_file() {
        return Ok(k.to_string());
    }
    if !looks_like_path {
        bail!(
            "-k/--key: '{k}' is not lp:<user>, gh:<user>, an OpenSSH public key line or a key file"
        );
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("-k/--key: cannot read the key file '{k}'"))?;
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .ok_or_else(|| anyhow::anyhow!("-k/--key: the key file '{k}' holds no key"))?;
    if line.contains("PRIVATE KEY") {
        bail!("-k/--key: '{k}' is a private key; give the public key (the .pub file)");
    }
    Ok(line.to_string())
}

/// Asks which advertised queue to reserve on (upstream's interactive prompt). Refuses
/// when stdin is not a terminal: a script must say `-q`.
async fn ask_queue(ctx: &Ctx) -> anyhow::Result<String> {
    use std::io::IsTerminal;
    if !std::io::stdin().is_terminal() {
        bail!("-q/--queue is required when not run interactively");
    }
    let reply = ctx.client.get("/v1/agents/queues").await?;
    let queues = match reply.status {
        StatusCode::OK => reply.json()?,
        StatusCode::NO_CONTENT => json!({}),
        _ => return Err(reply.error()),
    };
    let mut names: Vec<String> = queues
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    names.sort();
    if names.is_empty() {
        bail!("the server advertises no queues; give one with -q/--queue");
    }
    eprintln!("Advertised queues: {}", names.join(", "));
    eprint!("Queue to reserve on: ");
    let mut answer = String::new();
    std::io::stdin()
        .read_line(&mut answer)
        .context("cannot read the answer")?;
    let answer = answer.trim().to_string();
    if answer.is_empty() {
        bail!("no queue given");
    }
    Ok(answer)
}
