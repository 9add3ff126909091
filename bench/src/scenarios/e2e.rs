//! `e2e`: N agents with trivial phases on one queue; M jobs submitted as fast as
//! possible; jobs per second until all are complete, and how many were lost.

use crate::events::{EventTap, now_ms};
use crate::harness::{AgentSpec, Ctx, Proc, Server, start_agent, wait_consumers};
use crate::load::{Load, job};
use crate::report::{Goal, Report};
use anyhow::{anyhow, bail};
use std::collections::HashSet;
use std::time::Duration;

pub async fn run(ctx: &mut Ctx) -> anyhow::Result<Report> {
    let agents = ctx.opts.agents.unwrap_or(if ctx.quick() { 4 } else { 20 });
    let jobs = ctx
        .opts
        .jobs
        .unwrap_or(if ctx.quick() { 300 } else { 5000 });
    let limit = Duration::from_secs(if ctx.quick() { 50 } else { 300 });
    let q = ctx.queue("e2e");
    let server = Server::start(ctx, "e2e", &[]).await?;
    let mut procs = Vec::new();
    let mut started = Ok(());
    for i in 0..agents {
        match start_agent(ctx, &server, &format!("e2e-{i}"), &q, &AgentSpec::TRIVIAL).await {
            Ok(p) => procs.push(p),
            Err(e) => {
                started = Err(e);
                break;
            }
        }
    }
    let r = match started {
        Ok(()) => measure(ctx, &server, &q, agents, jobs, limit, &procs).await,
        Err(e) => Err(e),
    };
    super::stop_all(procs).await;
    server.proc.stop().await;
    let mut r = r?;
    r.param("agents", agents).param("jobs", jobs);
    Ok(r)
}

/// Submits `jobs` jobs and waits until every accepted one is complete (or `limit`).
/// Returns accepted count, completed count, seconds from the first submit to the last
/// completion.
pub async fn run_jobs(
    ctx: &Ctx,
    server: &Server,
    tap: &mut EventTap,
    q: &str,
    jobs: usize,
    concurrency: usize,
    limit: Duration,
) -> anyhow::Result<(usize, usize, f64, Option<String>)> {
    let start = now_ms();
    let qq = q.to_string();
    let res = Load {
        http: &ctx.http,
        url: server.url("/v1/job"),
        concurrency,
        count: Some(jobs),
        duration: limit,
        keep_ids: true,
    }
    .run(move |_| job(&qq))
    .await;
    if res.ok == 0 {
        bail!(
            "no submission succeeded: {}",
            res.first_error.unwrap_or_default()
        );
    }
    let mut waiting: HashSet<String> = res.accepted.iter().map(|(id, _)| id.clone()).collect();
    let deadline = start + limit.as_secs_f64() * 1000.0;
    let mut last = start;
    let mut done = 0usize;
    while !waiting.is_empty() {
        let left = deadline - now_ms();
        if left <= 0.0 {
            break;
        }
        match tap.next(Duration::from_millis(left as u64)).await? {
            Some(ev) if ev.state == "complete" && waiting.remove(&ev.job_id) => {
                done += 1;
                last = ev.recv_ms;
            }
            Some(_) => {}
            None => break,
        }
    }
    Ok((res.ok, done, (last - start) / 1000.0, res.first_error))
}

async fn measure(
    ctx: &Ctx,
    server: &Server,
    q: &str,
    agents: usize,
    jobs: usize,
    limit: Duration,
    procs: &[Proc],
) -> anyhow::Result<Report> {
    let mut tap = EventTap::start(&ctx.opts.amqp_uri, q).await?;
    wait_consumers(ctx, q, agents as u32, Duration::from_secs(60))
        .await
        .map_err(|e| {
            let tail = procs.first().map(Proc::tail).unwrap_or_default();
            anyhow!("{e:#}\nfirst agent's output:\n{tail}")
        })?;
    let (accepted, done, secs, err) = run_jobs(ctx, server, &mut tap, q, jobs, 64, limit).await?;
    tap.close().await;
    let lost = accepted - done;
    let mut r = Report::new("e2e");
    r.goal("rate", done as f64 / secs, "jobs/s", Goal::AtLeast(300.0))
        .fig("seconds", secs, "s")
        .param("accepted", accepted)
        .param("complete", done)
        .goal("lost", lost as f64, "jobs", Goal::AtMost(0.0));
    if lost > 0 {
        r.note(format!(
            "{lost} accepted jobs not complete within {} s",
            limit.as_secs()
        ));
    }
    if let Some(e) = err {
        r.note(format!("submit error: {e}"));
    }
    Ok(r)
}
