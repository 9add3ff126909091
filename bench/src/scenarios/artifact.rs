//! `artifact`: one large artifact uploaded (multipart field `file`) and downloaded;
//! MB/s each way and the API's peak RSS growth while it happens. The artifact is a real
//! gzip tar (the server checks every upload): one file, generated while it is sent, in
//! stored (uncompressed) deflate blocks, so the body is about `size` bytes.

use crate::harness::{Ctx, MIB, Server, rss_of};
use crate::load::job;
use crate::report::{Goal, Report};
use anyhow::{Context, anyhow, bail};
use futures_util::StreamExt;
use serde_json::Value;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub async fn run(ctx: &mut Ctx) -> anyhow::Result<Report> {
    let size: u64 = if ctx.quick() { 64 << 20 } else { 1 << 30 };
    let q = ctx.queue("artifact");
    let server = Server::start(ctx, "artifact", &[]).await?;
    let r = measure(ctx, &server, &q, size).await;
    server.proc.stop().await;
    let _ = std::fs::remove_dir_all(ctx.tmp.path().join("artifact-data"));
    r
}

async fn measure(ctx: &Ctx, server: &Server, q: &str, size: u64) -> anyhow::Result<Report> {
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
    // Only the job's holder may upload its artifact: claim it, send the token.
    let resp = ctx
        .http
        .post(server.url(&format!("/v1/job/{id}/claim")))
        .json(&serde_json::json!({"agent_id": "bench-artifact"}))
        .send()
        .await?;
    if !resp.status().is_success() {
        bail!("claim answered {}", resp.status());
    }
    let v: Value = resp.json().await?;
    let token = v
        .get("token")
        .and_then(Value::as_str)
        .ok_or_else(|| anyhow!("no token in the claim answer"))?
        .to_string();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pid = server.proc.pid;
    let before = rss_of(pid)?;
    // Sample RSS while the transfers run; VmHWM catches what the sampling misses.
    let stop = Arc::new(AtomicBool::new(false));
    let max_rss = Arc::new(AtomicU64::new(before.now));
    let sampler = {
        let stop = stop.clone();
        let max_rss = max_rss.clone();
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if let Ok(r) = rss_of(pid) {
                    max_rss.fetch_max(r.now, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    let sent = Arc::new(AtomicU64::new(0));
    let body_stream = gzip_tar_stream(size, sent.clone());
    let part = reqwest::multipart::Part::stream(reqwest::Body::wrap_stream(body_stream))
        .file_name("artifact.tar.gz")
        .mime_str("application/gzip")?;
    let form = reqwest::multipart::Form::new().part("file", part);
    let t0 = Instant::now();
    let resp = ctx
        .http
        .post(server.url(&format!("/v1/result/{id}/artifact")))
        .header("X-Testflinger-Token", token)
        .timeout(Duration::from_secs(600))
        .multipart(form)
        .send()
        .await
        .context("uploading")?;
    let up_secs = t0.elapsed().as_secs_f64();
    if !resp.status().is_success() {
        let s = resp.status();
        bail!(
            "upload answered {s}: {}",
            resp.text().await.unwrap_or_default()
        );
    }
    let t1 = Instant::now();
    let resp = ctx
        .http
        .get(server.url(&format!("/v1/result/{id}/artifact")))
        .timeout(Duration::from_secs(600))
        .send()
        .await
        .context("downloading")?;
    if !resp.status().is_success() {
        bail!("download answered {}", resp.status());
    }
    let mut got: u64 = 0;
    let mut body = resp.bytes_stream();
    while let Some(c) = body.next().await {
        got += c.context("reading the download")?.len() as u64;
    }
    let down_secs = t1.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let _ = sampler.await;
    let after = rss_of(pid)?;
    let sampled = max_rss.load(Ordering::Relaxed);
    let peak = if after.peak > before.peak {
        after.peak
    } else {
        sampled
    };
    let growth = peak.saturating_sub(before.now) as f64 / MIB;
    let size = sent.load(Ordering::Relaxed);
    if got != size {
        bail!("downloaded {got} bytes of {size}");
    }
    let mb = size as f64 / 1e6;
    let mut r = Report::new("artifact");
    r.param("bytes", size)
        .fig("upload", mb / up_secs, "MB/s")
        .fig("download", mb / down_secs, "MB/s")
        .goal("api_rss_growth", growth, "MiB", Goal::AtMost(64.0))
        .fig("api_rss_before", before.now as f64 / MIB, "MiB");
    Ok(r)
}

/// A gzip tar holding one file `artifacts/data.bin` of about `size` bytes, produced in
/// 1 MiB pieces as the body is sent (never whole in memory); `sent` counts the bytes.
fn gzip_tar_stream(
    size: u64,
    sent: Arc<AtomicU64>,
) -> impl futures_util::Stream<Item = std::io::Result<bytes::Bytes>> + Send + 'static {
    use std::io::Write;
    const CHUNK: u64 = 1 << 20;
    let mut header = tar::Header::new_gnu();
    header.set_size(size);
    header.set_mode(0o644);
    header.set_entry_type(tar::EntryType::Regular);
    let _ = header.set_path("artifacts/data.bin");
    header.set_cksum();
    let enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::none());
    let piece: Vec<u8> = (0..CHUNK).map(|i| (i % 251) as u8).collect();
    // State: the encoder (None once finished) and the file bytes still to write.
    let state = (Some(enc), size, Some(header.as_bytes().to_vec()));
    futures_util::stream::unfold(state, move |(enc, left, head)| {
        let piece = piece.clone();
        let sent = sent.clone();
        async move {
            let mut enc = enc?;
            let step = (|| -> std::io::Result<(Vec<u8>, Option<_>, u64)> {
                if let Some(h) = head {
                    enc.write_all(&h)?;
                }
                let n = left.min(CHUNK);
                enc.write_all(&piece[..n as usize])?;
                let left = left - n;
                if left > 0 {
                    let out = std::mem::take(enc.get_mut());
                    return Ok((out, Some(enc), left));
                }
                // Padding to a block, the two end blocks, the gzip trailer.
                let pad = ((512 - size % 512) % 512) as usize + 1024;
                enc.write_all(&vec![0u8; pad])?;
                Ok((enc.finish()?, None, 0))
            })();
            match step {
                Ok((out, enc, left)) => {
                    sent.fetch_add(out.len() as u64, Ordering::Relaxed);
                    Some((Ok(bytes::Bytes::from(out)), (enc, left, None)))
                }
                Err(e) => Some((Err(e), (None, 0, None))),
            }
        }
    })
}
