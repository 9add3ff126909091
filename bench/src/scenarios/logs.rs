//! `logs`: what a finished job's log costs Redis before and after its compaction into
//! the file store, and what 1 000 idle SSE followers cost the API (RSS) and how fast a
//! new fragment reaches all of them (pub/sub wake-up, no polling).
//!
//! No agent process: the bench claims jobs and posts fragments over HTTP as an agent
//! would, so the figures are the server's alone.

use crate::harness::{Ctx, MIB, Server};
use crate::load::job;
use crate::report::{Goal, Report};
use crate::stats::Samples;
use anyhow::{Context, anyhow, bail};
use futures_util::StreamExt;
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Output fragments, serial fragments and bytes of `log_data` each, per job.
const OUTPUT_FRAGMENTS: usize = 40;
const SERIAL_FRAGMENTS: usize = 10;
const FRAGMENT_BYTES: usize = 1000;

pub async fn run(ctx: &mut Ctx) -> anyhow::Result<Report> {
    let (jobs, followers) = if ctx.quick() { (20, 200) } else { (200, 1000) };
    let q = ctx.queue("logs");
    // The bench holds its jobs without heartbeats: a long lease keeps them held.
    let server = Server::start(ctx, "logs", &[("TESTFLINGER_LEASE_TTL", "3600")]).await?;
    let r = measure(ctx, &server, &q, jobs, followers).await;
    server.proc.stop().await;
    r
}

async fn submit_and_claim(ctx: &Ctx, server: &Server, q: &str) -> anyhow::Result<(String, String)> {
    let v: Value = ctx
        .http
        .post(server.url("/v1/job"))
        .json(&job(q))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let id = v
        .get("job_id")
        .and_then(Value::as_str)
        .ok_or_else(|| anyhow!("no job_id in the submit answer"))?
        .to_string();
    let c: Value = ctx
        .http
        .post(server.url(&format!("/v1/job/{id}/claim")))
        .json(&json!({"agent_id": "bench-logs"}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let token = c
        .get("token")
        .and_then(Value::as_str)
        .ok_or_else(|| anyhow!("no token in the claim answer: {c}"))?
        .to_string();
    Ok((id, token))
}

async fn post_fragment(
    http: &reqwest::Client,
    server: &Server,
    id: &str,
    token: &str,
    log_type: &str,
    n: usize,
    data: &str,
) -> anyhow::Result<()> {
    http.post(server.url(&format!("/v1/result/{id}/log/{log_type}")))
        .header("X-Testflinger-Token", token)
        .json(&json!({
            "fragment_number": n,
            "timestamp": chrono::Utc::now().to_rfc3339(),
            "phase": "test",
            "log_data": data,
        }))
        .send()
        .await?
        .error_for_status()?;
    Ok(())
}

/// Bytes Redis uses for the keys of these jobs (record and log sets), by `MEMORY USAGE`.
async fn redis_bytes(
    con: &mut redis::aio::MultiplexedConnection,
    prefix: &str,
    ids: &[(String, String)],
) -> anyhow::Result<(u64, u64)> {
    let mut p = redis::pipe();
    for (id, _) in ids {
        p.cmd("MEMORY")
            .arg("USAGE")
            .arg(format!("{prefix}:job:{id}"))
            .arg("SAMPLES")
            .arg(0);
        for lt in ["output", "serial"] {
            p.cmd("MEMORY")
                .arg("USAGE")
                .arg(format!("{prefix}:log:{id}:{lt}"))
                .arg("SAMPLES")
                .arg(0);
        }
    }
    let sizes: Vec<Option<u64>> = p.query_async(con).await?;
    let records: u64 = sizes.iter().step_by(3).flatten().sum();
    let total: u64 = sizes.iter().flatten().sum();
    Ok((records, total - records))
}

async fn log_keys_left(
    con: &mut redis::aio::MultiplexedConnection,
    prefix: &str,
) -> anyhow::Result<usize> {
    let mut cursor: u64 = 0;
    let mut n = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}:log:*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(con)
            .await?;
        n += keys.len();
        cursor = next;
        if cursor == 0 {
            return Ok(n);
        }
    }
}

async fn used_memory(con: &mut redis::aio::MultiplexedConnection) -> anyhow::Result<f64> {
    let info: String = redis::cmd("INFO").arg("memory").query_async(con).await?;
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .ok_or_else(|| anyhow!("no used_memory in INFO memory"))
}

async fn measure(
    ctx: &Ctx,
    server: &Server,
    q: &str,
    jobs: usize,
    followers: usize,
) -> anyhow::Result<Report> {
    let prefix = format!("{}-logs", ctx.prefix);
    let mut con = ctx.redis().await?;
    // Part 1: Redis bytes per finished job.
    let mut held = Vec::with_capacity(jobs);
    for _ in 0..jobs {
        held.push(submit_and_claim(ctx, server, q).await?);
    }
    let line = format!("{}\n", "x".repeat(FRAGMENT_BYTES - 1));
    let posts = held.iter().map(|(id, token)| {
        let line = line.clone();
        async move {
            for n in 0..OUTPUT_FRAGMENTS {
                post_fragment(&ctx.http, server, id, token, "output", n, &line).await?;
            }
            for n in 0..SERIAL_FRAGMENTS {
                post_fragment(&ctx.http, server, id, token, "serial", n, &line).await?;
            }
            anyhow::Ok(())
        }
    });
    let results: Vec<anyhow::Result<()>> = futures_util::stream::iter(posts)
        .buffer_unordered(16)
        .collect()
        .await;
    results.into_iter().collect::<anyhow::Result<()>>()?;
    let (rec0, logs0) = redis_bytes(&mut con, &prefix, &held).await?;
    let mem0 = used_memory(&mut con).await?;
    for (id, token) in &held {
        ctx.http
            .post(server.url(&format!("/v1/result/{id}")))
            .header("X-Testflinger-Token", token)
            .json(&json!({"job_state": "complete"}))
            .send()
            .await?
            .error_for_status()?;
    }
    let end = Instant::now() + Duration::from_secs(60);
    let compacted_in = Instant::now();
    while log_keys_left(&mut con, &prefix).await? > 0 {
        if Instant::now() > end {
            bail!("the finished jobs' logs did not leave Redis within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let compact_secs = compacted_in.elapsed().as_secs_f64();
    let (rec1, logs1) = redis_bytes(&mut con, &prefix, &held).await?;
    let mem1 = used_memory(&mut con).await?;
    // The log reads whole from the file store.
    let (probe, _) = &held[0];
    let res: Value = ctx
        .http
        .get(server.url(&format!("/v1/result/{probe}")))
        .send()
        .await?
        .json()
        .await?;
    let got = res
        .get("test_output")
        .and_then(Value::as_str)
        .map_or(0, str::len);
    if got != OUTPUT_FRAGMENTS * FRAGMENT_BYTES {
        bail!(
            "a compacted job's test_output has {got} bytes, not {}",
            OUTPUT_FRAGMENTS * FRAGMENT_BYTES
        );
    }
    let per = |b: u64| b as f64 / jobs as f64;

    // Part 2: idle SSE followers of one running job.
    let (id, token) = submit_and_claim(ctx, server, q).await?;
    post_fragment(&ctx.http, server, &id, &token, "output", 0, "hello\n").await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss0 = server.proc.rss()?;
    let addr = server
        .base
        .strip_prefix("http://")
        .ok_or_else(|| anyhow!("server base is not http"))?
        .to_string();
    let mut socks = Vec::with_capacity(followers);
    for _ in 0..followers {
        let mut s = tokio::net::TcpStream::connect(&addr)
            .await
            .context("connect a follower")?;
        s.write_all(
            format!(
                "GET /v1/result/{id}/log/output/stream HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n"
            )
            .as_bytes(),
        )
        .await?;
        socks.push(s);
    }
    // Every follower got its first batch.
    let first = futures_util::future::join_all(
        socks
            .iter_mut()
            .map(|s| read_until(s, "hello", Duration::from_secs(30))),
    )
    .await;
    if let Some(e) = first.into_iter().find_map(Result::err) {
        bail!("a follower did not get its first batch: {e:#}");
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss1 = server.proc.rss()?;
    // One new fragment: when does each follower have it?
    let sent = Instant::now();
    let wake = futures_util::future::join_all(socks.iter_mut().map(|s| async move {
        read_until(s, "world", Duration::from_secs(30)).await?;
        anyhow::Ok(sent.elapsed().as_secs_f64() * 1000.0)
    }));
    let post = post_fragment(&ctx.http, server, &id, &token, "output", 1, "world\n");
    let (wake, posted) = tokio::join!(wake, post);
    posted?;
    let mut lat = Samples::with_capacity(followers);
    for w in wake {
        lat.push(w?);
    }
    drop(socks);
    let mut r = Report::new("logs");
    r.param("jobs", jobs)
        .param(
            "log_bytes_per_job",
            (OUTPUT_FRAGMENTS + SERIAL_FRAGMENTS) * FRAGMENT_BYTES,
        )
        .param("fragments_per_job", OUTPUT_FRAGMENTS + SERIAL_FRAGMENTS)
        .param("followers", followers)
        .fig("redis_per_job_before", per(rec0 + logs0), "B")
        .fig("redis_logs_per_job_before", per(logs0), "B")
        .goal(
            "redis_per_job_after",
            per(rec1 + logs1),
            "B",
            Goal::AtMost(per(rec0) + 1024.0),
        )
        .fig("redis_logs_per_job_after", per(logs1), "B")
        .fig(
            "used_memory_freed_per_job",
            (mem0 - mem1) / jobs as f64,
            "B",
        )
        .fig("compaction_seconds", compact_secs, "s")
        .fig("api_rss_before_followers", rss0.now as f64 / MIB, "MiB")
        .fig("api_rss_followers", rss1.now as f64 / MIB, "MiB")
        .goal(
            "rss_per_follower",
            (rss1.now as f64 - rss0.now as f64) / followers as f64 / 1024.0,
            "KiB",
            Goal::AtMost(64.0),
        )
        .fig("wake_p50", lat.pct(50.0).unwrap_or(f64::NAN), "ms")
        .goal(
            "wake_p99",
            lat.pct(99.0).unwrap_or(f64::NAN),
            "ms",
            Goal::AtMost(1000.0),
        )
        .note(
            "redis_*: MEMORY USAGE (SAMPLES 0) of each job's record and log sets, before the jobs completed and after their logs were compacted; used_memory_freed_per_job: INFO used_memory delta over the same step (the shared Redis may move it); wake: from posting a fragment to every idle follower having it",
        );
    Ok(r)
}

/// Reads from `s` until `marker` was seen.
async fn read_until(
    s: &mut tokio::net::TcpStream,
    marker: &str,
    within: Duration,
) -> anyhow::Result<()> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let n = tokio::time::timeout_at(deadline, s.read(&mut buf))
            .await
            .map_err(|_| anyhow!("no '{marker}' within {} s", within.as_secs()))??;
        if n == 0 {
            bail!("the stream closed before '{marker}'");
        }
        seen.extend_from_slice(&buf[..n]);
        if seen.windows(marker.len()).any(|w| w == marker.as_bytes()) {
            return Ok(());
        }
        if seen.len() > 2 * marker.len() + 8192 {
            let keep_from = seen.len() - marker.len();
            seen.drain(..keep_from);
        }
    }
}
