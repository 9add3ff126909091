//! Cancel: a user ends a job (its owner, a manager or an admin), and the two ends of an
//! attachments wait: the attachments arrive (the job is queued), or they never come
//! within `attachments_timeout` (the job is cancelled).

use super::{Jobs, Transition};
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::store::{AttachState, JobSummary};
use actix_web::http::StatusCode;
use testflinger_common::{JobId, JobState};

impl Jobs {
    /// Cancels job `id` for `caller`: marks it cancelled, tells its holder, publishes the
    /// event. `Ok(false)` when the job already ended (nothing changed), 404 when it is
    /// unknown; only the job's owner, a manager or an admin may cancel it ([`check_owner`]:
    /// 401/403 otherwise).
    pub async fn cancel(&self, caller: &Caller, job_id: &JobId) -> ApiResult<bool> {
        let id_str = job_id.to_string();
        let id = id_str.as_str();
        let Some(job) = self.store.job_summary(id).await? else {
            return Err(ApiError::JobNotFound(id.to_string()));
        };
        check_owner(caller, Some(&job.owner), "cancel")?;
        match self.store.cancel(id, &job.queue).await? {
            None | Some(Err(_)) => Ok(false),
            Some(Ok((previous, agent))) => {
                if !agent.is_empty() && previous != JobState::Waiting {
                    self.notify_cancel(&agent, id).await;
                }
                self.events.publish(&Transition {
                    job_id: id.to_string(),
                    queue: job.queue.clone(),
                    state: JobState::Cancelled,
                    previous: Some(previous),
                    attempt: job.attempt,
                    agent: Some(agent).filter(|a| !a.is_empty()),
                    reason: None,
                    webhook: job.webhook(),
                });
                Ok(true)
            }
        }
    }

    /// Tells the holder of a running job, over the broker, that it was cancelled. Best
    /// effort: the heartbeat answer carries the same news.
    async fn notify_cancel(&self, agent: &str, id: &str) {
        let cmd = testflinger_common::protocol::ControlCommand::Cancel {
            job_id: id.to_string(),
        };
        let body = serde_json::to_vec(&cmd).unwrap_or_default();
        if let Err(e) = self.broker.send_control(agent, &body).await {
            tracing::warn!(job.id = %id, error = %e, "cancel command not published; the heartbeat will carry it");
        }
    }

    /// Whether `caller` may upload job `id`'s attachments now: the job's summary when it
    /// waits for them, `None` when they were received already (nothing to do). 404 for
    /// an unknown job; 401/403 for a caller who may not act on it ([`check_owner`]); 422
    /// (upstream's plain text) for a job that does not wait for attachments.
    pub async fn attachments_expected(
        &self,
        caller: &Caller,
        job_id: &JobId,
    ) -> ApiResult<Option<JobSummary>> {
        let id = job_id.to_string();
        let Some(job) = self.store.job_summary(&id).await? else {
            return Err(ApiError::JobNotFound(id));
        };
        check_owner(caller, Some(&job.owner), "upload attachments for")?;
        if job.attach == AttachState::Complete {
            return Ok(None);
        }
        let refuse = |why: &str| {
            ApiError::Text(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("Job {id} {why}\n"),
            )
        };
        if job.state != JobState::Waiting {
            return Err(refuse("is not valid"));
        }
        if job.attach != AttachState::Waiting {
            return Err(refuse("not awaiting attachments"));
        }
        Ok(Some(job))
    }

    /// The attachments of `job` (see [`Jobs::attachments_expected`]) were stored: the
    /// job is queued now. When the publish plainly fails the job waits for its
    /// attachments again (the client retries the upload) and the error is returned.
    pub async fn attachments_received(&self, job_id: &JobId, job: &JobSummary) -> ApiResult<()> {
        let id_str = job_id.to_string();
        let id = id_str.as_str();
        self.store.set_attach(id, AttachState::Complete).await?;
        self.store.outbox_add(id).await?;
        match self.publish(id, &job.queue, job.priority, &job.def).await {
            Ok(()) => self.store.outbox_done(id).await?,
            // Sent, not confirmed: the outbox publishes it again.
            Err(ApiError::Unconfirmed(_)) => {}
            Err(e) => {
                // Not queued: let the client retry the upload.
                self.store.outbox_done(id).await?;
                self.store.set_attach(id, AttachState::Waiting).await?;
                return Err(e);
            }
        }
        self.events.publish(&Transition {
            job_id: id.to_string(),
            queue: job.queue.clone(),
            state: JobState::Waiting,
            previous: None,
            attempt: 0,
            agent: None,
            reason: Some("attachments received".into()),
            webhook: job.webhook(),
        });
        Ok(())
    }

    /// Cancels jobs whose attachments never came before `cutoff_ms` (Redis time): no job
    /// waits for an upload forever (a client that died between submit and upload leaves
    /// one). Returns how many.
    pub async fn expire_attachment_waits(&self, cutoff_ms: i64) -> ApiResult<usize> {
        let secs = self.settings.attachments_timeout;
        let reason = format!("attachments were not uploaded within {secs} s");
        let jobs = self
            .store
            .expire_attachment_waits(cutoff_ms, &reason)
            .await?;
        for (id, queue) in &jobs {
            tracing::warn!(job.id = %id, "{reason}: job cancelled");
            self.events.publish(&Transition {
                job_id: id.clone(),
                queue: queue.clone(),
                state: JobState::Cancelled,
                previous: Some(JobState::Waiting),
                attempt: 0,
                agent: None,
                reason: Some(reason.clone()),
                webhook: None,
            });
        }
        Ok(jobs.len())
    }
}

/// Only the owner of a job, a manager or an admin may act on it; anyone on a job
/// submitted anonymously (as upstream). 401 for an anonymous caller, else 403.
pub fn check_owner(caller: &Caller, owner: Option<&str>, what: &str) -> ApiResult<()> {
    let owner = owner.unwrap_or_default();
    if caller.may_manage(owner) {
        return Ok(());
    }
    let status = if caller.client_id().is_none() {
        StatusCode::UNAUTHORIZED
    } else {
        StatusCode::FORBIDDEN
    };
    Err(ApiError::Json(
        status,
        format!("only the job's owner ('{owner}'), a manager or an admin may {what} this job"),
    ))
}
