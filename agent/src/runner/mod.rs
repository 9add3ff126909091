//! Runs one claimed job: the run directory, the phases in order with cleanup always,
//! output streamed to the API as fragments, results, artifacts, the final outcome.
//!
//! Every write about the job goes through its [`Spool`] (disk first, then the API, in
//! order, retried while the API is away) and carries the job's fencing token; the first
//! 409 (lease lost) stops the job at once and nothing more is written about it. When the
//! agent's own lease clock runs out ([`JobSignals::expired`]) the phase is killed, no
//! other phase of the job runs, and the job is released after its output is delivered.
//! The run directory is removed only once the final outcome was delivered.
//!
//! By concern, each a part of `Run`:
//! - `setup`: the run directory, secrets and their masks, the timeouts, the spool and
//!   its delivery task, the attachments;
//! - `sequence`: which phases run, in order, and what is reported around each (job
//!   and agent state, status, provision log, allocation, cancel and hold);
//! - `supervise`: one phase's process: started in its own group, recorded for the
//!   sweep, handed to the watchdog, watched against the timeouts and the job's signals,
//!   stopped;
//! - `output`: the phase's output and serial log: buffered, masked, cut into fragments,
//!   read to the end after the command exits;
//! - `outcome`: artifacts, the final outcome or the release, delivery of the spool.

mod outcome;
mod output;
mod sequence;
mod setup;
mod supervise;

use crate::client::ApiClient;
use crate::config::Config;
use crate::process::Watchdog;
use crate::spool::{Delivered, Entry, Spool};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

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
}

/// Time left until `deadline` (zero when past).
fn lease_left(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

fn now_iso() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}
