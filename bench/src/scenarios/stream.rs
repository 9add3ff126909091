//! `stream`: one job whose test phase prints N bytes; a reader follows the live log
//! (Server-Sent Events, resuming with `Last-Event-ID` as the CLI does). Checks that every
//! printed byte arrives, and measures the lag from the agent's fragment timestamp to
//! delivery, and the throughput.

use crate::events::now_ms;
use crate::harness::{AgentSpec, Ctx, Server, start_agent, wait_consumers};
use crate::load::job;
use crate::report::{Goal, Report};
use crate::stats::Samples;
use anyhow::{Context, anyhow, bail};
use futures_util::StreamExt;
use serde_json::Value;
use std::time::Duration;

/// Each printed line: 99 characters and a newline.
const LINE: &str = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789abcdefghijklmnopqrstuvwxyzA";

pub async fn run(ctx: &mut Ctx) -> anyhow::Result<Report> {
    let bytes: u64 = if ctx.quick() { 10_000_000 } else { 100_000_000 };
    let limit = Duration::from_secs(if ctx.quick() { 50 } else { 300 });
    let q = ctx.queue("stream");
    let server = Server::start(ctx, "stream", &[]).await?;
    let test = format!("yes {LINE} | head -c {bytes}");
    let spec = AgentSpec {
        setup: "true",
        test: &test,
    };
    let agent = match start_agent(ctx, &server, "stream", &q, &spec).await {
        Ok(a) => a,
        Err(e) => {
            server.proc.stop().await;
            return Err(e);
        }
    };
    let r = measure(ctx, &server, &q, bytes, limit).await;
    let r = match r {
        Ok(mut rep) => {
            if rep.notes.iter().any(|n| n.contains("delivered")) {
                // Say why, from the agent's own words.
                let why = agent.tail();
                if let Some(line) = why
                    .lines()
                    .rev()
                    .find(|l| l.contains("WARN") || l.contains("ERROR"))
                {
                    rep.note(format!("agent: {}", line.trim()));
                }
            }
            Ok(rep)
        }
        Err(e) => Err(anyhow!("{e:#}\nagent output:\n{}", agent.tail())),
    };
    agent.stop().await;
    server.proc.stop().await;
    r
}

#[derive(Default)]
struct Follow {
    test_bytes: u64,
    head: String,
    lag: Samples,
    first_ms: Option<f64>,
    last_ms: f64,
    last_id: Option<i64>,
    end_state: Option<String>,
}

async fn measure(
    ctx: &Ctx,
    server: &Server,
    q: &str,
    bytes: u64,
    limit: Duration,
) -> anyhow::Result<Report> {
    wait_consumers(ctx, q, 1, Duration::from_secs(30)).await?;
    let resp = ctx
        .http
        .post(server.url("/v1/job"))
        .json(&job(q))
        .send()
        .await?;
    if !resp.status().is_success() {
        bail!("submit answered {}", resp.status());
    }
    let v: Value = resp.json().await?;
    let id = v
        .get("job_id")
        .and_then(Value::as_str)
        .ok_or_else(|| anyhow!("no job_id in the submit answer"))?
        .to_string();
    let url = server.url(&format!("/v1/result/{id}/log/output/stream"));
    let mut f = Follow::default();
    let deadline = tokio::time::Instant::now() + limit;
    let mut reconnects = 0;
    while f.end_state.is_none() {
        let mut req = ctx.http.get(&url).timeout(limit);
        if let Some(n) = f.last_id {
            req = req.header("Last-Event-ID", n.to_string());
        }
        let r = tokio::time::timeout_at(deadline, follow(req, &mut f)).await;
        match r {
            Err(_) => bail!(
                "the log did not end within {} s ({} bytes of the test phase so far)",
                limit.as_secs(),
                f.test_bytes
            ),
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                reconnects += 1;
                if reconnects > 5 {
                    return Err(e.context("the log stream broke 5 times"));
                }
            }
        }
    }
    if f.lag.is_empty() {
        bail!("the log stream ended without any output");
    }
    // The agent opens each phase's output with a banner: a line of 50 '*', a line
    // naming the phase, another line of '*'. Everything after it is the command's.
    let stars = format!("\n{}\n", "*".repeat(50));
    let banner = f
        .head
        .find("phase on ")
        .and_then(|at| f.head[at..].find(&stars).map(|s| at + s + stars.len()))
        .ok_or_else(|| anyhow!("no phase banner at the start of the test output"))?;
    let delivered = f.test_bytes.saturating_sub(banner as u64);
    let secs = (f.last_ms - f.first_ms.unwrap_or(f.last_ms)) / 1000.0;
    let mut r = Report::new("stream");
    r.param("printed_bytes", bytes)
        .param("fragments", f.lag.len())
        .param("end_state", f.end_state.clone().unwrap_or_default())
        .param("reconnects", reconnects)
        .fig("delivered_bytes", delivered as f64, "B")
        .goal(
            "complete",
            if delivered == bytes { 1.0 } else { 0.0 },
            "",
            Goal::AtLeast(1.0),
        )
        .fig("lag_p50", f.lag.pct(50.0).unwrap_or(f64::NAN), "ms")
        .goal(
            "lag_p99",
            f.lag.pct(99.0).unwrap_or(f64::NAN),
            "ms",
            Goal::AtMost(1000.0),
        )
        .fig(
            "throughput",
            if secs > 0.0 {
                delivered as f64 / 1e6 / secs
            } else {
                f64::NAN
            },
            "MB/s",
        );
    if delivered != bytes {
        r.note(format!("{bytes} bytes printed, {delivered} delivered"));
    }
    Ok(r)
}

/// Reads one connection of the event stream until it ends.
async fn follow(req: reqwest::RequestBuilder, f: &mut Follow) -> anyhow::Result<()> {
    let resp = req.send().await.context("opening the log stream")?;
    if !resp.status().is_success() {
        bail!("the log stream answered {}", resp.status());
    }
    let mut body = resp.bytes_stream();
    let mut buf: Vec<u8> = Vec::new();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.context("reading the log stream")?;
        buf.extend_from_slice(&chunk);
        let now = now_ms();
        while let Some(end) = find(&buf, b"\n\n") {
            let block: Vec<u8> = buf.drain(..end + 2).collect();
            let text = String::from_utf8_lossy(&block);
            let mut event = "message";
            let mut data = String::new();
            let mut id = None;
            for line in text.lines() {
                if let Some(e) = line.strip_prefix("event: ") {
                    event = if e == "end" { "end" } else { "other" };
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data.push_str(d);
                } else if let Some(i) = line.strip_prefix("id: ") {
                    id = i.trim().parse::<i64>().ok();
                }
            }
            match event {
                "end" => {
                    let v: Value = serde_json::from_str(&data).unwrap_or(Value::Null);
                    f.end_state = Some(
                        v.get("job_state")
                            .and_then(Value::as_str)
                            .unwrap_or("?")
                            .to_string(),
                    );
                    return Ok(());
                }
                "message" if !data.is_empty() => {
                    let v: Value = serde_json::from_str(&data).context("a log event")?;
                    if let Some(ts) = v
                        .get("timestamp")
                        .and_then(Value::as_str)
                        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                    {
                        f.lag.push(now - ts.timestamp_micros() as f64 / 1000.0);
                    }
                    if v.get("phase").and_then(Value::as_str) == Some("test") {
                        let d = v.get("log_data").and_then(Value::as_str).unwrap_or("");
                        f.test_bytes += d.len() as u64;
                        if f.head.len() < 4096 {
                            let mut cut = (4096 - f.head.len()).min(d.len());
                            while !d.is_char_boundary(cut) {
                                cut -= 1;
                            }
                            f.head.push_str(&d[..cut]);
                        }
                        f.first_ms.get_or_insert(now);
                        f.last_ms = now;
                    }
                    if id.is_some() {
                        f.last_id = id;
                    }
                }
                _ => {}
            }
        }
    }
    Ok(())
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
