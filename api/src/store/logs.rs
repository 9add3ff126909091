//! Log fragments in Redis, and the Redis side of their compaction into the file store.
//!
//! While a job runs, its fragments live in the sorted sets `log:<id>:<type>` (scored by
//! [`super::fragment_score`]). When it ends (complete or cancelled: `REPORT`,
//! `REQUEUE` giving up, `CANCEL`), the job enters the sorted set `compact` (scored by
//! when it is due, ms); [`crate::logs`] writes its fragments to one file per log type
//! and attempt, then [`Store::finish_compaction`] marks the job record (`lc` = 1) and
//! deletes the sets in one step, unless a fragment was written meanwhile (the job's
//! write counter `lw` moved). Readers take the mark and the Redis fragments in one
//! `MULTI`, and read the files when the mark is set, so they never see neither.
//!
//! Job record fields used here: `lb_<type>` (bytes of `log_data` stored, for the
//! per-job cap), `lt_<type>` (1 once the truncation notice was stored), `lw` (writes
//! so far), `lc` (1 once compacted). Every fragment write and every end of a job
//! publishes on the channel `logev:<id>` (payload: the log type, or `end`), which one
//! subscriber per server fans out to its SSE streams.

use super::{Fragment, Store, StoreResult};
use futures_util::StreamExt;
use redis::Script;
use std::sync::LazyLock;
use testflinger_common::protocol::FenceToken;

/// Books a fragment against the job's log of this type, before it is stored: unless
/// the log reached its cap, counts its bytes (`lb_<type>`, replacing a fragment already
/// stored under this number) and the write (`lw`). Returns `stored`, `truncated` (the
/// cap is reached now: store the notice in its place), `dropped` (past the cap, notice
/// already there) or `unknown` (no such job). The fragment itself never passes through
/// Lua: copying a 1 MiB member into and out of a script cost about 3 ms of Redis time
/// per fragment (measured), which halved the stream scenario's throughput.
///
/// Checks the writer holds the job first ([`holder_check!`]), returning its verdict
/// (`stale`, `token`, `forbidden`) when not; the `MULTI` that stores the fragment checks
/// again, in the same step as the store (see `GUARD_BEFORE`).
static RESERVE_FRAGMENT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        holder_check!(),
        r#"
-- KEYS: log job leases ; ARGV: n data_len cap log_type id token agent
local verdict = holder(KEYS[2], KEYS[3], ARGV[5], ARGV[6], ARGV[7])
if verdict ~= 'ok' then return verdict end
local lt = ARGV[4]
local used = tonumber(redis.call('HGET', KEYS[2], 'lb_' .. lt) or '0') or 0
local old = redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[1], ARGV[1])
local oldlen = 0
if #old > 0 then
  local ok, f = pcall(cjson.decode, old[1])
  if ok and type(f) == 'table' and type(f['d']) == 'string' then oldlen = #f['d'] end
end
local len = tonumber(ARGV[2])
local outcome = 'stored'
if used - oldlen + len > tonumber(ARGV[3]) then
  if #old > 0 or redis.call('HGET', KEYS[2], 'lt_' .. lt) == '1' then return 'dropped' end
  redis.call('HSET', KEYS[2], 'lt_' .. lt, '1')
  len = 0
  outcome = 'truncated'
end
if len - oldlen ~= 0 then redis.call('HINCRBY', KEYS[2], 'lb_' .. lt, len - oldlen) end
redis.call('HINCRBY', KEYS[2], 'lw', 1)
return outcome
"#
    ))
});

/// First command of the `MULTI` that stores a fragment: the holder check again, now in
/// the same atomic step as the store (the holder may have lost the job since
/// `RESERVE_FRAGMENT`). When the check fails, the log is moved aside (`RENAME`, O(1)) so
/// that the `ZADD` that follows lands in an empty set, which `AFTER_FRAGMENT` drops
/// before it puts the log back: the fragment is never applied, and its data never
/// passes through Lua. KEYS: job leases log hold; ARGV: id token agent.
const GUARD_BEFORE: &str = concat!(
    holder_check!(),
    r#"
local verdict = holder(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3])
if verdict == 'ok' then return 1 end
if redis.call('EXISTS', KEYS[3]) == 1 then redis.call('RENAME', KEYS[3], KEYS[4]) end
return 0
"#
);

/// Runs in the same `MULTI` as the fragment's `ZADD`, after it. When `GUARD_BEFORE`
/// refused the write (the same check, same answer: nothing ran in between), drops what
/// the `ZADD` made and puts the log back, returning 0. Otherwise: a fragment for a job
/// that ended or was compacted already (a late one: the agent's spool delivering after
/// the end) schedules the job for compaction again `late_delay_ms` from now; then wakes
/// the job's streams; returns 1.
/// KEYS: job compact leases log hold; ARGV: channel id late_delay_ms log_type token agent.
const AFTER_FRAGMENT: &str = concat!(
    redis_now!(),
    holder_check!(),
    r#"
local verdict = holder(KEYS[1], KEYS[3], ARGV[2], ARGV[5], ARGV[6])
if verdict ~= 'ok' then
  redis.call('DEL', KEYS[4])
  if redis.call('EXISTS', KEYS[5]) == 1 then redis.call('RENAME', KEYS[5], KEYS[4]) end
  return 0
end
local f = redis.call('HMGET', KEYS[1], 'state', 'lc')
if f[1] == 'complete' or f[1] == 'cancelled' or f[2] == '1' then
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[2])
end
redis.call('PUBLISH', ARGV[1], ARGV[4])
return 1
"#
);

/// Ends a compaction: when no fragment was written since the snapshot `lw`, marks the
/// job compacted, deletes its fragment sets and takes it off `compact`. 1 when done.
static FINISH_COMPACTION: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
-- KEYS: job log_output log_serial compact ; ARGV: id lw
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('DEL', KEYS[2], KEYS[3])
  redis.call('ZREM', KEYS[4], ARGV[1])
  return 1
end
if (redis.call('HGET', KEYS[1], 'lw') or '0') ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], 'lc', '1')
redis.call('DEL', KEYS[2], KEYS[3])
redis.call('ZREM', KEYS[4], ARGV[1])
return 1
"#,
    )
});

/// Most fragments one round of [`Store::log_batch`] reads.
const READ_ROUND_MAX: usize = 64;

/// A bound on one read: at most `fragments` fragments and, past the first, about
/// `bytes` bytes of them.
#[derive(Debug, Clone, Copy)]
pub struct Batch {
    pub fragments: usize,
    pub bytes: usize,
}

/// What [`Store::put_fragment`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutFragment {
    Stored,
    /// The log reached its cap: the truncation notice was stored instead.
    Truncated,
    /// Past the cap, after the notice: accepted, not stored.
    Dropped,
    /// No such job (expired or never submitted): nothing stored.
    Unknown,
}

/// A job's fragments as read from Redis, with whether the job's log was compacted (then
/// the files hold the rest).
#[derive(Debug, Clone, Default)]
pub struct RedisLog {
    pub compacted: bool,
    pub fragments: Vec<Fragment>,
}

/// Where a compaction starts: the job's state and write counter, read before the
/// fragments are.
#[derive(Debug, Clone, Default)]
pub struct CompactionSnapshot {
    /// `None` when the job's record is gone.
    pub state: Option<testflinger_common::JobState>,
    pub writes: String,
}

impl Store {
    /// The pub/sub channel of a job's log events.
    pub fn log_channel(&self, id: &str) -> String {
        format!("{}:logev:{id}", self.keys.p)
    }

    /// Stores a log fragment, replacing one stored under the same number (a fragment
    /// delivered again shows once), unless the job's log of `log_type` holds `cap` bytes
    /// of `log_data` already: then `notice` (a fragment, stored once under this number)
    /// says so and later fragments are dropped. Expires with the retention; publishes on
    /// the job's channel. A fragment for a job that ended schedules it for compaction
    /// again `late_delay_ms` after the last such fragment.
    ///
    /// `holder`: the writer's fencing token and agent identity; the fragment is stored
    /// only if they hold the job, checked in the same atomic step as the store (409,
    /// 403 otherwise, as [`Store::check_token`]).
    #[allow(clippy::too_many_arguments)]
    pub async fn put_fragment(
        &self,
        id: &str,
        log_type: &str,
        f: &Fragment,
        cap: u64,
        notice: &Fragment,
        late_delay_ms: u64,
        holder: (Option<FenceToken>, Option<&str>),
    ) -> StoreResult<PutFragment> {
        let mut c = self.con();
        let log = self.keys.log(id, log_type);
        let token = holder.0.map(|t| t.to_string()).unwrap_or_default();
        let agent = holder.1.unwrap_or_default();
        let r: String = RESERVE_FRAGMENT
            .key(&log)
            .key(self.keys.job(id))
            .key(self.keys.leases())
            .arg(f.n)
            .arg(f.data.len())
            .arg(cap)
            .arg(log_type)
            .arg(id)
            .arg(&token)
            .arg(agent)
            .invoke_async(&mut c)
            .await?;
        let outcome = match r.as_str() {
            "stored" => PutFragment::Stored,
            "truncated" => PutFragment::Truncated,
            "dropped" => PutFragment::Dropped,
            "unknown" => PutFragment::Unknown,
            verdict => {
                self.holder_verdict(id, verdict, holder.1)?;
                return Err(super::unexpected("RESERVE_FRAGMENT", Some(verdict)));
            }
        };
        let member = match outcome {
            PutFragment::Stored => f.to_member(),
            PutFragment::Truncated => notice.to_member(),
            PutFragment::Dropped | PutFragment::Unknown => return Ok(outcome),
        };
        let hold = format!("{log}:hold");
        let (applied,): (i64,) = redis::pipe()
            .atomic()
            .cmd("EVAL")
            .arg(GUARD_BEFORE)
            .arg(4)
            .arg(self.keys.job(id))
            .arg(self.keys.leases())
            .arg(&log)
            .arg(&hold)
            .arg(id)
            .arg(&token)
            .arg(agent)
            .ignore()
            .cmd("ZREMRANGEBYSCORE")
            .arg(&log)
            .arg(f.n)
            .arg(f.n)
            .ignore()
            .cmd("ZADD")
            .arg(&log)
            .arg(f.n)
            .arg(member)
            .ignore()
            .cmd("EXPIRE")
            .arg(&log)
            .arg(self.retention_secs())
            .ignore()
            .cmd("EVAL")
            .arg(AFTER_FRAGMENT)
            .arg(5)
            .arg(self.keys.job(id))
            .arg(self.keys.compact())
            .arg(self.keys.leases())
            .arg(&log)
            .arg(&hold)
            .arg(self.log_channel(id))
            .arg(id)
            .arg(late_delay_ms)
            .arg(log_type)
            .arg(&token)
            .arg(agent)
            .query_async(&mut c)
            .await?;
        if applied != 1 {
            // The holder lost the job between the booking and the store: refused, with
            // the check's own answer (409 stale, 403 another agent's, 404 gone).
            self.check_token(id, holder.0, holder.1).await?;
            return Err(super::StoreError::Stale(id.to_string()));
        }
        Ok(outcome)
    }

    /// A job's fragments of one log type still in Redis, numbered `from` or more, in
    /// order, within `limit` (all when `None`), and in the same step whether the job
    /// was compacted (see the module docs).
    pub async fn log_fragments(
        &self,
        id: &str,
        log_type: &str,
        from: i64,
        limit: Option<Batch>,
    ) -> StoreResult<RedisLog> {
        if let Some(b) = limit {
            return self.log_batch(id, log_type, from, b).await;
        }
        let mut c = self.con();
        let (lc, members): (Option<String>, Vec<String>) = redis::pipe()
            .atomic()
            .hget(self.keys.job(id), "lc")
            .cmd("ZRANGEBYSCORE")
            .arg(self.keys.log(id, log_type))
            .arg(from)
            .arg("+inf")
            .query_async(&mut c)
            .await?;
        Ok(RedisLog {
            compacted: lc.as_deref() == Some("1"),
            fragments: members
                .iter()
                .filter_map(|m| Fragment::from_member(m))
                .collect(),
        })
    }

    /// [`Store::log_fragments`] within a [`Batch`]: fragments numbered `from` or more,
    /// at most `b.fragments`, and past the first about `b.bytes` bytes of members. Read
    /// in rounds of `MULTI { HGET lc; ZRANGEBYSCORE .. LIMIT 0 k }`: the first round takes
    /// one fragment, the next ones as many as the budget left allows at the largest size
    /// seen (at most [`READ_ROUND_MAX`]), so a log of large fragments is never read whole
    /// and no fragment passes through Lua (a 1 MiB member cost about 3 ms there). A job
    /// compacted between two rounds is read again from `from` under the mark, so the
    /// answer is one consistent view.
    async fn log_batch(
        &self,
        id: &str,
        log_type: &str,
        from: i64,
        b: Batch,
    ) -> StoreResult<RedisLog> {
        let mut c = self.con();
        let key = self.keys.log(id, log_type);
        let job = self.keys.job(id);
        let mut out: Vec<Fragment> = Vec::new();
        let mut compacted = false;
        let mut next = from;
        let mut bytes = 0usize;
        let mut largest = 0usize;
        loop {
            let left = b.fragments.saturating_sub(out.len());
            if left == 0 || (!out.is_empty() && bytes >= b.bytes) {
                break;
            }
            let k = if out.is_empty() {
                1
            } else {
                (b.bytes.saturating_sub(bytes) / largest.max(1)).clamp(1, left.min(READ_ROUND_MAX))
            };
            let (lc, got): (Option<String>, Vec<(String, f64)>) = redis::pipe()
                .atomic()
                .hget(&job, "lc")
                .cmd("ZRANGEBYSCORE")
                .arg(&key)
                .arg(next)
                .arg("+inf")
                .arg("WITHSCORES")
                .arg("LIMIT")
                .arg(0)
                .arg(k)
                .query_async(&mut c)
                .await?;
            let now_compacted = lc.as_deref() == Some("1");
            if now_compacted && !compacted && !out.is_empty() {
                out.clear();
                bytes = 0;
                largest = 0;
                next = from;
                compacted = true;
                continue;
            }
            compacted = now_compacted;
            let complete = got.len() < k;
            let mut full = false;
            for (m, score) in got {
                if !out.is_empty() && bytes + m.len() > b.bytes {
                    full = true;
                    break;
                }
                bytes += m.len();
                largest = largest.max(m.len());
                // By score, so an unreadable member is passed over, not read forever.
                next = next.max(score as i64 + 1);
                if let Some(f) = Fragment::from_member(&m) {
                    out.push(f);
                }
            }
            if complete || full {
                break;
            }
        }
        Ok(RedisLog {
            compacted,
            fragments: out,
        })
    }

    /// The newest fragments of a job's log still in Redis (at most `max`, oldest
    /// first), how many there are, and whether the job was compacted.
    pub async fn log_newest(
        &self,
        id: &str,
        log_type: &str,
        max: usize,
    ) -> StoreResult<(RedisLog, usize)> {
        let key = self.keys.log(id, log_type);
        let mut c = self.con();
        let (lc, total, members): (Option<String>, usize, Vec<String>) = redis::pipe()
            .atomic()
            .hget(self.keys.job(id), "lc")
            .zcard(&key)
            .zrevrange(&key, 0, max as isize - 1)
            .query_async(&mut c)
            .await?;
        let mut fragments: Vec<Fragment> = members
            .iter()
            .filter_map(|m| Fragment::from_member(m))
            .collect();
        fragments.reverse();
        Ok((
            RedisLog {
                compacted: lc.as_deref() == Some("1"),
                fragments,
            },
            total,
        ))
    }

    /// Jobs due for compaction at `now_ms` (client clock), oldest first, at most `limit`.
    pub async fn due_compactions(&self, now_ms: i64, limit: usize) -> StoreResult<Vec<String>> {
        self.due(&self.keys.compact(), now_ms, limit).await
    }

    /// Schedules (again) a job's compaction at `due_ms` (client clock).
    pub async fn schedule_compaction(&self, id: &str, due_ms: i64) -> StoreResult<()> {
        let mut c = self.con();
        let _: () = redis::cmd("ZADD")
            .arg(self.keys.compact())
            .arg(due_ms)
            .arg(id)
            .query_async(&mut c)
            .await?;
        Ok(())
    }

    /// The job's state and write counter, before a compaction reads its fragments.
    pub async fn compaction_snapshot(&self, id: &str) -> StoreResult<CompactionSnapshot> {
        let mut c = self.con();
        let (state, writes): (Option<String>, Option<String>) = redis::cmd("HMGET")
            .arg(self.keys.job(id))
            .arg(&["state", "lw"])
            .query_async(&mut c)
            .await?;
        Ok(CompactionSnapshot {
            state: state
                .map(|s| super::records::parse_state(id, &s))
                .transpose()?,
            writes: writes.unwrap_or_else(|| "0".into()),
        })
    }

    /// Takes a job off the compaction set without compacting it (not ended).
    pub async fn drop_compaction(&self, id: &str) -> StoreResult<()> {
        let mut c = self.con();
        let _: () = redis::cmd("ZREM")
            .arg(self.keys.compact())
            .arg(id)
            .query_async(&mut c)
            .await?;
        Ok(())
    }

    /// See `FINISH_COMPACTION`: true when the job's fragments left Redis, false when a
    /// fragment was written since `snap` (compact again later).
    pub async fn finish_compaction(
        &self,
        id: &str,
        snap: &CompactionSnapshot,
    ) -> StoreResult<bool> {
        let mut c = self.con();
        let r: i64 = FINISH_COMPACTION
            .key(self.keys.job(id))
            .key(self.keys.log(id, "output"))
            .key(self.keys.log(id, "serial"))
            .key(self.keys.compact())
            .arg(id)
            .arg(&snap.writes)
            .invoke_async(&mut c)
            .await?;
        Ok(r == 1)
    }

    /// The job ids of log events (fragment writes and ends of jobs) under this prefix,
    /// from a pub/sub connection of its own (`PSUBSCRIBE <prefix>:logev:*`). The stream
    /// ends when the connection drops.
    pub async fn log_events(
        &self,
    ) -> StoreResult<impl futures_util::Stream<Item = String> + Send + use<>> {
        let mut ps = self.client.get_async_pubsub().await?;
        let pattern = format!("{}:logev:*", self.keys.p);
        ps.psubscribe(&pattern).await?;
        let strip = format!("{}:logev:", self.keys.p);
        Ok(ps.into_on_message().filter_map(move |m| {
            let id = m
                .get_channel_name()
                .strip_prefix(strip.as_str())
                .map(str::to_string);
            async move { id }
        }))
    }
}
