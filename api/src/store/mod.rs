//! All state in Redis. Every key name is built in [`Keys`], under one configurable
//! prefix; every multi-step change that must be atomic is one Lua script in this module
//! or one of its files, by area: `jobs` (submit, read, position, cancel, search),
//! `leases` (claim, heartbeat, requeue, the holder's writes), `dispatch` (outbox, reaper,
//! reconciler, locks, attachment waits), `logs`, `auth`, `registry` (agents, queues),
//! `views` (the web UI's reads).
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

use redis::AsyncCommands;
use redis::aio::ConnectionManager;
use serde_json::Value;
use testflinger_common::protocol::FenceToken;

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

mod auth;
mod dispatch;
mod error;
mod jobs;
mod leases;
mod logs;
mod records;
mod registry;
pub mod views;
pub use auth::{ClientRecord, ClientUpdate};
use error::unexpected;
pub use error::{StoreError, StoreResult, not_holder, stale_message};
pub use jobs::Created;
pub use leases::{Claim, Report, Requeue, StateChange};
pub use logs::{Batch, CompactionSnapshot, PutFragment, RedisLog};
pub use records::{AttachState, JobRecord, JobSummary};
pub use registry::{AGENT_JOBS_KEPT, percentile};

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

/// A script's array reply, read strictly: an element missing or of the wrong kind is
/// [`StoreError::UnexpectedReply`] naming the script and the whole reply, never a default.
struct Reply {
    script: &'static str,
    items: Vec<redis::Value>,
}

impl Reply {
    fn new(script: &'static str, v: redis::Value) -> StoreResult<Reply> {
        match v {
            redis::Value::Array(items) => Ok(Reply { script, items }),
            other => Err(unexpected(script, Some(&format!("{other:?}")))),
        }
    }

    fn error(&self) -> StoreError {
        unexpected(self.script, Some(&format!("{:?}", self.items)))
    }

    /// Element `i` as text (a string or an integer).
    fn text(&self, i: usize) -> StoreResult<String> {
        match self.items.get(i) {
            Some(redis::Value::BulkString(b)) => Ok(String::from_utf8_lossy(b).into_owned()),
            Some(redis::Value::SimpleString(t)) => Ok(t.clone()),
            Some(redis::Value::Int(n)) => Ok(n.to_string()),
            _ => Err(self.error()),
        }
    }

    /// Element `i` as a count (an integer, or a string of one).
    fn count(&self, i: usize) -> StoreResult<u64> {
        match self.items.get(i) {
            Some(redis::Value::Int(n)) => u64::try_from(*n).map_err(|_| self.error()),
            Some(_) => self.text(i)?.parse().map_err(|_| self.error()),
            None => Err(self.error()),
        }
    }

    /// Element `i` as a signed integer.
    fn int(&self, i: usize) -> StoreResult<i64> {
        match self.items.get(i) {
            Some(redis::Value::Int(n)) => Ok(*n),
            Some(_) => self.text(i)?.parse().map_err(|_| self.error()),
            None => Err(self.error()),
        }
    }

    fn len(&self) -> usize {
        self.items.len()
    }

    /// The first element, the script's verdict.
    fn verdict(&self) -> StoreResult<String> {
        self.text(0)
    }
}

/// A fresh fencing token: 128 bits from the system's random source.
pub fn new_fence() -> StoreResult<FenceToken> {
    Ok(FenceToken::from_bytes(random_bytes::<16>()?))
}

/// `N` bytes from the system's random source (ring's `SystemRandom`).
pub fn random_bytes<const N: usize>() -> StoreResult<[u8; N]> {
    use ring::rand::SecureRandom;
    let mut b = [0u8; N];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| StoreError::Random)?;
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

    pub fn retention_secs(&self) -> i64 {
        self.retention as i64
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

    pub async fn ping(&self) -> StoreResult<()> {
        let mut c = self.con();
        let _: String = redis::cmd("PING").query_async(&mut c).await?;
        Ok(())
    }

    /// Fields of a job's record by name, in one `HMGET`: the store's own reads build
    /// their typed records from it (see `records.rs`).
    async fn job_fields(&self, id: &str, fields: &[&str]) -> StoreResult<Vec<Option<String>>> {
        let mut c = self.con();
        let v: Vec<Option<String>> = redis::cmd("HMGET")
            .arg(self.keys.job(id))
            .arg(fields)
            .query_async(&mut c)
            .await?;
        Ok(v)
    }

    /// Sets fields of a job's record as given (raw: for tools and tests; the API's
    /// writes go through the typed methods).
    pub async fn set_job_fields(&self, id: &str, fields: &[(&str, String)]) -> StoreResult<()> {
        let mut c = self.con();
        let _: () = c.hset_multiple(self.keys.job(id), fields).await?;
        Ok(())
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
