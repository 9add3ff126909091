//! `submit`: `POST /v1/job` at concurrency 64 for a fixed time against a fresh server;
//! each 200 means durably queued. Compared with `raw-publish` measured in the same run.

use crate::harness::{Ctx, Server};
use crate::load::{Load, job};
use crate::report::{Goal, Report};
use anyhow::bail;
use std::time::Duration;

pub const CONCURRENCY: usize = 64;

pub async fn run(ctx: &mut Ctx) -> anyhow::Result<Report> {
    let secs = ctx.opts.seconds.unwrap_or(if ctx.quick() { 4 } else { 20 });
    let mut r = Report::new("submit");
    let raw = match ctx.raw_publish_rate {
        Some(x) => x,
        None => {
            r.note("raw-publish baseline measured just before");
            super::raw_publish::measure(ctx, Duration::from_secs(secs.min(5))).await?
        }
    };
    let q = ctx.queue("submit");
    let server = Server::start(ctx, "submit", &[]).await?;
    let url = server.url("/v1/job");
    let qq = q.clone();
    // Warm-up: declares the queue, opens the confirm channels and HTTP connections.
    let warm = Load {
        http: &ctx.http,
        url: url.clone(),
        concurrency: CONCURRENCY,
        count: Some(500),
        duration: Duration::from_secs(30),
        keep_ids: false,
    }
    .run(move |_| job(&qq))
    .await;
    if warm.ok == 0 {
        let why = warm.first_error.unwrap_or_default();
        server.proc.stop().await;
        bail!("no submission succeeded during warm-up: {why}");
    }
    let qq = q.clone();
    let mut res = Load {
        http: &ctx.http,
        url,
        concurrency: CONCURRENCY,
        count: None,
        duration: Duration::from_secs(secs),
        keep_ids: false,
    }
    .run(move |_| job(&qq))
    .await;
    let rss = server.proc.rss().ok();
    server.proc.stop().await;
    if res.ok == 0 {
        bail!(
            "no submission succeeded: {}",
            res.first_error.unwrap_or_default()
        );
    }
    let rate = res.ok as f64 / res.elapsed.as_secs_f64();
    let p50 = res.latency.pct(50.0).unwrap_or(f64::NAN);
    let p99 = res.latency.pct(99.0).unwrap_or(f64::NAN);
    r.param("concurrency", CONCURRENCY)
        .param("seconds", secs)
        .param("accepted", res.ok)
        .param("errors", res.errors)
        .fig("rate", rate, "jobs/s")
        .fig("p50", p50, "ms")
        .goal("p99", p99, "ms", Goal::AtMost(20.0))
        .goal("ratio_to_raw_publish", rate / raw, "", Goal::AtLeast(0.4))
        .fig("raw_publish", raw, "msg/s");
    if let Some(rss) = rss {
        r.fig("api_rss", rss.now as f64 / crate::harness::MIB, "MiB");
    }
    if let Some(e) = res.first_error {
        r.note(format!("first error: {e}"));
    }
    Ok(r)
}
