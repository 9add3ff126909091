//! What one delivery from a job queue becomes: its job id (or a dead-lettered
//! message), the claim through the API and its answer (run, drop, step aside), a
//! raw-published job registered first, and a granted job run with its heartbeat until
//! it ends or the shutdown grace is over.

use super::lease::{heartbeat_loop, lease_margin};
use super::{Agent, settle};
use crate::client::ClientError;
use crate::runner::{self, ClaimedJob, JobEnd, JobReport, JobSignals};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::time::Duration;
use testflinger_broker::{Consumer, Incoming, OutgoingMessage};
use testflinger_common::protocol::{ClaimOutcome, ClaimResponse};
use tokio::time::Instant;
use tracing::Instrument;

impl Agent {
    /// One delivery: claim it, ack after the answer, run it when granted.
    pub(super) async fn handle(&self, msg: Incoming, consumer: &mut Option<Consumer>) {
        let job_id = match job_id_of(&msg) {
            Ok(id) => id,
            Err(why) => {
                // Never left to block its queue: the queue dead-letters it.
                tracing::warn!(queue = %msg.routing_key, message_id = ?msg.message_id, %why, "not a valid job message; dead-lettering it");
                settle(msg.reject().await);
                return;
            }
        };
        let span = tracing::info_span!("delivery", job.id = %job_id, job.queue = %msg.routing_key);
        self.handle_in_span(msg, job_id, consumer)
            .instrument(span)
            .await
    }

    async fn handle_in_span(&self, msg: Incoming, job_id: String, consumer: &mut Option<Consumer>) {
        if self.stop.is_cancelled() {
            settle(msg.requeue().await);
            self.close(consumer).await;
            return;
        }
        // The operator may have set the agent offline since the last check: a delivery
        // that arrives then goes back untouched.
        if let Ok(true) = self.held().await {
            tracing::info!(job.id = %job_id, "agent held by an operator; giving the delivery back");
            settle(msg.requeue().await);
            self.close(consumer).await;
            return;
        }
        let mut registered = false;
        loop {
            let claimed_at = Instant::now();
            let claim = match self.client.claim(&job_id).await {
                Ok(c) => c,
                Err(e) => return self.claim_failed(&msg, &job_id, e, consumer).await,
            };
            match claim.outcome {
                ClaimOutcome::Granted => {
                    settle(msg.ack().await);
                    // Stop consuming while the job runs, off the job's critical path: a
                    // delivery that slips in meanwhile goes back to its queue on close.
                    if let Some(c) = consumer.take() {
                        tokio::spawn(c.close());
                    }
                    let job = claimed_job(&msg, &job_id, claim, claimed_at);
                    self.run_claimed(job).await;
                    return;
                }
                ClaimOutcome::Unknown if !registered && !published_by_api(&msg) => {
                    if !self.register_or_settle(&msg, &job_id, consumer).await {
                        return;
                    }
                    registered = true;
                }
                outcome => return self.not_run(&msg, &job_id, outcome, consumer).await,
            }
        }
    }

    /// The claim failed: a job id the API refuses is dead-lettered, anything else goes
    /// back to its queue.
    async fn claim_failed(
        &self,
        msg: &Incoming,
        job_id: &str,
        e: ClientError,
        consumer: &mut Option<Consumer>,
    ) {
        match e {
            ClientError::Rejected {
                status: status @ (400 | 404 | 422),
                message,
            } => {
                tracing::warn!(job.id = %job_id, status, %message, "the API refuses this job id; dead-lettering the message");
                settle(msg.reject().await);
            }
            e => {
                tracing::warn!(job.id = %job_id, error = %e, "claim failed; giving the delivery back");
                self.give_back(msg, consumer).await;
            }
        }
    }

    /// A claim answer other than a grant (and other than an unknown job still to
    /// register): the delivery is dropped, or given back, or this agent steps aside.
    async fn not_run(
        &self,
        msg: &Incoming,
        job_id: &str,
        outcome: ClaimOutcome,
        consumer: &mut Option<Consumer>,
    ) {
        match outcome {
            ClaimOutcome::Excluded => {
                // Dropped, not requeued: a requeue puts the message back at the head,
                // where this agent would take it again and again. The API publishes
                // the job again from its outbox, behind the others.
                tracing::info!(job.id = %job_id, "this agent is excluded; the API hands the job to another agent");
                settle(msg.ack().await);
                // Step away so another agent's consumer gets it.
                self.close(consumer).await;
                self.pause(self.cfg.polling_interval().max(Duration::from_secs(1)))
                    .await;
            }
            ClaimOutcome::Unknown if published_by_api(msg) => {
                // The API published it and no longer knows the job (it expired, or
                // was removed): a stale wake-up, not a raw-published job to register.
                tracing::info!(job.id = %job_id, "stale message of a job the API no longer knows; dropping it");
                settle(msg.ack().await);
            }
            ClaimOutcome::Unknown => {
                tracing::warn!(job.id = %job_id, "job still unknown after registering it; giving it back");
                self.give_back(msg, consumer).await;
            }
            // A grant is run, never passed here.
            ClaimOutcome::Cancelled
            | ClaimOutcome::Owned
            | ClaimOutcome::Finished
            | ClaimOutcome::Granted => {
                tracing::info!(job.id = %job_id, outcome = ?outcome, "not ours to run; dropping the delivery");
                settle(msg.ack().await);
            }
        }
    }

    /// A raw-published job the API does not know: `true` once registered (claim it
    /// again), else the delivery is settled.
    async fn register_or_settle(
        &self,
        msg: &Incoming,
        job_id: &str,
        consumer: &mut Option<Consumer>,
    ) -> bool {
        match self.register_raw(msg, job_id).await {
            RawOutcome::Registered => return true,
            RawOutcome::DeadLettered => settle(msg.ack().await),
            RawOutcome::Rejected => settle(msg.reject().await),
            RawOutcome::Retry => self.give_back(msg, consumer).await,
        }
        false
    }

    /// Requeues the delivery, stops consuming and waits a second: what failed may
    /// work again soon, and meanwhile another agent may take the job.
    async fn give_back(&self, msg: &Incoming, consumer: &mut Option<Consumer>) {
        settle(msg.requeue().await);
        self.close(consumer).await;
        self.pause(Duration::from_secs(1)).await;
    }

    async fn close(&self, consumer: &mut Option<Consumer>) {
        if let Some(c) = consumer.take() {
            c.close().await;
        }
    }

    /// A raw-published job: register it through the API (same validation as a
    /// submission). An invalid one goes to `testflinger.dead` with the reason.
    async fn register_raw(&self, msg: &Incoming, job_id: &str) -> RawOutcome {
        let body = match serde_json::from_slice::<Value>(&msg.body) {
            Ok(Value::Object(mut o)) => {
                o.insert("job_id".into(), json!(job_id));
                serde_json::to_vec(&Value::Object(o)).unwrap_or_else(|_| msg.body.clone())
            }
            _ => msg.body.clone(),
        };
        match self.client.submit_job(&body).await {
            Ok(id) => {
                tracing::info!(job.id = %id, "registered a raw-published job");
                RawOutcome::Registered
            }
            Err(ClientError::Rejected { status, message }) => {
                tracing::warn!(job.id = %job_id, status, %message, "raw-published job is invalid; dead-lettering it");
                let r = self
                    .broker
                    .publish(OutgoingMessage {
                        exchange: "",
                        routing_key: testflinger_broker::topology::DEAD_QUEUE,
                        body: &msg.body,
                        message_id: msg.message_id.as_deref(),
                        content_type: Some("application/json"),
                        persistent: true,
                        headers: vec![("x-rejection-reason", message)],
                        ..OutgoingMessage::default()
                    })
                    .await;
                match r {
                    Ok(()) => RawOutcome::DeadLettered,
                    // A least-privilege agent user may publish nothing: reject the message
                    // instead, and its queue's dead-letter exchange takes it.
                    Err(e) if testflinger_broker::is_access_refused(&e) => RawOutcome::Rejected,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot dead-letter the job; retrying later");
                        RawOutcome::Retry
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot register the raw-published job; retrying later");
                RawOutcome::Retry
            }
        }
    }

    /// Runs a granted job with its heartbeat; on shutdown, lets it finish within the
    /// grace and then releases it.
    /// Runs a granted job with its heartbeat; on shutdown, lets it finish within the
    /// grace and then releases it.
    async fn run_claimed(&self, job: ClaimedJob) {
        let lease = Duration::from_secs(job.lease_ttl.max(1));
        let (signals, lease_tx) = JobSignals::new(job.claimed_at + lease - lease_margin(lease));
        if let Ok(mut c) = self.current.lock() {
            *c = Some((job.id.clone(), signals.cancel.clone()));
        }
        let heartbeat = tokio::spawn(heartbeat_loop(
            self.client.clone(),
            job.id.clone(),
            job.token,
            job.lease_ttl,
            signals.clone(),
            lease_tx,
            job.claimed_at + lease / 3,
        ));
        let report = self.run_within_grace(&job, &signals).await;
        heartbeat.abort();
        if let Ok(mut c) = self.current.lock() {
            *c = None;
        }
        match report {
            Ok(r) => self.job_ended(&job, r).await,
            Err(e) => {
                tracing::error!(job.id = %job.id, error = ?e, "cannot run the job; releasing it");
                if let Err(e) = self
                    .client
                    .release(&job.id, job.token, &format!("agent error: {e}"))
                    .await
                {
                    tracing::error!(job.id = %job.id, error = %e, "release failed; the reaper will requeue it");
                }
                // Whatever broke here may break the next job too: let others have a go.
                self.pause(self.cfg.polling_interval().max(Duration::from_secs(5)))
                    .await;
            }
        }
    }

    /// Runs the job; once the agent is told to stop, lets it go on for the shutdown
    /// grace, then stops it (`abort`) and waits for its release.
    async fn run_within_grace(
        &self,
        job: &ClaimedJob,
        signals: &JobSignals,
    ) -> anyhow::Result<JobReport> {
        let fut = runner::run_job(
            self.cfg.clone(),
            self.client.clone(),
            self.watchdog.clone(),
            job.clone(),
            signals.clone(),
        );
        tokio::pin!(fut);
        tokio::select! {
            r = &mut fut => r,
            _ = self.stop.cancelled() => {
                let grace = self.cfg.shutdown_grace();
                tracing::info!(job.id = %job.id, grace_s = grace.as_secs_f64(), "shutting down: the running job may finish within the grace");
                tokio::select! {
                    r = &mut fut => r,
                    _ = tokio::time::sleep(grace) => {
                        tracing::warn!(job.id = %job.id, "grace over: stopping and releasing the job");
                        signals.abort.cancel();
                        fut.await
                    }
                }
            }
        }
    }

    /// After a job this agent ran: says how it ended, puts the record back to
    /// `waiting` after a lost lease, re-checks a hold, steps aside after a local failure.
    async fn job_ended(&self, job: &ClaimedJob, r: JobReport) {
        match r.end {
            JobEnd::Finished => tracing::info!(job.id = %job.id, "job finished"),
            JobEnd::Released => tracing::info!(job.id = %job.id, "job released"),
            JobEnd::GaveUp => {
                tracing::warn!(job.id = %job.id, "lease lost: the job was stopped, its output delivered and the job released")
            }
            JobEnd::Undelivered => {
                tracing::warn!(job.id = %job.id, "shut down before the API had everything; the next start delivers the rest")
            }
            JobEnd::LeaseLost => {
                tracing::warn!(job.id = %job.id, "lease lost; the job belongs to someone else now");
                if r.hold.is_none() {
                    let idle = json!({"job_id": "", "state": "waiting", "comment": ""});
                    let quick = self.client.quick(2, Duration::from_secs(5));
                    if let Err(e) = quick.post_agent(&idle).await {
                        tracing::warn!(error = %e, "could not update the agent record");
                    }
                }
            }
        }
        if r.hold.is_some() {
            self.recheck.notify_one();
        }
        if r.failed {
            // Whatever broke here may break the next job too: let others have a go.
            self.pause(self.cfg.polling_interval().max(Duration::from_secs(5)))
                .await;
        }
    }
}

/// Whether the API published this message (it carries the API's header): an unknown
/// job then is a stale wake-up, never a raw-published job.
fn published_by_api(msg: &Incoming) -> bool {
    msg.headers
        .contains_key(testflinger_broker::topology::PUBLISHED_BY_HEADER)
}

/// The job a granted claim hands out.
fn claimed_job(
    msg: &Incoming,
    job_id: &str,
    claim: ClaimResponse,
    claimed_at: Instant,
) -> ClaimedJob {
    ClaimedJob {
        id: job_id.to_string(),
        queue: msg.routing_key.clone(),
        token: claim.token.unwrap_or_default(),
        attempt: claim.attempt.unwrap_or(1),
        lease_ttl: claim.lease_ttl.unwrap_or(30),
        claimed_at,
        def: claim.job.unwrap_or_else(|| json!({})),
    }
}

enum RawOutcome {
    Registered,
    DeadLettered,
    /// Not copied to the dead queue (no publish permission): reject it to its DLX.
    Rejected,
    Retry,
}

/// The job id of a delivery: the AMQP `message_id` when it is a UUID, else the body's
/// `job_id` (which must be a UUID), else a UUID derived from the body bytes (a
/// redelivery maps to the same). `Err` (why) for a message that cannot be a job: a
/// body that is not a JSON object, or a `job_id` that is not a UUID.
pub fn job_id_of(msg: &Incoming) -> Result<String, String> {
    job_id_from(msg.message_id.as_deref(), &msg.body)
}

/// See [`job_id_of`].
pub fn job_id_from(message_id: Option<&str>, body: &[u8]) -> Result<String, String> {
    if let Some(id) = message_id
        && let Ok(u) = uuid::Uuid::parse_str(id.trim())
    {
        return Ok(u.to_string());
    }
    let o = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(o)) => o,
        Ok(_) => return Err("the body is JSON but not an object".into()),
        Err(e) => return Err(format!("the body is not JSON: {e}")),
    };
    match o.get("job_id") {
        None | Some(Value::Null) => {}
        Some(Value::String(id)) => {
            return uuid::Uuid::parse_str(id.trim())
                .map(|u| u.to_string())
                .map_err(|_| format!("job_id '{id}' is not a UUID"));
        }
        Some(other) => return Err(format!("job_id {other} is not a UUID string")),
    }
    let digest = Sha256::digest(body);
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    Ok(uuid::Builder::from_random_bytes(bytes)
        .into_uuid()
        .to_string())
}

#[cfg(test)]
mod tests {
    use super::job_id_from;

    #[test]
    fn job_id_rules() {
        let id = "0b6a4f5e-8a53-4b4e-9d59-0a1b2c3d4e5f";
        assert_eq!(job_id_from(Some(id), b"{}").as_deref(), Ok(id));
        assert_eq!(
            job_id_from(
                Some("not-a-uuid"),
                format!(r#"{{"job_id": "{id}"}}"#).as_bytes()
            )
            .as_deref(),
            Ok(id)
        );
        let e = job_id_from(Some("not-a-uuid"), br#"{"job_id": "abc"}"#).expect_err("abc");
        assert!(e.contains("abc"), "{e}");
        assert!(job_id_from(None, br#"{"job_id": 5}"#).is_err());
        assert!(job_id_from(None, b"{not json").is_err());
        assert!(job_id_from(None, b"[1]").is_err());
        let a = job_id_from(None, br#"{"job_queue": "q"}"#).expect("a");
        let b = job_id_from(None, br#"{"job_queue": "q"}"#).expect("b");
        let c = job_id_from(None, br#"{"job_queue": "r"}"#).expect("c");
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(uuid::Uuid::parse_str(&a).is_ok());
    }
}
