//! Claim: an agent takes a job. One path for our push agents (`POST /v1/job/<id>/claim`)
//! and upstream's pull (`GET /v1/job?queue=..`); the secrets of the job are resolved in
//! the answer to the claim that holds its lease, for that attempt, and nowhere else.

use super::{Jobs, Transition};
use crate::error::ApiResult;
use crate::store::Claim;
use serde_json::Value;
use testflinger_common::protocol::ClaimOutcome;
use testflinger_common::{JobId, JobState};

/// The namespace of jobs submitted without credentials.
pub const ANONYMOUS: &str = "anonymous";

impl Jobs {
    /// Claims job `id` for `agent` with a lease of `lease_ms` (a `legacy` agent renews it
    /// by its writes). `served`: the queues the caller may serve, when checked (403
    /// otherwise). On a grant: the agent's record names the job, the event is published,
    /// the secrets are resolved in the answer. An agent excluded by the job drops its
    /// delivery; for a push agent the outbox publishes the job again, at the back.
    pub async fn claim(
        &self,
        job_id: &JobId,
        agent: &str,
        lease_ms: u64,
        legacy: bool,
        served: Option<&[String]>,
    ) -> ApiResult<Claim> {
        let id_str = job_id.to_string();
        let id = id_str.as_str();
        let mut c = self
            .store
            .claim(id, agent, lease_ms, legacy, served)
            .await?;
        if let Some(job) = c.job.as_mut() {
            self.resolve_secrets(job, id, &format!("{id}:{}", c.attempt))
                .await?;
        }
        if c.outcome == ClaimOutcome::Excluded && !legacy {
            self.store.outbox_add(id).await?;
        }
        if c.outcome == ClaimOutcome::Granted {
            // The granted definition carries the queue and the webhook: no second read.
            let field = |k: &str| {
                c.job
                    .as_ref()
                    .and_then(|j| j.get(k))
                    .and_then(Value::as_str)
                    .map(str::to_string)
            };
            // Shown in the agent's record, if it registered (a zombie must not invent one).
            self.store
                .update_agent_if_known(agent, &[("job_id", id)])
                .await?;
            self.store.note_agent_job(agent, id).await?;
            self.events.publish(&Transition {
                job_id: id.to_string(),
                queue: field("job_queue").unwrap_or_default(),
                state: JobState::Running,
                previous: Some(JobState::Waiting),
                attempt: c.attempt,
                agent: Some(agent.to_string()),
                reason: None,
                webhook: field("job_status_webhook"),
            });
        }
        if let Ok(v) = serde_json::to_value(c.outcome)
            && let Some(o) = v.as_str()
        {
            self.metrics.inc("testflinger_claims_total", o);
        }
        Ok(c)
    }

    /// Replaces the secret paths of claimed job `id` by their values from its owner's
    /// namespace (no owner: [`ANONYMOUS`]). `claim` names the claim (`<id>:<attempt>`):
    /// a single-use secret is consumed by the first claim that reads it and still answers
    /// a retried claim of the same attempt. Unknown paths become empty strings.
    async fn resolve_secrets(&self, job: &mut Value, id: &str, claim: &str) -> ApiResult<()> {
        let Some(secrets) = job
            .pointer_mut("/test_data/secrets")
            .and_then(Value::as_object_mut)
        else {
            return Ok(());
        };
        let owner = self.store.job_owner(id).await?;
        let namespace = if owner.is_empty() {
            ANONYMOUS
        } else {
            owner.as_str()
        };
        for (_, v) in secrets.iter_mut() {
            let path = v.as_str().unwrap_or_default().to_string();
            let raw = self.store.take_secret(namespace, &path, claim).await?;
            let rec: Value = raw
                .and_then(|r| serde_json::from_str(&r).ok())
                .unwrap_or(Value::Null);
            *v = Value::String(rec["value"].as_str().unwrap_or_default().to_string());
        }
        Ok(())
    }
}
