//! Leases: claim, heartbeat, requeue (reap or release), and the holder's writes (the
//! write check, the report, the artifact commit), each checked and applied in one script.

use super::records::{AttachState, parse_state};
use super::{Reply, Store, StoreError, StoreResult, new_fence, not_holder, now_iso, unexpected};
use redis::Script;
use serde_json::Value;
use std::sync::LazyLock;
use testflinger_common::JobState;
use testflinger_common::protocol::{ClaimOutcome, FenceToken};

/// Hands a waiting job to an agent, or answers why not. A claim retried by the agent that
/// holds the job, for the same attempt, gets the same grant again (the answer to its first
/// try was lost), so a retry burns no attempt.
static CLAIM: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        redis_now!(),
        r#"
-- KEYS: job qpos leases wait waitqueues ; ARGV: id agent lease_ms now_iso legacy retention new_fence
if redis.call('EXISTS', KEYS[1]) == 0 then return {'unknown'} end
local st = redis.call('HGET', KEYS[1], 'state')
if st == 'cancelled' then return {'cancelled'} end
if st == 'complete' then return {'finished'} end
if st == 'running' and redis.call('HGET', KEYS[1], 'agent') == ARGV[2]
   and (redis.call('HGET', KEYS[1], 'legacy') or '0') == ARGV[5] then
  local lease = now + tonumber(ARGV[3])
  redis.call('HSET', KEYS[1], 'lease', lease)
  redis.call('ZADD', KEYS[3], lease, ARGV[1])
  return {'granted', redis.call('HGET', KEYS[1], 'attempt'), redis.call('HGET', KEYS[1], 'fence'),
    redis.call('HGET', KEYS[1], 'def'), redis.call('HGET', KEYS[1], 'attach') or ''}
end
if st ~= 'waiting' then return {'owned'} end
if redis.call('HGET', KEYS[1], 'attach') == 'waiting' then return {'owned'} end
local def = redis.call('HGET', KEYS[1], 'def')
local ok, job = pcall(cjson.decode, def)
if ok and type(job) == 'table' and type(job['exclude_agents']) == 'table' then
  for _, a in ipairs(job['exclude_agents']) do
    if a == ARGV[2] then return {'excluded'} end
  end
end
local attempt = redis.call('HINCRBY', KEYS[1], 'attempt', 1)
local fence = ARGV[7]
redis.call('HSET', KEYS[1], 'fence', fence)
local lease = now + tonumber(ARGV[3])
redis.call('HSET', KEYS[1], 'state', 'running', 'agent', ARGV[2], 'lease', lease,
  'lease_ms', ARGV[3], 'legacy', ARGV[5], 'started_at', ARGV[4], 'reason', '')
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], lease, ARGV[1])
local created = tonumber(redis.call('HGET', KEYS[1], 'created')) or now
local waited = math.floor((now - created) / 1000)
if waited < 0 then waited = 0 end
redis.call('LPUSH', KEYS[4], waited)
redis.call('LTRIM', KEYS[4], 0, 999)
redis.call('EXPIRE', KEYS[4], ARGV[6])
redis.call('SADD', KEYS[5], redis.call('HGET', KEYS[1], 'queue'))
return {'granted', attempt, fence, def, redis.call('HGET', KEYS[1], 'attach') or ''}
"#
    ))
});

static HEARTBEAT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        redis_now!(),
        r#"
-- KEYS: job leases ; ARGV: id token lease_ms agent
if redis.call('EXISTS', KEYS[1]) == 0 then return {'unknown'} end
if redis.call('HGET', KEYS[1], 'fence') ~= ARGV[2] then return {'stale'} end
local st = redis.call('HGET', KEYS[1], 'state')
if st == 'waiting' or st == 'complete' then return {'stale'} end
if ARGV[4] ~= '' and redis.call('HGET', KEYS[1], 'agent') ~= ARGV[4] then return {'forbidden'} end
local lease = now + tonumber(ARGV[3])
redis.call('HSET', KEYS[1], 'lease', lease)
redis.call('ZADD', KEYS[2], lease, ARGV[1])
if st == 'cancelled' then return {'ok', 1} end
return {'ok', 0}
"#
    ))
});

/// Puts a running job back to waiting (reaper or release) or ends it once it has used
/// `max_attempts` runs; a release counts as a run. Replaces the fencing token by a fresh
/// random one either way, so the old holder's writes are refused.
/// The requeued job keeps its place in the position index and enters the outbox, from
/// which its wake-up message is published (again) until the broker confirms it.
static REQUEUE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        redis_now!(),
        r#"
-- KEYS: job leases qpos outbox compact ; ARGV: id max_attempts reason mode(reap|release) token new_fence channel agent
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('ZREM', KEYS[2], ARGV[1]); return {'gone'}
end
local st = redis.call('HGET', KEYS[1], 'state')
if ARGV[4] == 'release' and redis.call('HGET', KEYS[1], 'fence') ~= ARGV[5] then return {'stale'} end
if ARGV[4] == 'release' and ARGV[8] ~= '' and redis.call('HGET', KEYS[1], 'agent') ~= ARGV[8] then
  return {'forbidden'}
end
if st == 'waiting' or st == 'complete' or st == 'cancelled' then
  redis.call('ZREM', KEYS[2], ARGV[1]); return {'skip', st}
end
if ARGV[4] == 'reap' then
  local lease = tonumber(redis.call('HGET', KEYS[1], 'lease')) or 0
  if lease > now then return {'skip', st} end
end
redis.call('HSET', KEYS[1], 'fence', ARGV[6])
redis.call('ZREM', KEYS[2], ARGV[1])
local attempt = tonumber(redis.call('HGET', KEYS[1], 'attempt')) or 0
local agent = redis.call('HGET', KEYS[1], 'agent') or ''
if attempt >= tonumber(ARGV[2]) then
  local why = ARGV[3] .. '; giving up after ' .. attempt .. ' attempts'
  redis.call('HSET', KEYS[1], 'state', 'complete', 'reason', why, 'lease', 0)
  redis.call('ZADD', KEYS[5], now, ARGV[1])
  redis.call('PUBLISH', ARGV[7], 'end')
  return {'ended', st, attempt, agent, why}
end
local prio = tonumber(redis.call('HGET', KEYS[1], 'prio')) or 0
local seq = tonumber(redis.call('HGET', KEYS[1], 'seq')) or 0
redis.call('HSET', KEYS[1], 'state', 'waiting', 'reason', ARGV[3], 'lease', 0, 'agent', '')
redis.call('ZADD', KEYS[3], -prio * 4294967296 + (seq % 4294967296), ARGV[1])
redis.call('ZADD', KEYS[4], now, ARGV[1])
return {'requeued', st, attempt, agent, ARGV[3]}
"#
    ))
});

/// Checks, inside Redis, that a write about a job comes from its holder (see
/// [`holder_check!`]); for writes that are not Redis commands (an artifact's upload is
/// checked again when it is committed, by `ARTIFACT_COMMIT`).
static WRITE_CHECK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        holder_check!(),
        r#"
-- KEYS: job leases ; ARGV: id token agent
local verdict, attempt = holder(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3])
return {verdict, attempt}
"#
    ))
});

/// An agent's report about its job (`POST /v1/result/<id>`), checked and applied in one
/// step: the holder check ([`holder_check!`]), then the `status` and `device_info`
/// fields, then the state moved through the state machine (the caller passes the states
/// the job may move from, from `JobState::reported_from`; a job that ended keeps its
/// state) with the time it began (`at_<state>`, ms). Returns `{verdict}` when the check
/// fails, else `{'set'|'kept'|'refused'|'none', previous state, attempt, agent}`.
static REPORT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        redis_now!(),
        holder_check!(),
        r#"
-- KEYS: job leases qpos compact ; ARGV: id token agent channel new_state nfields [field value]... from_states...
local verdict, attempt = holder(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3])
if verdict ~= 'ok' then return {verdict} end
local nf = tonumber(ARGV[6])
for i = 0, nf - 1 do
  redis.call('HSET', KEYS[1], ARGV[7 + 2 * i], ARGV[8 + 2 * i])
end
local st = redis.call('HGET', KEYS[1], 'state')
local holder_agent = redis.call('HGET', KEYS[1], 'agent') or ''
local new = ARGV[5]
if new == '' then return {'none', st, attempt, holder_agent} end
if st == 'complete' or st == 'cancelled' then
  if new == 'complete' or new == 'cancelled' then redis.call('ZREM', KEYS[2], ARGV[1]) end
  return {'kept', st, attempt, holder_agent}
end
if st == new then return {'kept', st, attempt, holder_agent} end
local allowed = false
for i = 7 + 2 * nf, #ARGV do if ARGV[i] == st then allowed = true end end
if not allowed then return {'refused', st, attempt, holder_agent} end
redis.call('HSET', KEYS[1], 'state', new, 'at_' .. new, now)
if new == 'complete' or new == 'cancelled' then
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('ZREM', KEYS[3], ARGV[1])
  redis.call('HSET', KEYS[1], 'lease', 0)
  redis.call('ZADD', KEYS[4], now, ARGV[1])
  redis.call('PUBLISH', ARGV[4], 'end')
end
return {'set', st, attempt, holder_agent}
"#
    ))
});

/// Makes an uploaded artifact the job's, checked in the same step: the holder check,
/// then `artifact` set to the staged file's name. Returns `{verdict, previous name}`.
static ARTIFACT_COMMIT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        holder_check!(),
        r#"
-- KEYS: job leases ; ARGV: id token agent name
local verdict, attempt = holder(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3])
if verdict ~= 'ok' then return {verdict, ''} end
local previous = redis.call('HGET', KEYS[1], 'artifact') or ''
redis.call('HSET', KEYS[1], 'artifact', ARGV[4])
return {'ok', previous}
"#
    ))
});

/// What [`Store::report`] did to the state, with the state the job had before.
#[derive(Debug, Clone, PartialEq)]
pub enum StateChange {
    Set(JobState),
    /// Same state, no state reported, or the job already ended: nothing changed.
    Kept(JobState),
    /// The state machine does not allow this move.
    Refused(JobState),
}

/// What [`Store::report`] did, with the attempt and the agent holding the job.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub change: StateChange,
    pub attempt: u64,
    pub agent: String,
}

/// Result of a claim.
#[derive(Debug, Clone)]
pub struct Claim {
    pub outcome: ClaimOutcome,
    pub attempt: u64,
    pub token: FenceToken,
    pub job: Option<Value>,
}

/// What a requeue decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Requeue {
    Gone,
    Skip,
    Stale,
    Requeued {
        previous: JobState,
        attempt: u64,
        agent: String,
        reason: String,
    },
    Ended {
        previous: JobState,
        attempt: u64,
        agent: String,
        reason: String,
    },
}

impl Store {
    /// Atomically hands a waiting job to `agent` with a lease of `lease_ms` (Redis time).
    /// A `legacy` (HTTP-polling, tokenless) agent's lease is renewed by its writes.
    ///
    /// `served`: the queues the calling agent may serve (DESIGN.md "Who may do what");
    /// a job of another queue is refused with 403 naming it, and nothing changes.
    pub async fn claim(
        &self,
        id: &str,
        agent: &str,
        lease_ms: u64,
        legacy: bool,
        served: Option<&[String]>,
    ) -> StoreResult<Claim> {
        let k = &self.keys;
        let queue = self.job_queue(id).await?.unwrap_or_default();
        if let Some(served) = served
            && !queue.is_empty()
            && !served.contains(&queue)
        {
            return Err(StoreError::QueueNotServed {
                id: id.to_string(),
                queue,
                agent: agent.to_string(),
                served: served.to_vec(),
            });
        }
        let mut c = self.con();
        let r: redis::Value = CLAIM
            .key(k.job(id))
            .key(k.qpos(&queue))
            .key(k.leases())
            .key(k.wait(&queue))
            .key(k.wait_queues())
            .arg(id)
            .arg(agent)
            .arg(lease_ms)
            .arg(now_iso())
            .arg(if legacy { "1" } else { "0" })
            .arg(self.retention)
            .arg(new_fence()?.to_string())
            .invoke_async(&mut c)
            .await?;
        let r = Reply::new("CLAIM", r)?;
        let outcome = match r.verdict()?.as_str() {
            "granted" => ClaimOutcome::Granted,
            "cancelled" => ClaimOutcome::Cancelled,
            "finished" => ClaimOutcome::Finished,
            "excluded" => ClaimOutcome::Excluded,
            "unknown" => ClaimOutcome::Unknown,
            "owned" => ClaimOutcome::Owned,
            _ => return Err(r.error()),
        };
        if outcome != ClaimOutcome::Granted {
            return Ok(Claim {
                outcome,
                attempt: 0,
                token: FenceToken::default(),
                job: None,
            });
        }
        let attempt = r.count(1)?;
        let fence = r.text(2)?;
        let token = fence
            .parse::<FenceToken>()
            .map_err(|e| StoreError::BadRecord {
                id: id.to_string(),
                field: "fence",
                value: fence.clone(),
                why: e.to_string(),
            })?;
        let mut job: Value = serde_json::from_str(&r.text(3)?).unwrap_or(Value::Null);
        if let Some(o) = job.as_object_mut() {
            o.insert("job_id".into(), Value::String(id.to_string()));
            o.insert("started_at".into(), Value::String(now_iso()));
            let attach = AttachState::parse(id, Some(&r.text(4)?))?;
            if attach != AttachState::None {
                o.insert("attachments_status".into(), attach.as_str().into());
            }
        }
        Ok(Claim {
            outcome,
            attempt,
            token,
            job: Some(job),
        })
    }

    /// Renews a lease. `Ok(Some(cancel_requested))`, or `Ok(None)` when the token is stale.
    /// `agent`: the caller's agent identity (`None`: not checked); another agent's
    /// job is refused with 403.
    pub async fn heartbeat(
        &self,
        id: &str,
        token: FenceToken,
        lease_ms: u64,
        agent: Option<&str>,
    ) -> StoreResult<Option<bool>> {
        let mut c = self.con();
        let r: redis::Value = HEARTBEAT
            .key(self.keys.job(id))
            .key(self.keys.leases())
            .arg(id)
            .arg(token.to_string())
            .arg(lease_ms)
            .arg(agent.unwrap_or_default())
            .invoke_async(&mut c)
            .await?;
        let r = Reply::new("HEARTBEAT", r)?;
        match r.verdict()?.as_str() {
            "ok" => Ok(Some(r.count(1)? == 1)),
            "unknown" => Err(StoreError::JobNotFound(id.to_string())),
            "forbidden" => Err(not_holder(id, agent)),
            "stale" => Ok(None),
            _ => Err(r.error()),
        }
    }

    /// Reaps (mode reap: only when the lease expired) or releases (mode release: the
    /// holder gives it back, token checked) a running job.
    /// `holder`: for a release, the caller's agent identity (`None`: not checked).
    pub async fn requeue(
        &self,
        id: &str,
        queue: &str,
        max_attempts: u64,
        reason: &str,
        release_token: Option<FenceToken>,
        holder: Option<&str>,
    ) -> StoreResult<Requeue> {
        let k = &self.keys;
        let mut c = self.con();
        let r: redis::Value = REQUEUE
            .key(k.job(id))
            .key(k.leases())
            .key(k.qpos(queue))
            .key(k.outbox())
            .key(k.compact())
            .arg(id)
            .arg(max_attempts)
            .arg(reason)
            .arg(if release_token.is_some() {
                "release"
            } else {
                "reap"
            })
            .arg(release_token.map(|t| t.to_string()).unwrap_or_default())
            .arg(new_fence()?.to_string())
            .arg(self.log_channel(id))
            .arg(holder.unwrap_or_default())
            .invoke_async(&mut c)
            .await?;
        let r = Reply::new("REQUEUE", r)?;
        Ok(match r.verdict()?.as_str() {
            "gone" => Requeue::Gone,
            "forbidden" => return Err(not_holder(id, holder)),
            "stale" => Requeue::Stale,
            "skip" => Requeue::Skip,
            "requeued" => Requeue::Requeued {
                previous: parse_state(id, &r.text(1)?)?,
                attempt: r.count(2)?,
                agent: r.text(3)?,
                reason: r.text(4)?,
            },
            "ended" => Requeue::Ended {
                previous: parse_state(id, &r.text(1)?)?,
                attempt: r.count(2)?,
                agent: r.text(3)?,
                reason: r.text(4)?,
            },
            _ => return Err(r.error()),
        })
    }

    /// An agent's report about job `id`, checked and applied in one step (`REPORT`):
    /// the holder check, then `fields` (`status`, `device_info`), then `state` moved
    /// through the state machine of [`JobState::reported_from`] with the time it began.
    /// 404 for an unknown job, 409 for a stale holder, 403 for another agent's job;
    /// nothing is written then.
    pub async fn report(
        &self,
        id: &str,
        queue: &str,
        token: Option<FenceToken>,
        agent: Option<&str>,
        fields: &[(&str, String)],
        state: Option<JobState>,
    ) -> StoreResult<Report> {
        let from = match state {
            Some(st) => st.reported_from().map_err(|e| {
                StoreError::BadState(testflinger_common::ValidationError::new("job_state", e))
            })?,
            None => Vec::new(),
        };
        let k = &self.keys;
        let mut c = self.con();
        let mut inv = REPORT.key(k.job(id));
        inv.key(k.leases())
            .key(k.qpos(queue))
            .key(k.compact())
            .arg(id)
            .arg(token.map(|t| t.to_string()).unwrap_or_default())
            .arg(agent.unwrap_or_default())
            .arg(self.log_channel(id))
            .arg(state.map(|s| s.as_str()).unwrap_or_default())
            .arg(fields.len());
        for (f, v) in fields {
            inv.arg(*f).arg(v);
        }
        for f in from {
            inv.arg(f.as_str());
        }
        let r: redis::Value = inv.invoke_async(&mut c).await?;
        let r = Reply::new("REPORT", r)?;
        let verdict = r.verdict()?;
        self.holder_verdict(id, &verdict, agent)?;
        let previous = || -> StoreResult<JobState> { parse_state(id, &r.text(1)?) };
        let change = match verdict.as_str() {
            "set" => StateChange::Set(previous()?),
            "refused" => StateChange::Refused(previous()?),
            "kept" | "none" => StateChange::Kept(previous()?),
            _ => return Err(r.error()),
        };
        Ok(Report {
            change,
            attempt: r.count(2)?,
            agent: r.text(3)?,
        })
    }

    /// The error for a holder check's verdict that refuses the write (see
    /// [`holder_check!`]); `Ok` for any other verdict (`ok`, or the verdicts of a check
    /// that passed), which the caller then matches.
    pub(super) fn holder_verdict(
        &self,
        id: &str,
        verdict: &str,
        agent: Option<&str>,
    ) -> StoreResult<()> {
        match verdict {
            "unknown" => Err(StoreError::JobNotFound(id.to_string())),
            "stale" => Err(StoreError::Stale(id.to_string())),
            "forbidden" => Err(not_holder(id, agent)),
            "token" => Err(StoreError::TokenRequired(id.to_string())),
            _ => Ok(()),
        }
    }

    /// Makes the staged artifact file `name` job `id`'s artifact if the caller still
    /// holds the job, in one step (`ARTIFACT_COMMIT`). Returns the name it replaced.
    pub async fn commit_artifact(
        &self,
        id: &str,
        token: Option<FenceToken>,
        agent: Option<&str>,
        name: &str,
    ) -> StoreResult<String> {
        let mut c = self.con();
        let r: redis::Value = ARTIFACT_COMMIT
            .key(self.keys.job(id))
            .key(self.keys.leases())
            .arg(id)
            .arg(token.map(|t| t.to_string()).unwrap_or_default())
            .arg(agent.unwrap_or_default())
            .arg(name)
            .invoke_async(&mut c)
            .await?;
        let r = Reply::new("ARTIFACT_COMMIT", r)?;
        let verdict = r.verdict()?;
        self.holder_verdict(id, &verdict, agent)?;
        match verdict.as_str() {
            "ok" => r.text(1),
            _ => Err(r.error()),
        }
    }

    /// Checks, inside Redis, that a write about job `id` comes from its holder (see
    /// [`holder_check!`]): `Ok(attempt)` when allowed (the attempt the write belongs
    /// to), `Err(JobNotFound)` (404) when the job is unknown, 403 when `agent` (the
    /// caller's identity) does not hold it, `Err(Stale)` (409) otherwise. For a write
    /// that is not a Redis command: a Redis write checks in its own script.
    pub async fn check_token(
        &self,
        id: &str,
        token: Option<FenceToken>,
        agent: Option<&str>,
    ) -> StoreResult<u64> {
        let mut c = self.con();
        let (r, attempt): (String, u64) = WRITE_CHECK
            .key(self.keys.job(id))
            .key(self.keys.leases())
            .arg(id)
            .arg(token.map(|t| t.to_string()).unwrap_or_default())
            .arg(agent.unwrap_or_default())
            .invoke_async(&mut c)
            .await?;
        self.holder_verdict(id, &r, agent)?;
        match r.as_str() {
            "ok" => Ok(attempt),
            other => Err(unexpected("WRITE_CHECK", Some(other))),
        }
    }
}
