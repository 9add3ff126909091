//! `testflinger-bench faults [--quick] [--json FILE] [SCENARIO...]`: the fault suite.
//!
//! Starts private service instances (a RabbitMQ node of its own and a Redis with AOF on
//! a free port; never the machine's shared ones), then per scenario our server(s) and
//! agents against them, with a test command that records what it does in a ledger
//! ([`ledger`]). Each scenario injects its faults under load and prints one table row
//! and writes one JSON line: `scenario`, `accepted`, `completed`, `ended_other`
//! (`"state: reason"` -> count), `lost` (accepted, never final), `concurrent_runs` (jobs
//! whose ledger runs overlapped), `stale_writes_accepted`, `output_lines_lost` (lines a
//! finished test printed that the job's final result lacks), `submit_5xx` (5xx other
//! than 503), `submit_503`, `recovery_s` (fault end to the first test start after it,
//! worst fault), plus `overlap_max_s`, `requeue_max_s`, `notes` and the parameters.
//!
//! Exit status: 0 when every scenario ran (whatever its figures), 1 when one could not
//! run, 2 for a bad command line, 130 when interrupted. A broken guarantee is a figure,
//! never an exit status: the suite measures, `RELIABILITY.md` says what the figures
//! should be.

mod ledger;
mod proxy;
mod scenarios;
mod stack;
mod world;

use crate::harness::{Ctx, Options};
use anyhow::Context;
use clap::Parser;
use serde_json::{Map, Value, json};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(
    name = "testflinger-bench faults",
    bin_name = "testflinger-bench faults",
    about = "Fault scenarios on private RabbitMQ and Redis instances: lost jobs, concurrent runs, stale writes, lost output"
)]
pub struct FaultArgs {
    /// Scenarios, in order: agent-kill, agent-freeze, broker-restart, broker-cluster,
    /// redis-restart, api-restart, partition, or all (the default).
    scenarios: Vec<String>,
    /// Small sizes (the whole suite in a few minutes).
    #[arg(long)]
    quick: bool,
    /// Append one JSON line per scenario to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Where testflinger-server and testflinger-agent are (default: next to this binary).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Agents (default per scenario: agent-kill 20, others 6; 4 and 3 with --quick).
    #[arg(long)]
    agents: Option<usize>,
    /// Jobs in agent-kill (default 10000, 300 with --quick).
    #[arg(long)]
    jobs: Option<usize>,
}

/// The private instances every scenario shares (broker-cluster starts its own nodes).
pub struct Stack {
    pub dir: stack::StackDir,
    pub run_id: String,
    pub rabbit: stack::Rabbit,
    pub redis: stack::Redis,
    _epmd: Option<crate::harness::Proc>,
}

impl Stack {
    async fn start(run_id: &str) -> anyhow::Result<Stack> {
        let dir = stack::StackDir::new(run_id)?;
        let epmd = stack::ensure_epmd(&dir)?;
        let mut rabbit = stack::Rabbit::new(&dir, &format!("tfb{run_id}"))?;
        let mut redis = stack::Redis::new(&dir, "redis")?;
        redis.start().await.context("private Redis")?;
        rabbit.start().await.context("private RabbitMQ")?;
        Ok(Stack {
            dir,
            run_id: run_id.to_string(),
            rabbit,
            redis,
            _epmd: epmd,
        })
    }

    async fn stop(mut self) {
        self.rabbit.stop().await;
        self.redis.stop().await;
    }
}

pub fn main(args: Vec<std::ffi::OsString>) -> ExitCode {
    let args = match FaultArgs::try_parse_from(args) {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    let mut list: Vec<&'static str> = Vec::new();
    for n in &args.scenarios {
        let add: Vec<&'static str> = if n == "all" {
            scenarios::ALL.to_vec()
        } else if let Some(s) = scenarios::ALL.iter().find(|s| **s == n) {
            vec![*s]
        } else {
            eprintln!(
                "testflinger-bench faults: unknown scenario '{n}' (use {} or all)",
                scenarios::ALL.join(", ")
            );
            return ExitCode::from(2);
        };
        for s in add {
            if !list.contains(&s) {
                list.push(s);
            }
        }
    }
    if list.is_empty() {
        list = scenarios::ALL.to_vec();
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("testflinger-bench faults: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(run(args, list))
}

async fn run(args: FaultArgs, list: Vec<&'static str>) -> ExitCode {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
    let t0 = std::time::Instant::now();
    eprintln!("testflinger-bench faults: run {run_id}: starting a private RabbitMQ and Redis");
    let started = tokio::select! {
        s = Stack::start(&run_id) => s,
        _ = crate::interrupted() => return ExitCode::from(130),
    };
    let mut stack = match started {
        Ok(s) => s,
        Err(e) => {
            eprintln!("testflinger-bench faults: cannot start the private services: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let opts = Options {
        quick: args.quick,
        bin_dir: args.bin_dir.clone(),
        amqp_uri: stack.rabbit.uri(),
        redis_url: stack.redis.url(),
        agents: args.agents,
        jobs: args.jobs,
        seconds: None,
        server_env: Vec::new(),
    };
    let ctx = match Ctx::new(opts).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("testflinger-bench faults: {e:#}");
            stack.stop().await;
            return ExitCode::FAILURE;
        }
    };
    let mut rows: Vec<Map<String, Value>> = Vec::new();
    let mut failed = Vec::new();
    let mut interrupted = false;
    for s in &list {
        let st = std::time::Instant::now();
        eprintln!("testflinger-bench faults: {s} ...");
        let r = tokio::select! {
            r = scenarios::run(s, &ctx, &mut stack) => Some(r),
            _ = crate::interrupted() => None,
        };
        let row = match r {
            None => {
                interrupted = true;
                break;
            }
            Some(Ok(mut m)) => {
                m.insert(
                    "seconds".into(),
                    json!((st.elapsed().as_secs_f64() * 10.0).round() / 10.0),
                );
                eprintln!(
                    "testflinger-bench faults: {s} done in {:.1} s",
                    st.elapsed().as_secs_f64()
                );
                m
            }
            Some(Err(e)) => {
                eprintln!("testflinger-bench faults: {s} cannot run: {e:#}");
                failed.push(*s);
                let mut m = Map::new();
                m.insert("scenario".into(), json!(s));
                m.insert("error".into(), json!(format!("{e:#}")));
                m
            }
        };
        if let Err(e) = ctx.cleanup().await {
            eprintln!("testflinger-bench faults: clean-up after {s}: {e:#}");
        }
        if let Some(path) = &args.json
            && let Err(e) = append_json(path, &row)
        {
            eprintln!(
                "testflinger-bench faults: cannot write {}: {e:#}",
                path.display()
            );
            failed.push(*s);
        }
        print_row(&row, rows.is_empty());
        rows.push(row);
    }
    // Services on private ports and directories go entirely: nothing to clean inside.
    stack.stop().await;
    drop(ctx);
    eprintln!(
        "testflinger-bench faults: {} scenario(s) in {:.0} s; private services stopped and removed",
        rows.len(),
        t0.elapsed().as_secs_f64()
    );
    if interrupted {
        eprintln!("testflinger-bench faults: interrupted; cleaned up");
        return ExitCode::from(130);
    }
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        eprintln!(
            "testflinger-bench faults: {} scenario(s) could not run: {}",
            failed.len(),
            failed.join(", ")
        );
        ExitCode::FAILURE
    }
}

fn append_json(path: &std::path::Path, row: &Map<String, Value>) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    writeln!(f, "{}", Value::Object(row.clone()))?;
    Ok(())
}

const COLUMNS: [(&str, &str); 11] = [
    ("scenario", "scenario"),
    ("accepted", "accepted"),
    ("completed", "completed"),
    ("ended_other", "other"),
    ("lost", "lost"),
    ("concurrent_runs", "concurrent"),
    ("stale_writes_accepted", "stale_ok"),
    ("output_lines_lost", "lines_lost"),
    ("submit_5xx", "5xx"),
    ("submit_503", "503"),
    ("recovery_s", "recovery_s"),
];

/// One table row on stdout (with the header before the first).
fn print_row(row: &Map<String, Value>, header: bool) {
    let widths = [15, 9, 10, 6, 5, 11, 9, 11, 5, 5, 10];
    if header {
        let h: Vec<String> = COLUMNS
            .iter()
            .zip(widths)
            .map(|((_, t), w)| format!("{t:<w$}"))
            .collect();
        println!("{}", h.join(" ").trim_end());
    }
    if let Some(e) = row.get("error").and_then(Value::as_str) {
        let s = row.get("scenario").and_then(Value::as_str).unwrap_or("?");
        println!("{s:<15} cannot run: {}", e.lines().next().unwrap_or(""));
        return;
    }
    let cells: Vec<String> = COLUMNS
        .iter()
        .zip(widths)
        .map(|((k, _), w)| {
            let v = row.get(*k).unwrap_or(&Value::Null);
            let t = match v {
                Value::String(s) => s.clone(),
                Value::Null => "-".into(),
                Value::Object(m) => m
                    .values()
                    .filter_map(Value::as_u64)
                    .sum::<u64>()
                    .to_string(),
                other => other.to_string(),
            };
            format!("{t:<w$}")
        })
        .collect();
    println!("{}", cells.join(" ").trim_end());
    let _ = std::io::stdout().flush();
}
