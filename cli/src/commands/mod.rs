//! One module per subcommand (or small group), behind [`run`]'s single `match`.

mod admin;
mod agents;
mod job;
mod local;
mod poll;
mod queues;
mod reserve;
mod submit;

use crate::args::{Cli, Command};
use crate::client::Client;
use crate::config::{self, ConfigFile};
use std::process::ExitCode;

/// What every command that talks to the server gets.
pub struct Ctx {
    pub client: Client,
    pub config: ConfigFile,
}

pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let path = cli.configfile.clone().unwrap_or_else(config::default_path);
    let config = ConfigFile::load(&path)?;
    // These work without a (valid) server, so that a bad `server` can be fixed.
    let command = match cli.command {
        Command::Config(args) => return local::config(config, &args),
        Command::Completions(args) => return local::completions(&args),
        other => other,
    };
    let server = config::resolve_server(cli.server.as_deref(), &config)?;
    let creds = crate::auth::Credentials::resolve(
        cli.client_id.as_deref(),
        cli.secret_key.as_deref(),
        &config,
    );
    let session = crate::auth::Session::new(creds, &server);
    let ctx = Ctx {
        client: Client::new(server, cli.debug, session)?,
        config,
    };
    match command {
        Command::Submit(args) => submit::run(&ctx, &args).await,
        Command::Poll(args) => poll::run(&ctx, &args, testflinger_common::LogType::Output).await,
        Command::PollSerial(args) => {
            poll::run(&ctx, &args, testflinger_common::LogType::Serial).await
        }
        Command::Status(args) => job::status(&ctx, &args.job_id).await,
        Command::Results(args) => job::results(&ctx, &args.job_id).await,
        Command::Artifacts(args) => job::artifacts(&ctx, &args).await,
        Command::Show(args) => job::show(&ctx, &args).await,
        Command::Cancel(args) => job::cancel(&ctx, &args.job_id).await,
        Command::ListQueues(args) => queues::list(&ctx, args.json).await,
        Command::QueueStatus(args) => queues::status(&ctx, &args).await,
        Command::ListAgents(args) => agents::list(&ctx, &args).await,
        Command::AgentStatus(args) => agents::status(&ctx, &args).await,
        Command::Reserve(args) => reserve::run(&ctx, &args).await,
        Command::Jobs(args) => local::jobs(&ctx, &args).await,
        Command::Login => admin::login(&ctx).await,
        Command::Secret(args) => admin::secret(&ctx, args).await,
        Command::Admin(args) => admin::admin(&ctx, args).await,
        Command::Config(_) | Command::Completions(_) => Ok(ExitCode::SUCCESS),
    }
}

/// Pretty JSON with keys sorted at every level.
pub fn sorted_json(v: &serde_json::Value) -> String {
    fn sort(v: &serde_json::Value) -> serde_json::Value {
        match v {
            serde_json::Value::Object(m) => {
                let mut entries: Vec<_> = m.iter().collect();
                entries.sort_by(|a, b| a.0.cmp(b.0));
                serde_json::Value::Object(
                    entries
                        .into_iter()
                        .map(|(k, v)| (k.clone(), sort(v)))
                        .collect(),
                )
            }
            serde_json::Value::Array(a) => serde_json::Value::Array(a.iter().map(sort).collect()),
            other => other.clone(),
        }
    }
    serde_json::to_string_pretty(&sort(v)).unwrap_or_else(|_| v.to_string())
}
