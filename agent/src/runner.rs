//! Runs one claimed job: the run directory, the phases in order with cleanup always,
//! output streamed to the API as fragments, results, artifacts, the final outcome.
//!
//! Every write about the job goes through its [`Spool`] (disk first, then the API, in
//! order, retried while the API is away) and carries the job's fencing token; the first
//! 409 (lease lost) stops the job at once and nothing more is written about it. When the
//! agent's own lease clock runs out ([`JobSignals::expired`]) the phase is killed, no
//! other phase of the job runs, and the job is released after its output is delivered.
//! The run directory is removed only once the final outcome was delivered.

use crate::archive;
use crate::client::{ApiClient, Fragment};
use crate::config::Config;
use crate::phases::{self, ORDER};
use crate::process::{self, PhaseProcess, Watchdog};
use crate::spool::{self, Delivered, Entry, Meta, Spool};
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
use tokio::sync::watch;
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
/// After a phase's command exited and its drain second ran out: output already in the
/// pipe is still read, until it stays quiet this long ...
const DRAIN_QUIET: Duration = Duration::from_millis(50);
/// ... or this much was read (a background child printing forever cannot hold the job).
const DRAIN_MAX: usize = 4 << 20;
/// How long a stopped reserve or cleanup phase has to undo its changes on the device.
const UNDO_GRACE: Duration = Duration::from_secs(30);
/// Serial logs are sent in chunks of this size.
const SERIAL_CHUNK: usize = 1024 * 1024;
/// How long a shutting-down agent keeps delivering the spool before it leaves the rest
/// on disk for its next start.
const SHUTDOWN_DRAIN: Duration = Duration::from_secs(10);
/// Look-ups between phases (cancel, agent state): short, so an unreachable API cannot
/// hold the job longer than the lease clock allows.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a phase's start waits for the API to have the job's new state.
const STATE_WAIT: Duration = Duration::from_secs(2);
/// Between SIGTERM and SIGKILL when the watchdog or the start-up sweep ends a phase.
pub const ORPHAN_GRACE: Duration = Duration::from_secs(1);

/// A job this agent holds a lease on.
#[derive(Debug, Clone)]
pub struct ClaimedJob {
    pub id: String,
    pub queue: String,
    pub token: testflinger_common::protocol::FenceToken,
    pub attempt: u64,
    pub lease_ttl: u64,
    /// When the claim that granted the lease was sent: the lease counts from here.
    pub claimed_at: Instant,
    /// The job as the claim handed it out (with `job_id`, secrets resolved).
    pub def: Value,
}

/// What stops a job from the outside.
#[derive(Debug, Clone)]
pub struct JobSignals {
    /// The job was cancelled (control queue or heartbeat answer).
    pub cancel: CancellationToken,
    /// The lease is gone (409): stop, write nothing more.
    pub lost: CancellationToken,
    /// The agent is shutting down and the grace is over: kill and release the job.
    pub abort: CancellationToken,
    /// The agent's own lease clock ran out (no successful renewal for the lease minus a
    /// margin): kill the phase, run no other phase, deliver the output, release.
    pub expired: CancellationToken,
    /// When the lease, as the agent last renewed it, runs out (minus the margin). The
    /// heartbeat moves it; the watchdog is told.
    pub lease: watch::Receiver<Instant>,
}

impl JobSignals {
    /// Signals for a job whose lease (minus the margin) runs out at `deadline`; the
    /// sender moves that deadline.
    pub fn new(deadline: Instant) -> (JobSignals, watch::Sender<Instant>) {
        let (tx, rx) = watch::channel(deadline);
        (
            JobSignals {
                cancel: CancellationToken::new(),
                lost: CancellationToken::new(),
                abort: CancellationToken::new(),
                expired: CancellationToken::new(),
                lease: rx,
            },
            tx,
        )
    }
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
    /// The agent gave the lease up (its clock ran out): the phase was killed, the
    /// output delivered and the job released.
    GaveUp,
    /// The agent shut down before the spool was delivered: it stays on disk and the
    /// next start delivers it.
    Undelivered,
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
    /// The job could not run for a local reason (it was released): let other agents
    /// have a go before taking the next one.
    pub failed: bool,
}

/// Why a phase was stopped before it ended by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    GlobalTimeout(u64),
    OutputTimeout(u64),
    Cancelled,
    Abort,
    Lost,
    Expired,
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
            Stop::Expired => {
                "\nERROR: the lease on this job was lost (the API could not be reached to renew it); stopping.\n".into()
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the lease on the job was lost")]
struct LeaseLost;

#[derive(Debug, thiserror::Error)]
#[error("the lease on the job ran out on the agent's clock")]
struct LeaseExpired;

/// Runs a claimed job to its end, delivery of its spool included. `Err` only for local
/// failures that prevent running it at all (the run directory or the spool cannot be
/// created); the caller releases the job then.
pub async fn run_job(
    cfg: Arc<Config>,
    client: ApiClient,
    watchdog: Watchdog,
    job: ClaimedJob,
    signals: JobSignals,
) -> anyhow::Result<JobReport> {
    let span =
        tracing::info_span!("job", job.id = %job.id, job.queue = %job.queue, attempt = job.attempt);
    async move {
        let mut run = Run::prepare(cfg, client, watchdog, job, signals).await?;
        let end = match run.execute().await {
            Ok(end) => end,
            Err(e) if e.is::<LeaseLost>() => {
                run.forget();
                JobEnd::LeaseLost
            }
            Err(e) if e.is::<LeaseExpired>() => run.give_up().await,
            Err(e) => {
                // Whatever was spooled still goes out, then the release.
                tracing::error!(error = ?e, "cannot run the job; releasing it");
                let end = run
                    .release_for(format!("agent error: {e}"), JobEnd::Released)
                    .await;
                return Ok(JobReport {
                    end,
                    hold: run.hold.clone(),
                    failed: true,
                });
            }
        };
        Ok(JobReport {
            end,
            hold: run.hold.clone(),
            failed: false,
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
    spool: Spool,
    shipper: Option<tokio::task::JoinHandle<Delivered>>,
    watchdog: Watchdog,
    /// For look-ups and agent-record updates: few, short tries.
    quick: ApiClient,
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
        watchdog: Watchdog,
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

        let meta = Meta {
            job_id: job.id.clone(),
            token: job.token,
            attempt: job.attempt,
            lease_ttl: job.lease_ttl,
        };
        let dir = Spool::dir_for(&cfg.results_dir(), &cfg.agent_id, &job.id);
        let (spool, pending) = Spool::create(dir.clone(), &meta)
            .with_context(|| format!("cannot create the spool {}", dir.display()))?;
        let shipper = tokio::spawn(
            spool::deliver(
                client.clone(),
                meta,
                spool.clone(),
                pending,
                signals.lost.clone(),
            )
            .in_current_span(),
        );
        Ok(Run {
            quick: client.quick(2, LOOKUP_TIMEOUT),
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
            spool,
            shipper: Some(shipper),
            watchdog,
            hold: None,
            global_timeout,
            output_timeout,
            device_info_sent: None,
            started: false,
        })
    }

    /// Spools a write about the job; `Err` once the lease is lost.
    fn post_result(&self, what: &str, body: Value) -> anyhow::Result<()> {
        self.push(what, &Entry::Result { body, last: false })
            .map(|_| ())
    }

    fn push(&self, what: &str, entry: &Entry) -> anyhow::Result<Option<u64>> {
        if self.signals.lost.is_cancelled() {
            return Err(LeaseLost.into());
        }
        match self.spool.push(entry) {
            Ok(seq) => Ok(Some(seq)),
            Err(e) => {
                tracing::error!(what, error = %e, "cannot spool a write about the job; it is lost");
                Ok(None)
            }
        }
    }

    /// Spools the job's new state and waits (at most [`STATE_WAIT`]) until the API has
    /// it: a phase's start is what users wait for, so it goes before the agent's own
    /// calls; an unreachable API costs this wait once per phase.
    async fn post_state(&self, state: &str) -> anyhow::Result<()> {
        let body = json!({ "job_state": state });
        if let Some(seq) = self.push("job_state", &Entry::Result { body, last: false })? {
            tokio::select! {
                _ = self.spool.wait_delivered(seq, STATE_WAIT) => {}
                _ = self.signals.lost.cancelled() => return Err(LeaseLost.into()),
            }
        }
        Ok(())
    }

    async fn post_agent(&self, body: Value) {
        if let Err(e) = self.quick.post_agent(&body).await {
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
    async fn refresh_hold(&mut self) {
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
        // Downloaded to disk, then unpacked from disk: never whole in memory.
        let download = self.rundir.join("attachments.tar.gz");
        match self
            .client
            .get_attachments_to(&self.job.id, &download)
            .await
        {
            Ok(true) => {
                let dest = self.rundir.join("attachments");
                let limits = self.cfg.archive_limits();
                let archive = download.clone();
                let r = tokio::task::spawn_blocking(move || {
                    archive::unpack_attachments(&archive, &dest, limits)
                })
                .await
                .context("attachment extraction panicked")?;
                match r {
                    Ok(s) => {
                        tracing::info!(
                            files = s.files,
                            bytes = s.file_bytes,
                            "attachments unpacked"
                        )
                    }
                    Err(e) => tracing::warn!(
                        error = %e,
                        "attachments refused; the job runs without them"
                    ),
                }
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "could not download the attachments"),
        }
        let _ = tokio::fs::remove_file(&download).await;
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
            self.post_state(phase.job_state().as_str()).await?;
            if skip.is_none() && self.hold.is_none() {
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
            spool: Some(self.spool.clone()),
        };
        let line = "*".repeat(50);
        sink.push(
            format!(
                "{line}\n* Starting testflinger {phase} phase on {}\n{line}\n",
                self.cfg.agent_id
            )
            .as_bytes(),
        );
        let mut env = self.phase_env(phase);
        let marker = uuid::Uuid::new_v4().simple().to_string();
        env.insert(process::MARKER_ENV.to_string(), marker.clone());
        let mut proc = match PhaseProcess::spawn(self.cfg.command(phase), &self.rundir, &env) {
            Ok(p) => p,
            Err(e) => {
                sink.push(format!("\nERROR: cannot start the phase command: {e}\n").as_bytes());
                sink.flush(true);
                return Ok(100);
            }
        };
        // The phase dies with the agent: a record for the next start's sweep, and a
        // watchdog that outlives a crash or a freeze of the agent.
        let pgid = proc.tree.pgid();
        let record = process::record_path(&self.rundir, phase.as_str());
        if let Err(e) = process::write_record(&record, pgid, &marker, &self.cfg.agent_id) {
            tracing::warn!(error = %e, "cannot record the phase's process group");
        }
        let mut lease = self.signals.lease.clone();
        let mut lease_open = true;
        let left = lease_left(*lease.borrow_and_update());
        let watched = match self.watchdog.watch(pgid, left).await {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(error = %e, "cannot start the watchdog: the phase would outlive an agent crash");
                false
            }
        };
        let expired = self.signals.expired.clone();
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
        let spool = self.spool.clone();
        let spool_max = self.cfg.spool_max_bytes;
        let mut held = false;
        while !(eof && exited.is_some()) {
            let running = exited.is_none();
            // Backpressure: past `spool_max_bytes` waiting for the API, the output is not
            // read (the phase blocks on its pipe) and its silence is not counted. Once
            // the phase exited, what is left in the pipe is read regardless.
            let full = running && spool.backlog() > spool_max;
            if full && !held {
                tracing::warn!(
                    backlog = spool.backlog(),
                    spool_max_bytes = spool_max,
                    "the API is behind on this job's writes; the phase's output waits"
                );
            }
            held = full;
            tokio::select! {
                _ = lost.cancelled() => { stop = Some(Stop::Lost); break; }
                _ = expired.cancelled() => { stop = Some(Stop::Expired); break; }
                _ = abort.cancelled() => { stop = Some(Stop::Abort); break; }
                r = lease.changed(), if watched && lease_open => match r {
                    Ok(()) => {
                        let left = lease_left(*lease.borrow_and_update());
                        self.watchdog.extend(left).await;
                    }
                    // The heartbeat is gone: the watchdog's last deadline stands.
                    Err(_) => lease_open = false,
                },
                _ = cancel.cancelled(), if rules.cancellable && running => {
                    stop = Some(Stop::Cancelled); break;
                }
                _ = sleep_until(global_deadline.unwrap_or(far)), if running && global_deadline.is_some() => {
                    stop = global.map(Stop::GlobalTimeout); break;
                }
                _ = sleep_until(output_deadline.unwrap_or(far)), if running && output_deadline.is_some() && !full => {
                    stop = output.map(Stop::OutputTimeout); break;
                }
                _ = spool.wait_backlog_below(spool_max), if full && !eof => {
                    tracing::info!("the API caught up; reading the phase's output again");
                    if let Some(s) = output {
                        output_deadline = Some(Instant::now() + Duration::from_secs(s));
                    }
                }
                r = proc.output.read(&mut buf), if !eof && !full => match r {
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
            (None, Some(s)) => {
                // Gone past the drain deadline with the pipe still open (a background
                // child holds it): what is already written is kept, even when this task
                // was not scheduled between the deadline and the data (a loaded machine).
                let mut taken = 0usize;
                while !eof && taken < DRAIN_MAX {
                    match tokio::time::timeout(DRAIN_QUIET, proc.output.read(&mut buf)).await {
                        Ok(Ok(n)) if n > 0 => {
                            sink.push(&buf[..n]);
                            taken += n;
                        }
                        Ok(_) => eof = true,
                        Err(_) => break,
                    }
                }
                s
            }
            (Some(why), None) => {
                tracing::warn!(?why, "stopping the phase");
                sink.push(why.message().as_bytes());
                // Reserve and cleanup undo what they did to the device (keys, a VM):
                // they get longer to finish than a test does.
                let grace = if matches!(phase, Phase::Reserve | Phase::Cleanup) {
                    UNDO_GRACE
                } else {
                    KILL_GRACE
                };
                let s = proc
                    .tree
                    .kill_tree(grace)
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
        if watched {
            self.watchdog.done().await;
        }
        let _ = std::fs::remove_file(&record);
        sink.flush(true);
        match stop {
            Some(Stop::Lost) => return Err(LeaseLost.into()),
            Some(Stop::Expired) => return Err(LeaseExpired.into()),
            _ => {}
        }
        Ok(process::exit_code(status))
    }

    /// Streams `<phase>-serial.log`, written by the connector's serial logger.
    async fn send_serial(&mut self, phase: Phase) -> anyhow::Result<()> {
        use tokio::io::AsyncReadExt;
        let path = self.rundir.join(format!("{phase}-serial.log"));
        let Ok(mut file) = tokio::fs::File::open(&path).await else {
            return Ok(());
        };
        // Read in pieces (a serial log can be larger than memory), cut at character
        // boundaries: a character across a 1 MiB cut must not turn into U+FFFD on both
        // sides. More than SERIAL_CHUNK bytes stay buffered until the end, so the cuts
        // are those of `utf8_chunks` over the whole file.
        let mut buf: Vec<u8> = Vec::with_capacity(2 * SERIAL_CHUNK);
        let mut eof = false;
        loop {
            while !eof && buf.len() <= SERIAL_CHUNK {
                let want = (2 * SERIAL_CHUNK - buf.len()) as u64;
                match (&mut file).take(want).read_to_end(&mut buf).await {
                    Ok(n) => eof = n == 0,
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "cannot read the rest of the serial log");
                        eof = true;
                    }
                }
            }
            if buf.is_empty() {
                break;
            }
            let cut = testflinger_common::text::utf8_cut(&buf, SERIAL_CHUNK);
            let chunk = String::from_utf8_lossy(&buf[..cut]).into_owned();
            buf.drain(..cut);
            let fragment = Fragment {
                fragment_number: self.serial_counter,
                timestamp: now_iso(),
                phase,
                log_data: chunk,
            };
            self.serial_counter += 1;
            self.push(
                "serial log",
                &Entry::Log {
                    log_type: LogType::Serial,
                    fragment,
                },
            )?;
        }
        Ok(())
    }

    /// Artifacts first, then the final outcome; the run directory goes once the API
    /// has them.
    async fn finish(&mut self) -> anyhow::Result<JobEnd> {
        if self.signals.lost.is_cancelled() {
            return Err(LeaseLost.into());
        }
        let dir = self.rundir.join("artifacts");
        if archive::non_empty_dir(&dir) {
            // Packed into a file in the spool, uploaded streaming from it.
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
    async fn release(&mut self) -> anyhow::Result<JobEnd> {
        let reason = format!("agent {} shut down", self.cfg.agent_id);
        Ok(self.release_for(reason, JobEnd::Released).await)
    }

    /// The agent's lease clock ran out: the phase was killed; deliver what it wrote,
    /// then release the job (when the API still knows this lease, it requeues it at
    /// once; otherwise it answers 409 and the job is someone else's already).
    async fn give_up(&mut self) -> JobEnd {
        tracing::warn!(
            "lease lost on the agent's clock; the phase was stopped; delivering its output, then releasing the job"
        );
        let reason = format!(
            "agent {}: lease lost (no renewal in time); the phase was stopped",
            self.cfg.agent_id
        );
        self.release_for(reason, JobEnd::GaveUp).await
    }

    async fn release_for(&mut self, reason: String, end: JobEnd) -> JobEnd {
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
    fn forget(&mut self) {
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

/// Buffers a phase's output; each flush appends to `<phase>.log` and spools one
/// fragment for the API. Secrets are masked in both.
struct OutputSink {
    phase: Phase,
    log_path: PathBuf,
    pending: Vec<u8>,
    masks: Arc<Vec<(String, String)>>,
    counter: Arc<AtomicU64>,
    spool: Option<Spool>,
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
        if let Some(spool) = &self.spool {
            let fragment = Fragment {
                fragment_number: self.counter.fetch_add(1, Ordering::SeqCst),
                timestamp: now_iso(),
                phase: self.phase,
                log_data: text,
            };
            let entry = Entry::Log {
                log_type: LogType::Output,
                fragment,
            };
            if let Err(e) = spool.push(&entry) {
                tracing::error!(error = %e, "cannot spool an output fragment; it is lost");
            }
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

/// Time left until `deadline` (zero when past).
fn lease_left(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

fn now_iso() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A spool in `dir` and a way to read back what was spooled, in order.
    fn test_spool(dir: &Path) -> (Spool, impl FnMut() -> Vec<(LogType, Fragment)>) {
        let sdir = dir.join("spool");
        let meta = Meta {
            job_id: "j".into(),
            token: testflinger_common::protocol::FenceToken::from_bytes([1; 16]),
            attempt: 1,
            lease_ttl: 30,
        };
        let (spool, mut rx) = Spool::create(sdir.clone(), &meta).expect("spool");
        let read = move || {
            let mut out = Vec::new();
            while let Some(seq) = rx.try_recv() {
                let path = sdir.join(format!("{seq:012}.json"));
                let bytes = std::fs::read(&path).expect("entry");
                if let Ok(Entry::Log { log_type, fragment }) = serde_json::from_slice(&bytes) {
                    out.push((log_type, fragment));
                }
            }
            out
        };
        (spool, read)
    }

    #[test]
    fn output_is_masked_and_split_on_utf8_boundaries() {
        let dir = tempfile::tempdir().expect("tmp");
        let (spool, mut read) = test_spool(dir.path());
        let digest = hex::encode(Sha256::digest(b"hunter2"));
        let mask = format!("**{}**", &digest[..6]);
        let mut sink = OutputSink {
            phase: Phase::Test,
            log_path: dir.path().join("test.log"),
            pending: Vec::new(),
            masks: Arc::new(vec![("hunter2".into(), mask.clone())]),
            counter: Arc::new(AtomicU64::new(5)),
            spool: Some(spool),
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
        for (lt, f) in read() {
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
    ) -> (OutputSink, impl FnMut() -> Vec<(LogType, Fragment)>) {
        let (spool, read) = test_spool(dir);
        let sink = OutputSink {
            phase: Phase::Test,
            log_path: dir.join("test.log"),
            pending: Vec::new(),
            masks: Arc::new(masks),
            counter: Arc::new(AtomicU64::new(0)),
            spool: Some(spool),
        };
        (sink, read)
    }

    #[test]
    fn a_secret_split_across_reads_is_still_masked() {
        let dir = tempfile::tempdir().expect("tmp");
        let (mut sink, mut read) = sink(dir.path(), vec![("hunter2".into(), "**m**".into())]);
        sink.push(b"the password is hun");
        sink.flush(false);
        sink.push(b"ter2, done");
        sink.flush(false);
        sink.flush(true);
        let mut got = String::new();
        for (_, f) in read() {
            assert!(!f.log_data.contains("hun") || !f.log_data.contains("hunter2"));
            got.push_str(&f.log_data);
        }
        assert_eq!(got, "the password is **m**, done");
    }

    #[test]
    fn a_fast_writer_is_sent_in_bounded_fragments() {
        let dir = tempfile::tempdir().expect("tmp");
        let (mut sink, mut read) = sink(dir.path(), Vec::new());
        let block = vec![b'y'; 64 * 1024];
        for _ in 0..(5 * 16) {
            sink.push(&block); // 5 MiB without a tick
        }
        sink.flush(true);
        let mut total = 0;
        let mut count = 0;
        for (_, f) in read() {
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
