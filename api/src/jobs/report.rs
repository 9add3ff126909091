//! Report: the holder of a job says how it goes (`POST /v1/result/<id>`): the job's
//! state, each phase's exit status, the device's info. Checked and written in one
//! script (a stale holder's report is never applied, even one racing a requeue).

use super::{Jobs, Transition};
use crate::error::{ApiError, ApiResult};
use crate::store::StateChange;
use actix_web::http::StatusCode;
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use testflinger_common::protocol::FenceToken;
use testflinger_common::{JobId, JobState, Phase};

/// What a holder reports; every part optional (upstream's `POST /v1/result` body).
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub status: Option<BTreeMap<Phase, i64>>,
    pub device_info: Option<Map<String, Value>>,
    pub state: Option<JobState>,
}

impl Jobs {
    /// Applies `report` to job `id` for the holder with `token` (none: upstream's
    /// tokenless agents) and agent identity `agent` (none: not checked). 404 for an
    /// unknown job, 409 for a stale holder, 403 for another agent's job; 422 (never 409:
    /// an agent takes 409 to mean "lease lost") for a state the state machine does not
    /// allow from the job's. A state that ends the job wakes the log compactor.
    pub async fn report(
        &self,
        job_id: &JobId,
        token: Option<FenceToken>,
        agent: Option<&str>,
        report: &Report,
    ) -> ApiResult<()> {
        let id_str = job_id.to_string();
        let id = id_str.as_str();
        // Upstream accepts and drops a result for an unknown job; we say so (404).
        let Some(job) = self.store.job_summary(id).await? else {
            return Err(ApiError::JobNotFound(id.to_string()));
        };
        let mut fields: Vec<(&str, String)> = Vec::new();
        if let Some(status) = &report.status {
            let m: Map<String, Value> = status
                .iter()
                .map(|(p, c)| (p.to_string(), json!(c)))
                .collect();
            fields.push(("status", Value::Object(m).to_string()));
        }
        if let Some(di) = &report.device_info {
            fields.push(("device_info", Value::Object(di.clone()).to_string()));
        }
        let done = self
            .store
            .report(id, &job.queue, token, agent, &fields, report.state)
            .await?;
        match (done.change, report.state) {
            (StateChange::Set(previous), Some(state)) => {
                if state.is_terminal() {
                    // Its log moves to the file store now rather than at the next pass.
                    self.compact_now.notify_one();
                }
                self.events.publish(&Transition {
                    job_id: id.to_string(),
                    queue: job.queue.clone(),
                    state,
                    previous: Some(previous),
                    attempt: done.attempt,
                    agent: Some(done.agent).filter(|a| !a.is_empty()),
                    reason: None,
                    webhook: job.webhook(),
                });
                Ok(())
            }
            (StateChange::Refused(previous), Some(state)) => Err(ApiError::Json(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!(
                    "job_state: job {id} cannot move from '{previous}' to '{state}'; states only move forward (waiting, running, setup, provision, firmware_update, test, allocate, allocated, reserve, cleanup, complete)"
                ),
            )),
            _ => Ok(()),
        }
    }
}
