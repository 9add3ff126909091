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
    pub token: Option<u64>,
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
    pub token: u64,
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
