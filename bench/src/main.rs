//! `testflinger-bench [--quick] [--json FILE] SCENARIO...`: measures the Testflinger
//! server and agent against the machine's RabbitMQ and Redis (`AMQP_URI`, `REDIS_URL`).
//! `testflinger-bench faults [--quick] [--json FILE] [SCENARIO...]`: the fault suite on
//! private RabbitMQ and Redis instances ([`faults`], `RELIABILITY.md`).
//!
//! Each scenario starts the `testflinger-server` and `testflinger-agent` binaries it needs
//! (found next to this executable, or in `--bin-dir`) with a private Redis prefix and
//! private queue names, prints one table row, appends one JSON line to `--json`, and
//! removes its queues and Redis keys afterwards. A scenario that cannot run says why;
//! the exit status is then 1 (2 for a bad command line). Figures are never invented.
//!
//! Layout: [`harness`] (processes, private names, clean-up), [`load`] (HTTP submit load),
//! [`events`] (job events from `testflinger.events`), [`report`] (table and JSON lines),
//! [`scenarios`] (one module per scenario, one `match` dispatching them).

mod events;
mod faults;
mod harness;
mod load;
mod report;
mod scenarios;
mod stats;

use clap::Parser;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(
    name = "testflinger-bench",
    version,
    about = "Benchmarks of testflinger-server and testflinger-agent"
)]
struct Args {
    /// Scenarios to run, in the order given: raw-publish, submit, dispatch, e2e, stream,
    /// artifact, memory, scale, or all. (`testflinger-bench faults --help`: the fault
    /// suite.)
    #[arg(required = true)]
    scenarios: Vec<String>,
    /// Small sizes and short durations, for smoke runs (each scenario well under a minute).
    #[arg(long)]
    quick: bool,
    /// Append one JSON line per scenario to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Where testflinger-server and testflinger-agent are (default: next to this binary).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// RabbitMQ.
    #[arg(
        long,
        env = "AMQP_URI",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    amqp_uri: String,
    /// Redis.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379/")]
    redis_url: String,
    /// Agents in `e2e` (default 20, 4 with --quick).
    #[arg(long)]
    agents: Option<usize>,
    /// Jobs in `e2e` (default 5000, 300 with --quick).
    #[arg(long)]
    jobs: Option<usize>,
    /// Seconds of load in `submit` and `raw-publish` (default 20, 4 with --quick).
    #[arg(long)]
    seconds: Option<u64>,
    /// Extra environment for every server started, `KEY=VALUE` (repeatable), for
    /// experiments such as `TESTFLINGER_EVENTS=false`.
    #[arg(long = "server-env", value_name = "KEY=VALUE")]
    server_env: Vec<String>,
}

fn main() -> ExitCode {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if argv.get(1).is_some_and(|a| a == "faults") {
        return faults::main(argv[1..].to_vec());
    }
    let args = Args::parse();
    let list = match scenarios::parse_list(&args.scenarios) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("testflinger-bench: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("testflinger-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(run(args, list))
}

async fn run(args: Args, list: Vec<scenarios::Scenario>) -> ExitCode {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let opts = harness::Options {
        quick: args.quick,
        bin_dir: args.bin_dir.clone(),
        amqp_uri: args.amqp_uri.clone(),
        redis_url: args.redis_url.clone(),
        agents: args.agents,
        jobs: args.jobs,
        seconds: args.seconds,
        server_env: match parse_env(&args.server_env) {
            Ok(v) => v,
            Err(e) => {
                eprintln!("testflinger-bench: {e}");
                return ExitCode::from(2);
            }
        },
    };
    let mut ctx = match harness::Ctx::new(opts).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("testflinger-bench: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let mut out = report::Output::new(args.json.clone(), args.quick);
    eprintln!(
        "testflinger-bench: run {} (Redis prefix {}*), {} mode",
        ctx.run_id,
        ctx.prefix,
        if args.quick { "quick" } else { "full" }
    );
    let mut failed = Vec::new();
    for s in list {
        let started = std::time::Instant::now();
        eprintln!("testflinger-bench: {} ...", s.name());
        // On SIGINT/SIGTERM the scenario is dropped (its processes are killed on drop),
        // this run's queues and keys are removed, and the run ends.
        let r = tokio::select! {
            r = scenarios::run(s, &mut ctx) => Some(r),
            _ = interrupted() => None,
        };
        let cleanup = ctx.cleanup().await;
        let Some(r) = r else {
            eprintln!(
                "testflinger-bench: interrupted during {}; cleaned up",
                s.name()
            );
            if let Err(e) = cleanup {
                eprintln!("testflinger-bench: clean-up: {e:#}");
            }
            return ExitCode::from(130);
        };
        match r {
            Ok(rep) => {
                eprintln!(
                    "testflinger-bench: {} done in {:.1} s",
                    s.name(),
                    started.elapsed().as_secs_f64()
                );
                if let Err(e) = out.record(&rep) {
                    eprintln!("testflinger-bench: cannot write the JSON line: {e:#}");
                    failed.push(s.name());
                }
            }
            Err(e) => {
                eprintln!("testflinger-bench: {} cannot run: {e:#}", s.name());
                out.failed(s.name(), &format!("{e:#}"));
                failed.push(s.name());
            }
        }
        if let Err(e) = cleanup {
            eprintln!("testflinger-bench: clean-up after {}: {e:#}", s.name());
        }
    }
    out.print_table();
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        eprintln!(
            "testflinger-bench: {} scenario(s) could not run: {}",
            failed.len(),
            failed.join(", ")
        );
        ExitCode::FAILURE
    }
}

fn parse_env(raw: &[String]) -> Result<Vec<(String, String)>, String> {
    raw.iter()
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| format!("--server-env wants KEY=VALUE, got '{kv}'"))
        })
        .collect()
}

/// Resolves on SIGINT or SIGTERM.
async fn interrupted() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut i), Ok(mut t)) => {
            tokio::select! {
                _ = i.recv() => {}
                _ = t.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
