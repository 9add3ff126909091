//! `testflinger-device-connectors <type> <stage> -c <device.yaml> <job.json>`: runs one
//! stage of one device type in the current directory. Exit 0 success, 1 failure (bad
//! input included, reported as one line naming the file), 46 device recovery failure;
//! `runtest` exits with the tests' code.

use clap::Parser;
use std::path::PathBuf;
use std::process::ExitCode;
use testflinger_connectors::{Invocation, run};

#[derive(Parser)]
#[command(version, about = "Run one stage of a Testflinger device connector")]
struct Cli {
    /// Device type (fake, fake_connector, noprovision, multi)
    device_type: String,
    /// Stage: provision, firmware_update, runtest, allocate, reserve, cleanup
    stage: String,
    /// Device config (YAML)
    #[arg(short = 'c', long = "config")]
    config: PathBuf,
    /// Job file (JSON), as the agent writes it
    job: PathBuf,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            let text = e.to_string();
            let line = text
                .lines()
                .map(str::trim)
                .take_while(|l| !l.starts_with("Usage:"))
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join(" ");
            eprintln!(
                "{line} (usage: testflinger-device-connectors <type> <stage> -c <device.yaml> <job.json>)"
            );
            return ExitCode::from(1);
        }
    };
    match real_main(cli) {
        Ok(code) => ExitCode::from(u8::try_from(code & 0xff).unwrap_or(1)),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn real_main(cli: Cli) -> anyhow::Result<i32> {
    let dir = std::env::current_dir()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let inv = Invocation {
        device_type: cli.device_type,
        stage: cli.stage,
        config: cli.config,
        job: cli.job,
    };
    Ok(rt.block_on(run(&inv, &dir)))
}
