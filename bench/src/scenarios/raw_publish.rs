//! `raw-publish`: lapin straight to a durable queue, persistent 512 B messages,
//! confirms awaited per batch of 1000. The ceiling `submit` is compared with.

use crate::harness::Ctx;
use crate::report::Report;
use crate::stats::Samples;
use anyhow::bail;
use lapin::BasicProperties;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use std::time::{Duration, Instant};

pub const BATCH: usize = 1000;

pub async fn run(ctx: &mut Ctx) -> anyhow::Result<Report> {
    let secs = ctx.opts.seconds.unwrap_or(if ctx.quick() { 3 } else { 10 });
    let rate = measure(ctx, Duration::from_secs(secs)).await?;
    let per = per_message(ctx, Duration::from_secs(secs.min(5))).await?;
    let mut r = Report::new("raw-publish");
    let mut lat = per.latency;
    r.param("seconds", secs)
        .param("batch", BATCH)
        .param("size_bytes", 512)
        .fig("rate", rate, "msg/s")
        .fig("c64_rate", per.rate, "msg/s")
        .fig("c64_confirm_p50", lat.pct(50.0).unwrap_or(f64::NAN), "ms")
        .fig("c64_confirm_p99", lat.pct(99.0).unwrap_or(f64::NAN), "ms");
    r.note("c64_*: 64 tasks over 8 confirm channels, each awaiting its own confirm, into a job queue declared like the API's (priority, dead-letter): the broker's share of a submit");
    Ok(r)
}

pub struct PerMessage {
    pub rate: f64,
    pub latency: Samples,
}

/// What the API's publish does, without the API: 64 concurrent publishers, each waiting
/// for its own confirm, round-robin over 8 long-lived confirm channels.
pub async fn per_message(ctx: &mut Ctx, d: Duration) -> anyhow::Result<PerMessage> {
    let q = ctx.queue("raw-jobq");
    let conn = ctx.amqp().await?;
    let mut chans = Vec::new();
    for _ in 0..8 {
        let ch = conn.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        chans.push(ch);
    }
    testflinger_broker::topology::declare_job_queue(
        &chans[0],
        &q,
        testflinger_broker::QueueType::Classic,
    )
    .await?;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..64usize {
        let ch = chans[t % chans.len()].clone();
        let q = q.clone();
        tasks.push(tokio::spawn(async move {
            let body = vec![b'x'; 512];
            let mut lat = Samples::with_capacity(4096);
            while start.elapsed() < d {
                let props = BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_priority(0);
                let t0 = Instant::now();
                let c = ch
                    .basic_publish(
                        "".into(),
                        q.as_str().into(),
                        BasicPublishOptions {
                            mandatory: true,
                            ..BasicPublishOptions::default()
                        },
                        &body,
                        props,
                    )
                    .await?
                    .await?;
                if !c.is_ack() {
                    bail!("negative confirm");
                }
                lat.push(t0.elapsed().as_secs_f64() * 1000.0);
            }
            Ok::<_, anyhow::Error>(lat)
        }));
    }
    let mut latency = Samples::default();
    for t in tasks {
        latency.extend(t.await??);
    }
    let elapsed = start.elapsed().as_secs_f64();
    let _ = conn.close(200, "raw-publish done".into()).await;
    Ok(PerMessage {
        rate: latency.len() as f64 / elapsed,
        latency,
    })
}

/// Publishes for `d`; returns confirmed messages per second and remembers it in `ctx`.
pub async fn measure(ctx: &mut Ctx, d: Duration) -> anyhow::Result<f64> {
    let q = ctx.queue("raw");
    let conn = ctx.amqp().await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    ch.queue_declare(
        q.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await?;
    let body = vec![b'x'; 512];
    let props = BasicProperties::default().with_delivery_mode(2);
    let start = Instant::now();
    let mut acked = 0usize;
    let mut nacked = 0usize;
    while start.elapsed() < d {
        let mut confirms = Vec::with_capacity(BATCH);
        for _ in 0..BATCH {
            confirms.push(
                ch.basic_publish(
                    "".into(),
                    q.as_str().into(),
                    BasicPublishOptions::default(),
                    &body,
                    props.clone(),
                )
                .await?,
            );
        }
        for c in futures_util::future::join_all(confirms).await {
            if c?.is_ack() {
                acked += 1;
            } else {
                nacked += 1;
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let _ = conn.close(200, "raw-publish done".into()).await;
    if nacked > 0 {
        bail!("the broker refused {nacked} of {} messages", acked + nacked);
    }
    let rate = acked as f64 / elapsed;
    ctx.raw_publish_rate = Some(rate);
    Ok(rate)
}
