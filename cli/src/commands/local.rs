//! `config`, `completions` and `jobs`: the commands that mostly stay on this machine.

use super::Ctx;
use crate::args::{Cli, CompletionShell, CompletionsArgs, ConfigArgs, JobsArgs};
use crate::config::ConfigFile;
use crate::history::History;
use anyhow::{Context, bail};
use clap::CommandFactory;
use reqwest::StatusCode;
use std::io::Write;
use std::process::ExitCode;

pub fn config(mut cfg: ConfigFile, args: &ConfigArgs) -> anyhow::Result<ExitCode> {
    let Some(setting) = &args.setting else {
        let entries: Vec<(&str, &str)> = cfg.entries().collect();
        if entries.is_empty() {
            // Say where settings would come from instead of printing nothing.
            let exists = cfg.path.exists();
            println!(
                "# {} {}",
                cfg.path.display(),
                if exists {
                    "has no settings"
                } else {
                    "does not exist"
                }
            );
            let (server, from) = match std::env::var("TESTFLINGER_SERVER") {
                Ok(s) if !s.trim().is_empty() => (s, "from $TESTFLINGER_SERVER"),
                _ => (crate::config::DEFAULT_SERVER.to_string(), "the default"),
            };
            println!("# server = {server} ({from}); set one with: testflinger config server=URL");
        }
        for (k, v) in entries {
            println!("{k} = {v}");
        }
        return Ok(ExitCode::SUCCESS);
    };
    let Some((key, value)) = setting.split_once('=') else {
        bail!("expected key=value, got '{setting}'");
    };
    let key = key.trim();
    if key.is_empty() {
        bail!("expected key=value, got '{setting}'");
    }
    cfg.set(key, value.trim());
    cfg.save()?;
    println!("{key} = {}", value.trim());
    Ok(ExitCode::SUCCESS)
}

pub fn completions(args: &CompletionsArgs) -> anyhow::Result<ExitCode> {
    use clap_complete::Shell;
    let shell = match args.shell {
        CompletionShell::Bash => Shell::Bash,
        CompletionShell::Zsh => Shell::Zsh,
        CompletionShell::Fish => Shell::Fish,
    };
    let mut cmd = Cli::command();
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cmd, "testflinger", &mut script);
    std::io::stdout()
        .write_all(&script)
        .context("cannot write the completion script")?;
    Ok(ExitCode::SUCCESS)
}

pub async fn jobs(ctx: &Ctx, args: &JobsArgs) -> anyhow::Result<ExitCode> {
    let mut history = History::load();
    if history.jobs.is_empty() {
        println!("No jobs submitted from this machine");
        return Ok(ExitCode::SUCCESS);
    }
    if args.status {
        let ids: Vec<String> = history.jobs.iter().map(|(id, _)| id.clone()).collect();
        for id in ids {
            let reply = ctx
                .client
                .get(&format!("/v1/result/{}", crate::client::seg(&id)))
                .await?;
            let state = match reply.status {
                StatusCode::OK => reply
                    .json()
                    .ok()
                    .and_then(|v| v.get("job_state")?.as_str().map(str::to_string))
                    .unwrap_or_else(|| "unknown".to_string()),
                StatusCode::NO_CONTENT => "expired".to_string(),
                _ => "unknown".to_string(),
            };
            history.set_state(&id, &state);
        }
        let _ = history.save();
    }
    println!(
        "{:<36}  {:<15}  {:<20}  Queue",
        "Job ID", "State", "Submitted (UTC)"
    );
    for (id, e) in &history.jobs {
        let secs = e.submission_time as i64;
        let when = chrono::DateTime::from_timestamp(secs, 0)
            .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
            .unwrap_or_default();
        println!("{id:<36}  {:<15}  {when:<20}  {}", e.job_state, e.queue);
    }
    Ok(ExitCode::SUCCESS)
}
