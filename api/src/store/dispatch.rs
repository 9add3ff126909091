//! Dispatch: the outbox, the reaper's clock and expired leases, the reconciler's reads
//! (runnable waiting jobs, queue heads), index sweeps, named locks, attachment waits.

use super::{Store, StoreResult, now_ms};
use redis::{AsyncCommands, Script};
use std::sync::LazyLock;

/// Marks an agent `lost` only while its record still names the job whose lease expired:
/// a replacement that runs under the same name, or the same agent on a newer job, is not
/// lost.
static MARK_LOST: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
-- KEYS: agent ; ARGV: job_id comment
if redis.call('HGET', KEYS[1], 'job_id') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'state', 'lost', 'comment', ARGV[2])
return 1
"#,
    )
});

/// The reaper's clock and its grace: returns Redis time, and when the previous pass is
/// older than `gap_ms` (Redis, the API or the reaper was away), first extends every
/// running job's lease to now + its lease span, because its holder could not renew it
/// meanwhile.
static REAPER_CLOCK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        redis_now!(),
        r#"
-- KEYS: leases last ; ARGV: gap_ms default_lease_ms job_key_prefix
local last = tonumber(redis.call('GET', KEYS[2]) or '0')
redis.call('SET', KEYS[2], now)
local graced = 0
if now - last > tonumber(ARGV[1]) then
  local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now + tonumber(ARGV[2]))
  for _, id in ipairs(ids) do
    if redis.call('EXISTS', ARGV[3] .. id) == 1 then
      local span = tonumber(redis.call('HGET', ARGV[3] .. id, 'lease_ms') or '') or tonumber(ARGV[2])
      local lease = now + span
      redis.call('ZADD', KEYS[1], lease, id)
      redis.call('HSET', ARGV[3] .. id, 'lease', lease)
      graced = graced + 1
    else
      redis.call('ZREM', KEYS[1], id)
    end
  end
end
return {now, graced}
"#
    ))
});

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

/// Cancels a job whose attachments were never uploaded (still `attach` = waiting).
static EXPIRE_ATTACH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
-- KEYS: job qpos attachwait ; ARGV: id reason
redis.call('ZREM', KEYS[3], ARGV[1])
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if redis.call('HGET', KEYS[1], 'attach') ~= 'waiting' then return 0 end
if redis.call('HGET', KEYS[1], 'state') ~= 'waiting' then return 0 end
redis.call('HSET', KEYS[1], 'state', 'cancelled', 'reason', ARGV[2])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"#,
    )
});

impl Store {
    /// Marks `agent` lost because its lease on `job_id` expired, unless its record has
    /// moved on (see `MARK_LOST`). Returns whether it was marked.
    pub async fn mark_agent_lost(&self, agent: &str, job_id: &str) -> StoreResult<bool> {
        let mut c = self.con();
        let r: i64 = MARK_LOST
            .key(self.keys.agent(agent))
            .arg(job_id)
            .arg("lease expired: the agent stopped renewing its job")
            .invoke_async(&mut c)
            .await?;
        Ok(r == 1)
    }

    /// The reaper's clock (Redis time, ms) and how many leases it extended because the
    /// previous pass is older than `gap_ms` (see `REAPER_CLOCK`).
    pub async fn reaper_clock(
        &self,
        gap_ms: u64,
        default_lease_ms: u64,
    ) -> StoreResult<(i64, u64)> {
        let mut c = self.con();
        let r: (i64, u64) = REAPER_CLOCK
            .key(self.keys.leases())
            .key(self.keys.reaper_last())
            .arg(gap_ms)
            .arg(default_lease_ms)
            .arg(self.keys.job(""))
            .invoke_async(&mut c)
            .await?;
        Ok(r)
    }

    /// Running jobs whose lease ended before `now` (Redis ms), at most `limit`.
    pub async fn expired_leases(&self, now: i64, limit: usize) -> StoreResult<Vec<String>> {
        self.due(&self.keys.leases(), now, limit).await
    }

    /// Members of the sorted set `key` scored `until` or less, lowest first, at most
    /// `limit` (a schedule: leases, compactions).
    pub(crate) async fn due(
        &self,
        key: &str,
        until: i64,
        limit: usize,
    ) -> StoreResult<Vec<String>> {
        let mut c = self.con();
        let ids: Vec<String> = redis::cmd("ZRANGEBYSCORE")
            .arg(key)
            .arg("-inf")
            .arg(until)
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .query_async(&mut c)
            .await?;
        Ok(ids)
    }

    /// Jobs in the outbox that entered it before `before_ms` (Redis ms; use `i64::MAX`
    /// for all), oldest first, at most `limit`.
    pub async fn outbox(&self, before_ms: i64, limit: usize) -> StoreResult<Vec<String>> {
        // Scores are whole milliseconds: "before" is "at most one ms earlier".
        self.due(&self.keys.outbox(), before_ms.saturating_sub(1), limit)
            .await
    }

    /// Takes a job off the outbox: its message was confirmed (or it needs none now).
    pub async fn outbox_done(&self, id: &str) -> StoreResult<()> {
        let mut c = self.con();
        let _: () = c.zrem(self.keys.outbox(), id).await?;
        Ok(())
    }

    /// Puts a job in the outbox, to be published (again) by the reconciler.
    pub async fn outbox_add(&self, id: &str) -> StoreResult<()> {
        let mut c = self.con();
        let _: () = c.zadd(self.keys.outbox(), id, now_ms()).await?;
        Ok(())
    }

    /// The waiting jobs of `queue` that are ready to run (not waiting for attachments),
    /// in position order, at most `limit`: the jobs that should each have a message.
    pub async fn runnable_waiting(&self, queue: &str, limit: usize) -> StoreResult<Vec<String>> {
        let mut c = self.con();
        let ids: Vec<String> = c
            .zrange(self.keys.qpos(queue), 0, limit as isize - 1)
            .await?;
        if ids.is_empty() {
            return Ok(ids);
        }
        let mut p = redis::pipe();
        for id in &ids {
            p.cmd("HMGET")
                .arg(self.keys.job(id))
                .arg("state")
                .arg("attach");
        }
        let rows: Vec<(Option<String>, Option<String>)> = p.query_async(&mut c).await?;
        Ok(ids
            .into_iter()
            .zip(rows)
            .filter(|(_, (st, at))| {
                st.as_deref() == Some("waiting") && at.as_deref() != Some("waiting")
            })
            .map(|(id, _)| id)
            .collect())
    }

    /// Queues that have waiting jobs in their position index.
    pub async fn queues_with_waiting(&self) -> StoreResult<Vec<(String, u64)>> {
        let mut c = self.con();
        let pattern = self.keys.qpos("*");
        let strip = self.keys.qpos("");
        let keys: Vec<String> = {
            let mut it: redis::AsyncIter<String> = c.scan_match(&pattern).await?;
            let mut v = Vec::new();
            while let Some(key) = futures_util::StreamExt::next(&mut it).await {
                v.push(key?);
            }
            v
        };
        let mut out = Vec::new();
        for key in keys {
            let n: u64 = c.zcard(&key).await?;
            if n > 0
                && let Some(q) = key.strip_prefix(&strip)
            {
                out.push((q.to_string(), n));
            }
        }
        Ok(out)
    }

    /// The score of each queue's best waiting job (lower is better: priority, then
    /// submit order); `f64::MAX` for a queue with none.
    pub async fn queue_heads(&self, queues: &[String]) -> StoreResult<Vec<f64>> {
        let mut c = self.con();
        let mut pipe = redis::pipe();
        for queue in queues {
            pipe.cmd("ZRANGE")
                .arg(self.keys.qpos(queue))
                .arg(0)
                .arg(0)
                .arg("WITHSCORES");
        }
        let heads: Vec<Vec<(String, f64)>> = pipe.query_async(&mut c).await?;
        Ok(heads
            .into_iter()
            .map(|h| h.first().map_or(f64::MAX, |x| x.1))
            .collect())
    }

    /// Removes index entries of jobs created before `cutoff_ms` or whose record expired
    /// (job hashes expire by themselves; the sorted sets that list them do not). Returns
    /// how many entries went.
    pub async fn sweep_index_entries(&self, cutoff_ms: i64) -> StoreResult<usize> {
        let k = &self.keys;
        let mut c = self.con();
        let mut removed: usize = redis::cmd("ZREMRANGEBYSCORE")
            .arg(k.jobs())
            .arg("-inf")
            .arg(cutoff_ms)
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

    /// Cancels the jobs that have waited for their attachments since before `cutoff_ms`
    /// (at most 100 a call); returns `(id, queue)` of each job cancelled.
    pub async fn expire_attachment_waits(
        &self,
        cutoff_ms: i64,
        reason: &str,
    ) -> StoreResult<Vec<(String, String)>> {
        let mut c = self.con();
        let ids: Vec<String> = redis::cmd("ZRANGEBYSCORE")
            .arg(self.keys.attach_wait())
            .arg("-inf")
            .arg(cutoff_ms)
            .arg("LIMIT")
            .arg(0)
            .arg(100)
            .query_async(&mut c)
            .await?;
        let mut out = Vec::new();
        for id in ids {
            let queue = self.job_queue(&id).await?.unwrap_or_default();
            let done: i64 = EXPIRE_ATTACH
                .key(self.keys.job(&id))
                .key(self.keys.qpos(&queue))
                .key(self.keys.attach_wait())
                .arg(&id)
                .arg(reason)
                .invoke_async(&mut c)
                .await?;
            if done == 1 {
                out.push((id, queue));
            }
        }
        Ok(out)
    }

    /// Takes or renews a named lock held by `me` for `ttl_ms`; true when held.
    pub async fn hold_lock(&self, name: &str, me: &str, ttl_ms: u64) -> StoreResult<bool> {
        let mut c = self.con();
        let held: i64 = LOCK
            .key(format!("{}:{name}", self.keys.p))
            .arg(me)
            .arg(ttl_ms)
            .invoke_async(&mut c)
            .await?;
        Ok(held == 1)
    }
}
