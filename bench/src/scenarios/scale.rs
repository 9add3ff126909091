//! `scale`: many waiting jobs over many queues (no agents); latency of the position
//! lookup and of a queue's job list, one request at a time.

use crate::harness::{Ctx, Server};
use crate::load::{Load, job};
use crate::report::{Goal, Report};
use crate::stats::Samples;
use anyhow::{Context, bail};
use std::time::{Duration, Instant};

pub async fn run(ctx: &mut Ctx) -> anyhow::Result<Report> {
    let (jobs, queues, lookups, statuses) = if ctx.quick() {
        (5_000, 50, 500, 50)
    } else {
        (100_000, 1_000, 3_000, 300)
    };
    let limit = Duration::from_secs(if ctx.quick() { 50 } else { 300 });
    let names: Vec<String> = (0..queues)
        .map(|i| ctx.queue(&format!("scale-{i}")))
        .collect();
    let server = Server::start(ctx, "scale", &[]).await?;
    let r = measure(ctx, &server, names, jobs, lookups, statuses, limit).await;
    server.proc.stop().await;
    r
}

async fn measure(
    ctx: &Ctx,
    server: &Server,
    names: Vec<String>,
    jobs: usize,
    lookups: usize,
    statuses: usize,
    limit: Duration,
) -> anyhow::Result<Report> {
    let queues = names.len();
    let n2 = names.clone();
    let seed = Load {
        http: &ctx.http,
        url: server.url("/v1/job"),
        concurrency: 64,
        count: Some(jobs),
        duration: limit,
        keep_ids: true,
    }
    .run(move |i| job(&n2[i % n2.len()]))
    .await;
    if seed.ok < jobs {
        bail!(
            "only {} of {jobs} jobs were accepted within {} s: {}",
            seed.ok,
            limit.as_secs(),
            seed.first_error.unwrap_or_default()
        );
    }
    let seed_rate = seed.ok as f64 / seed.elapsed.as_secs_f64();
    let mut rng = Rng::new();
    let mut pos = Samples::with_capacity(lookups);
    for _ in 0..lookups {
        let (id, _) = &seed.accepted[rng.below(seed.accepted.len())];
        let url = server.url(&format!("/v1/job/{id}/position"));
        let t0 = Instant::now();
        let resp = ctx.http.get(&url).send().await.context("position")?;
        let status = resp.status();
        let _ = resp.bytes().await?;
        pos.push(t0.elapsed().as_secs_f64() * 1000.0);
        if !status.is_success() {
            bail!("position answered {status}");
        }
    }
    let mut qs = Samples::with_capacity(statuses);
    for _ in 0..statuses {
        let q = &names[rng.below(queues)];
        let url = server.url(&format!("/v1/queues/{q}/jobs"));
        let t0 = Instant::now();
        let resp = ctx.http.get(&url).send().await.context("queue jobs")?;
        let status = resp.status();
        let _ = resp.bytes().await?;
        qs.push(t0.elapsed().as_secs_f64() * 1000.0);
        if !status.is_success() {
            bail!("queue jobs answered {status}");
        }
    }
    let mut r = Report::new("scale");
    r.param("jobs", jobs)
        .param("queues", queues)
        .param("lookups", lookups)
        .fig("seed_rate", seed_rate, "jobs/s")
        .fig("position_p50", pos.pct(50.0).unwrap_or(f64::NAN), "ms")
        .goal(
            "position_p99",
            pos.pct(99.0).unwrap_or(f64::NAN),
            "ms",
            Goal::AtMost(2.0),
        )
        .fig("queue_jobs_p50", qs.pct(50.0).unwrap_or(f64::NAN), "ms")
        .fig("queue_jobs_p99", qs.pct(99.0).unwrap_or(f64::NAN), "ms");
    Ok(r)
}

/// xorshift64*, seeded from the clock: enough to pick samples.
struct Rng(u64);

impl Rng {
    fn new() -> Rng {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9E37_79B9_7F4A_7C15);
        Rng(t | 1)
    }
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n.max(1) as u64) as usize
    }
}
