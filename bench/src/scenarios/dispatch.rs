//! `dispatch`: one idle agent; one job at a time; from the submit's 200 to the start of
//! the setup phase as the agent records it (the API's timestamp of the `setup` state the
//! agent posts, read from `testflinger.events`).

use crate::events::{EventTap, now_ms};
use crate::harness::{AgentSpec, Ctx, Server, start_agent, wait_consumers};
use crate::load::job;
use crate::report::{Goal, Report};
use crate::stats::Samples;
use anyhow::{Context, anyhow};
use std::time::Duration;

pub async fn run(ctx: &mut Ctx) -> anyhow::Result<Report> {
    let n = if ctx.quick() { 40 } else { 250 };
    let q = ctx.queue("dispatch");
    let server = Server::start(ctx, "dispatch", &[]).await?;
    let agent = match start_agent(ctx, &server, "dispatch", &q, &AgentSpec::TRIVIAL).await {
        Ok(a) => a,
        Err(e) => {
            server.proc.stop().await;
            return Err(e);
        }
    };
    let r = measure(ctx, &server, &q, n).await;
    let r = r.map_err(|e| anyhow!("{e:#}\nagent output:\n{}", agent.tail()));
    agent.stop().await;
    server.proc.stop().await;
    r
}

async fn measure(ctx: &Ctx, server: &Server, q: &str, n: usize) -> anyhow::Result<Report> {
    let mut tap = EventTap::start(&ctx.opts.amqp_uri, q).await?;
    wait_consumers(ctx, q, 1, Duration::from_secs(30)).await?;
    let url = server.url("/v1/job");
    let warmup = 5;
    let mut recorded = Samples::with_capacity(n);
    let mut observed = Samples::with_capacity(n);
    for i in 0..warmup + n {
        let resp = ctx
            .http
            .post(&url)
            .json(&job(q))
            .send()
            .await
            .context("submitting")?;
        let t200 = now_ms();
        if !resp.status().is_success() {
            return Err(anyhow!("submit answered {}", resp.status()));
        }
        let v: serde_json::Value = resp.json().await?;
        let id = v
            .get("job_id")
            .and_then(|x| x.as_str())
            .ok_or_else(|| anyhow!("no job_id in the submit answer"))?
            .to_string();
        let setup = tap.wait_for(&id, "setup", Duration::from_secs(30)).await?;
        tap.wait_for(&id, "complete", Duration::from_secs(60))
            .await?;
        tap.clear();
        if i >= warmup {
            recorded.push(setup.ts_ms - t200);
            observed.push(setup.recv_ms - t200);
        }
    }
    tap.close().await;
    let mut r = Report::new("dispatch");
    r.param("jobs", n)
        .param("agents", 1)
        .goal(
            "p50",
            recorded.pct(50.0).unwrap_or(f64::NAN),
            "ms",
            Goal::AtMost(5.0),
        )
        .goal(
            "p99",
            recorded.pct(99.0).unwrap_or(f64::NAN),
            "ms",
            Goal::AtMost(25.0),
        )
        .fig(
            "event_seen_p50",
            observed.pct(50.0).unwrap_or(f64::NAN),
            "ms",
        )
        .fig(
            "event_seen_p99",
            observed.pct(99.0).unwrap_or(f64::NAN),
            "ms",
        );
    Ok(r)
}
