//! `testflinger-agent -c <config.yaml>`: runs one device agent until SIGTERM or SIGINT.
//!
//! `testflinger-agent watchdog` is started by the agent itself, one per agent, and kills
//! a phase the agent can no longer look after (see `testflinger_agent::process`); it is
//! not for people.
//!
//! Exits 2 on a bad command line, 1 on an unreadable or invalid config file (the
//! message names the file and the key) or a malformed AMQP URI; 0 after a clean
//! shutdown, in which a running job was finished or released to its queue.

use clap::Parser;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use testflinger_agent::{Config, telemetry};

#[derive(Parser, Debug)]
#[command(
    name = "testflinger-agent",
    version,
    about = "Testflinger device agent"
)]
struct Args {
    /// The agent configuration file (YAML).
    #[arg(short = 'c', long = "config", default_value = "testflinger-agent.conf")]
    config: PathBuf,
    /// Upstream's token file: JSON `{"refresh_token": "..."}` from the lab's provisioning.
    /// Absent file: the agent talks to the API unauthenticated.
    #[arg(
        long = "token-file",
        default_value = "/var/lib/testflinger-agent/refresh_token"
    )]
    token_file: PathBuf,
    #[command(subcommand)]
    internal: Option<Internal>,
}

/// Started by the agent itself, not by people.
#[derive(clap::Subcommand, Debug)]
enum Internal {
    /// Kills a phase's process group if the agent dies or stops renewing its lease
    /// (see `testflinger_agent::process`).
    #[command(hide = true)]
    Watchdog {
        #[arg(long, default_value_t = 1000)]
        grace_ms: u64,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(Internal::Watchdog { grace_ms }) = args.internal {
        testflinger_agent::process::watchdog_main(Duration::from_millis(grace_ms));
        return ExitCode::SUCCESS;
    }
    let mut cfg = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("testflinger-agent: {e}");
            return ExitCode::FAILURE;
        }
    };
    cfg.token_file = Some(args.token_file);
    telemetry::init(&cfg);
    // One device, one job at a time: a single-threaded runtime is enough (phase commands
    // are child processes, lapin has its own I/O thread) and keeps the agent small.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("testflinger-agent: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(testflinger_agent::run(cfg, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("testflinger-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
