//! Who may do what: upstream Testflinger's model (reference §1.4).
//!
//! On when `JWT_SIGNING_KEY` is set. Clients exchange their credentials at
//! `POST /v1/oauth2/token` for a short-lived HS256 JWT (10 minutes) and a refresh token
//! (6 days, stored hashed). The JWT carries the client's [`Permissions`]; every route
//! reads the caller from the `Authorization: Bearer <jwt>` header through the [`Caller`]
//! extractor and checks its role with [`Caller::require`]. A caller without a header is
//! an anonymous `contributor`. Off (no key): every caller may do everything, as before
//! (a trusted network only; the server warns loudly at start-up).
//!
//! Errors, as upstream: no or expired token where one is needed → 401; a token that does
//! not verify, or a role that is not enough → 403
//! (`{"message": "Specified action requires role: ..."}`).

use crate::error::{ApiError, ApiResult};
use actix_web::http::StatusCode;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use testflinger_common::Job;

pub use crate::settings::{ACCESS_TTL, DEFAULT_ADMIN_ID};
/// Lifetime of an unused refresh token, seconds (upstream: 6 days); each use renews it.
pub const REFRESH_TTL: u64 = 6 * 24 * 3600;
/// Reservations up to this many seconds need no permission (upstream: 6 hours).
pub const FREE_RESERVATION: u64 = 6 * 3600;
/// Reservation length when `reserve_data.timeout` is absent (upstream: 1 hour).
pub const DEFAULT_RESERVATION: u64 = 3600;
/// bcrypt cost of stored secrets (upstream: Python bcrypt's default, 12).
pub const BCRYPT_COST: u32 = 12;

pub use crate::roles::{
    ADMIN, ADMIN_MANAGER, ADMIN_MANAGER_AGENT, AGENT, AgentIdentity, Permissions, Role, USERS,
};

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    exp: u64,
    iat: u64,
    sub: String,
    permissions: Permissions,
    /// The client's token generation when the token was issued (see
    /// [`crate::store::ClientRecord::generation`]); 0 in tokens of older servers.
    #[serde(default)]
    generation: u64,
}

/// The server's signing key and policy; `None` key = auth off.
pub struct Auth {
    keys: Option<(EncodingKey, DecodingKey)>,
    leeway: u64,
    access_ttl: u64,
    /// Bounds the bcrypt hashes computed at once (`TESTFLINGER_LOGIN_MAX_HASHES`).
    hashes: tokio::sync::Semaphore,
    /// A hash of a random secret, checked for unknown client ids so that a login costs
    /// the same whether or not the id exists.
    decoy: tokio::sync::OnceCell<String>,
    /// One login hashed at a time per client address: a flood from one address holds
    /// at most one hashing slot, so logins from elsewhere are not queued behind it.
    per_address:
        std::sync::Mutex<std::collections::HashMap<String, std::sync::Arc<tokio::sync::Mutex<()>>>>,
}

/// A client address's login turn (see [`Auth::login_turn`]); frees its entry on drop.
pub struct LoginTurn<'a> {
    auth: &'a Auth,
    addr: String,
    lock: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Drop for LoginTurn<'_> {
    fn drop(&mut self) {
        self.lock = None;
        if let Ok(mut m) = self.auth.per_address.lock()
            && m.get(&self.addr)
                .is_some_and(|l| std::sync::Arc::strong_count(l) == 1)
        {
            m.remove(&self.addr);
        }
    }
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("enabled", &self.enabled())
            .finish()
    }
}

impl Auth {
    /// Auth with this HS256 key (on), or none (off). `leeway`: seconds of clock skew
    /// tolerated on `exp` (upstream's `JWT_LEEWAY`, default 5); `access_ttl`: seconds
    /// an access token lives ([`ACCESS_TTL`] by default).
    pub fn new(signing_key: Option<&str>, leeway: u64, access_ttl: u64) -> Auth {
        Auth {
            keys: signing_key.filter(|k| !k.is_empty()).map(|k| {
                (
                    EncodingKey::from_secret(k.as_bytes()),
                    DecodingKey::from_secret(k.as_bytes()),
                )
            }),
            leeway,
            access_ttl: access_ttl.max(1),
            hashes: tokio::sync::Semaphore::new(2),
            decoy: tokio::sync::OnceCell::new(),
            per_address: Default::default(),
        }
    }

    /// Waits until no other login from `addr` is being checked on this replica.
    pub async fn login_turn(&self, addr: &str) -> LoginTurn<'_> {
        let lock = self.per_address.lock().map(|mut m| {
            m.entry(addr.to_string())
                .or_insert_with(|| std::sync::Arc::new(tokio::sync::Mutex::new(())))
                .clone()
        });
        let guard = match lock {
            Ok(l) => Some(l.lock_owned().await),
            Err(_) => None,
        };
        LoginTurn {
            auth: self,
            addr: addr.to_string(),
            lock: guard,
        }
    }

    /// At most `n` (at least 1) bcrypt hashes at once.
    pub fn with_max_hashes(mut self, n: usize) -> Auth {
        self.hashes = tokio::sync::Semaphore::new(n.max(1));
        self
    }

    /// Whether `secret` matches `stored` (a bcrypt hash), or, for an unknown client
    /// (`None`), the same work against a decoy hash, answering false. Waits for one of
    /// the bounded hashing slots; the hash runs on the blocking pool.
    pub async fn check_secret(&self, secret: String, stored: Option<String>) -> ApiResult<bool> {
        let decoy = self
            .decoy
            .get_or_try_init(|| async {
                let random = hex::encode(crate::store::random_bytes::<16>()?);
                hash_secret(random).await
            })
            .await?
            .clone();
        let _permit = self
            .hashes
            .acquire()
            .await
            .map_err(|e| ApiError::Internal(anyhow::anyhow!("hash slots closed: {e}")))?;
        let known = stored.is_some();
        let ok = verify_secret(secret, stored.unwrap_or(decoy)).await?;
        Ok(known && ok)
    }

    /// A bcrypt hash of `secret`, in one of the bounded hashing slots.
    pub async fn hash(&self, secret: String) -> ApiResult<String> {
        let _permit = self
            .hashes
            .acquire()
            .await
            .map_err(|e| ApiError::Internal(anyhow::anyhow!("hash slots closed: {e}")))?;
        hash_secret(secret).await
    }

    /// Seconds an access token lives.
    pub fn access_ttl(&self) -> u64 {
        self.access_ttl
    }

    pub fn enabled(&self) -> bool {
        self.keys.is_some()
    }

    /// A signed access token for these permissions and the client's token `generation`,
    /// valid [`Auth::access_ttl`] seconds.
    pub fn issue(&self, permissions: Permissions, generation: u64) -> ApiResult<String> {
        let Some((enc, _)) = &self.keys else {
            return Err(ApiError::Json(
                StatusCode::BAD_REQUEST,
                "authentication is not enabled on this server (JWT_SIGNING_KEY is unset)".into(),
            ));
        };
        let now = chrono::Utc::now().timestamp().max(0) as u64;
        let claims = Claims {
            exp: now + self.access_ttl,
            iat: now,
            sub: "access_token".into(),
            permissions,
            generation,
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, enc)
            .map_err(|e| ApiError::Internal(anyhow::anyhow!("cannot sign a token: {e}")))
    }

    /// The permissions in a bearer token and the generation it was issued under.
    /// Expired → 401; anything else wrong → 403.
    pub fn verify(&self, token: &str) -> ApiResult<(Permissions, u64)> {
        let Some((_, dec)) = &self.keys else {
            return Err(forbidden("authentication is not enabled on this server"));
        };
        let mut v = Validation::new(Algorithm::HS256);
        v.leeway = self.leeway;
        v.set_required_spec_claims(&["exp", "sub"]);
        match jsonwebtoken::decode::<Claims>(token, dec, &v) {
            Ok(d) if d.claims.sub == "access_token" => {
                Ok((d.claims.permissions, d.claims.generation))
            }
            Ok(_) => Err(forbidden("Invalid Token: not an access token")),
            Err(e) => match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => Err(ApiError::Json(
                    StatusCode::UNAUTHORIZED,
                    "Token has expired".into(),
                )),
                _ => Err(forbidden(&format!("Invalid Token: {e}"))),
            },
        }
    }
}

fn forbidden(msg: &str) -> ApiError {
    ApiError::Json(StatusCode::FORBIDDEN, msg.to_string())
}

/// Who is calling: anonymous, or the client whose token came with the request.
#[derive(Debug, Clone, Default)]
pub struct Caller {
    /// Whether the server checks permissions at all.
    pub enabled: bool,
    pub perms: Option<Permissions>,
    /// For an `agent` token: the agent it stands for, read from the client record on
    /// this request.
    pub agent: Option<AgentIdentity>,
}

impl Caller {
    /// A caller with no credentials (anonymous contributor).
    pub fn anonymous(enabled: bool) -> Caller {
        Caller {
            enabled,
            perms: None,
            agent: None,
        }
    }

    /// The caller given a raw `Authorization` header value (or none), from the token
    /// alone, with the generation the token was issued under; see
    /// [`Caller::authenticate`] for the check against the client record.
    pub fn from_authorization(auth: &Auth, header: Option<&str>) -> ApiResult<(Caller, u64)> {
        if !auth.enabled() {
            return Ok((Caller::anonymous(false), 0));
        }
        let Some(h) = header.map(str::trim).filter(|h| !h.is_empty()) else {
            return Ok((Caller::anonymous(true), 0));
        };
        let token = h
            .strip_prefix("Bearer ")
            .or_else(|| h.strip_prefix("bearer "))
            .ok_or_else(|| {
                ApiError::Json(
                    StatusCode::UNAUTHORIZED,
                    "Authorization header must be 'Bearer <access token>'".into(),
                )
            })?;
        let (perms, generation) = auth.verify(token.trim())?;
        Ok((
            Caller {
                enabled: true,
                perms: Some(perms),
                agent: None,
            },
            generation,
        ))
    }

    /// The agent this caller may act as, for agent-only routes: `None` when auth is off
    /// or the caller is an admin or manager (they may act for any agent); the token's
    /// agent for an `agent` token. Call after [`Caller::require`].
    pub fn acting_agent(&self) -> Option<&AgentIdentity> {
        if !self.enabled {
            return None;
        }
        self.agent.as_ref()
    }

    /// With auth on and an `agent` token: 403 unless `agent_id` is the token's own agent
    /// (an agent credential stands for one device). `what` names the action.
    pub fn require_agent(&self, agent_id: &str, what: &str) -> ApiResult<()> {
        match self.acting_agent() {
            Some(me) if me.agent_id != agent_id => Err(forbidden(&format!(
                "{what}: this token stands for agent '{}', not '{agent_id}' (an agent credential acts only as its own agent)",
                me.agent_id
            ))),
            _ => Ok(()),
        }
    }

    pub fn client_id(&self) -> Option<&str> {
        self.perms.as_ref().map(|p| p.client_id.as_str())
    }

    /// The caller's role; anonymous callers are contributors.
    pub fn role(&self) -> Role {
        self.perms.as_ref().map_or(Role::Contributor, |p| p.role)
    }

    /// Ok when auth is off or the caller's role is one of `roles`. Otherwise 401 for an
    /// anonymous caller, 403 for an authenticated one.
    pub fn require(&self, roles: &[Role]) -> ApiResult<()> {
        if !self.enabled || roles.contains(&self.role()) {
            return Ok(());
        }
        let names: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
        if self.perms.is_none() {
            return Err(ApiError::Json(
                StatusCode::UNAUTHORIZED,
                format!(
                    "Authentication required: this action needs role {} (get a token at /v1/oauth2/token)",
                    names.join(", ")
                ),
            ));
        }
        Err(forbidden(&format!(
            "Specified action requires role: {}",
            names.join(", ")
        )))
    }

    /// Whether the caller may act on something owned by `owner` (empty = anonymous):
    /// auth off, an anonymous owner (as upstream), the owner, a manager or an admin.
    pub fn may_manage(&self, owner: &str) -> bool {
        !self.enabled
            || owner.is_empty()
            || self.client_id() == Some(owner)
            || matches!(self.role(), Role::Admin | Role::Manager)
    }

    /// Upstream's submission checks (reference §1.4): a non-zero priority, a restricted
    /// queue and a reservation above 6 h each need a permission. Anonymous → 401, not
    /// enough → 403. Nothing is checked when auth is off.
    pub fn check_submission(&self, job: &Job, restricted: bool) -> ApiResult<()> {
        if !self.enabled {
            return Ok(());
        }
        let q = job.job_queue.as_str();
        let deny = |what: String| -> ApiError {
            if self.perms.is_none() {
                ApiError::Json(
                    StatusCode::UNAUTHORIZED,
                    format!(
                        "{what} needs an authenticated client (get a token at /v1/oauth2/token)"
                    ),
                )
            } else {
                forbidden(&format!("Not enough permissions: {what}"))
            }
        };
        let none = Permissions::default();
        let p = self.perms.as_ref().unwrap_or(&none);
        let prio = job.priority();
        if prio != 0 && Permissions::limit(&p.max_priority, q).is_none_or(|max| max < prio) {
            return Err(deny(format!(
                "job_priority {prio} on queue '{q}' (allowed up to {})",
                Permissions::limit(&p.max_priority, q).unwrap_or(0)
            )));
        }
        if restricted && !p.allowed_queues.iter().any(|a| a == q) {
            return Err(deny(format!("queue '{q}' is restricted")));
        }
        if let Some(r) = &job.reserve_data {
            let t = r.timeout.map_or(DEFAULT_RESERVATION, |s| s.0);
            let max = Permissions::limit(&p.max_reservation_time, q)
                .unwrap_or(0)
                .max(FREE_RESERVATION);
            if t > max {
                return Err(deny(format!(
                    "reserve_data.timeout {t} s on queue '{q}' (allowed up to {max} s)"
                )));
            }
        }
        Ok(())
    }
}

/// A bcrypt hash of a client secret (cost [`BCRYPT_COST`]); compatible with upstream's
/// stored hashes. Runs on a blocking thread: it takes a quarter second of CPU.
pub async fn hash_secret(secret: String) -> ApiResult<String> {
    tokio::task::spawn_blocking(move || bcrypt::hash(secret, BCRYPT_COST))
        .await
        .map_err(|e| ApiError::Internal(e.into()))?
        .map_err(|e| ApiError::Internal(anyhow::anyhow!("bcrypt: {e}")))
}

/// Whether `secret` matches a stored bcrypt hash (false for a malformed hash).
pub async fn verify_secret(secret: String, hash: String) -> ApiResult<bool> {
    tokio::task::spawn_blocking(move || bcrypt::verify(secret, &hash).unwrap_or(false))
        .await
        .map_err(|e| ApiError::Internal(e.into()))
}

/// A new opaque refresh token: 64 hex characters (256 random bits).
pub fn new_refresh_token() -> ApiResult<String> {
    Ok(hex::encode(crate::store::random_bytes::<32>()?))
}

/// How a refresh token is stored: its SHA-256, hex.
pub fn token_digest(token: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(token.as_bytes()))
}
