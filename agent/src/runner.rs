//! Runs one claimed job: the run directory, the phases in order with cleanup always,
//! output streamed to the API as fragments, results, artifacts, the final outcome.
//!
//! Every write carries the job's fencing token; the first 409 (lease lost) stops the
//! job at once and nothing more is written about it.

use crate::archive;
use crate::client::{ApiClient, ClientError, Fragment};
use crate::config::Config;
use crate::phases::{self, ORDER};
use crate::process::{self, PhaseProcess};
use anyhow::Context;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use testflinger_common::{LogType, Phase};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Upstream's defaults for the two timeouts, in seconds.
const DEFAULT_GLOBAL_TIMEOUT: u64 = 4 * 3600;
const DEFAULT_OUTPUT_TIMEOUT: u64 = 900;
/// How often buffered output is sent while a phase runs.
const FLUSH_EVERY: Duration = Duration::from_millis(500);
/// How long a killed phase gets between SIGTERM and SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(3);
/// Serial logs are sent in chunks of this size.
const SERIAL_CHUNK: usize = 1024 * 1024;

/// A job this agent holds a lease on.
#[derive(Debug, Clone)]
pub struct ClaimedJob {
    pub id: String,
    pub queue: String,
    pub token: u64,
    pub attempt: u64,
    pub lease_ttl: u64,
    /// The job as the claim handed it out (with `job_id`, secrets resolved).
    pub def: Value,
}

/// What stops a job from the outside.
#[derive(Debug, Clone, Default)]
pub struct JobSignals {
    /// The job was cancelled (control queue or heartbeat answer).
    pub cancel: CancellationToken,
    /// The lease is gone (409): stop, write nothing more.
    pub lost: CancellationToken,
    /// The agent is shutting down and the grace is over: kill and release the job.
    pub abort: CancellationToken,
}

/// How a job ended for this agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobEnd {
    /// The job ran to its end (complete or cancelled) and the outcome was sent.
    Finished,
    /// Given back to its queue (shutdown).
    Released,
    /// Someone else owns it now; nothing more was written.
    LeaseLost,
}

/// An agent state that blocks new jobs, set by an operator or by a recovery failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hold {
    pub state: String,
    pub comment: String,
}

/// The result of [`run_job`].
#[derive(Debug, Clone)]
pub struct JobReport {
    pub end: JobEnd,
    /// When set, the agent must take no more jobs.
    pub hold: Option<Hold>,
}

/// Why a phase was stopped before it ended by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    GlobalTimeout(u64),
    OutputTimeout(u64),
    Cancelled,
    Abort,
    Lost,
}

impl Stop {
    fn message(self) -> String {
        match self {
            Stop::GlobalTimeout(s) => format!("\nERROR: Global timeout reached! ({s}s)\n"),
            Stop::OutputTimeout(s) => format!("\nERROR: Output timeout reached! ({s}s)\n"),
            Stop::Cancelled => "\nJob cancellation was requested, exiting.\n".into(),
            Stop::Abort => {
                "\nERROR: the agent is shutting down; the job goes back to its queue.\n".into()
            }
            Stop::Lost => "\nERROR: the lease on this job was lost; stopping.\n".into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the lease on the job was lost")]
struct LeaseLost;

/// Runs a claimed job to its end. `Err` only for local failures that prevent running
/// it at all (the run directory cannot be created); the caller releases the job then.
pub async fn run_job(
    cfg: Arc<Config>,
    client: ApiClient,
    job: ClaimedJob,
    signals: JobSignals,
) -> anyhow::Result<JobReport> {
    let span =
        tracing::info_span!("job", job.id = %job.id, job.queue = %job.queue, attempt = job.attempt);
    async move {
        let mut run = Run::prepare(cfg, client, job, signals).await?;
        let end = match run.execute().await {
            Ok(end) => end,
            Err(e) if e.is::<LeaseLost>() => JobEnd::LeaseLost,
            Err(e) => return Err(e),
        };
        run.close_logs().await;
        Ok(JobReport {
            end,
            hold: run.hold.clone(),
        })
    }
    .instrument(span)
    .await
}

struct Run {
    cfg: Arc<Config>,
    client: ApiClient,
    job: ClaimedJob,
    signals: JobSignals,
    rundir: PathBuf,
    env: BTreeMap<String, String>,
    secrets: BTreeMap<String, String>,
    masks: Arc<Vec<(String, String)>>,
    status: BTreeMap<String, i32>,
    output_counter: Arc<AtomicU64>,
    serial_counter: u64,
    shipper_tx: Option<mpsc::UnboundedSender<(LogType, Fragment)>>,
    shipper: Option<tokio::task::JoinHandle<()>>,
    hold: Option<Hold>,
    global_timeout: u64,
    output_timeout: u64,
    /// The device info last posted, so it is sent again only when it changes.
    device_info_sent: Option<Value>,
    /// Whether a phase has started (the first needs no look-ups: the claim was one).
    started: bool,
}

impl Run {
    async fn prepare(
        cfg: Arc<Config>,
        client: ApiClient,
        job: ClaimedJob,
        signals: JobSignals,
    ) -> anyhow::Result<Run> {
        let rundir = cfg.execution_basedir.join(&job.id);
        if rundir.exists() {
            tokio::fs::remove_dir_all(&rundir)
                .await
                .with_context(|| format!("cannot clear old run directory {}", rundir.display()))?;
        }
        tokio::fs::create_dir_all(&rundir)
            .await
            .with_context(|| format!("cannot create run directory {}", rundir.display()))?;
        let pretty = serde_json::to_vec_pretty(&job.def)?;
        tokio::fs::write(rundir.join("testflinger.json"), pretty).await?;
        tokio::fs::write(rundir.join("testflinger-outcome.json"), b"{}").await?;
        tokio::fs::write(rundir.join("device-connector-error.json"), b"").await?;

        let secrets: BTreeMap<String, String> = job
            .def
            .pointer("/test_data/secrets")
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_string())))
                    .collect()
            })
            .unwrap_or_default();
        let masks: Vec<(String, String)> = secrets
            .values()
            .filter(|v| !v.is_empty())
            .map(|v| {
                let digest = hex::encode(Sha256::digest(v.as_bytes()));
                (v.clone(), format!("**{}**", &digest[..6]))
            })
            .collect();
        let pick = |key: &str, cap: Option<u64>, default: u64| {
            let from_job = job
                .def
                .get(key)
                .and_then(Value::as_u64)
                .filter(|v| *v > 0)
                .unwrap_or(default);
            from_job.min(cap.filter(|v| *v > 0).unwrap_or(default))
        };
        let global_timeout = pick("global_timeout", cfg.global_timeout, DEFAULT_GLOBAL_TIMEOUT);
        let output_timeout = pick("output_timeout", cfg.output_timeout, DEFAULT_OUTPUT_TIMEOUT);

        let (tx, rx) = mpsc::unbounded_channel();
        let shipper = tokio::spawn(
            ship_logs(
                client.clone(),
                job.id.clone(),
                job.token,
                rx,
                signals.lost.clone(),
            )
            .in_current_span(),
        );
        Ok(Run {
            env: cfg.string_values.clone(),
            cfg,
            client,
            job,
            signals,
            rundir,
            secrets,
            masks: Arc::new(masks),
            status: BTreeMap::new(),
            output_counter: Arc::new(AtomicU64::new(0)),
            serial_counter: 0,
            shipper_tx: Some(tx),
            shipper: Some(shipper),
            hold: None,
            global_timeout,
            output_timeout,
            device_info_sent: None,
            started: false,
        })
    }

    /// Turns a write's failure into what the job does next: a lost lease stops it,
    /// anything else is logged and the job goes on.
    fn check<T>(&self, what: &str, r: Result<T, ClientError>) -> anyhow::Result<Option<T>> {
        match r {
            Ok(v) => Ok(Some(v)),
            Err(ClientError::LeaseLost(m)) => {
                tracing::warn!(what, message = %m, "lease lost; stopping the job");
                self.signals.lost.cancel();
                Err(LeaseLost.into())
            }
            Err(e) => {
                tracing::warn!(what, error = %e, "API call failed");
                Ok(None)
            }
        }
    }

    async fn post_result(&self, what: &str, body: Value) -> anyhow::Result<()> {
        let r = self
            .client
            .post_result(&self.job.id, self.job.token, &body)
            .await;
        self.check(what, r).map(|_| ())
    }

    async fn post_agent(&self, body: Value) {
        if let Err(e) = self.client.post_agent(&body).await {
            tracing::warn!(error = %e, "could not update the agent record");
        }
    }

    async fn execute(&mut self) -> anyhow::Result<JobEnd> {
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
        if self.signals.abort.is_cancelled() {
            return self.release().await;
        }
        self.phase(Phase::Cleanup).await?;
        if self.signals.abort.is_cancelled() {
            return self.release().await;
        }
        self.finish().await?;
        Ok(JobEnd::Finished)
    }

    fn stopping(&self) -> bool {
        self.signals.cancel.is_cancelled()
            || self.signals.lost.is_cancelled()
            || self.signals.abort.is_cancelled()
    }

    /// Upstream checks `job_state` before each phase; the control queue and the
    /// heartbeat usually tell us first.
    async fn cancelled_on_server(&self) -> bool {
        match self.client.job_state(&self.job.id).await {
            Ok(Some(s)) if s == "cancelled" => {
                self.signals.cancel.cancel();
                true
            }
            _ => false,
        }
    }

    /// Reads the agent record: an operator's offline or maintenance set while the job
    /// runs is kept (we stop posting phase states over it) and honoured after the job.
    async fn refresh_hold(&mut self) {
        if self.hold.is_some() {
            return;
        }
        if let Ok(Some(a)) = self.client.get_agent().await {
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

    async fn fetch_attachments(&mut self) -> anyhow::Result<()> {
        if self
            .job
            .def
            .get("attachments_status")
            .and_then(Value::as_str)
            != Some("complete")
        {
            return Ok(());
        }
        let bytes = match self.client.get_attachments(&self.job.id).await {
            Ok(Some(b)) => b,
            Ok(None) => return Ok(()),
            Err(e) => {
                tracing::warn!(error = %e, "could not download the attachments");
                return Ok(());
            }
        };
        let dest = self.rundir.join("attachments");
        let r = tokio::task::spawn_blocking(move || archive::extract_attachments(&bytes, &dest))
            .await
            .context("attachment extraction panicked")?;
        if let Err(e) = r {
            tracing::warn!(error = %e, "attachments refused");
        }
        // The phases see the job without the `attachments` keys (upstream).
        if let Some(o) = self.job.def.as_object_mut() {
            for key in ["provision_data", "firmware_update_data", "test_data"] {
                if let Some(Value::Object(section)) = o.get_mut(key) {
                    section.remove("attachments");
                    if section.is_empty() {
                        o.remove(key);
                    }
                }
            }
        }
        Ok(())
    }

    fn device_info(&self) -> Option<Value> {
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
            // The hold was checked just before the claim: the first phase starts at once.
            let first = !self.started;
            self.started = true;
            if skip.is_none() && !first {
                self.refresh_hold().await;
            }
            // Upstream posts the state of every phase it enters, even one it then skips.
            self.post_result("job_state", json!({"job_state": phase.job_state()}))
                .await?;
            if skip.is_none() && self.hold.is_none() {
                self.post_agent(json!({"state": phase.as_str(), "job_id": self.job.id}))
                    .await;
            } else if first {
                self.post_agent(json!({"job_id": self.job.id})).await;
            }
            if let Some(di) = self.device_info()
                && self.device_info_sent.as_ref() != Some(&di)
            {
                self.post_result("device_info", json!({"device_info": di.clone()}))
                    .await?;
                self.device_info_sent = Some(di);
            }
            if let Some(reason) = skip {
                tracing::debug!(reason, "phase skipped");
                return Ok(None);
            }
            tracing::info!("phase starts");
            let code = self.run_command(phase).await?;
            tracing::info!(code, "phase ended");
            self.send_serial(phase).await?;
            self.status.insert(phase.as_str().to_string(), code);
            let outcome = json!({"status": self.status});
            let _ = tokio::fs::write(
                self.rundir.join("testflinger-outcome.json"),
                serde_json::to_vec(&outcome).unwrap_or_default(),
            )
            .await;
            self.post_result("status", outcome).await?;
            if code == 46 {
                self.recovery_failed().await;
            }
            if phase == Phase::Provision {
                let detail = match code {
                    0 => "provision_success",
                    46 => "recovery_fail",
                    _ => "provision_fail",
                };
                if let Err(e) = self
                    .client
                    .post_provision_log(&self.job.id, code, detail)
                    .await
                {
                    tracing::warn!(error = %e, "could not post the provision log");
                }
            }
            if phase == Phase::Allocate && code == 0 {
                self.allocated().await?;
            }
            Ok(Some(code))
        }
        .instrument(span)
        .await
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
            self.post_result("device_info", json!({"device_info": di}))
                .await?;
        }
        self.post_result("job_state", json!({"job_state": "allocated"}))
            .await?;
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
                if let Ok(Some(s)) = self.client.job_state(id).await
                    && matches!(s.as_str(), "complete" | "completed" | "cancelled")
                {
                    return Ok(());
                }
            }
            tokio::select! {
                _ = self.signals.cancel.cancelled() => return Ok(()),
                _ = self.signals.abort.cancelled() => return Ok(()),
                _ = self.signals.lost.cancelled() => return Err(LeaseLost.into()),
                _ = tokio::time::sleep(self.cfg.polling_interval()) => {}
            }
        }
    }

    fn phase_env(&self, phase: Phase) -> BTreeMap<String, String> {
        let mut env = self.env.clone();
        if phase == Phase::Test {
            env.extend(self.secrets.clone());
        }
        env
    }

    /// Runs the phase command, streaming its output; returns its exit code.
    async fn run_command(&mut self, phase: Phase) -> anyhow::Result<i32> {
        let rules = phases::rules(phase);
        let mut sink = OutputSink {
            phase,
            log_path: self.rundir.join(format!("{phase}.log")),
            pending: Vec::new(),
            masks: self.masks.clone(),
            counter: self.output_counter.clone(),
            tx: self.shipper_tx.clone(),
        };
        let line = "*".repeat(50);
        sink.push(
            format!(
                "{line}\n* Starting testflinger {phase} phase on {}\n{line}\n",
                self.cfg.agent_id
            )
            .as_bytes(),
        );
        let env = self.phase_env(phase);
        let mut proc = match PhaseProcess::spawn(self.cfg.command(phase), &self.rundir, &env) {
            Ok(p) => p,
            Err(e) => {
                sink.push(format!("\nERROR: cannot start the phase command: {e}\n").as_bytes());
                sink.flush(true);
                return Ok(100);
            }
        };
        let now = Instant::now();
        let global = rules.global_timeout.then_some(self.global_timeout);
        let output = rules.output_timeout.then_some(self.output_timeout);
        let global_deadline = global.map(|s| now + Duration::from_secs(s));
        let mut output_deadline = output.map(|s| now + Duration::from_secs(s));
        let far = now + Duration::from_secs(100 * 365 * 86400);
        let mut tick = tokio::time::interval(FLUSH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut buf = vec![0u8; 64 * 1024];
        let mut exited = None;
        let mut eof = false;
        let mut drain_deadline: Option<Instant> = None;
        let cancel = self.signals.cancel.clone();
        let lost = self.signals.lost.clone();
        let abort = self.signals.abort.clone();
        let mut stop = None;
        while !(eof && exited.is_some()) {
            let running = exited.is_none();
            tokio::select! {
                _ = lost.cancelled() => { stop = Some(Stop::Lost); break; }
                _ = abort.cancelled() => { stop = Some(Stop::Abort); break; }
                _ = cancel.cancelled(), if rules.cancellable && running => {
                    stop = Some(Stop::Cancelled); break;
                }
                _ = sleep_until(global_deadline.unwrap_or(far)), if running && global_deadline.is_some() => {
                    stop = global.map(Stop::GlobalTimeout); break;
                }
                _ = sleep_until(output_deadline.unwrap_or(far)), if running && output_deadline.is_some() => {
                    stop = output.map(Stop::OutputTimeout); break;
                }
                r = proc.output.read(&mut buf), if !eof => match r {
                    Ok(0) | Err(_) => eof = true,
                    Ok(n) => {
                        sink.push(&buf[..n]);
                        if let Some(s) = output {
                            output_deadline = Some(Instant::now() + Duration::from_secs(s));
                        }
                    }
                },
                s = proc.tree.wait(), if running => {
                    exited = Some(s.context("waiting for the phase command")?);
                    // A background child may keep the pipe open: read a little more, then go.
                    drain_deadline = Some(Instant::now() + Duration::from_secs(1));
                }
                _ = sleep_until(drain_deadline.unwrap_or(far)), if drain_deadline.is_some() => break,
                _ = tick.tick() => sink.flush(false),
            }
        }
        let status = match (stop, exited) {
            (None, Some(s)) => s,
            (Some(why), None) => {
                tracing::warn!(?why, "stopping the phase");
                sink.push(why.message().as_bytes());
                let s = proc
                    .tree
                    .kill_tree(KILL_GRACE)
                    .await
                    .context("killing the phase")?;
                // What the dying tree still wrote.
                let end = Instant::now() + Duration::from_millis(300);
                while !eof {
                    match tokio::time::timeout_at(end, proc.output.read(&mut buf)).await {
                        Ok(Ok(n)) if n > 0 => sink.push(&buf[..n]),
                        _ => eof = true,
                    }
                }
                s
            }
            (Some(_), Some(s)) => s,
            (None, None) => proc.tree.wait().await.context("waiting for the phase")?,
        };
        sink.flush(true);
        if stop == Some(Stop::Lost) {
            return Err(LeaseLost.into());
        }
        Ok(process::exit_code(status))
    }

    /// Streams `<phase>-serial.log`, written by the connector's serial logger.
    async fn send_serial(&mut self, phase: Phase) -> anyhow::Result<()> {
        let path = self.rundir.join(format!("{phase}-serial.log"));
        let Ok(data) = tokio::fs::read(&path).await else {
            return Ok(());
        };
        // Cut at character boundaries: a character across a 1 MiB cut must not turn into
        // U+FFFD on both sides.
        for chunk in testflinger_common::text::utf8_chunks(&data, SERIAL_CHUNK) {
            let fragment = Fragment {
                fragment_number: self.serial_counter,
                timestamp: now_iso(),
                phase,
                log_data: chunk,
            };
            self.serial_counter += 1;
            let r = self
                .client
                .post_log(&self.job.id, self.job.token, LogType::Serial, &fragment)
                .await;
            self.check("serial log", r)?;
        }
        Ok(())
    }

    /// Artifacts first, then the final outcome.
    async fn finish(&mut self) -> anyhow::Result<()> {
        self.close_logs().await;
        if self.signals.lost.is_cancelled() {
            return Err(LeaseLost.into());
        }
        let dir = self.rundir.join("artifacts");
        if archive::non_empty_dir(&dir) {
            let d = dir.clone();
            match tokio::task::spawn_blocking(move || archive::pack_artifacts(&d)).await {
                Ok(Ok(tarball)) => {
                    let r = self
                        .client
                        .post_artifact(&self.job.id, self.job.token, tarball)
                        .await;
                    if self.check("artifacts", r)?.is_some() {
                        let _ = tokio::fs::remove_dir_all(&dir).await;
                    }
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "could not pack the artifacts"),
                Err(e) => tracing::warn!(error = %e, "artifact packing panicked"),
            }
        }
        let mut body = Map::new();
        body.insert("job_state".into(), json!("complete"));
        body.insert("status".into(), json!(self.status));
        if let Some(di) = self.device_info() {
            body.insert("device_info".into(), di);
        }
        self.post_result("final outcome", Value::Object(body))
            .await?;
        let _ = tokio::fs::remove_dir_all(&self.rundir).await;
        self.end_agent_record().await;
        Ok(())
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

    /// Gives the job back to its queue (shutdown after the grace).
    async fn release(&mut self) -> anyhow::Result<JobEnd> {
        self.close_logs().await;
        let r = self
            .client
            .release(
                &self.job.id,
                self.job.token,
                &format!("agent {} shut down", self.cfg.agent_id),
            )
            .await;
        match r {
            Ok(()) => {
                tracing::info!("job released to its queue");
                self.end_agent_record().await;
                Ok(JobEnd::Released)
            }
            Err(ClientError::LeaseLost(_)) => Ok(JobEnd::LeaseLost),
            Err(e) => {
                // The lease runs out and the reaper requeues it: still not lost.
                tracing::error!(error = %e, "could not release the job; the reaper will requeue it");
                Ok(JobEnd::Released)
            }
        }
    }

    /// Waits for every queued log fragment to be sent.
    async fn close_logs(&mut self) {
        self.shipper_tx.take();
        if let Some(h) = self.shipper.take() {
            let _ = h.await;
        }
    }
}

/// Buffers a phase's output; each flush appends to `<phase>.log` and queues one
/// fragment for the API. Secrets are masked in both.
struct OutputSink {
    phase: Phase,
    log_path: PathBuf,
    pending: Vec<u8>,
    masks: Arc<Vec<(String, String)>>,
    counter: Arc<AtomicU64>,
    tx: Option<mpsc::UnboundedSender<(LogType, Fragment)>>,
}

/// Largest output fragment sent in one request: the API refuses bodies over 16 MiB, and
/// smaller fragments keep a fast writer's output flowing while it runs.
const FRAGMENT_MAX: usize = 1 << 20;

impl OutputSink {
    fn push(&mut self, bytes: &[u8]) {
        self.pending.extend_from_slice(bytes);
        if self.pending.len() >= FRAGMENT_MAX {
            self.flush(false);
        }
    }

    /// Sends what is buffered. Unless `all`, an incomplete UTF-8 sequence at the end, and
    /// an end that could be the start of a secret, wait for the next read, so a secret
    /// split across two reads is still masked.
    fn flush(&mut self, all: bool) {
        if self.pending.is_empty() {
            return;
        }
        let cut = if all {
            self.pending.len()
        } else {
            match std::str::from_utf8(&self.pending) {
                Ok(_) => self.pending.len(),
                Err(e) if e.error_len().is_none() => e.valid_up_to(),
                Err(_) => self.pending.len(),
            }
        };
        if cut == 0 {
            return;
        }
        let rest = self.pending.split_off(cut);
        let chunk = std::mem::replace(&mut self.pending, rest);
        let mut text = String::from_utf8_lossy(&chunk).into_owned();
        for (secret, mask) in self.masks.iter() {
            text = text.replace(secret.as_str(), mask);
        }
        if !all {
            let longest = self.masks.iter().map(|(s, _)| s.len()).max().unwrap_or(0);
            let mut keep_from = text.len().saturating_sub(longest.saturating_sub(1));
            while !text.is_char_boundary(keep_from) {
                keep_from -= 1;
            }
            // Hold back only a tail that could begin a secret.
            let tail = &text[keep_from..];
            let held = (0..tail.len())
                .filter(|&i| tail.is_char_boundary(i))
                .find(|&i| self.masks.iter().any(|(s, _)| s.starts_with(&tail[i..])))
                .map(|i| keep_from + i);
            if let Some(at) = held {
                let mut back = text.split_off(at).into_bytes();
                back.extend_from_slice(&self.pending);
                self.pending = back;
            }
        }
        if text.is_empty() {
            return;
        }
        append(&self.log_path, &text);
        if let Some(tx) = &self.tx {
            let fragment = Fragment {
                fragment_number: self.counter.fetch_add(1, Ordering::SeqCst),
                timestamp: now_iso(),
                phase: self.phase,
                log_data: text,
            };
            let _ = tx.send((LogType::Output, fragment));
        }
    }
}

fn append(path: &Path, text: &str) {
    let r = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()));
    if let Err(e) = r {
        tracing::warn!(path = %path.display(), error = %e, "cannot write the phase log");
    }
}

/// Posts fragments in order; a 409 marks the lease lost and drops the rest.
async fn ship_logs(
    client: ApiClient,
    job_id: String,
    token: u64,
    mut rx: mpsc::UnboundedReceiver<(LogType, Fragment)>,
    lost: CancellationToken,
) {
    while let Some((lt, fragment)) = rx.recv().await {
        if lost.is_cancelled() {
            continue;
        }
        match client.post_log(&job_id, token, lt, &fragment).await {
            Ok(()) => {}
            Err(ClientError::LeaseLost(m)) => {
                tracing::warn!(message = %m, "lease lost while sending output");
                lost.cancel();
            }
            Err(e) => tracing::warn!(error = %e, "an output fragment was not delivered"),
        }
    }
}

fn now_iso() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_is_masked_and_split_on_utf8_boundaries() {
        let dir = tempfile::tempdir().expect("tmp");
        let (tx, mut rx) = mpsc::unbounded_channel();
        let digest = hex::encode(Sha256::digest(b"hunter2"));
        let mask = format!("**{}**", &digest[..6]);
        let mut sink = OutputSink {
            phase: Phase::Test,
            log_path: dir.path().join("test.log"),
            pending: Vec::new(),
            masks: Arc::new(vec![("hunter2".into(), mask.clone())]),
            counter: Arc::new(AtomicU64::new(5)),
            tx: Some(tx),
        };
        let text = "password hunter2 \u{e9}";
        let bytes = text.as_bytes();
        // Cut inside the two-byte 'é'.
        sink.push(&bytes[..bytes.len() - 1]);
        sink.flush(false);
        sink.push(&bytes[bytes.len() - 1..]);
        sink.flush(false);
        let mut got = String::new();
        let mut numbers = Vec::new();
        while let Ok((lt, f)) = rx.try_recv() {
            assert_eq!(lt, LogType::Output);
            numbers.push(f.fragment_number);
            got.push_str(&f.log_data);
        }
        assert_eq!(got, format!("password {mask} \u{e9}"));
        assert_eq!(numbers, [5, 6]);
        let log = std::fs::read_to_string(dir.path().join("test.log")).expect("log");
        assert_eq!(log, got);
        assert!(!log.contains("hunter2"));
    }

    fn sink(
        dir: &Path,
        masks: Vec<(String, String)>,
    ) -> (OutputSink, mpsc::UnboundedReceiver<(LogType, Fragment)>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let sink = OutputSink {
            phase: Phase::Test,
            log_path: dir.join("test.log"),
            pending: Vec::new(),
            masks: Arc::new(masks),
            counter: Arc::new(AtomicU64::new(0)),
            tx: Some(tx),
        };
        (sink, rx)
    }

    #[test]
    fn a_secret_split_across_reads_is_still_masked() {
        let dir = tempfile::tempdir().expect("tmp");
        let (mut sink, mut rx) = sink(dir.path(), vec![("hunter2".into(), "**m**".into())]);
        sink.push(b"the password is hun");
        sink.flush(false);
        sink.push(b"ter2, done");
        sink.flush(false);
        sink.flush(true);
        let mut got = String::new();
        while let Ok((_, f)) = rx.try_recv() {
            assert!(!f.log_data.contains("hun") || !f.log_data.contains("hunter2"));
            got.push_str(&f.log_data);
        }
        assert_eq!(got, "the password is **m**, done");
    }

    #[test]
    fn a_fast_writer_is_sent_in_bounded_fragments() {
        let dir = tempfile::tempdir().expect("tmp");
        let (mut sink, mut rx) = sink(dir.path(), Vec::new());
        let block = vec![b'y'; 64 * 1024];
        for _ in 0..(5 * 16) {
            sink.push(&block); // 5 MiB without a tick
        }
        sink.flush(true);
        let mut total = 0;
        let mut count = 0;
        while let Ok((_, f)) = rx.try_recv() {
            assert!(
                f.log_data.len() <= FRAGMENT_MAX + 64 * 1024,
                "{}",
                f.log_data.len()
            );
            total += f.log_data.len();
            count += 1;
        }
        assert_eq!(total, 5 << 20);
        assert!(count >= 5);
    }
}
