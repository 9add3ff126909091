//! Auth state in Redis: clients, refresh tokens, restricted queues, job owners.
//!
//! Keys (under the store's prefix; none of them expires with the job retention):
//! - `client:<id>`: hash `secret_hash` (bcrypt), `role`, `max_priority` (JSON object),
//!   `max_reservation_time` (JSON object), `email`, `generation` (see
//!   [`ClientRecord::generation`]), for an agent client `agent_id` and `agent_queues`
//!   (JSON list);
//! - `clientgen`: the counter generations are drawn from (never reset, so a re-created
//!   id never gets an old generation back);
//! - `login:addr:<address>`, `login:fail:<client id>`: login rate-limit counters,
//!   expiring with their window;
//! - `clientq:<id>`: set of the restricted queues the client may submit to;
//! - `clients`: set of client ids;
//! - `refresh:<sha256 of the token>`: `<generation> <client id>` (a bare client id,
//!   written by older servers, reads as generation 0), expiring with the token;
//! - `restricted`: set of restricted queue names; `rqowners:<q>`: set of their owners;
//! - `regqueues`: queues an agent or operator registered (with auth on, only those get a
//!   broker queue); `parked:<q>`: waiting jobs of an unregistered queue, moved to the
//!   outbox when the queue is registered.

use super::{Keys, Store, StoreResult};
use crate::roles::{Permissions, Role};
use redis::{AsyncCommands, Script};
use std::collections::{BTreeMap, HashMap};
use std::sync::LazyLock;

/// Creates or changes a client and gives it a new token generation from the global
/// counter. KEYS: client clients clientgen; ARGV: id, then field value pairs.
static PUT_CLIENT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local g = redis.call('INCR', KEYS[3])
redis.call('HSET', KEYS[1], 'generation', g)
if #ARGV > 1 then redis.call('HSET', KEYS[1], unpack(ARGV, 2)) end
redis.call('SADD', KEYS[2], ARGV[1])
return g
"#,
    )
});

/// Counts one event in a fixed window: returns the count and the seconds left of the
/// window. KEYS: counter; ARGV: window seconds.
static COUNT_IN_WINDOW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local n = redis.call('INCR', KEYS[1])
if n == 1 or redis.call('TTL', KEYS[1]) < 0 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
return {n, redis.call('TTL', KEYS[1])}
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

/// What [`Store::client_token_state`] reads on each authenticated request.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TokenState {
    pub generation: u64,
    pub agent_id: Option<String>,
    pub agent_queues: Option<Vec<String>>,
}

impl Keys {
    pub fn client(&self, id: &str) -> String {
        format!("{}:client:{id}", self.p)
    }
    pub fn client_queues(&self, id: &str) -> String {
        format!("{}:clientq:{id}", self.p)
    }
    pub fn clients(&self) -> String {
        format!("{}:clients", self.p)
    }
    pub fn client_generation(&self) -> String {
        format!("{}:clientgen", self.p)
    }
    pub fn login_address(&self, addr: &str) -> String {
        format!("{}:login:addr:{addr}", self.p)
    }
    pub fn login_failures(&self, id: &str) -> String {
        format!("{}:login:fail:{id}", self.p)
    }
    pub fn refresh(&self, digest: &str) -> String {
        format!("{}:refresh:{digest}", self.p)
    }
    pub fn restricted(&self) -> String {
        format!("{}:restricted", self.p)
    }
    pub fn restricted_owners(&self, q: &str) -> String {
        format!("{}:rqowners:{q}", self.p)
    }
    pub fn registered_queues(&self) -> String {
        format!("{}:regqueues", self.p)
    }
    pub fn parked(&self, q: &str) -> String {
        format!("{}:parked:{q}", self.p)
    }
}

/// A stored client.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClientRecord {
    pub secret_hash: String,
    pub email: Option<String>,
    pub permissions: Permissions,
    /// The client's token generation: drawn anew from a counter that never repeats
    /// whenever the client is created or changed. Tokens carry the generation they were
    /// issued under and are refused once it moved (or the client is gone), so deleting
    /// or changing a client ends its access and refresh tokens at once (DESIGN.md "Who
    /// may do what"). 0 for a record written by an older server.
    pub generation: u64,
    /// For an agent client: the agent it stands for, when an admin recorded one (else
    /// the client id).
    pub agent_id: Option<String>,
    /// For an agent client: the queues an admin or manager let it serve (`None`: none
    /// set, so the queues its agent record lists).
    pub agent_queues: Option<Vec<String>>,
}

/// Changes to a client (`PUT /v1/client-permissions/<id>`); `None` keeps the value.
#[derive(Debug, Clone, Default)]
pub struct ClientUpdate {
    pub secret_hash: Option<String>,
    pub role: Option<Role>,
    pub max_priority: Option<BTreeMap<String, i64>>,
    pub max_reservation_time: Option<BTreeMap<String, u64>>,
    pub email: Option<String>,
    /// The agent an agent client stands for; `Some("")` removes it (the client id again).
    pub agent_id: Option<String>,
    /// The queues an agent client may serve; `Some(vec![])` removes them.
    pub agent_queues: Option<Vec<String>>,
}

impl Store {
    /// The client `id`, with its allowed queues; `None` if unknown.
    pub async fn client(&self, id: &str) -> StoreResult<Option<ClientRecord>> {
        let mut c = self.con();
        let (h, queues): (HashMap<String, String>, Vec<String>) = redis::pipe()
            .hgetall(self.keys.client(id))
            .smembers(self.keys.client_queues(id))
            .query_async(&mut c)
            .await?;
        if h.is_empty() {
            return Ok(None);
        }
        let mut allowed_queues = queues;
        allowed_queues.sort();
        let prio = h
            .get("max_priority")
            .and_then(|v| serde_json::from_str(v).ok());
        let reserve = h
            .get("max_reservation_time")
            .and_then(|v| serde_json::from_str(v).ok());
        Ok(Some(ClientRecord {
            generation: h
                .get("generation")
                .and_then(|g| g.parse().ok())
                .unwrap_or(0),
            agent_id: h.get("agent_id").filter(|a| !a.is_empty()).cloned(),
            agent_queues: h
                .get("agent_queues")
                .and_then(|q| serde_json::from_str::<Vec<String>>(q).ok())
                .filter(|q| !q.is_empty()),
            secret_hash: h.get("secret_hash").cloned().unwrap_or_default(),
            email: h.get("email").filter(|e| !e.is_empty()).cloned(),
            permissions: Permissions {
                client_id: id.to_string(),
                role: h
                    .get("role")
                    .and_then(|r| r.parse().ok())
                    .unwrap_or_default(),
                max_priority: prio.unwrap_or_default(),
                allowed_queues,
                max_reservation_time: reserve.unwrap_or_default(),
            },
        }))
    }

    /// Every client id, sorted.
    pub async fn client_ids(&self) -> StoreResult<Vec<String>> {
        let mut c = self.con();
        let mut ids: Vec<String> = c.smembers(self.keys.clients()).await?;
        ids.sort();
        Ok(ids)
    }

    /// The token state of client `id` (its generation and agent identity), or `None`
    /// when there is no such client. One round trip; read on every authenticated
    /// request.
    pub async fn client_token_state(&self, id: &str) -> StoreResult<Option<TokenState>> {
        let mut c = self.con();
        let f: Vec<Option<String>> = redis::cmd("HMGET")
            .arg(self.keys.client(id))
            .arg(&["role", "generation", "agent_id", "agent_queues"])
            .query_async(&mut c)
            .await?;
        let get = |i: usize| f.get(i).cloned().flatten();
        if get(0).is_none() {
            return Ok(None);
        }
        Ok(Some(TokenState {
            generation: get(1).and_then(|g| g.parse().ok()).unwrap_or(0),
            agent_id: get(2).filter(|a| !a.is_empty()),
            agent_queues: get(3)
                .and_then(|q| serde_json::from_str::<Vec<String>>(&q).ok())
                .filter(|q| !q.is_empty()),
        }))
    }

    /// Counts a login attempt from `addr` in the current window; returns the attempts
    /// so far and the seconds left of the window.
    pub async fn count_login_attempt(&self, addr: &str, window: u64) -> StoreResult<(u64, u64)> {
        self.count_in_window(&self.keys.login_address(addr), window)
            .await
    }

    /// Counts a login of client `id` (known or not) in the current window before its
    /// secret is checked ([`Store::forgive_login`] takes it back when it succeeds).
    pub async fn count_login_failure(&self, id: &str, window: u64) -> StoreResult<(u64, u64)> {
        self.count_in_window(&self.keys.login_failures(id), window)
            .await
    }

    /// Takes back the count of a login of client `id` that succeeded.
    pub async fn forgive_login(&self, id: &str) -> StoreResult<()> {
        let mut c = self.con();
        let _: i64 = c.decr(self.keys.login_failures(id), 1).await?;
        Ok(())
    }

    async fn count_in_window(&self, key: &str, window: u64) -> StoreResult<(u64, u64)> {
        let mut c = self.con();
        let (n, ttl): (u64, i64) = COUNT_IN_WINDOW
            .key(key)
            .arg(window)
            .invoke_async(&mut c)
            .await?;
        Ok((n, ttl.max(0) as u64))
    }

    /// Creates or updates a client with the given fields and gives it a new token
    /// generation (ending the tokens issued before). Returns the new generation.
    pub async fn put_client(&self, id: &str, u: &ClientUpdate) -> StoreResult<u64> {
        let mut fields: Vec<(&str, String)> = Vec::new();
        if let Some(h) = &u.secret_hash {
            fields.push(("secret_hash", h.clone()));
        }
        if let Some(r) = u.role {
            fields.push(("role", r.as_str().to_string()));
        }
        if let Some(m) = &u.max_priority {
            fields.push(("max_priority", serde_json::json!(m).to_string()));
        }
        if let Some(m) = &u.max_reservation_time {
            fields.push(("max_reservation_time", serde_json::json!(m).to_string()));
        }
        if let Some(e) = &u.email {
            fields.push(("email", e.clone()));
        }
        if let Some(a) = &u.agent_id {
            fields.push(("agent_id", a.clone()));
        }
        if let Some(q) = &u.agent_queues {
            fields.push(("agent_queues", serde_json::json!(q).to_string()));
        }
        let mut c = self.con();
        let mut inv = PUT_CLIENT.key(self.keys.client(id));
        inv.key(self.keys.clients())
            .key(self.keys.client_generation())
            .arg(id);
        for (k, v) in &fields {
            inv.arg(*k).arg(v);
        }
        let generation: u64 = inv.invoke_async(&mut c).await?;
        Ok(generation)
    }

    /// Deletes a client, its restricted-queue grants and ownerships. False if unknown.
    pub async fn delete_client(&self, id: &str) -> StoreResult<bool> {
        let mut c = self.con();
        let queues: Vec<String> = c.smembers(self.keys.client_queues(id)).await?;
        let mut p = redis::pipe();
        p.atomic()
            .del(self.keys.client(id))
            .srem(self.keys.clients(), id)
            .ignore()
            .del(self.keys.client_queues(id))
            .ignore();
        for q in &queues {
            p.srem(self.keys.restricted_owners(q), id).ignore();
        }
        let (deleted,): (i64,) = p.query_async(&mut c).await?;
        Ok(deleted == 1)
    }

    /// Stores a refresh token's digest for `client_id` at its token `generation`,
    /// expiring after `ttl_secs`.
    pub async fn put_refresh(
        &self,
        digest: &str,
        client_id: &str,
        generation: u64,
        ttl_secs: u64,
    ) -> StoreResult<()> {
        let mut c = self.con();
        let _: () = c
            .set_ex(
                self.keys.refresh(digest),
                format!("{generation} {client_id}"),
                ttl_secs,
            )
            .await?;
        Ok(())
    }

    /// The client a live refresh token belongs to and the generation it was issued at.
    pub async fn refresh_owner(&self, digest: &str) -> StoreResult<Option<(String, u64)>> {
        let mut c = self.con();
        let v: Option<String> = c.get(self.keys.refresh(digest)).await?;
        Ok(v.map(|v| match v.split_once(' ') {
            Some((g, id)) => (id.to_string(), g.parse().unwrap_or(u64::MAX)),
            None => (v, 0),
        }))
    }

    /// Revokes a refresh token; false if it was unknown (or already revoked, or expired).
    pub async fn revoke_refresh(&self, digest: &str) -> StoreResult<bool> {
        let mut c = self.con();
        let n: i64 = c.del(self.keys.refresh(digest)).await?;
        Ok(n == 1)
    }

    /// Whether `queue` is restricted.
    pub async fn is_restricted(&self, queue: &str) -> StoreResult<bool> {
        let mut c = self.con();
        Ok(c.sismember(self.keys.restricted(), queue).await?)
    }

    /// Restricted queues with their owners, sorted by queue.
    pub async fn restricted_queues(&self) -> StoreResult<Vec<(String, Vec<String>)>> {
        let mut c = self.con();
        let mut queues: Vec<String> = c.smembers(self.keys.restricted()).await?;
        queues.sort();
        let mut out = Vec::with_capacity(queues.len());
        for q in queues {
            let owners = self.restricted_owners(&q).await?;
            out.push((q, owners));
        }
        Ok(out)
    }

    /// The owners of a restricted queue, sorted.
    pub async fn restricted_owners(&self, queue: &str) -> StoreResult<Vec<String>> {
        let mut c = self.con();
        let mut owners: Vec<String> = c.smembers(self.keys.restricted_owners(queue)).await?;
        owners.sort();
        Ok(owners)
    }

    /// Marks `queue` restricted and lets `client_id` submit to it.
    pub async fn restrict_queue(&self, queue: &str, client_id: &str) -> StoreResult<()> {
        let mut c = self.con();
        let _: () = redis::pipe()
            .atomic()
            .sadd(self.keys.restricted(), queue)
            .ignore()
            .sadd(self.keys.restricted_owners(queue), client_id)
            .ignore()
            .sadd(self.keys.client_queues(client_id), queue)
            .ignore()
            .query_async(&mut c)
            .await?;
        Ok(())
    }

    /// Lifts the restriction of `queue` entirely (upstream deletes the record) and takes
    /// the queue from every owner's allowed queues. False if it was not restricted.
    pub async fn unrestrict_queue(&self, queue: &str) -> StoreResult<bool> {
        let owners = self.restricted_owners(queue).await?;
        let mut c = self.con();
        let mut p = redis::pipe();
        p.atomic()
            .srem(self.keys.restricted(), queue)
            .del(self.keys.restricted_owners(queue))
            .ignore();
        for o in &owners {
            p.srem(self.keys.client_queues(o), queue).ignore();
        }
        let (removed,): (i64,) = p.query_async(&mut c).await?;
        Ok(removed == 1)
    }

    /// Registers job queues (an agent serves them, or an operator declared them) and
    /// hands their parked jobs to the outbox (scored 0: published at the next pass).
    /// Returns how many jobs were unparked.
    pub async fn register_queues(&self, queues: &[String]) -> StoreResult<usize> {
        if queues.is_empty() {
            return Ok(0);
        }
        let mut c = self.con();
        let _: () = c.sadd(self.keys.registered_queues(), queues).await?;
        let mut moved = 0;
        for q in queues {
            let ids: Vec<String> = c.smembers(self.keys.parked(q)).await?;
            if ids.is_empty() {
                continue;
            }
            let mut p = redis::pipe();
            p.atomic();
            for id in &ids {
                p.zadd(self.keys.outbox(), id, 0).ignore();
            }
            p.srem(self.keys.parked(q), &ids).ignore();
            let _: () = p.query_async(&mut c).await?;
            moved += ids.len();
        }
        Ok(moved)
    }

    /// Whether a job queue was registered.
    pub async fn is_registered(&self, queue: &str) -> StoreResult<bool> {
        let mut c = self.con();
        Ok(c.sismember(self.keys.registered_queues(), queue).await?)
    }

    /// Parks a waiting job of an unregistered queue: off the outbox until the queue is
    /// registered. Parked jobs expire with the retention.
    pub async fn park(&self, id: &str, queue: &str) -> StoreResult<()> {
        let mut c = self.con();
        let _: () = redis::pipe()
            .atomic()
            .zrem(self.keys.outbox(), id)
            .ignore()
            .sadd(self.keys.parked(queue), id)
            .ignore()
            .expire(self.keys.parked(queue), self.retention as i64)
            .ignore()
            .query_async(&mut c)
            .await?;
        Ok(())
    }

    /// Stores a secret (JSON record) under `client/path` for `ttl_secs`.
    pub async fn put_secret(
        &self,
        client: &str,
        path: &str,
        record: &str,
        ttl_secs: u64,
    ) -> StoreResult<()> {
        let mut c = self.con();
        let _: () = c
            .set_ex(self.keys.secret(client, path), record, ttl_secs)
            .await?;
        Ok(())
    }

    /// Deletes a secret; whether it existed.
    pub async fn delete_secret(&self, client: &str, path: &str) -> StoreResult<bool> {
        let mut c = self.con();
        let n: i64 = c.del(self.keys.secret(client, path)).await?;
        Ok(n == 1)
    }

    /// A secret's stored record (JSON), if it exists.
    pub async fn get_secret(&self, client: &str, path: &str) -> StoreResult<Option<String>> {
        let mut c = self.con();
        Ok(c.get(self.keys.secret(client, path)).await?)
    }

    /// Whether a secret exists.
    pub async fn secret_exists(&self, client: &str, path: &str) -> StoreResult<bool> {
        let mut c = self.con();
        Ok(c.exists(self.keys.secret(client, path)).await?)
    }

    /// A secret's stored record (JSON) for the claim `claim` (`<job>:<attempt>`), see
    /// `TAKE_SECRET`; `None` when there is none for this claim.
    pub async fn take_secret(
        &self,
        client: &str,
        path: &str,
        claim: &str,
    ) -> StoreResult<Option<String>> {
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
}
