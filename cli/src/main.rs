//! `testflinger`: the Testflinger user client.
//!
//! Submits jobs, follows their output, fetches results and artifacts, and shows queues
//! and agents, talking HTTP to a Testflinger server (`--server`, else the config file's
//! `server`, else `TESTFLINGER_SERVER`).
//!
//! Every failure ends the process with a single `error: ...` line on stderr and exit
//! status 1 (130 after Ctrl-C); there are no stack traces.
//!
//! Layout:
//! - [`args`]: the command line (clap derive), one enum variant per subcommand.
//! - [`config`]: the INI config file and server resolution.
//! - [`client`]: the HTTP client and the mapping of server answers to one-line errors.
//! - [`history`]: the local job history.
//! - [`help_markdown`]: the generated CLI reference (hidden `help-markdown`).
//! - [`jobfile`]: reading YAML/JSON job files and packing attachments.
//! - [`commands`]: one module per subcommand (or small group).

mod args;
mod auth;
mod client;
mod commands;
mod config;
mod help_markdown;
mod history;
mod jobfile;
mod output;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    // No stack traces: a panic (a bug, or stdout closed under `println!`) is one line.
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".to_string());
        if !msg.contains("Broken pipe") {
            eprintln!("error: internal error: {}", output::one_line(&msg));
        }
        std::process::exit(1);
    }));
    // Hidden: the CLI reference page of the documentation (scripts/docs gen).
    if std::env::args().nth(1).as_deref() == Some("help-markdown") {
        print!("{}", help_markdown::render());
        return ExitCode::SUCCESS;
    }
    let cli = args::Cli::parse();
    // reqwest is built without a default crypto provider, so pick ring once.
    let _ = rustls::crypto::ring::default_provider().install_default();

    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(commands::run(cli)) {
        Ok(code) => code,
        Err(e) => {
            output::print_error(&e);
            ExitCode::FAILURE
        }
    }
}
