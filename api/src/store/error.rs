//! What can go wrong in the store, kept apart: each cause is its own variant, so a caller
//! can tell an outage from a stale holder from a script that answered something unknown.
//! The HTTP edge maps them once (`impl From<StoreError> for ApiError` in
//! `crate::error`), to the status and message the API has always given.

use testflinger_common::ValidationError;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Redis is away or not serving now (connection refused, dropped or timed out; a
    /// transient error code such as `LOADING` or `READONLY`): retry later. Nothing was
    /// written by the command that failed.
    #[error("state store (Redis) unavailable: {0}")]
    Unavailable(#[source] redis::RedisError),
    /// Redis refused a command (a bug, or data of the wrong type).
    #[error("redis command failed: {0}")]
    Redis(#[source] redis::RedisError),
    /// A write names a job there is no record of (never submitted, or expired).
    #[error("Job {0} not found")]
    JobNotFound(String),
    /// The fencing token is stale: the job was reassigned or released.
    #[error("{}", stale_message(.0))]
    Stale(String),
    /// The caller's agent is not the agent that holds the job.
    #[error(
        "job {id} is not held by agent '{agent}': an agent writes only about the jobs it holds a lease on"
    )]
    NotHolder { id: String, agent: String },
    /// A tokenless write about a job held under a lease: the holder's token was needed.
    #[error(
        "job {0} is held under a lease: writes about it must carry the holder's {header} header",
        header = testflinger_common::protocol::TOKEN_HEADER
    )]
    TokenRequired(String),
    /// A claim of a job on a queue the calling agent may not serve.
    #[error(
        "job {id} is on queue '{queue}', which agent '{agent}' may not serve (its queues: {}); an admin or manager sets them with agent_queues in /v1/client-permissions",
        served.join(", ")
    )]
    QueueNotServed {
        id: String,
        queue: String,
        agent: String,
        served: Vec<String>,
    },
    /// A state a writer may not ask for (`waiting` and `running` are the server's).
    #[error("{0}")]
    BadState(ValidationError),
    /// A Lua script answered something this code does not know.
    #[error("unexpected reply from the {script} script: {reply:?}")]
    UnexpectedReply { script: &'static str, reply: String },
    /// A stored value that is not what the store writes there.
    #[error("job {id}: stored {field} {value:?} is not valid: {why}")]
    BadRecord {
        id: String,
        field: &'static str,
        value: String,
        why: String,
    },
    /// The system random source failed.
    #[error("the system random source failed")]
    Random,
    /// A value could not be turned into JSON.
    #[error("serialization: {0}")]
    Serialization(#[from] serde_json::Error),
}

pub type StoreResult<T> = Result<T, StoreError>;

impl From<redis::RedisError> for StoreError {
    fn from(e: redis::RedisError) -> Self {
        if e.is_io_error()
            || e.is_timeout()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
            || e.code().is_some_and(|c| TRANSIENT_REDIS_CODES.contains(&c))
        {
            StoreError::Unavailable(e)
        } else {
            StoreError::Redis(e)
        }
    }
}

/// The error for a write about job `id` by `agent` (the caller's agent identity),
/// which does not hold it.
pub fn not_holder(id: &str, agent: Option<&str>) -> StoreError {
    StoreError::NotHolder {
        id: id.to_string(),
        agent: agent.unwrap_or_default().to_string(),
    }
}

/// A script answered something this code does not know: an error, never a default.
pub fn unexpected(script: &'static str, reply: Option<&str>) -> StoreError {
    StoreError::UnexpectedReply {
        script,
        reply: reply.unwrap_or("(no reply)").to_string(),
    }
}

/// The 409 message for a write with a stale fencing token.
pub fn stale_message(id: &str) -> String {
    format!(
        "stale fencing token for job {id}: the job was reassigned or released; stop working on it"
    )
}

/// Redis answers that mean "not now" rather than "wrong": the data set is loading
/// (after a restart, from the AOF), a replica is read-only (failover), memory is full,
/// a script is busy, or the server is shutting down or in cluster transition.
pub const TRANSIENT_REDIS_CODES: &[&str] = &[
    "LOADING",
    "READONLY",
    "OOM",
    "BUSY",
    "MASTERDOWN",
    "TRYAGAIN",
    "CLUSTERDOWN",
    "NOREPLICAS",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_cause() {
        assert_eq!(
            StoreError::TokenRequired("j".into()).to_string(),
            format!(
                "job j is held under a lease: writes about it must carry the holder's {} header",
                testflinger_common::protocol::TOKEN_HEADER
            )
        );
        let e = StoreError::QueueNotServed {
            id: "j".into(),
            queue: "q".into(),
            agent: "a".into(),
            served: vec!["x".into(), "y".into()],
        };
        assert_eq!(
            e.to_string(),
            "job j is on queue 'q', which agent 'a' may not serve (its queues: x, y); an admin or manager sets them with agent_queues in /v1/client-permissions"
        );
        assert_eq!(
            not_holder("j", Some("a")).to_string(),
            "job j is not held by agent 'a': an agent writes only about the jobs it holds a lease on"
        );
        assert!(unexpected("CLAIM", Some("x")).to_string().contains("CLAIM"));
    }
}
