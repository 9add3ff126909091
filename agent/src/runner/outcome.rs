//! The job's end: artifacts and the final outcome, or a release; delivery of the
//! spool (bounded once the agent shuts down); the agent record back to `waiting` or to
//! its hold; the run directory removed once the API has everything.

use super::{JobEnd, LeaseLost, Run};
use crate::archive;
use crate::spool::{self, Delivered, Entry};
use serde_json::{Map, Value, json};
use std::time::Duration;

/// How long a shutting-down agent keeps delivering the spool before it leaves the rest
/// on disk for its next start.
const SHUTDOWN_DRAIN: Duration = Duration::from_secs(10);

impl Run {
    /// Artifacts first, then the final outcome; the run directory goes once the API
    /// has them.
    pub(super) async fn finish(&mut self) -> anyhow::Result<JobEnd> {
        if self.signals.lost.is_cancelled() {
            return Err(LeaseLost.into());
        }
        self.spool_artifacts().await;
        let mut body = Map::new();
        body.insert("job_state".into(), json!("complete"));
        body.insert("status".into(), json!(self.status));
        if let Some(di) = self.device_info() {
            body.insert("device_info".into(), di);
        }
        self.push(
            "final outcome",
            &Entry::Result {
                body: Value::Object(body),
                last: true,
            },
        )?;
        match self.drain().await {
            Some(Delivered::All) => {
                self.remove_rundir().await;
                self.end_agent_record().await;
                Ok(JobEnd::Finished)
            }
            Some(Delivered::LeaseLost) => Err(LeaseLost.into()),
            None => Ok(JobEnd::Undelivered),
        }
    }

    /// Packs `artifacts/` of the run directory, when it has files, into a file in the
    /// spool, uploaded streaming from it.
    async fn spool_artifacts(&self) {
        let dir = self.rundir.join("artifacts");
        if !archive::non_empty_dir(&dir) {
            return;
        }
        let d = dir.clone();
        let staged = self.spool.artifact_staging();
        let out = staged.clone();
        match tokio::task::spawn_blocking(move || archive::pack_artifacts(&d, &out)).await {
            Ok(Ok(packed)) => {
                for (path, why) in &packed.skipped {
                    tracing::warn!(path = %path.display(), reason = %why, "left out of the artifacts");
                }
                tracing::info!(
                    files = packed.files,
                    bytes = packed.file_bytes,
                    "artifacts packed"
                );
                if let Err(e) = self.spool.push_artifact_file(&staged) {
                    tracing::error!(error = %e, "cannot spool the artifacts; they are not sent");
                }
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "could not pack the artifacts"),
            Err(e) => tracing::warn!(error = %e, "artifact packing panicked"),
        }
        let _ = std::fs::remove_file(&staged);
    }

    /// After the job: back to `waiting`, unless the agent must stay offline.
    async fn end_agent_record(&mut self) {
        self.refresh_hold().await;
        match &self.hold {
            Some(h) => {
                self.post_agent(json!({"job_id": "", "state": h.state, "comment": h.comment}))
                    .await
            }
            None => {
                self.post_agent(json!({"job_id": "", "state": "waiting", "comment": ""}))
                    .await
            }
        }
    }

    /// Gives the job back to its queue (shutdown after the grace), after its output.
    pub(super) async fn release(&mut self) -> anyhow::Result<JobEnd> {
        let reason = format!("agent {} shut down", self.cfg.agent_id);
        Ok(self.release_for(reason, JobEnd::Released).await)
    }

    /// The agent's lease clock ran out: the phase was killed; deliver what it wrote,
    /// then release the job (when the API still knows this lease, it requeues it at
    /// once; otherwise it answers 409 and the job is someone else's already).
    pub(super) async fn give_up(&mut self) -> JobEnd {
        tracing::warn!(
            "lease lost on the agent's clock; the phase was stopped; delivering its output, then releasing the job"
        );
        let reason = format!(
            "agent {}: lease lost (no renewal in time); the phase was stopped",
            self.cfg.agent_id
        );
        self.release_for(reason, JobEnd::GaveUp).await
    }

    pub(super) async fn release_for(&mut self, reason: String, end: JobEnd) -> JobEnd {
        if self.push("release", &Entry::Release { reason }).is_err() {
            self.forget();
            return JobEnd::LeaseLost;
        }
        match self.drain().await {
            Some(Delivered::All) => {
                tracing::info!("job released to its queue");
                self.remove_rundir().await;
                self.end_agent_record().await;
                end
            }
            Some(Delivered::LeaseLost) => {
                self.forget();
                JobEnd::LeaseLost
            }
            None => JobEnd::Undelivered,
        }
    }

    /// Closes the spool and waits until it is delivered: `None` when the agent shut
    /// down first (after [`SHUTDOWN_DRAIN`] more; what is left stays on disk for the
    /// next start).
    async fn drain(&mut self) -> Option<Delivered> {
        self.spool.close();
        let mut h = self.shipper.take()?;
        if !self.signals.abort.is_cancelled() {
            tokio::select! {
                r = &mut h => return r.ok(),
                _ = self.signals.abort.cancelled() => {}
            }
        }
        match tokio::time::timeout(SHUTDOWN_DRAIN, &mut h).await {
            Ok(r) => r.ok(),
            Err(_) => {
                h.abort();
                tracing::warn!(
                    spool = %self.spool.dir().display(),
                    "shutting down with writes the API does not have yet; the next start delivers them"
                );
                None
            }
        }
    }

    /// The job is someone else's: stop delivering, drop the spool and run directory.
    pub(super) fn forget(&mut self) {
        if let Some(h) = self.shipper.take() {
            h.abort();
        }
        spool::remove(self.spool.dir());
        let _ = std::fs::remove_dir_all(&self.rundir);
    }

    async fn remove_rundir(&self) {
        let _ = tokio::fs::remove_dir_all(&self.rundir).await;
    }
}
