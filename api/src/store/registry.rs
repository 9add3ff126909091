//! Agents, advertised queues and images, queue job lists, wait-time samples and gauges:
//! the records the agents and queues routes and `/metrics` read and write.

use super::{Store, StoreResult, now_iso, now_ms};
use redis::{AsyncCommands, Script};
use std::collections::{BTreeMap, HashMap};
use std::sync::LazyLock;

/// Agent log lines and provision log entries kept per agent.
const AGENT_LOG_KEPT: isize = 100;

static UPDATE_AGENT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"#,
    )
});

/// How many recent jobs the index [`super::Keys::agent_jobs`] keeps per agent.
pub const AGENT_JOBS_KEPT: isize = 100;

impl Store {
    /// Every registered agent's record (`agent:<name>` hash), oldest registration first:
    /// `(name, fields)`; a record that expired comes back empty.
    pub async fn agent_records(
        &self,
    ) -> StoreResult<Vec<(String, std::collections::HashMap<String, String>)>> {
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

    /// Sets fields of an agent's record if the agent registered; never creates one.
    pub async fn update_agent_if_known(
        &self,
        name: &str,
        fields: &[(&str, &str)],
    ) -> StoreResult<bool> {
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

    /// Adds a granted claim to the agent's recent-jobs index ([`super::Keys::agent_jobs`]),
    /// keeping the newest [`AGENT_JOBS_KEPT`]; the index expires with the retention.
    pub async fn note_agent_job(&self, agent: &str, id: &str) -> StoreResult<()> {
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
}

impl Store {
    /// Writes an agent's record (`fields`, plus `name` and `updated_at`), lists it in
    /// `agents`, appends `log` lines (the newest 100 kept); everything expires with the
    /// retention. Returns the state the record had before.
    pub async fn put_agent(
        &self,
        name: &str,
        fields: &[(&str, String)],
        log: &[String],
    ) -> StoreResult<Option<String>> {
        let k = &self.keys;
        let retention = self.retention_secs();
        let mut all: Vec<(&str, String)> =
            vec![("name", name.to_string()), ("updated_at", now_iso())];
        all.extend(fields.iter().cloned());
        let mut p = redis::pipe();
        p.hset_multiple(k.agent(name), &all).ignore();
        p.expire(k.agent(name), retention).ignore();
        p.zadd(k.agents(), name, now_ms()).ignore();
        if !log.is_empty() {
            p.rpush(k.agent_log(name), log).ignore();
            p.ltrim(k.agent_log(name), -AGENT_LOG_KEPT, -1).ignore();
            p.expire(k.agent_log(name), retention).ignore();
        }
        let mut c = self.con();
        let previous: Option<String> = c.hget(k.agent(name), "state").await?;
        let _: () = p.query_async(&mut c).await?;
        Ok(previous)
    }

    /// One agent's record; empty when unknown.
    pub async fn agent_record(&self, name: &str) -> StoreResult<HashMap<String, String>> {
        let mut c = self.con();
        Ok(c.hgetall(self.keys.agent(name)).await?)
    }

    /// Drops names from the `agents` list (their records expired).
    pub async fn forget_agents(&self, names: &[String]) -> StoreResult<()> {
        if names.is_empty() {
            return Ok(());
        }
        let mut c = self.con();
        let _: () = c.zrem(self.keys.agents(), names).await?;
        Ok(())
    }

    /// Appends a provision log entry (JSON) for an agent (the newest 100 kept) and sets
    /// its provision streak.
    pub async fn add_provision_log(
        &self,
        name: &str,
        entry: &str,
        streak_type: &str,
        streak_count: i64,
    ) -> StoreResult<()> {
        let k = &self.keys;
        let mut c = self.con();
        let _: () = redis::pipe()
            .rpush(k.provision_log(name), entry)
            .ignore()
            .ltrim(k.provision_log(name), -AGENT_LOG_KEPT, -1)
            .ignore()
            .expire(k.provision_log(name), self.retention_secs())
            .ignore()
            .hset_multiple(
                k.agent(name),
                &[
                    ("provision_streak_type", streak_type.to_string()),
                    ("provision_streak_count", streak_count.to_string()),
                ],
            )
            .ignore()
            .query_async(&mut c)
            .await?;
        Ok(())
    }

    /// Sets advertised queues' descriptions.
    pub async fn advertise_queues(&self, items: &[(String, String)]) -> StoreResult<()> {
        if items.is_empty() {
            return Ok(());
        }
        let key = self.keys.queues();
        let mut c = self.con();
        let _: () = redis::pipe()
            .hset_multiple(&key, items)
            .ignore()
            .expire(&key, self.retention_secs())
            .ignore()
            .query_async(&mut c)
            .await?;
        Ok(())
    }

    /// Advertised queues and their descriptions.
    pub async fn advertised_queues(&self) -> StoreResult<BTreeMap<String, String>> {
        let mut c = self.con();
        Ok(c.hgetall(self.keys.queues()).await?)
    }

    /// Stores each queue's advertised images (JSON object name -> provision data).
    pub async fn put_images(&self, by_queue: &[(String, String)]) -> StoreResult<()> {
        if by_queue.is_empty() {
            return Ok(());
        }
        let mut p = redis::pipe();
        for (q, images) in by_queue {
            let key = self.keys.images(q);
            p.set(&key, images).ignore();
            p.expire(&key, self.retention_secs()).ignore();
        }
        let mut c = self.con();
        let _: () = p.query_async(&mut c).await?;
        Ok(())
    }

    /// A queue's advertised images (JSON), if any.
    pub async fn images(&self, queue: &str) -> StoreResult<Option<String>> {
        let mut c = self.con();
        Ok(c.get(self.keys.images(queue)).await?)
    }

    /// A queue's jobs (oldest first) as `(id, state, created_at)`; ids whose record
    /// expired are dropped from the list.
    pub async fn queue_jobs(&self, queue: &str) -> StoreResult<Vec<(String, String, String)>> {
        let k = &self.keys;
        let mut c = self.con();
        let ids: Vec<String> = c.zrange(k.qjobs(queue), 0, -1).await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut p = redis::pipe();
        for id in &ids {
            p.cmd("HMGET").arg(k.job(id)).arg("state").arg("created_at");
        }
        let rows: Vec<(Option<String>, Option<String>)> = p.query_async(&mut c).await?;
        let mut out = Vec::new();
        let mut gone = Vec::new();
        for (id, row) in ids.into_iter().zip(rows) {
            match row {
                (Some(state), Some(created)) => out.push((id, state, created)),
                _ => gone.push(id),
            }
        }
        if !gone.is_empty() {
            let _: () = c.zrem(k.qjobs(queue), gone).await?;
        }
        Ok(out)
    }

    /// Wait-time samples (seconds) of `queues`, or of every queue that has some when
    /// `queues` is empty.
    pub async fn wait_samples(&self, queues: Vec<String>) -> StoreResult<Vec<(String, Vec<f64>)>> {
        let k = &self.keys;
        let mut c = self.con();
        let queues: Vec<String> = if queues.is_empty() {
            c.smembers(k.wait_queues()).await?
        } else {
            queues
        };
        if queues.is_empty() {
            return Ok(Vec::new());
        }
        let mut p = redis::pipe();
        for queue in &queues {
            p.lrange(k.wait(queue), 0, -1);
        }
        let samples: Vec<Vec<f64>> = p.query_async(&mut c).await?;
        Ok(queues.into_iter().zip(samples).collect())
    }

    /// Waiting jobs per queue (the position index's size).
    pub async fn waiting_counts(&self, queues: &[String]) -> StoreResult<Vec<u64>> {
        if queues.is_empty() {
            return Ok(Vec::new());
        }
        let mut p = redis::pipe();
        for q in queues {
            p.zcard(self.keys.qpos(q));
        }
        let mut c = self.con();
        Ok(p.query_async(&mut c).await?)
    }

    /// How many jobs are held under a lease.
    pub async fn lease_count(&self) -> StoreResult<u64> {
        let mut c = self.con();
        Ok(c.zcard(self.keys.leases()).await?)
    }
}

/// Linear-interpolated percentile of sorted samples (numpy's default method).
pub fn percentile(sorted: &[f64], pct: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = pct / 100.0 * (sorted.len() - 1) as f64;
    let lo = rank.floor() as usize;
    let hi = rank.ceil() as usize;
    sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64)
}

#[cfg(test)]
mod tests {
    #[test]
    fn percentiles() {
        let s = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(super::percentile(&s, 50.0), 2.5);
        assert_eq!(super::percentile(&s, 0.0), 1.0);
        assert_eq!(super::percentile(&s, 100.0), 4.0);
    }
}
