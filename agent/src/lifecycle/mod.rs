//! The agent's life: kill what a previous run left (the sweep) and deliver what its
//! spools hold, register, consume the job queues (one channel, prefetch 1 per
//! consumer), claim each delivery through the API, run what is granted with a
//! heartbeat and the agent's own lease clock, honour the operator's offline/maintenance,
//! listen for cancels on the control queue, and shut down without dropping a job
//! (marking the agent offline in its record).
//!
//! Lease clock: each heartbeat call waits at most [`heartbeat_timeout`] (a fifth of the
//! lease); the lease counts from when the last successful renewal was *sent*; once
//! now > that + lease - [`lease_margin`], the agent stops the phase itself ("lease
//! lost"), runs no other phase of the job, delivers its output and releases it.

use crate::client::{ApiClient, ClientError};
use crate::config::Config;
use crate::process::{self, Watchdog};
use crate::runner::{self, JobSignals};
use crate::spool::{self, Delivered, Entry, Spool};
use serde_json::{Value, json};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use testflinger_broker::{Broker, BrokerConfig, Consumer};
use testflinger_common::AgentState;
use testflinger_common::protocol::ControlCommand;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

mod delivery;
mod lease;

pub use delivery::{job_id_from, job_id_of};
use lease::heartbeat_loop;
pub use lease::{heartbeat_timeout, lease_margin};

/// How often an idle agent refreshes its records on the server.
const REFRESH_EVERY: Duration = Duration::from_secs(6 * 3600);
/// The comment of the agent record while the agent is stopped (SIGTERM/SIGINT); unlike
/// an operator's offline, the next start clears it.
pub const STOPPED_COMMENT: &str = "testflinger-agent stopped; it is back when it starts again";

/// The job being run, so the control queue can cancel it.
type Current = Arc<Mutex<Option<(String, CancellationToken)>>>;

/// Runs the agent until `shutdown` resolves. A job running then may go on for the
/// configured grace; after it, the job is killed and released to its queue.
///
/// Fails when the broker settings are malformed; the API and the broker being down
/// are waited out.
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let stop = CancellationToken::new();
    let stopper = stop.clone();
    let agent = Agent::new(Arc::new(cfg), stop.clone())?;
    let main = agent.main_loop();
    tokio::pin!(main);
    tokio::select! {
        r = &mut main => return r,
        _ = shutdown => {
            tracing::info!("shutdown requested");
            stopper.cancel();
        }
    }
    let r = main.await;
    agent.mark_offline().await;
    r
}

struct Agent {
    cfg: Arc<Config>,
    client: ApiClient,
    broker: Broker,
    stop: CancellationToken,
    current: Current,
    recheck: Arc<Notify>,
    watchdog: Watchdog,
}

impl Agent {
    fn new(cfg: Arc<Config>, stop: CancellationToken) -> anyhow::Result<Agent> {
        let client = ApiClient::new(&cfg.server_address, &cfg.agent_id)?
            .with_token_file(cfg.token_file.as_deref())?;
        // One connection is plenty for one device, and keeps the agent small.
        let mut bcfg = BrokerConfig::new(cfg.amqp_uri());
        bcfg.connections = 1;
        bcfg.queue_type = cfg.queue_type();
        let broker = Broker::new(bcfg)?;
        Ok(Agent {
            cfg,
            client,
            broker,
            stop,
            current: Arc::new(Mutex::new(None)),
            recheck: Arc::new(Notify::new()),
            watchdog: Watchdog::new(runner::ORPHAN_GRACE),
        })
    }

    async fn main_loop(&self) -> anyhow::Result<()> {
        // First of all, before waiting for anything: no phase of a previous run may go
        // on while this one starts.
        let basedir = self.cfg.execution_basedir.clone();
        let me = self.cfg.agent_id.clone();
        let left = match tokio::task::spawn_blocking(move || {
            let dirs = process::run_dirs_of(&basedir, &me);
            (process::sweep(&basedir, &me, runner::ORPHAN_GRACE), dirs)
        })
        .await
        {
            Ok((n, dirs)) => {
                if n > 0 {
                    tracing::warn!(groups = n, "killed phases a previous run left");
                }
                dirs
            }
            Err(e) => {
                tracing::error!(error = %e, "the start-up sweep failed");
                Vec::new()
            }
        };
        self.undo_reservations(&left).await;
        if !self.register().await {
            return Ok(());
        }
        self.recover().await;
        if self.stop.is_cancelled() {
            return Ok(());
        }
        let control = tokio::spawn(control_loop(
            self.broker.clone(),
            self.cfg.agent_id.clone(),
            self.current.clone(),
            self.recheck.clone(),
            self.stop.clone(),
        ));
        let r = self.consume_loop().await;
        control.abort();
        r
    }

    /// A reservation that a crash cut short may have left its keys on the device (the
    /// connector records them in `reservation-keys.json` in the run directory): for each
    /// run directory of a previous run that still holds such a record, runs the agent's
    /// `cleanup_command` there, whose connector removes the recorded keys. Bounded to
    /// two minutes each.
    async fn undo_reservations(&self, dirs: &[std::path::PathBuf]) {
        let cmd = self.cfg.cleanup_command.trim();
        if cmd.is_empty() {
            return;
        }
        for dir in dirs {
            if !dir.join("reservation-keys.json").exists() {
                continue;
            }
            tracing::warn!(dir = %dir.display(), "a reservation a previous run left: running cleanup_command to remove its keys");
            let run = tokio::process::Command::new("/bin/sh")
                .arg("-c")
                .arg(cmd)
                .current_dir(dir)
                .stdin(std::process::Stdio::null())
                .kill_on_drop(true)
                .output();
            match tokio::time::timeout(Duration::from_secs(120), run).await {
                Ok(Ok(out)) if out.status.success() => {
                    tracing::info!(dir = %dir.display(), "reservation keys of a previous run removed");
                }
                Ok(Ok(out)) => tracing::error!(
                    dir = %dir.display(),
                    code = ?out.status.code(),
                    output = %String::from_utf8_lossy(&out.stdout),
                    error = %String::from_utf8_lossy(&out.stderr),
                    "cleanup_command failed: the reservation's keys may remain on the device"
                ),
                Ok(Err(e)) => tracing::error!(error = %e, "cannot run cleanup_command"),
                Err(_) => {
                    tracing::error!(dir = %dir.display(), "cleanup_command did not finish within 120 s")
                }
            }
        }
    }

    /// Waits for the API, then registers. Keeps an operator's offline or maintenance
    /// (upstream's restart clears it). `false` when shut down first.
    async fn register(&self) -> bool {
        let mut delay = Duration::from_millis(500);
        loop {
            match self.try_register().await {
                Ok(()) => return true,
                Err(e) => tracing::warn!(error = %e, "cannot register with the API; retrying"),
            }
            if self.pause(delay).await {
                return false;
            }
            delay = (delay * 2).min(Duration::from_secs(30));
        }
    }

    async fn try_register(&self) -> Result<(), ClientError> {
        let c = &self.cfg;
        // An operator's offline or maintenance stays; our own "stopped" mark goes.
        let held = self
            .client
            .get_agent()
            .await?
            .filter(|a| a.get("comment").and_then(Value::as_str) != Some(STOPPED_COMMENT))
            .and_then(|a| a.get("state").and_then(Value::as_str).map(str::to_string))
            .filter(|s| s.parse::<AgentState>().is_ok_and(|s| s.blocks_jobs()));
        let mut body = json!({
            "queues": c.job_queues,
            "location": c.location.clone().unwrap_or_default(),
            "provision_type": c.provision_type.clone().unwrap_or_default(),
            "job_id": "",
        });
        if let Some(id) = &c.identifier {
            body["identifier"] = json!(id);
        }
        match &held {
            Some(state) => tracing::warn!(%state, "the agent is held by an operator; keeping it"),
            None => {
                body["state"] = json!("waiting");
                body["comment"] = json!("");
            }
        }
        self.client.post_agent(&body).await?;
        self.advertise().await?;
        tracing::info!(agent = %c.agent_id, queues = ?c.job_queues, "registered");
        Ok(())
    }

    async fn advertise(&self) -> Result<(), ClientError> {
        if !self.cfg.advertised_queues.is_empty() {
            self.client
                .post_queues(&json!(self.cfg.advertised_queues))
                .await?;
        }
        if !self.cfg.advertised_images.is_empty() {
            self.client
                .post_images(&json!(self.cfg.advertised_images))
                .await?;
        }
        Ok(())
    }

    /// Delivers what the spools of a previous run hold (its phases were swept): output,
    /// then the final outcome if it was spooled, else a release so the job runs again
    /// at once. Heartbeats keep the lease meanwhile; a 409 drops a spool (the job is
    /// someone else's). Returns early on shutdown, leaving the rest on disk.
    async fn recover(&self) {
        for dir in spool::leftovers(&self.cfg.results_dir(), &self.cfg.agent_id) {
            if self.stop.is_cancelled() {
                return;
            }
            let Some((meta, spool, pending)) = Spool::reopen(dir.clone()) else {
                continue;
            };
            let span = tracing::info_span!("recovery", job.id = %meta.job_id);
            let done = async {
                if !spool.has_terminal() {
                    let reason = format!(
                        "agent {} restarted; the job's phase did not survive it",
                        self.cfg.agent_id
                    );
                    if let Err(e) = spool.push(&Entry::Release { reason }) {
                        tracing::warn!(error = %e, "cannot spool the release; the reaper requeues the job");
                    }
                }
                spool.close();
                tracing::info!("delivering what a previous run left");
                let lease = Duration::from_secs(meta.lease_ttl.max(1));
                let now = Instant::now();
                let (signals, lease_tx) = JobSignals::new(now + lease - lease_margin(lease));
                let heartbeat = tokio::spawn(heartbeat_loop(
                    self.client.clone(),
                    meta.job_id.clone(),
                    meta.token,
                    meta.lease_ttl,
                    signals.clone(),
                    lease_tx,
                    now,
                ));
                let job_id = meta.job_id.clone();
                let delivery = spool::deliver(
                    self.client.clone(),
                    meta,
                    spool.clone(),
                    pending,
                    signals.lost,
                );
                let r = tokio::select! {
                    r = delivery => Some(r),
                    _ = self.stop.cancelled() => None,
                };
                heartbeat.abort();
                match r {
                    Some(Delivered::All) => tracing::info!("delivered"),
                    Some(Delivered::LeaseLost) => {
                        tracing::info!("lease lost; the job is someone else's now")
                    }
                    None => return false,
                }
                let _ = tokio::fs::remove_dir_all(self.cfg.execution_basedir.join(&job_id)).await;
                true
            }
            .instrument(span)
            .await;
            if !done {
                return;
            }
        }
    }

    /// On shutdown: the record says `offline` (with [`STOPPED_COMMENT`]) until the
    /// agent starts again, unless an operator holds it already. Best effort, bounded.
    async fn mark_offline(&self) {
        let quick = self.client.quick(2, Duration::from_secs(3));
        if let Ok(Some(a)) = quick.get_agent().await
            && a.get("comment").and_then(Value::as_str) != Some(STOPPED_COMMENT)
            && a.get("state")
                .and_then(Value::as_str)
                .and_then(|s| s.parse::<AgentState>().ok())
                .is_some_and(|s| s.blocks_jobs())
        {
            return;
        }
        let body = json!({"state": "offline", "comment": STOPPED_COMMENT, "job_id": ""});
        match quick.post_agent(&body).await {
            Ok(()) => tracing::info!("agent marked offline"),
            Err(e) => tracing::warn!(error = %e, "could not mark the agent offline"),
        }
    }

    /// Re-posts the agent's queues and location (not its state) and the advertised
    /// queues and images.
    async fn refresh_records(&self) -> Result<(), ClientError> {
        let c = &self.cfg;
        self.client
            .post_agent(&json!({
                "queues": c.job_queues,
                "location": c.location.clone().unwrap_or_default(),
                "provision_type": c.provision_type.clone().unwrap_or_default(),
            }))
            .await?;
        self.advertise().await
    }

    /// Sleeps, or returns `true` early when the agent shuts down.
    async fn pause(&self, d: Duration) -> bool {
        tokio::select! {
            _ = self.stop.cancelled() => true,
            _ = tokio::time::sleep(d) => self.stop.is_cancelled(),
        }
    }

    /// Whether an operator (or a recovery failure) holds the agent.
    async fn held(&self) -> Result<bool, ClientError> {
        Ok(self
            .client
            .get_agent()
            .await?
            .and_then(|a| a.get("state").and_then(Value::as_str).map(str::to_string))
            .and_then(|s| s.parse::<AgentState>().ok())
            .is_some_and(|s| s.blocks_jobs()))
    }

    async fn consume_loop(&self) -> anyhow::Result<()> {
        let mut consumer: Option<Consumer> = None;
        let mut broker_delay = Duration::from_millis(200);
        let mut paused = false;
        let mut refreshed = tokio::time::Instant::now();
        while !self.stop.is_cancelled() {
            // Keep the agent and queue records fresh (they expire after the retention).
            if refreshed.elapsed() >= REFRESH_EVERY {
                refreshed = tokio::time::Instant::now();
                if let Err(e) = self.refresh_records().await {
                    tracing::warn!(error = %e, "could not refresh the agent's records");
                }
            }
            if !self.may_take_jobs(&mut consumer, &mut paused).await {
                self.wait_for_recheck().await;
                continue;
            }
            let c = match consumer.as_mut() {
                Some(c) => c,
                None => {
                    let tag = format!("agent-{}", self.cfg.agent_id);
                    match self.broker.consume(&self.cfg.job_queues, 1, &tag).await {
                        Ok(c) => {
                            broker_delay = Duration::from_millis(200);
                            consumer.insert(c)
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot consume the job queues; retrying");
                            if self.pause(broker_delay).await {
                                break;
                            }
                            broker_delay = (broker_delay * 2).min(Duration::from_secs(10));
                            continue;
                        }
                    }
                }
            };
            let next = tokio::select! {
                _ = self.stop.cancelled() => break,
                _ = self.recheck.notified() => continue,
                _ = tokio::time::sleep(self.cfg.polling_interval()) => continue,
                m = c.next() => m,
            };
            match next {
                Some(Ok(msg)) => {
                    // Nothing more is delivered to us while we decide and run: the channel
                    // goes after the answer, so a prefetched message goes back at once.
                    self.handle(msg, &mut consumer).await;
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "consumer failed; consuming again");
                    consumer = None;
                }
                None => {
                    tracing::warn!("consumer channel closed; consuming again");
                    consumer = None;
                }
            }
        }
        if let Some(c) = consumer.take() {
            c.close().await;
        }
        tracing::info!("agent stopped");
        Ok(())
    }

    /// Whether the agent may take jobs now: not while an operator (or a recovery
    /// failure) holds it, nor while its state cannot be read; the consumer goes then.
    /// `paused`: whether it was held at the last check (each change is said once).
    async fn may_take_jobs(&self, consumer: &mut Option<Consumer>, paused: &mut bool) -> bool {
        match self.held().await {
            Ok(true) => {
                if let Some(c) = consumer.take() {
                    c.close().await;
                }
                if !*paused {
                    tracing::info!("agent is offline or in maintenance: not taking jobs");
                    *paused = true;
                }
                false
            }
            Ok(false) => {
                if *paused {
                    tracing::info!("agent is back: taking jobs again");
                    *paused = false;
                }
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the agent's state");
                if let Some(c) = consumer.take() {
                    c.close().await;
                }
                false
            }
        }
    }

    async fn wait_for_recheck(&self) {
        tokio::select! {
            _ = self.stop.cancelled() => {}
            _ = self.recheck.notified() => {}
            _ = tokio::time::sleep(self.cfg.polling_interval()) => {}
        }
    }
}

fn settle(r: Result<(), testflinger_broker::BrokerError>) {
    if let Err(e) = r {
        tracing::warn!(error = %e, "cannot settle the delivery; the broker will redeliver it");
    }
}

/// Consumes this agent's control queue (reconnecting as needed): cancels reach the
/// running job at once, state changes trigger an immediate re-check.
async fn control_loop(
    broker: Broker,
    agent_id: String,
    current: Current,
    recheck: Arc<Notify>,
    stop: CancellationToken,
) {
    let mut delay = Duration::from_millis(200);
    while !stop.is_cancelled() {
        let mut consumer = match broker.consume_control(&agent_id).await {
            Ok(c) => {
                delay = Duration::from_millis(200);
                c
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot consume the control queue; retrying");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(10));
                continue;
            }
        };
        loop {
            let msg = tokio::select! {
                _ = stop.cancelled() => {
                    consumer.close().await;
                    return;
                }
                m = consumer.next() => m,
            };
            let Some(Ok(msg)) = msg else { break };
            match serde_json::from_slice::<ControlCommand>(&msg.body) {
                Ok(ControlCommand::Cancel { job_id }) => {
                    let token = current.lock().ok().and_then(|c| {
                        c.as_ref()
                            .filter(|(id, _)| *id == job_id)
                            .map(|(_, t)| t.clone())
                    });
                    if let Some(t) = token {
                        tracing::info!(job.id = %job_id, "control: cancel");
                        t.cancel();
                    }
                }
                Ok(ControlCommand::SetState { state }) => {
                    tracing::info!(%state, "control: state changed");
                    recheck.notify_one();
                }
                Err(e) => tracing::warn!(error = %e, "unreadable control command"),
            }
        }
    }
}
