//! A job's record read as types: the whole record ([`JobRecord`]), what most requests
//! need of it in one `HMGET` ([`JobSummary`]), and single fields. A stored value that is
//! not what the store writes there is [`StoreError::BadRecord`], never a default.

use super::{Store, StoreError, StoreResult};
use redis::AsyncCommands;
use serde_json::{Map, Value};
use std::collections::HashMap;
use testflinger_common::JobState;
use testflinger_common::protocol::FenceToken;

/// Whether a job waits for its attachments (the `attach` field).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttachState {
    /// The job has none (stored empty).
    #[default]
    None,
    /// Submitted with attachments that are not uploaded yet: it does not run.
    Waiting,
    /// Uploaded.
    Complete,
}

impl AttachState {
    /// As stored, and as a claimed job's `attachments_status` shows it.
    pub fn as_str(self) -> &'static str {
        match self {
            AttachState::None => "",
            AttachState::Waiting => "waiting",
            AttachState::Complete => "complete",
        }
    }

    pub(super) fn parse(id: &str, raw: Option<&str>) -> StoreResult<AttachState> {
        match raw.unwrap_or_default() {
            "" => Ok(AttachState::None),
            "waiting" => Ok(AttachState::Waiting),
            "complete" => Ok(AttachState::Complete),
            other => Err(bad(
                id,
                "attach",
                other,
                "expected '', 'waiting' or 'complete'",
            )),
        }
    }
}

/// A job's record as stored.
#[derive(Debug, Clone)]
pub struct JobRecord {
    pub def: Value,
    pub queue: String,
    pub state: JobState,
    pub created_at: String,
    pub attempt: u64,
    /// The fencing token of the current claim; `None` before the first.
    pub fence: Option<FenceToken>,
    pub agent: String,
    pub started_at: String,
    pub reason: String,
    pub status: Map<String, Value>,
    pub device_info: Option<Value>,
    pub attach: AttachState,
    pub priority: i64,
}

/// What most requests about a job read of its record, in one `HMGET`
/// ([`Store::job_summary`]).
#[derive(Debug, Clone)]
pub struct JobSummary {
    pub queue: String,
    pub state: JobState,
    /// The definition as submitted (with its `job_id`).
    pub def: Value,
    /// The client that submitted it; empty for an anonymous submission.
    pub owner: String,
    /// The agent that holds or last held it, as stored (`None`: never claimed).
    pub agent: Option<String>,
    pub attempt: u64,
    pub priority: i64,
    pub attach: AttachState,
}

impl JobSummary {
    /// The definition's `job_status_webhook`, if any.
    pub fn webhook(&self) -> Option<String> {
        self.def
            .get("job_status_webhook")?
            .as_str()
            .map(str::to_string)
    }
}

/// The fields [`JobSummary`] is read from, in [`JobSummary::from_fields`] order.
const SUMMARY_FIELDS: &[&str] = &[
    "state", "queue", "def", "owner", "agent", "attempt", "prio", "attach",
];

impl JobSummary {
    /// `None` when the record is gone (it has no `state`).
    fn from_fields(id: &str, f: Vec<Option<String>>) -> StoreResult<Option<JobSummary>> {
        let mut f = f.into_iter();
        let mut next = || f.next().flatten();
        let Some(state) = next() else {
            return Ok(None);
        };
        let state = parse_state(id, &state)?;
        let queue = next().ok_or_else(|| bad(id, "queue", "", "missing"))?;
        let def = parse_json(id, "def", &next().unwrap_or_default())?;
        Ok(Some(JobSummary {
            state,
            queue,
            def,
            owner: next().unwrap_or_default(),
            agent: next(),
            attempt: parse_num(id, "attempt", next().as_deref())?,
            priority: parse_num(id, "prio", next().as_deref())?,
            attach: AttachState::parse(id, next().as_deref())?,
        }))
    }
}

/// A stored job state; `completed` (upstream's spelling) reads as `complete`.
pub(super) fn parse_state(id: &str, raw: &str) -> StoreResult<JobState> {
    JobState::parse_lenient(raw).ok_or_else(|| bad(id, "state", raw, "not a job state"))
}

/// A stored number; 0 when the field is absent.
fn parse_num<T: std::str::FromStr + Default>(
    id: &str,
    field: &'static str,
    raw: Option<&str>,
) -> StoreResult<T> {
    match raw {
        None => Ok(T::default()),
        Some(r) => r.parse().map_err(|_| bad(id, field, r, "not a number")),
    }
}

fn parse_json<T: serde::de::DeserializeOwned>(
    id: &str,
    field: &'static str,
    raw: &str,
) -> StoreResult<T> {
    serde_json::from_str(raw).map_err(|e| bad(id, field, raw, &e.to_string()))
}

fn bad(id: &str, field: &'static str, value: &str, why: &str) -> StoreError {
    StoreError::BadRecord {
        id: id.to_string(),
        field,
        value: value.chars().take(200).collect(),
        why: why.to_string(),
    }
}

impl Store {
    /// A job's whole record; `None` when unknown.
    pub async fn get_job(&self, id: &str) -> StoreResult<Option<JobRecord>> {
        let mut c = self.con();
        let h: HashMap<String, String> = c.hgetall(self.keys.job(id)).await?;
        let Some(state) = h.get("state") else {
            return Ok(None);
        };
        let g = |k: &str| h.get(k).cloned().unwrap_or_default();
        let json_opt = |k: &'static str| -> StoreResult<Option<Value>> {
            h.get(k).map(|raw| parse_json(id, k, raw)).transpose()
        };
        let fence = match h.get("fence").map(String::as_str).unwrap_or_default() {
            "" => None,
            raw => Some(
                raw.parse::<FenceToken>()
                    .map_err(|e| bad(id, "fence", raw, &e.to_string()))?,
            ),
        };
        Ok(Some(JobRecord {
            def: json_opt("def")?.unwrap_or(Value::Null),
            queue: g("queue"),
            state: parse_state(id, state)?,
            created_at: g("created_at"),
            attempt: parse_num(id, "attempt", h.get("attempt").map(String::as_str))?,
            fence,
            agent: g("agent"),
            started_at: g("started_at"),
            reason: g("reason"),
            status: h
                .get("status")
                .map(|raw| parse_json(id, "status", raw))
                .transpose()?
                .unwrap_or_default(),
            device_info: json_opt("device_info")?,
            attach: AttachState::parse(id, h.get("attach").map(String::as_str))?,
            priority: parse_num(id, "prio", h.get("prio").map(String::as_str))?,
        }))
    }

    /// What most requests need of a job (see [`JobSummary`]), in one `HMGET`; `None`
    /// when unknown.
    pub async fn job_summary(&self, id: &str) -> StoreResult<Option<JobSummary>> {
        let f = self.job_fields(id, SUMMARY_FIELDS).await?;
        JobSummary::from_fields(id, f)
    }

    /// A job's state; `None` when unknown.
    pub async fn job_state(&self, id: &str) -> StoreResult<Option<JobState>> {
        self.job_field(id, "state")
            .await?
            .map(|s| parse_state(id, &s))
            .transpose()
    }

    /// A job's queue; `None` when unknown.
    pub async fn job_queue(&self, id: &str) -> StoreResult<Option<String>> {
        self.job_field(id, "queue").await
    }

    /// A job's definition; `None` when unknown.
    pub async fn job_def(&self, id: &str) -> StoreResult<Option<Value>> {
        self.job_field(id, "def")
            .await?
            .map(|d| parse_json(id, "def", &d))
            .transpose()
    }

    /// The client that submitted a job (empty: anonymous, or no such job).
    pub async fn job_owner(&self, id: &str) -> StoreResult<String> {
        Ok(self.job_field(id, "owner").await?.unwrap_or_default())
    }

    /// The agent that holds or last held a job, as stored (`None`: never claimed, or
    /// no such job).
    pub async fn job_agent(&self, id: &str) -> StoreResult<Option<String>> {
        self.job_field(id, "agent").await
    }

    /// The file name of a job's committed artifact (empty: none, or no such job).
    pub async fn job_artifact(&self, id: &str) -> StoreResult<String> {
        Ok(self.job_field(id, "artifact").await?.unwrap_or_default())
    }

    /// Records whether a job's attachments were uploaded.
    pub async fn set_attach(&self, id: &str, attach: AttachState) -> StoreResult<()> {
        self.set_job_fields(id, &[("attach", attach.as_str().to_string())])
            .await
    }

    async fn job_field(&self, id: &str, field: &str) -> StoreResult<Option<String>> {
        let mut c = self.con();
        Ok(c.hget(self.keys.job(id), field).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(f: &[Option<&str>]) -> Vec<Option<String>> {
        f.iter().map(|v| v.map(str::to_string)).collect()
    }

    #[test]
    fn a_summary_reads_typed_fields_and_refuses_unknown_values() {
        let ok = row(&[
            Some("running"),
            Some("q"),
            Some(r#"{"job_status_webhook":"http://h/w"}"#),
            Some(""),
            Some("a1"),
            Some("2"),
            Some("3"),
            Some("waiting"),
        ]);
        let s = JobSummary::from_fields("j", ok)
            .ok()
            .flatten()
            .expect("summary");
        assert_eq!(s.state, JobState::Running);
        assert_eq!(s.webhook().as_deref(), Some("http://h/w"));
        assert_eq!((s.attempt, s.priority), (2, 3));
        assert_eq!(s.attach, AttachState::Waiting);
        assert_eq!(s.agent.as_deref(), Some("a1"));
        assert!(matches!(
            JobSummary::from_fields("j", row(&[None; 8])),
            Ok(None)
        ));
        let bogus = row(&[
            Some("bogus"),
            Some("q"),
            Some("{}"),
            None,
            None,
            None,
            None,
            None,
        ]);
        assert!(matches!(
            JobSummary::from_fields("j", bogus),
            Err(StoreError::BadRecord { field: "state", .. })
        ));
        let attach = row(&[
            Some("waiting"),
            Some("q"),
            Some("{}"),
            None,
            None,
            None,
            None,
            Some("x"),
        ]);
        assert!(matches!(
            JobSummary::from_fields("j", attach),
            Err(StoreError::BadRecord {
                field: "attach",
                ..
            })
        ));
    }
}
