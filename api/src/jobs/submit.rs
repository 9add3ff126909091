//! Submit: admission of a job, the one path shared by `POST /v1/job` and the
//! broker-native submission queue; and the publish of a job's wake-up message.
//!
//! Order: validate; write the record, position entry and outbox entry (one script);
//! publish and await the confirm; only then answer. Redis is the source of truth and the
//! message a wake-up: a broker that was plainly unreachable removes the record again
//! (503, nothing left behind); an unclear outcome keeps it in the outbox to be published
//! again, so a success always means the job will run.

use super::Jobs;
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::events::Transition;
use actix_web::http::StatusCode;
use serde_json::Value;
use testflinger_common::{Job, JobId, JobState};

/// Validates and queues a job; returns its id. `forced_id` (a broker `message_id`)
/// takes precedence over a `job_id` in the body. `caller` is who submits: its
/// permissions are checked (priority, restricted queue, reservation length, secrets) and
/// it becomes the job's owner (anonymous: no owner).
///
/// The same definition submitted again under a known id (a client retrying) answers that
/// id and queues nothing new; a different definition, or a job that already ended,
/// under a known id (say, a definition copied from `testflinger show`) is queued as a new
/// job with a new id.
impl Jobs {
    pub async fn admit(
        &self,
        body: Value,
        forced_id: Option<JobId>,
        caller: &Caller,
    ) -> ApiResult<JobId> {
        // Both paths come here with the JSON already read; `POST /v1/job` checks its raw body
        // first as well, before building it.
        let text = serde_json::to_vec(&body).map_err(|e| ApiError::Internal(e.into()))?;
        self.check_bounds(&text)?;
        drop(text);
        let job = Job::from_value(body).map_err(ApiError::Validation)?;
        let restricted = caller.enabled && self.store.is_restricted(&job.job_queue).await?;
        caller.check_submission(&job, restricted)?;
        let owner = caller.client_id().unwrap_or_default().to_string();
        self.check_secrets(&job, caller).await?;
        self.check_exclusions(&job).await?;
        let id = forced_id.or(job.job_id).unwrap_or_default();
        let tags = job.tags.clone().unwrap_or_default();
        let attach = job.has_attachments();
        let with_id = |id: &JobId| {
            let mut def = job.to_value();
            if let Some(o) = def.as_object_mut() {
                o.insert("job_id".into(), Value::String(id.to_string()));
            }
            def
        };
        let create = |id: JobId| {
            let def = with_id(&id);
            let tags = &tags;
            let job = &job;
            let owner = &owner;
            async move {
                let created = self
                    .store
                    .create_job(
                        &id.to_string(),
                        &def,
                        &job.job_queue,
                        job.priority(),
                        attach,
                        tags,
                        owner,
                    )
                    .await?;
                Ok::<_, ApiError>((id, def, created))
            }
        };
        let (mut id, mut def, created) = create(id).await?;
        if !created.created {
            let same =
                serde_json::from_str::<Value>(&created.existing_def).ok() == Some(def.clone());
            let ended = created.state.is_terminal();
            if same && !ended {
                // A retry: the job is durable in Redis; the outbox or the reconciler publishes
                // it if its first publish never completed.
                return Ok(id);
            }
            let (new_id, new_def, again) = create(JobId::default()).await?;
            if !again.created {
                return Err(ApiError::Internal(anyhow::anyhow!(
                    "new job id {new_id} already taken"
                )));
            }
            (id, def) = (new_id, new_def);
        }
        let id_str = id.to_string();
        if !attach {
            self.publish_new(&id_str, &job.job_queue, job.priority(), &def, &tags)
                .await?;
        }
        let labels = self.settings.metrics_max_label_values;
        self.metrics
            .inc_bounded("testflinger_jobs_total", &job.job_queue, labels);
        if job.reserve_data.is_some() {
            self.metrics
                .inc_bounded("testflinger_reservations_total", &job.job_queue, labels);
        }
        self.events.publish(&Transition {
            job_id: id_str,
            queue: job.job_queue.clone(),
            state: JobState::Waiting,
            previous: None,
            attempt: 0,
            agent: None,
            reason: None,
            webhook: job.job_status_webhook.clone(),
        });
        Ok(id)
    }

    /// Refuses (422, naming the field, what was given, the limit and its setting) a job
    /// past the size bounds of the settings (`TESTFLINGER_MAX_JOB_TAGS`,
    /// `TESTFLINGER_MAX_JOB_TAG_CHARS`, `TESTFLINGER_MAX_JOB_FIELD_BYTES`), from its JSON
    /// text, without building it. Every submission passes here ([`admit`]); `POST /v1/job`
    /// also calls it on its body before reading it, so a refused body is never built.
    pub fn check_bounds(&self, text: &[u8]) -> ApiResult<()> {
        testflinger_common::job::check_bounds(text, &self.settings.job_bounds())
            .map_err(ApiError::Validation)
    }

    /// Publishes a just-recorded job (it is in the outbox). Confirmed: off the outbox.
    /// Plainly not sent (the broker is unreachable or refused it): the record is removed and
    /// the caller gets 503, nothing stays. Outcome unclear (sent, no confirm): the record and
    /// the outbox entry stay and the caller gets success, since the job is durable in Redis
    /// and the reconciler publishes it again (a duplicate message is dropped at claim).
    pub async fn publish_new(
        &self,
        id: &str,
        queue: &str,
        priority: i64,
        def: &Value,
        tags: &[String],
    ) -> ApiResult<()> {
        match self.publish(id, queue, priority, def).await {
            Ok(()) => Ok(self.store.outbox_done(id).await?),
            Err(ApiError::Unconfirmed(e)) => {
                tracing::warn!(job.id = %id, error = %e, "publish outcome unclear: the job stays recorded and is published again");
                Ok(())
            }
            Err(e) => {
                if let Err(cleanup) = self.store.delete_job(id, queue, tags).await {
                    tracing::error!(job.id = %id, error = %cleanup, "could not remove unqueued job");
                }
                Err(e)
            }
        }
    }

    /// Publishes a job's wake-up message to its queue, waiting for the broker's confirm.
    ///
    /// With auth on, a queue no agent or operator registered gets no broker queue: the job
    /// is parked in Redis instead (and published when the queue is registered), so anonymous
    /// submissions to made-up names cannot create durable broker queues.
    pub async fn publish(
        &self,
        id: &str,
        queue: &str,
        priority: i64,
        def: &Value,
    ) -> ApiResult<()> {
        if self.auth_enabled && !self.store.is_registered(queue).await? {
            tracing::info!(job.id = %id, queue, "queue not registered by any agent: the job waits in Redis");
            return Ok(self.store.park(id, queue).await?);
        }
        let body = serde_json::to_vec(def).map_err(|e| ApiError::Internal(e.into()))?;
        self.broker
            .publish_job(queue, id, priority, &body)
            .await
            .map_err(ApiError::from)
    }

    /// Upstream's rule for `test_data.secrets` with auth on: the submitter must be an
    /// authenticated client and every path must exist in its namespace (422 otherwise).
    async fn check_secrets(&self, job: &Job, caller: &Caller) -> ApiResult<()> {
        let Some(secrets) = job.test_data.as_ref().and_then(|t| t.secrets.as_ref()) else {
            return Ok(());
        };
        if !caller.enabled || secrets.is_empty() {
            return Ok(());
        }
        let unprocessable = |m: String| ApiError::Json(StatusCode::UNPROCESSABLE_ENTITY, m);
        let Some(client) = caller.client_id() else {
            return Err(unprocessable(
            "test_data.secrets needs an authenticated client: secrets are read from the submitter's namespace".into(),
        ));
        };
        let mut missing = Vec::new();
        for path in secrets.values() {
            if !self.store.secret_exists(client, path).await? {
                missing.push(path.as_str());
            }
        }
        if missing.is_empty() {
            Ok(())
        } else {
            Err(unprocessable(format!(
                "Inaccessible secret paths: {}",
                missing.join(", ")
            )))
        }
    }

    /// Upstream's rule: with `exclude_agents`, some registered agent of the queue must be
    /// allowed to run the job.
    async fn check_exclusions(&self, job: &Job) -> ApiResult<()> {
        if job.exclude_agents.is_empty() {
            return Ok(());
        }
        let agents = crate::agents::agents_on_queue(&self.store, &job.job_queue).await?;
        let allowed = agents.iter().any(|a| {
            a.get("name")
                .and_then(Value::as_str)
                .is_some_and(|n| !job.exclude_agents.iter().any(|x| x == n))
        });
        if allowed {
            Ok(())
        } else {
            Err(ApiError::Json(
                StatusCode::UNPROCESSABLE_ENTITY,
                "There are no agents on the specified queue that are allowed to run this job"
                    .into(),
            ))
        }
    }
}
