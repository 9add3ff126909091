//! Phase sequencing: which phases run, in order, cleanup always; what is reported
//! around each (the job's and the agent's state, device info, status, provision log);
//! allocation; cancels seen between phases; an operator's hold.

use super::{Hold, JobEnd, LeaseExpired, LeaseLost, Run};
use crate::phases::{self, ORDER};
use crate::spool::Entry;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use testflinger_common::Phase;
use tracing::Instrument;

impl Run {
    pub(super) async fn execute(&mut self) -> anyhow::Result<JobEnd> {
        if self.signals.lost.is_cancelled() {
            return Err(LeaseLost.into());
        }
        self.fetch_attachments().await?;

        for (i, phase) in ORDER.into_iter().enumerate() {
            if self.stopping() {
                break;
            }
            // Skipped phases cost no look-up: the control queue and the heartbeat tell
            // us of a cancel anyway; this is upstream's check, before real work only.
            // Nor does the first phase: the claim has just said the job is not cancelled.
            let runs = phases::skip_reason(&self.cfg, &self.job.def, phase).is_none();
            if runs && i > 0 && self.cancelled_on_server().await {
                tracing::info!("job cancelled; going to cleanup");
                break;
            }
            let code = self.phase(phase).await?;
            let Some(code) = code else { continue };
            if code != 0 && phases::rules(phase).stops_on_failure {
                tracing::info!(%phase, code, "phase failed; going to cleanup");
                break;
            }
        }
        if self.signals.lost.is_cancelled() {
            return Err(LeaseLost.into());
        }
        if self.signals.expired.is_cancelled() {
            return Err(LeaseExpired.into());
        }
        if self.signals.abort.is_cancelled() {
            return self.release().await;
        }
        self.phase(Phase::Cleanup).await?;
        if self.signals.abort.is_cancelled() {
            return self.release().await;
        }
        self.finish().await
    }

    fn stopping(&self) -> bool {
        self.signals.cancel.is_cancelled()
            || self.signals.lost.is_cancelled()
            || self.signals.abort.is_cancelled()
            || self.signals.expired.is_cancelled()
    }

    /// Upstream checks `job_state` before each phase; the control queue and the
    /// heartbeat usually tell us first.
    async fn cancelled_on_server(&self) -> bool {
        match self.quick.job_state(&self.job.id).await {
            Ok(Some(s)) if s == "cancelled" => {
                self.signals.cancel.cancel();
                true
            }
            _ => false,
        }
    }

    /// Reads the agent record: an operator's offline or maintenance set while the job
    /// runs is kept (we stop posting phase states over it) and honoured after the job.
    pub(super) async fn refresh_hold(&mut self) {
        if self.hold.is_some() {
            return;
        }
        if let Ok(Some(a)) = self.quick.get_agent().await {
            let state = a.get("state").and_then(Value::as_str).unwrap_or_default();
            if state
                .parse::<testflinger_common::AgentState>()
                .is_ok_and(|s| s.blocks_jobs())
            {
                self.hold = Some(Hold {
                    state: state.to_string(),
                    comment: a
                        .get("comment")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string(),
                });
            }
        }
    }

    pub(super) fn device_info(&self) -> Option<Value> {
        let text = std::fs::read_to_string(self.rundir.join("device-info.json")).ok()?;
        let v: Value = serde_json::from_str(&text).ok()?;
        match v.get("device_info") {
            Some(Value::Object(m)) => Some(Value::Object(m.clone())),
            _ => None,
        }
    }

    /// Runs one phase with its reporting around it; `None` when skipped.
    async fn phase(&mut self, phase: Phase) -> anyhow::Result<Option<i32>> {
        let span = tracing::info_span!("phase", %phase);
        async {
            let skip = phases::skip_reason(&self.cfg, &self.job.def, phase);
            self.announce(phase, skip.is_none()).await?;
            if let Some(reason) = skip {
                tracing::debug!(reason, "phase skipped");
                return Ok(None);
            }
            tracing::info!("phase starts");
            let code = self.run_command(phase).await?;
            tracing::info!(code, "phase ended");
            self.send_serial(phase).await?;
            self.report(phase, code).await?;
            Ok(Some(code))
        }
        .instrument(span)
        .await
    }

    /// Entering a phase (`runs`: it is not skipped): the job's new state, the agent's,
    /// the device info when it changed.
    async fn announce(&mut self, phase: Phase, runs: bool) -> anyhow::Result<()> {
        // The hold was checked just before the claim: the first phase starts at once.
        let first = !self.started;
        self.started = true;
        if runs && !first {
            self.refresh_hold().await;
        }
        // Upstream posts the state of every phase it enters, even one it then skips.
        self.post_state(phase.job_state().as_str()).await?;
        if runs && self.hold.is_none() {
            self.post_agent(json!({"state": phase.as_str(), "job_id": self.job.id}))
                .await;
        } else if first {
            self.post_agent(json!({"job_id": self.job.id})).await;
        }
        if let Some(di) = self.device_info()
            && self.device_info_sent.as_ref() != Some(&di)
        {
            self.post_result("device_info", json!({"device_info": di.clone()}))?;
            self.device_info_sent = Some(di);
        }
        Ok(())
    }

    /// A phase ended with `code`: the status (to the API and the outcome file), a
    /// recovery failure, the provision log, the allocation.
    async fn report(&mut self, phase: Phase, code: i32) -> anyhow::Result<()> {
        self.status.insert(phase.as_str().to_string(), code);
        let outcome = json!({"status": self.status});
        let _ = tokio::fs::write(
            self.rundir.join("testflinger-outcome.json"),
            serde_json::to_vec(&outcome).unwrap_or_default(),
        )
        .await;
        self.post_result("status", outcome)?;
        if code == 46 {
            self.recovery_failed().await;
        }
        if phase == Phase::Provision {
            let detail = match code {
                0 => "provision_success",
                46 => "recovery_fail",
                _ => "provision_fail",
            };
            self.push(
                "provision log",
                &Entry::ProvisionLog {
                    exit_code: code,
                    detail: detail.to_string(),
                },
            )?;
        }
        if phase == Phase::Allocate && code == 0 {
            self.allocated().await?;
        }
        Ok(())
    }

    async fn recovery_failed(&mut self) {
        let comment = format!(
            "Set to offline by agent. Recovery failed during job '{}' execution.",
            self.job.id
        );
        tracing::error!("device recovery failed (exit 46): the agent goes offline");
        self.post_agent(json!({"state": "offline", "comment": comment}))
            .await;
        self.hold = Some(Hold {
            state: "offline".into(),
            comment,
        });
    }

    /// Allocate: publish the device, say `allocated`, then hold the device until this
    /// job or its parent ends.
    async fn allocated(&mut self) -> anyhow::Result<()> {
        if let Some(di) = self.device_info() {
            self.post_result("device_info", json!({"device_info": di}))?;
        }
        self.post_result("job_state", json!({"job_state": "allocated"}))?;
        let parent = self
            .job
            .def
            .get("parent_job_id")
            .and_then(Value::as_str)
            .map(str::to_string);
        let mut watch = vec![self.job.id.clone()];
        watch.extend(parent);
        loop {
            for id in &watch {
                if let Ok(Some(s)) = self.quick.job_state(id).await
                    && matches!(s.as_str(), "complete" | "completed" | "cancelled")
                {
                    return Ok(());
                }
            }
            tokio::select! {
                _ = self.signals.cancel.cancelled() => return Ok(()),
                _ = self.signals.abort.cancelled() => return Ok(()),
                _ = self.signals.lost.cancelled() => return Err(LeaseLost.into()),
                _ = self.signals.expired.cancelled() => return Err(LeaseExpired.into()),
                _ = tokio::time::sleep(self.cfg.polling_interval()) => {}
            }
        }
    }

    pub(super) fn phase_env(&self, phase: Phase) -> BTreeMap<String, String> {
        let mut env = self.env.clone();
        if phase == Phase::Test {
            env.extend(self.secrets.clone());
        }
        env
    }
}
