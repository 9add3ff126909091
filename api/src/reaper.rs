//! The lease reaper. One replica at a time holds a Redis lock and, every
//! `reaper_interval_ms`, requeues running jobs whose lease expired (attempt + 1, reason
//! "agent lost"), or ends them once `max_attempts` runs were used. Lease times are Redis
//! time; after a gap in its passes it grants one lease of grace first. It also drains the
//! outbox (jobs whose wake-up message is not confirmed), and a reconciler republishes
//! waiting jobs whose broker queue lost their messages. It sweeps expired files too.

use crate::error::ApiResult;
use crate::jobs::requeue::Cause;
use crate::state::AppState;
use crate::store::now_ms;
use std::time::{Duration, Instant};

/// Runs until `shutdown`, after the pass under way.
pub async fn run(app: AppState, shutdown: tokio_util::sync::CancellationToken) {
    let me = uuid::Uuid::new_v4().to_string();
    let interval = Duration::from_millis(app.settings.reaper_interval_ms.max(50));
    let mut last_sweep = Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        match tick(&app, &me, interval).await {
            Ok(n) if n > 0 => tracing::info!(reaped = n, "reaper requeued or ended jobs"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "reaper pass failed; retrying"),
        }
        if last_sweep.elapsed() > Duration::from_secs(3600) {
            last_sweep = Instant::now();
            let files = app.files.clone();
            let age = Duration::from_secs(app.settings.retention);
            let _ = tokio::task::spawn_blocking(move || files.sweep(age)).await;
            if let Err(e) = sweep_indexes(&app).await {
                tracing::warn!(error = %e, "index sweep failed; retrying in an hour");
            }
        }
    }
}

/// Removes index entries of jobs that expired (job hashes expire by themselves; the
/// sorted sets that list them do not).
pub async fn sweep_indexes(app: &AppState) -> ApiResult<usize> {
    let cutoff = now_ms() - (app.settings.retention as i64) * 1000;
    Ok(app.store.sweep_index_entries(cutoff).await?)
}

/// One pass: returns how many jobs it requeued or ended. Holds the reaper lock; takes
/// its clock from Redis; after a gap (no pass for longer than a third of a lease) it first
/// grants every running job one more lease; one job that fails does not stop the pass.
pub async fn tick(app: &AppState, me: &str, interval: Duration) -> ApiResult<usize> {
    let ttl = (interval.as_millis() as u64 * 5).max(1000);
    if !app.store.hold_lock("reaper", me, ttl).await? {
        return Ok(0);
    }
    let gap_ms = (app.lease_ms() / 3).max(interval.as_millis() as u64 * 3);
    let (now, graced) = app.store.reaper_clock(gap_ms, app.lease_ms()).await?;
    if graced > 0 {
        tracing::warn!(
            leases = graced,
            "reaper resumed after a gap (Redis, the API or the reaper was away): every running job gets one more lease before any is reaped"
        );
    }
    let mut n = 0;
    for id in app.store.expired_leases(now, 200).await? {
        match reap_one(app, &id).await {
            Ok(true) => n += 1,
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(job.id = %id, error = %e, "could not reap job; next pass retries")
            }
        }
    }
    reconcile_outbox(app, now).await;
    expire_attachment_waits(app, now).await;
    Ok(n)
}

/// Cancels jobs whose attachments never came within `attachments_timeout`.
async fn expire_attachment_waits(app: &AppState, now: i64) {
    let cutoff = now - (app.settings.attachments_timeout as i64) * 1000;
    if let Err(e) = app.jobs.expire_attachment_waits(cutoff).await {
        tracing::warn!(error = %e, "could not expire attachment waits");
    }
}

async fn reap_one(app: &AppState, id: &str) -> ApiResult<bool> {
    let Ok(job_id) = id.parse::<testflinger_common::JobId>() else {
        tracing::warn!(job.id = %id, "a lease names no job id; ignored");
        return Ok(false);
    };
    Ok(app
        .jobs
        .requeue(&job_id, Cause::LeaseExpired)
        .await?
        .is_some())
}

/// How long a job stays in the outbox before the reconciler publishes it again: longer
/// than a normal publish takes, so a submit in flight is not published twice for nothing.
const OUTBOX_AGE_MS: i64 = 3_000;

/// Publishes again what the outbox holds for longer than [`OUTBOX_AGE_MS`] (a publish
/// that failed or whose outcome was unclear, a requeue whose message is not confirmed).
/// Stops at the first failure: the broker is probably away, the next pass retries.
async fn reconcile_outbox(app: &AppState, now: i64) {
    let ids = match app.store.outbox(now - OUTBOX_AGE_MS, 500).await {
        Ok(ids) => ids,
        Err(e) => {
            tracing::warn!(error = %e, "could not read the outbox");
            return;
        }
    };
    for id in ids {
        if let Err(e) = republish(app, &id).await {
            tracing::warn!(job.id = %id, error = %e, "republish failed; the outbox keeps it");
            break;
        }
    }
}

/// Compares each queue's runnable waiting jobs with the messages its broker queue holds
/// (a passive declare gives the count); when the broker holds fewer (a purged or deleted
/// queue, a crash between record and publish), publishes that queue's waiting jobs again.
/// Duplicates are harmless: the claim grants a job once. Returns the jobs published.
///
/// `short` carries the queues that were short at the previous pass: a queue is repaired
/// only when it is short twice in a row, so a message that an agent is claiming right now
/// (delivered, so not counted) does not cause a round of duplicates.
pub async fn reconcile_queues(
    app: &AppState,
    short: &mut std::collections::HashSet<String>,
) -> ApiResult<usize> {
    let mut published = 0;
    let mut now_short = std::collections::HashSet::new();
    for (queue, waiting) in app.store.queues_with_waiting().await? {
        // Unregistered queues have no broker queue by design (their jobs are parked).
        if app.auth.enabled() && !app.store.is_registered(&queue).await? {
            continue;
        }
        let held = match app.broker.message_count(&queue).await {
            Ok(n) => u64::from(n),
            // The queue does not exist (deleted): it holds nothing.
            Err(testflinger_broker::BrokerError::Protocol(_)) => {
                app.broker.forget_declared(&queue);
                0
            }
            Err(e) => return Err(e.into()),
        };
        if held >= waiting {
            continue;
        }
        let ids = app.store.runnable_waiting(&queue, 10_000).await?;
        if (ids.len() as u64) <= held {
            continue;
        }
        now_short.insert(queue.clone());
        if !short.contains(&queue) {
            continue;
        }
        tracing::warn!(
            queue,
            waiting = ids.len(),
            messages = held,
            "queue holds fewer messages than waiting jobs: publishing them again"
        );
        for id in ids {
            republish(app, &id).await?;
            published += 1;
        }
    }
    *short = now_short;
    Ok(published)
}

/// Runs [`reconcile_queues`] every `interval` while this replica holds the reaper lock's
/// turn (any replica may run it: duplicates are harmless, but one is enough).
pub async fn run_reconciler(
    app: AppState,
    interval: Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let me = uuid::Uuid::new_v4().to_string();
    let mut short = std::collections::HashSet::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        let ttl = interval.as_millis() as u64 * 2;
        if !matches!(app.store.hold_lock("reconciler", &me, ttl).await, Ok(true)) {
            continue;
        }
        match reconcile_queues(&app, &mut short).await {
            Ok(n) if n > 0 => tracing::info!(published = n, "reconciler published waiting jobs"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "reconcile pass failed; retrying"),
        }
    }
}

/// Publishes a waiting job's wake-up message (again) and takes it off the outbox once
/// the broker confirmed it. A job that is no longer waiting needs no message: it leaves
/// the outbox. A requeued job (attempt > 0) is published one priority level up, so it
/// keeps its place ahead of the jobs that queued behind it instead of going to the tail.
pub async fn republish(app: &AppState, id: &str) -> ApiResult<()> {
    match id.parse::<testflinger_common::JobId>() {
        Ok(job_id) => app.jobs.republish(&job_id).await,
        // Not a job id: nothing to publish; it leaves the outbox.
        Err(_) => Ok(app.store.outbox_done(id).await?),
    }
}
