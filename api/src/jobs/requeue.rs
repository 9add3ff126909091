//! Requeue: a running job goes back to waiting, because its holder gives it back
//! (release) or because its lease expired (the reaper, "agent lost"); after
//! `max_attempts` runs it ends instead. One rule for both: the fencing token is replaced
//! (the old holder's writes are refused), the job keeps its place, the outbox carries
//! its wake-up message until the broker confirms it.

use super::{Jobs, Transition};
use crate::error::{ApiError, ApiResult};
use crate::store::{AttachState, Requeue};
use testflinger_common::protocol::FenceToken;
use testflinger_common::{JobId, JobState};

/// Why a job is requeued.
#[derive(Debug, Clone)]
pub enum Cause<'a> {
    /// Its holder (`token`; `agent`: the caller's identity when checked) gives it back.
    Released {
        token: FenceToken,
        agent: Option<&'a str>,
        reason: String,
    },
    /// Its lease expired: the reaper takes it back.
    LeaseExpired,
}

impl Jobs {
    /// Requeues (or ends) job `id` for `cause`. Returns the transition made, `None` when
    /// there was nothing to do (the job moved on, or its lease was renewed meanwhile).
    /// A release by a stale holder is 409, by another agent 403.
    pub async fn requeue(&self, job_id: &JobId, cause: Cause<'_>) -> ApiResult<Option<Transition>> {
        let id_str = job_id.to_string();
        let id = id_str.as_str();
        // An unknown job still goes through the store, which takes it off the leases.
        let job = self.store.job_summary(id).await?;
        let (queue, webhook) = match &job {
            Some(j) => (j.queue.clone(), j.webhook()),
            None if matches!(cause, Cause::Released { .. }) => {
                return Err(ApiError::JobNotFound(id.to_string()));
            }
            None => (String::new(), None),
        };
        let (reason, token, holder) = match &cause {
            Cause::Released {
                token,
                agent,
                reason,
            } => (reason.as_str(), Some(*token), *agent),
            Cause::LeaseExpired => ("agent lost", None, None),
        };
        let max = self.settings.max_attempts;
        let done = self
            .store
            .requeue(id, &queue, max, reason, token, holder)
            .await?;
        let (state, previous, attempt, agent, reason) = match done {
            Requeue::Stale => {
                return Err(ApiError::Stale(crate::store::stale_message(id)));
            }
            Requeue::Requeued {
                previous,
                attempt,
                agent,
                reason,
            } => (JobState::Waiting, previous, attempt, agent, reason),
            // A release counts as a run: after `max_attempts` the job ends with the reason.
            Requeue::Ended {
                previous,
                attempt,
                agent,
                reason,
            } => (JobState::Complete, previous, attempt, agent, reason),
            _ => return Ok(None),
        };
        if matches!(cause, Cause::LeaseExpired) {
            let action = if state == JobState::Waiting {
                "requeued"
            } else {
                "ended"
            };
            self.metrics.inc("testflinger_reaped_total", action);
            tracing::warn!(job.id = %id, agent = %agent, attempt, "lease expired: job {action}");
            if !agent.is_empty()
                && let Err(e) = self.store.mark_agent_lost(&agent, id).await
            {
                tracing::warn!(agent, error = %e, "could not mark agent lost");
            }
        }
        if state == JobState::Waiting
            && let Err(e) = self.republish(job_id).await
        {
            tracing::warn!(job.id = %id, error = %e, "requeued job not yet republished; the outbox keeps it");
        }
        let t = Transition {
            job_id: id.to_string(),
            queue,
            state,
            previous: Some(previous),
            attempt,
            agent: Some(agent).filter(|a| !a.is_empty()),
            reason: Some(reason),
            webhook,
        };
        self.events.publish(&t);
        Ok(Some(t))
    }

    /// Publishes a waiting job's wake-up message again (from the outbox, or after a
    /// requeue: a job that ran before goes ahead of its priority's others), then takes
    /// it off the outbox. A job that is not waiting, or waits for attachments, only
    /// leaves the outbox.
    pub async fn republish(&self, job_id: &JobId) -> ApiResult<()> {
        let id_str = job_id.to_string();
        let id = id_str.as_str();
        if let Some(job) = self.store.job_summary(id).await?
            && job.state == JobState::Waiting
            && job.attach != AttachState::Waiting
        {
            let boost = i64::from(job.attempt > 0);
            self.publish(id, &job.queue, job.priority + boost, &job.def)
                .await?;
        }
        Ok(self.store.outbox_done(id).await?)
    }
}
