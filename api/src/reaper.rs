//! The lease reaper. One replica at a time holds a Redis lock and, every
//! `reaper_interval_ms`, requeues running jobs whose lease expired (attempt + 1, reason
//! "agent lost"), or ends them once `max_attempts` runs were lost. A requeued job sits in
//! the `republish` set until its new message is confirmed, so a broker outage delays it
//! but cannot lose it. It also sweeps expired files from the store.

use crate::error::{ApiError, ApiResult};
use crate::events;
use crate::state::AppState;
use crate::store::{Requeue, now_ms};
use redis::{AsyncCommands, Script};
use serde_json::Value;
use std::sync::LazyLock;
use std::time::{Duration, Instant};

static LOCK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2]); return 1
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0
"#,
    )
});

/// Runs until the task is dropped.
pub async fn run(app: AppState) {
    let me = uuid::Uuid::new_v4().to_string();
    let interval = Duration::from_millis(app.settings.reaper_interval_ms.max(50));
    let mut last_sweep = Instant::now();
    loop {
        tokio::time::sleep(interval).await;
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
    let k = &app.store.keys;
    let mut c = app.store.con();
    let cutoff = now_ms() - (app.settings.retention as i64) * 1000;
    let mut removed: usize = redis::cmd("ZREMRANGEBYSCORE")
        .arg(k.jobs())
        .arg("-inf")
        .arg(cutoff)
        .query_async(&mut c)
        .await?;
    for pattern in [k.qjobs("*"), k.qpos("*")] {
        let keys: Vec<String> = {
            let mut it: redis::AsyncIter<String> = c.scan_match(&pattern).await?;
            let mut v = Vec::new();
            while let Some(key) = futures_util::StreamExt::next(&mut it).await {
                v.push(key?);
            }
            v
        };
        for key in keys {
            let ids: Vec<String> = c.zrange(&key, 0, -1).await?;
            if ids.is_empty() {
                continue;
            }
            let mut p = redis::pipe();
            for id in &ids {
                p.exists(k.job(id));
            }
            let alive: Vec<bool> = p.query_async(&mut c).await?;
            let gone: Vec<&String> = ids
                .iter()
                .zip(alive)
                .filter(|(_, a)| !a)
                .map(|(id, _)| id)
                .collect();
            if !gone.is_empty() {
                removed += gone.len();
                let _: () = c.zrem(&key, gone).await?;
            }
        }
    }
    Ok(removed)
}

/// One pass: returns how many jobs it requeued or ended.
pub async fn tick(app: &AppState, me: &str, interval: Duration) -> ApiResult<usize> {
    let k = &app.store.keys;
    let mut c = app.store.con();
    let held: i64 = LOCK
        .key(k.reaper_lock())
        .arg(me)
        .arg((interval.as_millis() as u64 * 5).max(1000))
        .invoke_async(&mut c)
        .await?;
    if held != 1 {
        return Ok(0);
    }
    let expired: Vec<String> = redis::cmd("ZRANGEBYSCORE")
        .arg(k.leases())
        .arg("-inf")
        .arg(now_ms())
        .arg("LIMIT")
        .arg(0)
        .arg(200)
        .query_async(&mut c)
        .await?;
    let mut n = 0;
    for id in expired {
        let f = app.store.job_fields(&id, &["queue", "def"]).await?;
        let queue = f[0].clone().unwrap_or_default();
        let webhook = super::routes::jobs::webhook_of(f[1].as_deref());
        match app
            .store
            .requeue(&id, &queue, app.settings.max_attempts, "agent lost", None)
            .await?
        {
            Requeue::Requeued {
                previous,
                attempt,
                agent,
                reason,
            } => {
                n += 1;
                app.metrics.inc("testflinger_reaped_total", "requeued");
                tracing::warn!(job.id = %id, agent = %agent, attempt, "lease expired: job requeued");
                mark_lost(app, &agent).await;
                if let Err(e) = republish(app, &id).await {
                    tracing::warn!(job.id = %id, error = %e, "requeued job not yet republished; will retry");
                }
                events::emit(
                    app,
                    &id,
                    &queue,
                    "waiting",
                    Some(&previous),
                    attempt,
                    Some(&agent),
                    Some(&reason),
                    webhook,
                );
            }
            Requeue::Ended {
                previous,
                attempt,
                agent,
                reason,
            } => {
                n += 1;
                app.metrics.inc("testflinger_reaped_total", "ended");
                tracing::warn!(job.id = %id, agent = %agent, attempt, "lease expired: job ended");
                mark_lost(app, &agent).await;
                events::emit(
                    app,
                    &id,
                    &queue,
                    "complete",
                    Some(&previous),
                    attempt,
                    Some(&agent),
                    Some(&reason),
                    webhook,
                );
            }
            _ => {}
        }
    }
    // Requeued jobs whose message was not confirmed yet.
    let pending: Vec<String> = c.smembers(k.republish()).await?;
    for id in pending {
        if let Err(e) = republish(app, &id).await {
            tracing::warn!(job.id = %id, error = %e, "republish failed; will retry");
            break;
        }
    }
    Ok(n)
}

async fn mark_lost(app: &AppState, agent: &str) {
    if agent.is_empty() {
        return;
    }
    let fields = [
        ("state", "lost"),
        (
            "comment",
            "lease expired: the agent stopped renewing its job",
        ),
    ];
    if let Err(e) = app.store.update_agent_if_known(agent, &fields).await {
        tracing::warn!(agent, error = %e, "could not mark agent lost");
    }
}

/// Publishes a requeued job's message again and takes it off the `republish` set.
pub async fn republish(app: &AppState, id: &str) -> ApiResult<()> {
    let f = app
        .store
        .job_fields(id, &["queue", "prio", "def", "state"])
        .await?;
    let k = &app.store.keys;
    let mut c = app.store.con();
    if f[3].as_deref() == Some("waiting") {
        let queue = f[0]
            .clone()
            .ok_or_else(|| ApiError::Internal(anyhow::anyhow!("job {id} has no queue")))?;
        let prio = f[1].as_deref().and_then(|p| p.parse().ok()).unwrap_or(0);
        let def: Value = f[2]
            .as_deref()
            .and_then(|d| serde_json::from_str(d).ok())
            .unwrap_or(Value::Null);
        crate::submit::publish(app, id, &queue, prio, &def).await?;
    }
    let _: () = c.srem(k.republish(), id).await?;
    Ok(())
}
