//! `memory`: RSS of an idle API and an idle agent after start-up and after N jobs.

use super::e2e::run_jobs;
use crate::events::EventTap;
use crate::harness::{AgentSpec, Ctx, MIB, Server, start_agent, wait_consumers};
use crate::report::{Goal, Report};
use anyhow::{anyhow, bail};
use std::time::Duration;

pub async fn run(ctx: &mut Ctx) -> anyhow::Result<Report> {
    let jobs = if ctx.quick() { 100 } else { 1000 };
    let limit = Duration::from_secs(if ctx.quick() { 50 } else { 300 });
    let q = ctx.queue("memory");
    let server = Server::start(ctx, "memory", &[]).await?;
    let agent = match start_agent(ctx, &server, "memory", &q, &AgentSpec::TRIVIAL).await {
        Ok(a) => a,
        Err(e) => {
            server.proc.stop().await;
            return Err(e);
        }
    };
    let result: anyhow::Result<Report> = async {
        let mut tap = EventTap::start(&ctx.opts.amqp_uri, &q).await?;
        wait_consumers(ctx, &q, 1, Duration::from_secs(30)).await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let api0 = server.proc.rss()?;
        let agent0 = agent.rss()?;
        let (accepted, done, _, _) = run_jobs(ctx, &server, &mut tap, &q, jobs, 4, limit).await?;
        tap.close().await;
        if done < accepted {
            bail!(
                "only {done} of {accepted} jobs completed within {} s",
                limit.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let api1 = server.proc.rss()?;
        let agent1 = agent.rss()?;
        let mut r = Report::new("memory");
        r.param("jobs", jobs)
            .goal(
                "api_idle_start",
                api0.now as f64 / MIB,
                "MiB",
                Goal::AtMost(30.0),
            )
            .goal(
                "agent_idle_start",
                agent0.now as f64 / MIB,
                "MiB",
                Goal::AtMost(8.0),
            )
            .goal(
                "api_idle_after",
                api1.now as f64 / MIB,
                "MiB",
                Goal::AtMost(30.0),
            )
            .goal(
                "agent_idle_after",
                agent1.now as f64 / MIB,
                "MiB",
                Goal::AtMost(8.0),
            )
            .fig("agent_idle_private", agent1.private as f64 / MIB, "MiB")
            .fig("api_idle_private", api1.private as f64 / MIB, "MiB")
            .fig("api_peak", api1.peak as f64 / MIB, "MiB")
            .fig("agent_peak", agent1.peak as f64 / MIB, "MiB");
        Ok(r)
    }
    .await;
    let result = result.map_err(|e| anyhow!("{e:#}\nagent output:\n{}", agent.tail()));
    agent.stop().await;
    server.proc.stop().await;
    result
}
