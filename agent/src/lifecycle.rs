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
use crate::runner::{self, ClaimedJob, JobEnd, JobSignals};
use crate::spool::{self, Delivered, Entry, Spool};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use testflinger_broker::{Broker, BrokerConfig, Consumer, Incoming, OutgoingMessage};
use testflinger_common::AgentState;
use testflinger_common::protocol::{ClaimOutcome, ControlCommand};
use tokio::sync::{Notify, watch};
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// How often an idle agent refreshes its records on the server.
const REFRESH_EVERY: Duration = Duration::from_secs(6 * 3600);
/// The comment of the agent record while the agent is stopped (SIGTERM/SIGINT); unlike
/// an operator's offline, the next start clears it.
pub const STOPPED_COMMENT: &str = "testflinger-agent stopped; it is back when it starts again";

/// The agent stops its phase this long before the lease would end on the server: a
/// fifth of the lease, between 0.5 s and 30 s.
pub fn lease_margin(lease: Duration) -> Duration {
    (lease / 5).clamp(Duration::from_millis(500), Duration::from_secs(30))
}

/// How long one heartbeat call may take: a fifth of the lease, between 0.3 s and 10 s,
/// so several tries fit in one lease.
pub fn heartbeat_timeout(lease: Duration) -> Duration {
    (lease / 5).clamp(Duration::from_millis(300), Duration::from_secs(10))
}

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
            match self.held().await {
                Ok(true) => {
                    if let Some(c) = consumer.take() {
                        c.close().await;
                    }
                    if !paused {
                        tracing::info!("agent is offline or in maintenance: not taking jobs");
                        paused = true;
                    }
                    self.wait_for_recheck().await;
                    continue;
                }
                Ok(false) => {
                    if paused {
                        tracing::info!("agent is back: taking jobs again");
                        paused = false;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the agent's state");
                    if let Some(c) = consumer.take() {
                        c.close().await;
                    }
                    self.wait_for_recheck().await;
                    continue;
                }
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

    async fn wait_for_recheck(&self) {
        tokio::select! {
            _ = self.stop.cancelled() => {}
            _ = self.recheck.notified() => {}
            _ = tokio::time::sleep(self.cfg.polling_interval()) => {}
        }
    }

    /// One delivery: claim it, ack after the answer, run it when granted.
    async fn handle(&self, msg: Incoming, consumer: &mut Option<Consumer>) {
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
                Err(ClientError::Rejected {
                    status: status @ (400 | 404 | 422),
                    message,
                }) => {
                    tracing::warn!(job.id = %job_id, status, %message, "the API refuses this job id; dead-lettering the message");
                    settle(msg.reject().await);
                    return;
                }
                Err(e) => {
                    tracing::warn!(job.id = %job_id, error = %e, "claim failed; giving the delivery back");
                    settle(msg.requeue().await);
                    self.close(consumer).await;
                    self.pause(Duration::from_secs(1)).await;
                    return;
                }
            };
            match claim.outcome {
                ClaimOutcome::Granted => {
                    settle(msg.ack().await);
                    // Stop consuming while the job runs, off the job's critical path: a
                    // delivery that slips in meanwhile goes back to its queue on close.
                    if let Some(c) = consumer.take() {
                        tokio::spawn(c.close());
                    }
                    let job = ClaimedJob {
                        id: job_id.clone(),
                        queue: msg.routing_key.clone(),
                        token: claim.token.unwrap_or_default(),
                        attempt: claim.attempt.unwrap_or(1),
                        lease_ttl: claim.lease_ttl.unwrap_or(30),
                        claimed_at,
                        def: claim.job.unwrap_or_else(|| json!({})),
                    };
                    self.run_claimed(job).await;
                    return;
                }
                ClaimOutcome::Cancelled | ClaimOutcome::Owned | ClaimOutcome::Finished => {
                    tracing::info!(job.id = %job_id, outcome = ?claim.outcome, "not ours to run; dropping the delivery");
                    settle(msg.ack().await);
                    return;
                }
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
                    return;
                }
                ClaimOutcome::Unknown
                    if msg
                        .headers
                        .contains_key(testflinger_broker::topology::PUBLISHED_BY_HEADER) =>
                {
                    // The API published it and no longer knows the job (it expired, or
                    // was removed): a stale wake-up, not a raw-published job to register.
                    tracing::info!(job.id = %job_id, "stale message of a job the API no longer knows; dropping it");
                    settle(msg.ack().await);
                    return;
                }
                ClaimOutcome::Unknown if !registered => {
                    match self.register_raw(&msg, &job_id).await {
                        RawOutcome::Registered => {
                            registered = true;
                            continue;
                        }
                        RawOutcome::DeadLettered => {
                            settle(msg.ack().await);
                            return;
                        }
                        RawOutcome::Rejected => {
                            settle(msg.reject().await);
                            return;
                        }
                        RawOutcome::Retry => {
                            settle(msg.requeue().await);
                            self.close(consumer).await;
                            self.pause(Duration::from_secs(1)).await;
                            return;
                        }
                    }
                }
                ClaimOutcome::Unknown => {
                    tracing::warn!(job.id = %job_id, "job still unknown after registering it; giving it back");
                    settle(msg.requeue().await);
                    self.close(consumer).await;
                    self.pause(Duration::from_secs(1)).await;
                    return;
                }
            }
        }
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
        let fut = runner::run_job(
            self.cfg.clone(),
            self.client.clone(),
            self.watchdog.clone(),
            job.clone(),
            signals.clone(),
        );
        tokio::pin!(fut);
        let report = tokio::select! {
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
        };
        heartbeat.abort();
        if let Ok(mut c) = self.current.lock() {
            *c = None;
        }
        match report {
            Ok(r) => {
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
}

enum RawOutcome {
    Registered,
    DeadLettered,
    /// Not copied to the dead queue (no publish permission): reject it to its DLX.
    Rejected,
    Retry,
}

fn settle(r: Result<(), testflinger_broker::BrokerError>) {
    if let Err(e) = r {
        tracing::warn!(error = %e, "cannot settle the delivery; the broker will redeliver it");
    }
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

/// Renews the lease every third of its length, first at `next`; each call waits at
/// most [`heartbeat_timeout`], a failed one is tried again after a tenth of the lease.
/// A successful renewal moves the lease deadline (`lease_tx`: when it was sent, plus
/// the lease, minus the margin); when that deadline passes first, `expired` is
/// cancelled and the loop ends ("lease lost" on the agent's clock). A cancel in the
/// answer reaches the running phase; a 409 cancels `lost`.
async fn heartbeat_loop(
    client: ApiClient,
    job_id: String,
    token: testflinger_common::protocol::FenceToken,
    mut lease_ttl: u64,
    signals: JobSignals,
    lease_tx: watch::Sender<Instant>,
    mut next: Instant,
) {
    loop {
        let deadline = *lease_tx.borrow();
        tokio::select! {
            _ = sleep_until(deadline) => {
                tracing::warn!(job.id = %job_id, "lease lost: no successful renewal in time; stopping the job");
                signals.expired.cancel();
                return;
            }
            _ = sleep_until(next) => {}
        }
        let lease = Duration::from_secs(lease_ttl.max(1));
        let once = client.once(heartbeat_timeout(lease));
        let sent = Instant::now();
        let r = tokio::select! {
            r = once.heartbeat(&job_id, token) => r,
            // The top of the loop says it.
            _ = sleep_until(deadline) => continue,
        };
        match r {
            Ok(r) => {
                if r.cancel_requested && !signals.cancel.is_cancelled() {
                    tracing::info!(job.id = %job_id, "heartbeat: the job was cancelled");
                    signals.cancel.cancel();
                }
                lease_ttl = r.lease_ttl.max(1);
                let lease = Duration::from_secs(lease_ttl);
                lease_tx.send_replace(sent + lease - lease_margin(lease));
                next = sent + lease / 3;
            }
            Err(ClientError::LeaseLost(m)) => {
                tracing::warn!(job.id = %job_id, message = %m, "heartbeat: lease lost");
                signals.lost.cancel();
                return;
            }
            Err(ClientError::JobGone(m)) => {
                tracing::warn!(job.id = %job_id, message = %m, "heartbeat: the API has no such job any more; stopping it");
                signals.lost.cancel();
                return;
            }
            Err(ClientError::StoreDown(m)) => {
                // The API is there and says Redis is not: nobody can reap this lease
                // meanwhile, and the reaper grants a lease of grace once Redis is back,
                // so the job goes on (a healthy job is not re-run for a Redis outage).
                tracing::warn!(job.id = %job_id, message = %m, "heartbeat: the API's state store is down; keeping the job");
                lease_tx.send_replace(sent + lease - lease_margin(lease));
                next = Instant::now() + (lease / 10).max(Duration::from_millis(200));
            }
            Err(e) => {
                tracing::warn!(job.id = %job_id, error = %e, "heartbeat failed");
                next = Instant::now() + (lease / 10).max(Duration::from_millis(200));
            }
        }
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
