//! Bodies of our additions to the v1 API, shared by the API and our agent, and the job
//! event published on `testflinger.events`.
//!
//! Fencing: a claim returns a `token`. Every later write of the holder about that job
//! (state, logs, results, artifacts, heartbeat, release) carries it in the
//! [`TOKEN_HEADER`] header (or the `token` field of the body); the API answers 409 when
//! the job has moved on (reaped, released, re-claimed). Writes without a token are
//! accepted for upstream Python agents, which know nothing of leases.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// HTTP header carrying the fencing token on agent writes.
pub const TOKEN_HEADER: &str = "X-Testflinger-Token";

/// A lease's fencing token: 128 random bits, on the wire 32 lowercase hex digits (in
/// JSON a string, in [`TOKEN_HEADER`] the bare digits). Random rather than a counter, so
/// a caller cannot guess the token of a job it does not hold. `Copy`, so holders pass it
/// around freely; the API draws it (see `FenceToken::from_bytes`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct FenceToken(u128);

impl FenceToken {
    /// The token made of these 16 bytes (the API passes 16 bytes from the system's
    /// random source).
    pub fn from_bytes(b: [u8; 16]) -> FenceToken {
        FenceToken(u128::from_be_bytes(b))
    }
}

impl std::fmt::Display for FenceToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

/// Shown as its hex digits: a token is a capability, but a log of the holder's own
/// token reveals nothing the holder does not have.
impl std::fmt::Debug for FenceToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FenceToken({self})")
    }
}

/// Why a string is not a fencing token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a fencing token is 32 hexadecimal digits; got {0:?}")]
pub struct BadToken(pub String);

impl std::str::FromStr for FenceToken {
    type Err = BadToken;
    fn from_str(s: &str) -> Result<FenceToken, BadToken> {
        let t = s.trim();
        if t.len() != 32 || !t.bytes().all(|b| b.is_ascii_hexdigit()) {
            let shown: String = t.chars().take(40).collect();
            return Err(BadToken(shown));
        }
        u128::from_str_radix(t, 16)
            .map(FenceToken)
            .map_err(|_| BadToken(t.to_string()))
    }
}

impl Serialize for FenceToken {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for FenceToken {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<FenceToken, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// `POST /v1/job/<id>/claim`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimRequest {
    pub agent_id: String,
}

/// What a claim decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClaimOutcome {
    /// The caller holds the job now: run it.
    Granted,
    /// The job was cancelled while it waited: drop the delivery.
    Cancelled,
    /// Another agent holds a live lease on it: drop the delivery.
    Owned,
    /// The job already ended: drop the delivery.
    Finished,
    /// The caller is in the job's `exclude_agents`: give the delivery back.
    Excluded,
    /// The job has no record (published raw to its queue): register it, then claim.
    Unknown,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClaimResponse {
    pub outcome: ClaimOutcome,
    /// The fencing token, present when granted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<FenceToken>,
    /// Which attempt this is (1 for the first run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u64>,
    /// Lease length in seconds; heartbeat every third of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_ttl: Option<u64>,
    /// The job as `GET /v1/job?queue=` would hand it out, when granted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<Value>,
}

/// `POST /v1/job/<id>/heartbeat` and `POST /v1/job/<id>/release`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseRequest {
    pub agent_id: String,
    pub token: FenceToken,
    /// Why the job is given back (release only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeartbeatResponse {
    /// The job was cancelled: stop the running phase and go to cleanup.
    pub cancel_requested: bool,
    pub lease_ttl: u64,
}

/// A command for one agent on exchange `testflinger.control` (routing key = agent id).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum ControlCommand {
    Cancel { job_id: String },
    SetState { state: String },
}

/// A job state change, published to `testflinger.events` with routing key
/// `job.<queue>.<state>` and delivered to `job_status_webhook`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobEvent {
    pub job_id: String,
    pub job_queue: String,
    pub job_state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_state: Option<String>,
    pub attempt: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<String>,
    /// RFC 3339 UTC.
    pub timestamp: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fence_token_round_trips_as_hex() {
        let t = FenceToken::from_bytes([0xab; 16]);
        let s = t.to_string();
        assert_eq!(s, "ab".repeat(16));
        assert_eq!(s.parse::<FenceToken>(), Ok(t));
        let j = serde_json::to_value(t).unwrap();
        assert_eq!(j, serde_json::json!("ab".repeat(16)));
        assert_eq!(serde_json::from_value::<FenceToken>(j).unwrap(), t);
        let small = FenceToken::from_bytes([0; 16]).to_string();
        assert_eq!(small.len(), 32);
    }

    #[test]
    fn fence_token_refuses_numbers_and_junk() {
        assert!("1".parse::<FenceToken>().is_err());
        assert!("zz".repeat(16).parse::<FenceToken>().is_err());
        assert!("a".repeat(33).parse::<FenceToken>().is_err());
        assert!(serde_json::from_value::<FenceToken>(serde_json::json!(7)).is_err());
    }
}
