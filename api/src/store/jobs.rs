//! Jobs: submit (create), read, position, cancel, search, delete.

use super::records::parse_state;
use super::{Reply, Store, StoreResult, now_iso, now_ms};
use redis::{AsyncCommands, Script};
use serde_json::Value;
use std::sync::LazyLock;
use testflinger_common::JobState;

static SUBMIT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
-- KEYS: job qpos qjobs jobs seq outbox attachwait ; ARGV: id def queue prio created_ms created_iso attach ttl tags_json owner
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {0, redis.call('HGET', KEYS[1], 'state') or '', redis.call('HGET', KEYS[1], 'def') or ''}
end
local seq = redis.call('INCR', KEYS[5])
local score = -tonumber(ARGV[4]) * 4294967296 + (seq % 4294967296)
redis.call('HSET', KEYS[1], 'def', ARGV[2], 'queue', ARGV[3], 'prio', ARGV[4], 'seq', seq,
  'created', ARGV[5], 'created_at', ARGV[6], 'state', 'waiting', 'attempt', 0, 'fence', '',
  'attach', ARGV[7], 'tags', ARGV[9], 'owner', ARGV[10])
redis.call('EXPIRE', KEYS[1], ARGV[8])
redis.call('ZADD', KEYS[2], score, ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[5], ARGV[1])
redis.call('ZADD', KEYS[4], ARGV[5], ARGV[1])
if ARGV[7] == '' then
  redis.call('ZADD', KEYS[6], ARGV[5], ARGV[1])
else
  redis.call('ZADD', KEYS[7], ARGV[5], ARGV[1])
end
return {1, 'waiting'}
"#,
    )
});

/// A waiting job's rank in its queue's position index, in one round trip (the queue is
/// read from the job record; the index key is built here from the prefix in ARGV).
static POSITION: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
-- KEYS: job ; ARGV: id qpos_key_prefix
local f = redis.call('HMGET', KEYS[1], 'queue', 'state')
if not f[1] or f[2] ~= 'waiting' then return -1 end
local r = redis.call('ZRANK', ARGV[2] .. f[1], ARGV[1])
if not r then return -1 end
return r
"#,
    )
});

static UNSUBMIT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
-- KEYS: job qpos qjobs jobs outbox ; ARGV: id
redis.call('ZREM', KEYS[5], ARGV[1])
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
return 1
"#,
    )
});

static CANCEL: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        redis_now!(),
        r#"
-- KEYS: job qpos compact ; ARGV: id channel
if redis.call('EXISTS', KEYS[1]) == 0 then return {'unknown'} end
local st = redis.call('HGET', KEYS[1], 'state')
if st == 'cancelled' or st == 'complete' then return {'done', st} end
redis.call('HSET', KEYS[1], 'state', 'cancelled')
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], now, ARGV[1])
redis.call('PUBLISH', ARGV[2], 'end')
return {'cancelled', st, redis.call('HGET', KEYS[1], 'agent') or ''}
"#
    ))
});

/// Raises a job's counter field to ARGV[1] if it is lower; returns the old value (0
/// when unset), or -1 for an unknown job.
static ADVANCE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local old = tonumber(redis.call('HGET', KEYS[1], ARGV[2]) or '0') or 0
if tonumber(ARGV[1]) > old then redis.call('HSET', KEYS[1], ARGV[2], ARGV[1]) end
return old
"#,
    )
});

/// What [`Store::create_job`] did.
#[derive(Debug, Clone)]
pub struct Created {
    /// False when a job with this id existed already (then nothing was written).
    pub created: bool,
    /// The job's state (the existing job's, when not created).
    pub state: JobState,
    /// The existing job's stored definition (JSON), when not created.
    pub existing_def: String,
}

impl Store {
    /// Records a new job (state waiting, in the position index). Returns false when a
    /// job with this id exists already (then nothing is written). `owner`: the client id
    /// that submitted it, empty for anonymous.
    #[allow(clippy::too_many_arguments)]
    pub async fn create_job(
        &self,
        id: &str,
        def: &Value,
        queue: &str,
        priority: i64,
        attach_waiting: bool,
        tags: &[String],
        owner: &str,
    ) -> StoreResult<Created> {
        let k = &self.keys;
        let mut c = self.con();
        let tags_json = serde_json::to_string(tags)?;
        let r: redis::Value = SUBMIT
            .key(k.job(id))
            .key(k.qpos(queue))
            .key(k.qjobs(queue))
            .key(k.jobs())
            .key(k.seq())
            .key(k.outbox())
            .key(k.attach_wait())
            .arg(id)
            .arg(def.to_string())
            .arg(queue)
            .arg(priority)
            .arg(now_ms())
            .arg(now_iso())
            .arg(if attach_waiting { "waiting" } else { "" })
            .arg(self.retention)
            .arg(tags_json)
            .arg(owner)
            .invoke_async(&mut c)
            .await?;
        let r = Reply::new("SUBMIT", r)?;
        let (created, state, existing_def) = match r.count(0)? {
            1 => (true, parse_state(id, &r.text(1)?)?, String::new()),
            0 => (false, parse_state(id, &r.text(1)?)?, r.text(2)?),
            _ => return Err(r.error()),
        };
        if created {
            let mut p = redis::pipe();
            p.zadd(k.job_queues(), queue, now_ms()).ignore();
            p.expire(k.job_queues(), self.retention as i64).ignore();
            for t in tags {
                p.sadd(k.tag(t), id).ignore();
                p.expire(k.tag(t), self.retention as i64).ignore();
            }
            let _: () = p.query_async(&mut c).await?;
        }
        Ok(Created {
            created,
            state,
            existing_def,
        })
    }

    /// Removes a job that could not be queued (no half-written job stays behind).
    pub async fn delete_job(&self, id: &str, queue: &str, tags: &[String]) -> StoreResult<()> {
        let k = &self.keys;
        let mut c = self.con();
        let _: i64 = UNSUBMIT
            .key(k.job(id))
            .key(k.qpos(queue))
            .key(k.qjobs(queue))
            .key(k.jobs())
            .key(k.outbox())
            .arg(id)
            .invoke_async(&mut c)
            .await?;
        if !tags.is_empty() {
            let mut p = redis::pipe();
            for t in tags {
                p.srem(k.tag(t), id).ignore();
            }
            let _: () = p.query_async(&mut c).await?;
        }
        Ok(())
    }

    /// The 0-based position of a waiting job in its queue; `None` when the job is
    /// unknown, not waiting, or not in the index.
    pub async fn position(&self, id: &str) -> StoreResult<Option<i64>> {
        let mut c = self.con();
        let r: i64 = POSITION
            .key(self.keys.job(id))
            .arg(id)
            .arg(self.keys.qpos(""))
            .invoke_async(&mut c)
            .await?;
        Ok((r >= 0).then_some(r))
    }

    /// Cancels a job. `None` if unknown; `Some(Err(state))` if already ended;
    /// `Some(Ok((previous, agent)))` when cancelled now (`agent` empty when none held it).
    pub async fn cancel(
        &self,
        id: &str,
        queue: &str,
    ) -> StoreResult<Option<Result<(JobState, String), JobState>>> {
        let mut c = self.con();
        let r: redis::Value = CANCEL
            .key(self.keys.job(id))
            .key(self.keys.qpos(queue))
            .key(self.keys.compact())
            .arg(id)
            .arg(self.log_channel(id))
            .invoke_async(&mut c)
            .await?;
        let r = Reply::new("CANCEL", r)?;
        Ok(match r.verdict()?.as_str() {
            "unknown" => None,
            "done" => Some(Err(parse_state(id, &r.text(1)?)?)),
            "cancelled" => Some(Ok((parse_state(id, &r.text(1)?)?, r.text(2)?))),
            _ => return Err(r.error()),
        })
    }

    /// Jobs for `GET /v1/job/search`: all jobs newest first, or the union (`all`:
    /// intersection) of the tags' sets; each with `(id, state, created_at, created_ms)`;
    /// jobs that expired are left out.
    pub async fn search_jobs(
        &self,
        tags: &[String],
        all: bool,
    ) -> StoreResult<Vec<(String, String, String, i64)>> {
        let k = &self.keys;
        let mut c = self.con();
        let ids: Vec<String> = if tags.is_empty() {
            c.zrevrange(k.jobs(), 0, -1).await?
        } else {
            let keys: Vec<String> = tags.iter().map(|t| k.tag(t)).collect();
            redis::cmd(if all { "SINTER" } else { "SUNION" })
                .arg(keys)
                .query_async(&mut c)
                .await?
        };
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.cmd("HMGET")
                .arg(k.job(id))
                .arg("state")
                .arg("created_at")
                .arg("created");
        }
        let rows: Vec<(Option<String>, Option<String>, Option<i64>)> =
            pipe.query_async(&mut c).await?;
        Ok(ids
            .into_iter()
            .zip(rows)
            .filter_map(|(id, (state, created_at, created))| {
                Some((id, state?, created_at?, created.unwrap_or(0)))
            })
            .collect())
    }

    /// How many of an agent's cumulative event list were relayed before; records that
    /// `seen` are relayed now. `None` for an unknown job.
    pub async fn advance_agent_events(&self, id: &str, seen: u64) -> StoreResult<Option<u64>> {
        let mut c = self.con();
        let old: i64 = ADVANCE
            .key(self.keys.job(id))
            .arg(seen)
            .arg("agent_events")
            .invoke_async(&mut c)
            .await?;
        Ok(u64::try_from(old).ok())
    }
}
