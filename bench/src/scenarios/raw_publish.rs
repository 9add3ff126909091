//! `raw-publish`: lapin straight to a durable queue, persistent 512 B messages,
//! confirms awaited per batch of 1000. The ceiling `submit` is compared with.

use crate::harness::Ctx;
use crate::report::Report;
use anyhow::bail;
use lapin::BasicProperties;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use std::time::{Duration, Instant};

pub const BATCH: usize = 1000;

pub async fn run(ctx: &mut Ctx) -> anyhow::Result<Report> {
    let secs = ctx.opts.seconds.unwrap_or(if ctx.quick() { 3 } else { 10 });
    let rate = measure(ctx, Duration::from_secs(secs)).await?;
    let mut r = Report::new("raw-publish");
    r.param("seconds", secs)
        .param("batch", BATCH)
        .param("size_bytes", 512)
        .fig("rate", rate, "msg/s");
    Ok(r)
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
