//! Read-only queries of the web UI. Each reads a bounded page of a sorted-set index
//! (`jobs`, `qjobs:<q>`, `qpos:<q>`, `agentjobs:<a>`, `jobqueues`) and then only the
//! records on that page, in one pipelined round trip; no query walks every job.
//! Agents and queues are read whole: there are as many as devices, not as jobs.

use super::{Reply, Store, StoreResult};
use redis::{AsyncCommands, Script};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::LazyLock;
use testflinger_common::JobState;

/// The job fields a table row shows, in [`JobRow::from_fields`] order.
const ROW_FIELDS: &[&str] = &[
    "state",
    "queue",
    "created_at",
    "agent",
    "attempt",
    "prio",
    "tags",
    "started_at",
];

/// One job as a table row.
#[derive(Debug, Clone, Default)]
pub struct JobRow {
    pub id: String,
    pub state: String,
    pub queue: String,
    pub created_at: String,
    pub agent: String,
    pub attempt: u64,
    pub priority: i64,
    pub tags: Vec<String>,
    pub started_at: String,
}

impl JobRow {
    /// `None` when the record is gone (expired while its id stayed in an index).
    fn from_fields(id: &str, f: Vec<Option<String>>) -> Option<JobRow> {
        let g = |i: usize| f.get(i).cloned().flatten().unwrap_or_default();
        let state = f.first().cloned().flatten()?;
        Some(JobRow {
            id: id.to_string(),
            state,
            queue: g(1),
            created_at: g(2),
            agent: g(3),
            attempt: g(4).parse().unwrap_or(0),
            priority: g(5).parse().unwrap_or(0),
            tags: serde_json::from_str(&g(6)).unwrap_or_default(),
            started_at: g(7),
        })
    }

    /// The first 8 characters of the id, for tables.
    pub fn short_id(&self) -> &str {
        self.id.get(..8).unwrap_or(&self.id)
    }

    pub fn is_terminal(&self) -> bool {
        is_terminal(&self.state)
    }
}

pub fn is_terminal(state: &str) -> bool {
    JobState::parse_lenient(state).is_some_and(JobState::is_terminal)
}

/// The rows of `ids`, in that order, skipping jobs whose record is gone. One round trip.
pub async fn job_rows(store: &Store, ids: &[String]) -> StoreResult<Vec<JobRow>> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let k = &store.keys;
    let mut p = redis::pipe();
    for id in ids {
        p.cmd("HMGET").arg(k.job(id)).arg(ROW_FIELDS);
    }
    let mut c = store.con();
    let rows: Vec<Vec<Option<String>>> = p.query_async(&mut c).await?;
    Ok(ids
        .iter()
        .zip(rows)
        .filter_map(|(id, f)| JobRow::from_fields(id, f))
        .collect())
}

/// A job with everything its page shows.
#[derive(Debug, Clone, Default)]
pub struct JobDetail {
    pub row: JobRow,
    pub def: Value,
    pub reason: String,
    pub status: BTreeMap<String, Value>,
    pub device_info: Option<Value>,
    /// When each state began (ms), from the `at_<state>` fields.
    pub state_times: Vec<(String, i64)>,
    pub owner: Option<String>,
}

/// A job's record, or `None` when unknown.
pub async fn job_detail(store: &Store, id: &str) -> StoreResult<Option<JobDetail>> {
    let mut c = store.con();
    let h: HashMap<String, String> = c.hgetall(store.keys.job(id)).await?;
    if !h.contains_key("state") {
        return Ok(None);
    }
    let fields = ROW_FIELDS
        .iter()
        .map(|f| h.get(*f).cloned())
        .collect::<Vec<_>>();
    let Some(row) = JobRow::from_fields(id, fields) else {
        return Ok(None);
    };
    let mut state_times: Vec<(String, i64)> = h
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix("at_")?.to_string(), v.parse().ok()?)))
        .collect();
    state_times.sort_by_key(|(_, t)| *t);
    Ok(Some(JobDetail {
        def: h
            .get("def")
            .and_then(|d| serde_json::from_str(d).ok())
            .unwrap_or(Value::Null),
        reason: h.get("reason").cloned().unwrap_or_default(),
        status: h
            .get("status")
            .and_then(|s| serde_json::from_str(s).ok())
            .unwrap_or_default(),
        device_info: h
            .get("device_info")
            .and_then(|d| serde_json::from_str(d).ok()),
        owner: h.get("owner").cloned().filter(|o| !o.is_empty()),
        state_times,
        row,
    }))
}

/// One log fragment (the web UI shows `n`, `attempt`, `phase` and `data`).
pub use super::Fragment;

/// Where a job list reads from, newest first.
#[derive(Debug, Clone)]
pub struct JobFilter {
    pub queue: Option<String>,
    pub tags: Vec<String>,
    pub states: Vec<String>,
}

/// A page of a job list.
#[derive(Debug, Clone, Default)]
pub struct JobPage {
    pub rows: Vec<JobRow>,
    /// Where the next page starts (position in the index), when there is one.
    pub next: Option<usize>,
    /// How many index entries this page looked at (a state filter skips some).
    pub scanned: usize,
    /// The scan stopped at its bound before filling the page.
    pub capped: bool,
    /// Entries in the index (all jobs, the queue's jobs, or the tags' jobs).
    pub total: usize,
}

/// Most index entries one page request looks at when a state filter skips rows.
pub const SCAN_BOUND: usize = 2000;

/// One page of a job index, filtered by state inside Redis (read-only; one round trip).
/// The index is `KEYS[1]` (newest = highest score), intersected with the tag sets
/// `KEYS[2..]` when there are any. Returns `{total, scanned, next, capped, ids...}`
/// (`next` = -1 when there is no next page). A record that is gone is skipped.
static PAGE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
-- KEYS: index tagset... ; ARGV: job_key_prefix from limit bound state...
local from, limit, bound = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local want, any = {}, #ARGV < 5
for i = 5, #ARGV do want[ARGV[i]] = true end
local function matches(st)
  if not st then return false end
  if any then return true end
  local done = st == 'complete' or st == 'completed'
  local ended = done or st == 'cancelled'
  if want[st] then return true end
  if done and (want['complete'] or want['completed']) then return true end
  if want['active'] and not ended then return true end
  if want['running'] and not ended and st ~= 'waiting' then return true end
  return false
end
local asc, total = nil, 0
if #KEYS > 1 then
  local args = {#KEYS}
  for i = 1, #KEYS do args[#args + 1] = KEYS[i] end
  args[#args + 1] = 'WEIGHTS'
  args[#args + 1] = 1
  for i = 2, #KEYS do args[#args + 1] = 0 end
  asc = redis.call('ZINTER', unpack(args))
  total = #asc
else
  total = redis.call('ZCARD', KEYS[1])
end
local function slice(s, n)
  if asc then
    local out = {}
    for i = s, math.min(s + n, total) - 1 do out[#out + 1] = asc[total - i] end
    return out
  end
  return redis.call('ZREVRANGE', KEYS[1], s, s + n - 1)
end
local found, pos, scanned = {}, from, 0
while pos < total and scanned < bound do
  local ids = slice(pos, 500)
  if #ids == 0 then break end
  for _, id in ipairs(ids) do
    if scanned >= bound then break end
    if matches(redis.call('HGET', ARGV[1] .. id, 'state')) then
      if #found == limit then return {total, scanned, pos, 0, unpack(found)} end
      found[#found + 1] = id
    end
    pos = pos + 1
    scanned = scanned + 1
  end
end
if pos < total then return {total, scanned, pos, 1, unpack(found)} end
return {total, scanned, -1, 0, unpack(found)}
"#,
    )
});

/// A page of `limit` jobs matching `f`, newest first, starting at index position `from`.
/// Looks at most [`SCAN_BOUND`] index entries (then `capped`, with `next` to go on).
pub async fn job_page(
    store: &Store,
    f: &JobFilter,
    from: usize,
    limit: usize,
) -> StoreResult<JobPage> {
    let k = &store.keys;
    let mut inv = PAGE.key(match &f.queue {
        Some(q) => k.qjobs(q),
        None => k.jobs(),
    });
    for t in &f.tags {
        inv.key(k.tag(t));
    }
    inv.arg(k.job("")).arg(from).arg(limit).arg(SCAN_BOUND);
    for s in &f.states {
        inv.arg(s);
    }
    let mut c = store.con();
    let r = Reply::new("PAGE", inv.invoke_async(&mut c).await?)?;
    let ids = (4..r.len())
        .map(|i| r.text(i))
        .collect::<StoreResult<Vec<String>>>()?;
    let next = r.int(2)?;
    // Only a state filter can end a page early without filling it.
    let capped = r.int(3)? == 1 && !f.states.is_empty() && ids.len() < limit;
    Ok(JobPage {
        rows: job_rows(store, &ids).await?,
        next: usize::try_from(next).ok(),
        scanned: r.count(1)? as usize,
        capped,
        total: r.count(0)? as usize,
    })
}

/// One agent as the UI shows it.
#[derive(Debug, Clone, Default)]
pub struct AgentRow {
    pub name: String,
    pub state: String,
    pub location: String,
    pub provision_type: String,
    pub identifier: String,
    pub job_id: String,
    pub comment: String,
    pub updated_at: String,
    pub queues: Vec<String>,
    pub streak_type: String,
    pub streak_count: i64,
}

impl AgentRow {
    fn from_hash(h: HashMap<String, String>) -> AgentRow {
        let g = |k: &str| h.get(k).cloned().unwrap_or_default();
        AgentRow {
            name: g("name"),
            state: g("state"),
            location: g("location"),
            provision_type: g("provision_type"),
            identifier: g("identifier"),
            job_id: g("job_id"),
            comment: g("comment"),
            updated_at: g("updated_at"),
            queues: serde_json::from_str(&g("queues")).unwrap_or_default(),
            streak_type: g("provision_streak_type"),
            streak_count: g("provision_streak_count").parse().unwrap_or(0),
        }
    }

    /// Takes jobs, by the one availability rule ([`AgentState::takes_jobs`]).
    pub fn is_available(&self) -> bool {
        testflinger_common::AgentState::record_takes_jobs(Some(self.state.as_str()))
    }

    pub fn is_idle(&self) -> bool {
        self.state == "waiting"
    }
}

/// Every registered agent, by name. Read-only (unlike the API's list, it does not prune).
pub async fn agents(store: &Store) -> StoreResult<Vec<AgentRow>> {
    let mut out: Vec<AgentRow> = store
        .agent_records()
        .await?
        .into_iter()
        .filter(|(_, h)| !h.is_empty())
        .map(|(n, h)| {
            let mut a = AgentRow::from_hash(h);
            if a.name.is_empty() {
                a.name = n.clone();
            }
            a
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// An agent with its logs, or `None` when unknown.
#[derive(Debug, Clone, Default)]
pub struct AgentDetail {
    pub agent: AgentRow,
    /// The agent's own log lines (newest last), as it posted them.
    pub log: Vec<String>,
    /// Provision outcomes, newest first.
    pub provisions: Vec<Provision>,
    /// Jobs the agent took, newest first.
    pub jobs: Vec<JobRow>,
}

#[derive(Debug, Clone, Default)]
pub struct Provision {
    pub job_id: String,
    pub exit_code: i64,
    pub detail: String,
    pub timestamp: String,
}

pub async fn agent_detail(
    store: &Store,
    name: &str,
    jobs: usize,
) -> StoreResult<Option<AgentDetail>> {
    let k = &store.keys;
    let mut c = store.con();
    let (h, log, prov, ids): (
        HashMap<String, String>,
        Vec<String>,
        Vec<String>,
        Vec<String>,
    ) = redis::pipe()
        .hgetall(k.agent(name))
        .lrange(k.agent_log(name), -50, -1)
        .lrange(k.provision_log(name), -50, -1)
        .zrevrange(k.agent_jobs(name), 0, jobs as isize - 1)
        .query_async(&mut c)
        .await?;
    if h.is_empty() {
        return Ok(None);
    }
    let mut agent = AgentRow::from_hash(h);
    if agent.name.is_empty() {
        agent.name = name.to_string();
    }
    let provisions = prov
        .iter()
        .rev()
        .filter_map(|p| {
            let v: Value = serde_json::from_str(p).ok()?;
            Some(Provision {
                job_id: v.get("job_id")?.as_str()?.to_string(),
                exit_code: v.get("exit_code")?.as_i64()?,
                detail: v
                    .get("detail")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
                timestamp: v
                    .get("timestamp")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
            })
        })
        .collect();
    Ok(Some(AgentDetail {
        agent,
        log,
        provisions,
        jobs: job_rows(store, &ids).await?,
    }))
}

/// Wait-time statistics of a queue, in seconds.
#[derive(Debug, Clone, Default)]
pub struct WaitStats {
    pub samples: usize,
    pub p50: f64,
    pub p90: f64,
    pub p95: f64,
}

impl WaitStats {
    fn of(mut s: Vec<f64>) -> Option<WaitStats> {
        if s.is_empty() {
            return None;
        }
        s.sort_by(f64::total_cmp);
        let p = |x| super::percentile(&s, x);
        Some(WaitStats {
            samples: s.len(),
            p50: p(50.0),
            p90: p(90.0),
            p95: p(95.0),
        })
    }
}

/// A queue as the UI shows it.
#[derive(Debug, Clone, Default)]
pub struct QueueRow {
    pub name: String,
    pub description: String,
    /// Jobs waiting (the position index).
    pub waiting: u64,
    /// Jobs its agents are running now.
    pub running: u64,
    /// Agents serving it, and how many of them are idle.
    pub agents: usize,
    pub idle: usize,
    pub wait: Option<WaitStats>,
}

/// Every known queue: advertised, served by an agent, or submitted to. `agents` is the
/// list from [`agents`]; `running` the rows of the jobs those agents hold.
pub async fn queues(
    store: &Store,
    agents: &[AgentRow],
    running: &[JobRow],
) -> StoreResult<Vec<QueueRow>> {
    let k = &store.keys;
    let mut c = store.con();
    let (described, submitted, sampled): (HashMap<String, String>, Vec<String>, Vec<String>) =
        redis::pipe()
            .hgetall(k.queues())
            .zrange(k.job_queues(), 0, -1)
            .smembers(k.wait_queues())
            .query_async(&mut c)
            .await?;
    let mut names: BTreeSet<String> = described.keys().cloned().collect();
    names.extend(submitted);
    names.extend(sampled);
    for a in agents {
        names.extend(a.queues.iter().cloned());
    }
    let names: Vec<String> = names.into_iter().collect();
    queue_rows(store, names, &described, agents, running).await
}

/// Rows of the named queues (depth, wait samples) in one round trip.
pub async fn queue_rows(
    store: &Store,
    names: Vec<String>,
    described: &HashMap<String, String>,
    agents: &[AgentRow],
    running: &[JobRow],
) -> StoreResult<Vec<QueueRow>> {
    if names.is_empty() {
        return Ok(Vec::new());
    }
    let k = &store.keys;
    let mut p = redis::pipe();
    for q in &names {
        p.zcard(k.qpos(q));
        p.lrange(k.wait(q), 0, -1);
    }
    let mut c = store.con();
    let raw: Vec<redis::Value> = p.query_async(&mut c).await?;
    let mut out = Vec::new();
    for (i, q) in names.into_iter().enumerate() {
        let waiting: u64 = raw
            .get(2 * i)
            .and_then(|v| redis::from_redis_value(v.clone()).ok())
            .unwrap_or(0);
        let samples: Vec<f64> = raw
            .get(2 * i + 1)
            .and_then(|v| redis::from_redis_value(v.clone()).ok())
            .unwrap_or_default();
        let serving: Vec<&AgentRow> = agents.iter().filter(|a| a.queues.contains(&q)).collect();
        out.push(QueueRow {
            description: described.get(&q).cloned().unwrap_or_default(),
            waiting,
            running: running.iter().filter(|r| r.queue == q).count() as u64,
            agents: serving.len(),
            idle: serving.iter().filter(|a| a.is_idle()).count(),
            wait: WaitStats::of(samples),
            name: q,
        });
    }
    Ok(out)
}

/// The jobs the agents hold now (their `job_id`, when that job has not ended).
pub async fn running_jobs(store: &Store, agents: &[AgentRow]) -> StoreResult<Vec<JobRow>> {
    let ids: Vec<String> = agents
        .iter()
        .filter(|a| !a.job_id.is_empty())
        .map(|a| a.job_id.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    Ok(job_rows(store, &ids)
        .await?
        .into_iter()
        .filter(|r| !r.is_terminal() && r.state != "waiting")
        .collect())
}

/// What a queue's page shows besides its row.
#[derive(Debug, Clone, Default)]
pub struct QueueDetail {
    /// The first waiting jobs, in the order they will run.
    pub waiting: Vec<JobRow>,
    /// The most recent jobs submitted to it, newest first.
    pub recent: Vec<JobRow>,
    /// Whether the queue is known at all (described, served, or submitted to).
    pub known: bool,
    pub description: String,
}

pub async fn queue_detail(
    store: &Store,
    name: &str,
    agents: &[AgentRow],
    waiting: usize,
    recent: usize,
) -> StoreResult<QueueDetail> {
    let k = &store.keys;
    let mut c = store.con();
    let (description, head, recent_ids, submitted): (
        Option<String>,
        Vec<String>,
        Vec<String>,
        Option<f64>,
    ) = redis::pipe()
        .hget(k.queues(), name)
        .zrange(k.qpos(name), 0, waiting as isize - 1)
        .zrevrange(k.qjobs(name), 0, recent as isize - 1)
        .zscore(k.job_queues(), name)
        .query_async(&mut c)
        .await?;
    let known = description.is_some()
        || submitted.is_some()
        || !recent_ids.is_empty()
        || agents.iter().any(|a| a.queues.iter().any(|q| q == name));
    Ok(QueueDetail {
        waiting: job_rows(store, &head).await?,
        recent: job_rows(store, &recent_ids).await?,
        known,
        description: description.unwrap_or_default(),
    })
}
