//! All state in Redis. Every key name is built in [`Keys`], under one configurable
//! prefix; every multi-step change that must be atomic is one Lua script here.
//!
//! Per job: hash `job:<id>` (definition, state, attempt, fencing token, lease, statuses),
//! sorted sets `log:<id>:<type>` (fragments scored by fragment number, while the job runs;
//! compacted into the file store when it ends, see `store/logs.rs`). Per queue: the
//! position index `qpos:<q>` (waiting jobs, scored by priority then submit order), the
//! job list `qjobs:<q>`, wait-time samples `wait:<q>`. Global: `jobs` (all jobs by
//! creation), `leases` (running jobs by lease expiry, Redis time), `outbox` (jobs whose
//! wake-up message is not yet confirmed by the broker), agents, queues, images. For the
//! web UI: `agentjobs:<agent>` (an agent's recent jobs by claim time), `jobqueues` (queues
//! ever submitted to), and `at_<state>` fields of `job:<id>` (when each state began, ms).

mod auth;
mod registry;
pub mod views;
pub use auth::{ClientRecord, ClientUpdate};

use crate::error::{ApiError, ApiResult};
use redis::aio::ConnectionManager;
use redis::{AsyncCommands, Script};
use serde_json::{Map, Value};
use std::sync::LazyLock;
use testflinger_common::JobState;
use testflinger_common::protocol::{ClaimOutcome, FenceToken};

/// Key names, all under one prefix.
#[derive(Debug, Clone)]
pub struct Keys {
    p: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Keys {
        Keys {
            p: prefix.to_string(),
        }
    }
    pub fn prefix(&self) -> &str {
        &self.p
    }
    pub fn job(&self, id: &str) -> String {
        format!("{}:job:{id}", self.p)
    }
    pub fn log(&self, id: &str, log_type: &str) -> String {
        format!("{}:log:{id}:{log_type}", self.p)
    }
    /// Ended jobs whose log fragments are to be compacted into the file store, scored by
    /// when that is due (ms); see `store/logs.rs`.
    pub fn compact(&self) -> String {
        format!("{}:compact", self.p)
    }
    pub fn qpos(&self, q: &str) -> String {
        format!("{}:qpos:{q}", self.p)
    }
    pub fn qjobs(&self, q: &str) -> String {
        format!("{}:qjobs:{q}", self.p)
    }
    pub fn jobs(&self) -> String {
        format!("{}:jobs", self.p)
    }
    pub fn tag(&self, t: &str) -> String {
        format!("{}:tag:{t}", self.p)
    }
    pub fn leases(&self) -> String {
        format!("{}:leases", self.p)
    }
    /// Jobs whose wake-up message must be published (again): new jobs until the broker
    /// confirms, requeued jobs, jobs whose publish outcome was unclear. Scored by when
    /// they entered, in Redis milliseconds.
    pub fn outbox(&self) -> String {
        format!("{}:outbox", self.p)
    }
    /// Jobs waiting for their attachments, by submit time (ms): the reaper cancels those
    /// whose upload never came.
    pub fn attach_wait(&self) -> String {
        format!("{}:attachwait", self.p)
    }
    /// The reaper's last pass, in Redis milliseconds.
    pub fn reaper_last(&self) -> String {
        format!("{}:reaper:last", self.p)
    }
    pub fn seq(&self) -> String {
        format!("{}:seq", self.p)
    }
    pub fn wait(&self, q: &str) -> String {
        format!("{}:wait:{q}", self.p)
    }
    pub fn wait_queues(&self) -> String {
        format!("{}:waitqueues", self.p)
    }
    pub fn agent(&self, name: &str) -> String {
        format!("{}:agent:{name}", self.p)
    }
    pub fn agent_log(&self, name: &str) -> String {
        format!("{}:agentlog:{name}", self.p)
    }
    /// An agent's recent jobs: sorted set of job ids scored by claim time (ms), for the
    /// web UI. Written at claim; the newest [`AGENT_JOBS_KEPT`] are kept.
    pub fn agent_jobs(&self, name: &str) -> String {
        format!("{}:agentjobs:{name}", self.p)
    }
    /// Every queue that was ever submitted to: sorted set scored by the last submission
    /// (ms), for the web UI's queue list. Written at submit.
    pub fn job_queues(&self) -> String {
        format!("{}:jobqueues", self.p)
    }
    pub fn provision_log(&self, name: &str) -> String {
        format!("{}:provlog:{name}", self.p)
    }
    pub fn agents(&self) -> String {
        format!("{}:agents", self.p)
    }
    pub fn queues(&self) -> String {
        format!("{}:queues", self.p)
    }
    pub fn images(&self, q: &str) -> String {
        format!("{}:images:{q}", self.p)
    }
    pub fn secret(&self, client: &str, path: &str) -> String {
        format!("{}:secret:{client}/{path}", self.p)
    }
}

/// Lua prelude: `now` in milliseconds from the Redis server's clock, so every replica
/// compares leases against one clock (DESIGN.md "Delivery guarantees" 6).
macro_rules! redis_now {
    () => {
        "local __t = redis.call('TIME')\nlocal now = tonumber(__t[1]) * 1000 + math.floor(tonumber(__t[2]) / 1000)\n"
    };
}

/// Lua prelude: `holder(job_key, leases_key, id, token, agent)`, the one check of a
/// write about a job by its holder (used by every fenced write, in the same script as the
/// write, so nothing can slip between the check and the write). Returns the verdict and
/// the job's attempt:
/// - with a token (`X-Testflinger-Token`): `ok` when it is the job's fencing token and the
///   job is not waiting; `stale` otherwise;
/// - without (upstream's HTTP-polling agents): `ok` only for a job a legacy agent holds
///   while it runs, and the write renews its lease as a heartbeat would; `token` for a
///   job held under a lease (a token was needed); `stale` once it is not running;
/// - `forbidden` when `agent` (the caller's agent identity; empty: not checked) is not
///   the agent that holds the job (DESIGN.md "Who may do what");
/// - `unknown` when there is no such job.
macro_rules! holder_check {
    () => {
        r#"
local function holder(key, leases, id, token, agent)
  if redis.call('EXISTS', key) == 0 then return 'unknown', 0 end
  local f = redis.call('HMGET', key, 'fence', 'state', 'legacy', 'lease_ms', 'attempt', 'agent')
  local attempt = tonumber(f[5]) or 0
  if token ~= '' then
    if f[1] ~= token or f[2] == 'waiting' then return 'stale', attempt end
    if agent ~= '' and f[6] ~= agent then return 'forbidden', attempt end
    return 'ok', attempt
  end
  if f[3] ~= '1' then return 'token', attempt end
  if f[2] == 'waiting' or f[2] == 'complete' or f[2] == 'cancelled' then return 'stale', attempt end
  if agent ~= '' and f[6] ~= agent then return 'forbidden', attempt end
  local t = redis.call('TIME')
  local lease = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + (tonumber(f[4]) or 0)
  redis.call('HSET', key, 'lease', lease)
  redis.call('ZADD', leases, lease, id)
  return 'ok', attempt
end
"#
    };
}

mod logs;
pub use logs::{Batch, CompactionSnapshot, PutFragment, RedisLog};

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

static UPDATE_AGENT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
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

/// How many recent jobs the index [`Keys::agent_jobs`] keeps per agent.
pub const AGENT_JOBS_KEPT: isize = 100;

/// A job's record as stored.
#[derive(Debug, Clone, Default)]
pub struct JobRecord {
    pub def: Value,
    pub queue: String,
    pub state: String,
    pub created_at: String,
    pub attempt: u64,
    pub fence: String,
    pub agent: String,
    pub started_at: String,
    pub reason: String,
    pub status: Map<String, Value>,
    pub device_info: Option<Value>,
    pub attach: String,
    pub priority: i64,
}

/// One log fragment as stored (member of the sorted set `log:<id>:<type>`, scored by
/// `n`; and one line of a compacted log file, see [`crate::logs`]): JSON
/// `{"n","a","ms","t","p","d"}`.
#[derive(Debug, Clone, PartialEq)]
pub struct Fragment {
    /// The stored number: unique across attempts (see [`fragment_score`]).
    pub n: i64,
    /// The attempt that wrote it (1 for fragments stored before attempts were recorded).
    pub attempt: u64,
    /// Its timestamp in Unix milliseconds, and as the agent wrote it.
    pub ts_ms: i64,
    pub ts: String,
    pub phase: String,
    pub data: String,
}

impl Fragment {
    pub fn to_member(&self) -> String {
        serde_json::json!({"n": self.n, "a": self.attempt, "ms": self.ts_ms, "t": self.ts, "p": self.phase, "d": self.data})
            .to_string()
    }

    pub fn from_member(member: &str) -> Option<Fragment> {
        let v: Value = serde_json::from_str(member).ok()?;
        Some(Fragment {
            n: v.get("n")?.as_i64()?,
            attempt: v.get("a").and_then(Value::as_u64).unwrap_or(1),
            ts_ms: v.get("ms").and_then(Value::as_i64).unwrap_or(0),
            ts: v
                .get("t")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            phase: v.get("p")?.as_str()?.to_string(),
            data: v.get("d")?.as_str()?.to_string(),
        })
    }
}

/// What [`Store::create_job`] did.
#[derive(Debug, Clone)]
pub struct Created {
    /// False when a job with this id existed already (then nothing was written).
    pub created: bool,
    /// The job's state (the existing job's, when not created).
    pub state: String,
    /// The existing job's stored definition (JSON), when not created.
    pub existing_def: String,
}

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

/// Reads a secret for a claim. A single-use (`ephemeral`) secret is handed to one claim
/// only: the first read moves it under the claim (`<job>:<attempt>`), so the same claim
/// retried gets it again and any other claim gets nothing.
static TAKE_SECRET: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
-- KEYS: secret used ; ARGV: claim ttl_s
local raw = redis.call('GET', KEYS[1])
if raw then
  local ok, rec = pcall(cjson.decode, raw)
  if ok and type(rec) == 'table' and rec['ephemeral'] == true then
    redis.call('DEL', KEYS[1])
    redis.call('SET', KEYS[2], ARGV[1] .. '\n' .. raw, 'EX', ARGV[2])
  end
  return raw
end
local used = redis.call('GET', KEYS[2])
if used then
  local nl = string.find(used, '\n', 1, true)
  if nl and string.sub(used, 1, nl - 1) == ARGV[1] then return string.sub(used, nl + 1) end
end
return false
"#,
    )
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

/// What [`Store::report`] did to the state, with the state the job had before.
#[derive(Debug, Clone, PartialEq)]
pub enum StateChange {
    Set(String),
    /// Same state, no state reported, or the job already ended: nothing changed.
    Kept(String),
    /// The state machine does not allow this move.
    Refused(String),
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
        previous: String,
        attempt: u64,
        agent: String,
        reason: String,
    },
    Ended {
        previous: String,
        attempt: u64,
        agent: String,
        reason: String,
    },
}

#[derive(Clone)]
pub struct Store {
    pub keys: Keys,
    con: ConnectionManager,
    /// For pub/sub connections (one per server, see [`Store::log_events`]).
    client: redis::Client,
    retention: u64,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("prefix", &self.keys.p)
            .finish()
    }
}

fn s(v: &redis::Value) -> String {
    match v {
        redis::Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        redis::Value::SimpleString(t) => t.clone(),
        redis::Value::Int(i) => i.to_string(),
        _ => String::new(),
    }
}

fn n(v: &redis::Value) -> u64 {
    match v {
        redis::Value::Int(i) => u64::try_from(*i).unwrap_or(0),
        other => s(other).parse().unwrap_or(0),
    }
}

fn list(v: redis::Value) -> Vec<redis::Value> {
    match v {
        redis::Value::Array(items) => items,
        _ => Vec::new(),
    }
}

/// A fresh fencing token: 128 bits from the system's random source.
pub fn new_fence() -> ApiResult<FenceToken> {
    Ok(FenceToken::from_bytes(random_bytes::<16>()?))
}

/// `N` bytes from the system's random source (ring's `SystemRandom`).
pub fn random_bytes<const N: usize>() -> ApiResult<[u8; N]> {
    use ring::rand::SecureRandom;
    let mut b = [0u8; N];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| ApiError::Internal(anyhow::anyhow!("the system random source failed")))?;
    Ok(b)
}

/// What an operator must hear about Redis' persistence (`appendonly`, `appendfsync`):
/// the promise that an accepted job, a granted claim and every acknowledged output line
/// survive a Redis crash holds only with `appendonly yes` and `appendfsync always`. With
/// `everysec` Redis answers before its write reaches the file and may postpone that write
/// by up to 2 s while an fsync is slow (redis.io "Persistence"; `flushAppendOnlyFile`),
/// so a crash then loses acknowledged writes. Empty when the settings are durable.
pub fn persistence_warnings(appendonly: &str, appendfsync: &str) -> Vec<String> {
    if !appendonly.eq_ignore_ascii_case("yes") {
        return vec![format!(
            "Redis runs with appendonly {appendonly}: a Redis restart loses every job, claim and log; run it with --appendonly yes --appendfsync always (RELIABILITY.md)"
        )];
    }
    if !appendfsync.eq_ignore_ascii_case("always") {
        return vec![format!(
            "Redis runs with appendfsync {appendfsync}: a Redis crash can lose the last seconds of acknowledged writes (claims, job states, output); run it with --appendfsync always (RELIABILITY.md)"
        )];
    }
    Vec::new()
}

pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Upstream's datetime rendering: seconds precision and a literal `Z`.
pub fn now_iso() -> String {
    chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

impl Store {
    /// Connects to Redis. Fails when Redis cannot be reached within a few seconds.
    pub async fn connect(url: &str, prefix: &str, retention: u64) -> anyhow::Result<Store> {
        let client = redis::Client::open(url)?;
        let pubsub_client = client.clone();
        let cfg = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(std::time::Duration::from_secs(2)))
            .set_response_timeout(Some(std::time::Duration::from_secs(5)))
            .set_number_of_retries(2);
        let con = ConnectionManager::new_with_config(client, cfg).await?;
        Ok(Store {
            keys: Keys::new(prefix),
            con,
            client: pubsub_client,
            retention,
        })
    }

    pub fn con(&self) -> ConnectionManager {
        self.con.clone()
    }

    pub fn retention(&self) -> u64 {
        self.retention
    }

    /// Redis' `appendonly` and `appendfsync` settings (`CONFIG GET`), or `None` when
    /// `CONFIG` is refused (managed Redis services often rename or disable it).
    pub async fn persistence(&self) -> Option<(String, String)> {
        let mut c = self.con();
        let mut get = async |name: &str| -> Option<String> {
            let v: Vec<String> = redis::cmd("CONFIG")
                .arg("GET")
                .arg(name)
                .query_async(&mut c)
                .await
                .ok()?;
            v.get(1).cloned()
        };
        let aof = get("appendonly").await?;
        let fsync = get("appendfsync").await?;
        Some((aof, fsync))
    }

    pub async fn ping(&self) -> ApiResult<()> {
        let mut c = self.con();
        let _: String = redis::cmd("PING").query_async(&mut c).await?;
        Ok(())
    }

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
    ) -> ApiResult<Created> {
        let k = &self.keys;
        let mut c = self.con();
        let tags_json = serde_json::to_string(tags).unwrap_or_else(|_| "[]".into());
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
        let r = list(r);
        let created = r.first().map(n).unwrap_or(0) == 1;
        let state = r.get(1).map(s).unwrap_or_default();
        let existing_def = r.get(2).map(s).unwrap_or_default();
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
    pub async fn delete_job(&self, id: &str, queue: &str, tags: &[String]) -> ApiResult<()> {
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

    pub async fn get_job(&self, id: &str) -> ApiResult<Option<JobRecord>> {
        let mut c = self.con();
        let h: std::collections::HashMap<String, String> = c.hgetall(self.keys.job(id)).await?;
        if h.is_empty() {
            return Ok(None);
        }
        let g = |k: &str| h.get(k).cloned().unwrap_or_default();
        let num = |k: &str| g(k).parse::<u64>().unwrap_or(0);
        Ok(Some(JobRecord {
            def: serde_json::from_str(&g("def")).unwrap_or(Value::Null),
            queue: g("queue"),
            state: g("state"),
            created_at: g("created_at"),
            attempt: num("attempt"),
            fence: g("fence"),
            agent: g("agent"),
            started_at: g("started_at"),
            reason: g("reason"),
            status: serde_json::from_str(&g("status")).unwrap_or_default(),
            device_info: h
                .get("device_info")
                .and_then(|d| serde_json::from_str(d).ok()),
            attach: g("attach"),
            priority: g("prio").parse().unwrap_or(0),
        }))
    }

    pub async fn job_fields(&self, id: &str, fields: &[&str]) -> ApiResult<Vec<Option<String>>> {
        let mut c = self.con();
        let v: Vec<Option<String>> = redis::cmd("HMGET")
            .arg(self.keys.job(id))
            .arg(fields)
            .query_async(&mut c)
            .await?;
        Ok(v)
    }

    /// The 0-based position of a waiting job in its queue; `None` when the job is
    /// unknown, not waiting, or not in the index.
    pub async fn position(&self, id: &str) -> ApiResult<Option<i64>> {
        let mut c = self.con();
        let r: i64 = POSITION
            .key(self.keys.job(id))
            .arg(id)
            .arg(self.keys.qpos(""))
            .invoke_async(&mut c)
            .await?;
        Ok((r >= 0).then_some(r))
    }

    pub async fn set_job_fields(&self, id: &str, fields: &[(&str, String)]) -> ApiResult<()> {
        let mut c = self.con();
        let _: () = c.hset_multiple(self.keys.job(id), fields).await?;
        Ok(())
    }

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
    ) -> ApiResult<Claim> {
        let k = &self.keys;
        let queue = self
            .job_fields(id, &["queue"])
            .await?
            .pop()
            .flatten()
            .unwrap_or_default();
        if let Some(served) = served
            && !queue.is_empty()
            && !served.contains(&queue)
        {
            return Err(ApiError::Json(
                actix_web::http::StatusCode::FORBIDDEN,
                format!(
                    "job {id} is on queue '{queue}', which agent '{agent}' may not serve (its queues: {}); an admin or manager sets them with agent_queues in /v1/client-permissions",
                    served.join(", ")
                ),
            ));
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
        let r = list(r);
        let outcome = match r.first().map(s).as_deref() {
            Some("granted") => ClaimOutcome::Granted,
            Some("cancelled") => ClaimOutcome::Cancelled,
            Some("finished") => ClaimOutcome::Finished,
            Some("excluded") => ClaimOutcome::Excluded,
            Some("unknown") => ClaimOutcome::Unknown,
            _ => ClaimOutcome::Owned,
        };
        if outcome != ClaimOutcome::Granted {
            return Ok(Claim {
                outcome,
                attempt: 0,
                token: FenceToken::default(),
                job: None,
            });
        }
        let attempt = r.get(1).map(n).unwrap_or(0);
        let token = r
            .get(2)
            .map(s)
            .unwrap_or_default()
            .parse::<FenceToken>()
            .map_err(|e| ApiError::Internal(anyhow::anyhow!("stored fence of {id}: {e}")))?;
        let mut job: Value =
            serde_json::from_str(&r.get(3).map(s).unwrap_or_default()).unwrap_or(Value::Null);
        if let Some(o) = job.as_object_mut() {
            o.insert("job_id".into(), Value::String(id.to_string()));
            o.insert("started_at".into(), Value::String(now_iso()));
            let attach = r.get(4).map(s).unwrap_or_default();
            if !attach.is_empty() {
                o.insert("attachments_status".into(), Value::String(attach));
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
    ) -> ApiResult<Option<bool>> {
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
        let r = list(r);
        match r.first().map(s).as_deref() {
            Some("ok") => Ok(Some(r.get(1).map(n).unwrap_or(0) == 1)),
            Some("unknown") => Err(ApiError::JobNotFound(id.to_string())),
            Some("forbidden") => Err(not_holder(id, agent)),
            Some("stale") => Ok(None),
            other => Err(unexpected("HEARTBEAT", other)),
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
    ) -> ApiResult<Requeue> {
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
        let r = list(r);
        let get = |i: usize| r.get(i).map(s).unwrap_or_default();
        Ok(match get(0).as_str() {
            "gone" => Requeue::Gone,
            "forbidden" => return Err(not_holder(id, holder)),
            "stale" => Requeue::Stale,
            "requeued" => Requeue::Requeued {
                previous: get(1),
                attempt: r.get(2).map(n).unwrap_or(0),
                agent: get(3),
                reason: get(4),
            },
            "ended" => Requeue::Ended {
                previous: get(1),
                attempt: r.get(2).map(n).unwrap_or(0),
                agent: get(3),
                reason: get(4),
            },
            _ => Requeue::Skip,
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
    ) -> ApiResult<Report> {
        let from = match state {
            Some(st) => st.reported_from().map_err(|e| {
                ApiError::Validation(testflinger_common::ValidationError::new("job_state", e))
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
        let r = list(r);
        let verdict = r.first().map(s).unwrap_or_default();
        self.holder_verdict(id, &verdict, agent)?;
        let previous = r.get(1).map(s).unwrap_or_default();
        let attempt = r.get(2).map(n).unwrap_or(0);
        let holder = r.get(3).map(s).unwrap_or_default();
        let change = match verdict.as_str() {
            "set" => StateChange::Set(previous),
            "refused" => StateChange::Refused(previous),
            "kept" | "none" => StateChange::Kept(previous),
            other => return Err(unexpected("REPORT", Some(other))),
        };
        Ok(Report {
            change,
            attempt,
            agent: holder,
        })
    }

    /// The error for a holder check's verdict other than `ok` (see [`holder_check!`]);
    /// `Ok` for `ok` and for the verdicts of a check that passed.
    fn holder_verdict(&self, id: &str, verdict: &str, agent: Option<&str>) -> ApiResult<()> {
        match verdict {
            "unknown" => Err(ApiError::JobNotFound(id.to_string())),
            "stale" => Err(ApiError::Stale(stale_message(id))),
            "forbidden" => Err(not_holder(id, agent)),
            "token" => Err(ApiError::Stale(format!(
                "job {id} is held under a lease: writes about it must carry the holder's {} header",
                testflinger_common::protocol::TOKEN_HEADER
            ))),
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
    ) -> ApiResult<String> {
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
        let r = list(r);
        let verdict = r.first().map(s).unwrap_or_default();
        self.holder_verdict(id, &verdict, agent)?;
        if verdict != "ok" {
            return Err(unexpected("ARTIFACT_COMMIT", Some(&verdict)));
        }
        Ok(r.get(1).map(s).unwrap_or_default())
    }

    /// Cancels a job. `None` if unknown; `Some(Err(state))` if already ended;
    /// `Some(Ok((previous, agent)))` when cancelled now.
    pub async fn cancel(
        &self,
        id: &str,
        queue: &str,
    ) -> ApiResult<Option<Result<(String, String), String>>> {
        let mut c = self.con();
        let r: redis::Value = CANCEL
            .key(self.keys.job(id))
            .key(self.keys.qpos(queue))
            .key(self.keys.compact())
            .arg(id)
            .arg(self.log_channel(id))
            .invoke_async(&mut c)
            .await?;
        let r = list(r);
        let get = |i: usize| r.get(i).map(s).unwrap_or_default();
        Ok(match get(0).as_str() {
            "unknown" => None,
            "done" => Some(Err(get(1))),
            _ => Some(Ok((get(1), get(2)))),
        })
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
    ) -> ApiResult<u64> {
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

    /// Marks `agent` lost because its lease on `job_id` expired, unless its record has
    /// moved on (see `MARK_LOST`). Returns whether it was marked.
    pub async fn mark_agent_lost(&self, agent: &str, job_id: &str) -> ApiResult<bool> {
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
    pub async fn reaper_clock(&self, gap_ms: u64, default_lease_ms: u64) -> ApiResult<(i64, u64)> {
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
    pub async fn expired_leases(&self, now: i64, limit: usize) -> ApiResult<Vec<String>> {
        self.due(&self.keys.leases(), now, limit).await
    }

    /// Members of the sorted set `key` scored `until` or less, lowest first, at most
    /// `limit` (a schedule: leases, compactions).
    pub(crate) async fn due(&self, key: &str, until: i64, limit: usize) -> ApiResult<Vec<String>> {
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
    pub async fn outbox(&self, before_ms: i64, limit: usize) -> ApiResult<Vec<String>> {
        let mut c = self.con();
        let ids: Vec<String> = redis::cmd("ZRANGEBYSCORE")
            .arg(self.keys.outbox())
            .arg("-inf")
            .arg(format!("({before_ms}"))
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .query_async(&mut c)
            .await?;
        Ok(ids)
    }

    /// Takes a job off the outbox: its message was confirmed (or it needs none now).
    pub async fn outbox_done(&self, id: &str) -> ApiResult<()> {
        let mut c = self.con();
        let _: () = c.zrem(self.keys.outbox(), id).await?;
        Ok(())
    }

    /// Puts a job in the outbox, to be published (again) by the reconciler.
    pub async fn outbox_add(&self, id: &str) -> ApiResult<()> {
        let mut c = self.con();
        let _: () = c.zadd(self.keys.outbox(), id, now_ms()).await?;
        Ok(())
    }

    /// The waiting jobs of `queue` that are ready to run (not waiting for attachments),
    /// in position order, at most `limit`: the jobs that should each have a message.
    pub async fn runnable_waiting(&self, queue: &str, limit: usize) -> ApiResult<Vec<String>> {
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
    pub async fn queues_with_waiting(&self) -> ApiResult<Vec<(String, u64)>> {
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

    /// Jobs for `GET /v1/job/search`: all jobs newest first, or the union (`all`:
    /// intersection) of the tags' sets; each with `(id, state, created_at, created_ms)`;
    /// jobs that expired are left out.
    pub async fn search_jobs(
        &self,
        tags: &[String],
        all: bool,
    ) -> ApiResult<Vec<(String, String, String, i64)>> {
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

    /// The score of each queue's best waiting job (lower is better: priority, then
    /// submit order); `f64::MAX` for a queue with none.
    pub async fn queue_heads(&self, queues: &[String]) -> ApiResult<Vec<f64>> {
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
    pub async fn sweep_index_entries(&self, cutoff_ms: i64) -> ApiResult<usize> {
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

    /// A secret's stored record (JSON) for the claim `claim` (`<job>:<attempt>`), see
    /// `TAKE_SECRET`; `None` when there is none for this claim.
    pub async fn take_secret(
        &self,
        client: &str,
        path: &str,
        claim: &str,
    ) -> ApiResult<Option<String>> {
        let mut c = self.con();
        let r: Option<String> = TAKE_SECRET
            .key(self.keys.secret(client, path))
            .key(format!("{}:secretused:{client}/{path}", self.keys.p))
            .arg(claim)
            .arg(3600)
            .invoke_async(&mut c)
            .await?;
        Ok(r)
    }

    /// Cancels the jobs that have waited for their attachments since before `cutoff_ms`
    /// (at most 100 a call); returns `(id, queue)` of each job cancelled.
    pub async fn expire_attachment_waits(
        &self,
        cutoff_ms: i64,
        reason: &str,
    ) -> ApiResult<Vec<(String, String)>> {
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
            let queue = self
                .job_fields(&id, &["queue"])
                .await?
                .pop()
                .flatten()
                .unwrap_or_default();
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

    /// How many of an agent's cumulative event list were relayed before; records that
    /// `seen` are relayed now. `None` for an unknown job.
    pub async fn advance_agent_events(&self, id: &str, seen: u64) -> ApiResult<Option<u64>> {
        let mut c = self.con();
        let old: i64 = ADVANCE
            .key(self.keys.job(id))
            .arg(seen)
            .arg("agent_events")
            .invoke_async(&mut c)
            .await?;
        Ok(u64::try_from(old).ok())
    }

    /// Every registered agent's record (`agent:<name>` hash), oldest registration first:
    /// `(name, fields)`; a record that expired comes back empty.
    pub async fn agent_records(
        &self,
    ) -> ApiResult<Vec<(String, std::collections::HashMap<String, String>)>> {
        let k = &self.keys;
        let mut c = self.con();
        let names: Vec<String> = c.zrange(k.agents(), 0, -1).await?;
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let mut p = redis::pipe();
        for n in &names {
            p.hgetall(k.agent(n));
        }
        let rows: Vec<std::collections::HashMap<String, String>> = p.query_async(&mut c).await?;
        Ok(names.into_iter().zip(rows).collect())
    }

    /// Takes or renews a named lock held by `me` for `ttl_ms`; true when held.
    pub async fn hold_lock(&self, name: &str, me: &str, ttl_ms: u64) -> ApiResult<bool> {
        let mut c = self.con();
        let held: i64 = LOCK
            .key(format!("{}:{name}", self.keys.p))
            .arg(me)
            .arg(ttl_ms)
            .invoke_async(&mut c)
            .await?;
        Ok(held == 1)
    }

    /// Sets fields of an agent's record if the agent registered; never creates one.
    pub async fn update_agent_if_known(
        &self,
        name: &str,
        fields: &[(&str, &str)],
    ) -> ApiResult<bool> {
        if fields.is_empty() {
            return Ok(false);
        }
        let mut inv = UPDATE_AGENT.key(self.keys.agent(name));
        for (k, v) in fields {
            inv.arg(*k).arg(*v);
        }
        let mut c = self.con();
        let r: i64 = inv.invoke_async(&mut c).await?;
        Ok(r == 1)
    }

    /// Adds a granted claim to the agent's recent-jobs index ([`Keys::agent_jobs`]),
    /// keeping the newest [`AGENT_JOBS_KEPT`]; the index expires with the retention.
    pub async fn note_agent_job(&self, agent: &str, id: &str) -> ApiResult<()> {
        let key = self.keys.agent_jobs(agent);
        let mut c = self.con();
        let _: () = redis::pipe()
            .zadd(&key, id, now_ms())
            .ignore()
            .zremrangebyrank(&key, 0, -(AGENT_JOBS_KEPT + 1))
            .ignore()
            .expire(&key, self.retention as i64)
            .ignore()
            .query_async(&mut c)
            .await?;
        Ok(())
    }

    pub fn retention_secs(&self) -> i64 {
        self.retention as i64
    }
}

/// Fragment numbers of one attempt stay below this; attempt `a` > 1 stores its fragment
/// `n` at `(a - 1) * ATTEMPT_STRIDE + n`, so each attempt's output is kept apart, in
/// order, under ids unique across attempts (and attempt 1 keeps upstream's numbers).
pub const ATTEMPT_STRIDE: i64 = 1_000_000_000;

/// Where fragment `n` of `attempt` is stored (its score and its public id).
pub fn fragment_score(attempt: u64, n: i64) -> i64 {
    (attempt.max(1) as i64 - 1) * ATTEMPT_STRIDE + n
}

/// The 409 message for a write with a stale fencing token.
/// 403 for a write about a job another agent holds.
pub fn not_holder(id: &str, agent: Option<&str>) -> ApiError {
    ApiError::Json(
        actix_web::http::StatusCode::FORBIDDEN,
        format!(
            "job {id} is not held by agent '{}': an agent writes only about the jobs it holds a lease on",
            agent.unwrap_or_default()
        ),
    )
}

/// A script answered something this code does not know: an error, never a default.
pub fn unexpected(script: &str, reply: Option<&str>) -> ApiError {
    ApiError::Internal(anyhow::anyhow!(
        "unexpected reply from the {script} script: {reply:?}"
    ))
}

pub fn stale_message(id: &str) -> String {
    format!(
        "stale fencing token for job {id}: the job was reassigned or released; stop working on it"
    )
}
