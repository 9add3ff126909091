//! Process supervision of one phase: its command started in its own process group,
//! recorded for the next start's sweep and handed to the watchdog (so that it dies with
//! the agent), watched against the phase's timeouts and the job's signals while its
//! output is read, stopped (SIGTERM, SIGKILL after a grace), its exit code.

use super::output::{self, FLUSH_EVERY, OutputSink, READ_BUF};
use super::{LeaseExpired, LeaseLost, Run, lease_left};
use crate::phases::{self, Rules};
use crate::process::{self, PhaseProcess};
use anyhow::Context;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;
use testflinger_common::Phase;
use tokio::sync::watch;
use tokio::time::{Instant, sleep_until};

/// How long a killed phase gets between SIGTERM and SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(3);
/// How long a stopped reserve or cleanup phase has to undo its changes on the device.
const UNDO_GRACE: Duration = Duration::from_secs(30);
/// After the command exited, how long output is still read as it comes (a background
/// child may keep the pipe open) before the phase is done with.
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(1);

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

/// What makes a phase die with the agent: its record for the next start's sweep and,
/// when one could be started, the watchdog, told of each lease renewal.
struct Guard {
    record: PathBuf,
    watched: bool,
    /// The job's lease deadline, as the heartbeat moves it.
    lease: watch::Receiver<Instant>,
}

/// How watching a phase ended.
#[derive(Debug, Clone, Copy)]
struct Watched {
    /// Why it was stopped, if it was.
    stop: Option<Stop>,
    /// The shell's exit status, once it exited.
    exited: Option<ExitStatus>,
    /// Whether its output pipe reached end of file.
    eof: bool,
}

/// The phase's limits (in seconds, those that apply to it) and their deadlines.
struct Deadlines {
    global: Option<u64>,
    output: Option<u64>,
    global_at: Option<Instant>,
    /// Moved by each read of output.
    output_at: Option<Instant>,
    /// Set once the command exited: the end of [`DRAIN_AFTER_EXIT`].
    drain_at: Option<Instant>,
    /// Stands for a deadline that is not set (its branch is disabled then).
    far: Instant,
}

impl Deadlines {
    fn new(rules: Rules, global_timeout: u64, output_timeout: u64) -> Deadlines {
        let now = Instant::now();
        let global = rules.global_timeout.then_some(global_timeout);
        let output = rules.output_timeout.then_some(output_timeout);
        Deadlines {
            global,
            output,
            global_at: global.map(|s| now + Duration::from_secs(s)),
            output_at: output.map(|s| now + Duration::from_secs(s)),
            drain_at: None,
            far: now + Duration::from_secs(100 * 365 * 86400),
        }
    }

    /// Output came, or may come again: the output timeout starts over.
    fn output_seen(&mut self) {
        if let Some(s) = self.output {
            self.output_at = Some(Instant::now() + Duration::from_secs(s));
        }
    }
}

impl Run {
    /// Runs the phase command, streaming its output; returns its exit code.
    pub(super) async fn run_command(&mut self, phase: Phase) -> anyhow::Result<i32> {
        let mut sink = self.output_sink(phase);
        let marker = uuid::Uuid::new_v4().simple().to_string();
        let Some(mut proc) = self.start(phase, &marker, &mut sink) else {
            return Ok(100);
        };
        let mut guard = self.guard(phase, proc.tree.pgid(), &marker).await;
        let watched = self.watch(phase, &mut proc, &mut sink, &mut guard).await?;
        let status = end_process(phase, &mut proc, &mut sink, watched).await?;
        if guard.watched {
            self.watchdog.done().await;
        }
        let _ = std::fs::remove_file(&guard.record);
        sink.flush(true);
        match watched.stop {
            Some(Stop::Lost) => return Err(LeaseLost.into()),
            Some(Stop::Expired) => return Err(LeaseExpired.into()),
            _ => {}
        }
        Ok(process::exit_code(status))
    }

    /// Starts the phase command in the run directory with the phase's environment and
    /// `marker`; `None` (the reason in its output) when it cannot be started.
    fn start(&self, phase: Phase, marker: &str, sink: &mut OutputSink) -> Option<PhaseProcess> {
        let mut env = self.phase_env(phase);
        env.insert(process::MARKER_ENV.to_string(), marker.to_string());
        match PhaseProcess::spawn(self.cfg.command(phase), &self.rundir, &env) {
            Ok(p) => Some(p),
            Err(e) => {
                sink.push(format!("\nERROR: cannot start the phase command: {e}\n").as_bytes());
                sink.flush(true);
                None
            }
        }
    }

    /// The phase dies with the agent: a record for the next start's sweep, and a
    /// watchdog that outlives a crash or a freeze of the agent.
    async fn guard(&self, phase: Phase, pgid: u32, marker: &str) -> Guard {
        let record = process::record_path(&self.rundir, phase.as_str());
        if let Err(e) = process::write_record(&record, pgid, marker, &self.cfg.agent_id) {
            tracing::warn!(error = %e, "cannot record the phase's process group");
        }
        let mut lease = self.signals.lease.clone();
        let left = lease_left(*lease.borrow_and_update());
        let watched = match self.watchdog.watch(pgid, left).await {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(error = %e, "cannot start the watchdog: the phase would outlive an agent crash");
                false
            }
        };
        Guard {
            record,
            watched,
            lease,
        }
    }

    /// Watches the running phase until it exited and its output ended (or the drain
    /// second after its exit ran out), or until something stops it: the job's signals,
    /// a timeout. Meanwhile reads its output (flushed every [`FLUSH_EVERY`]) and tells
    /// the watchdog of each lease renewal.
    async fn watch(
        &self,
        phase: Phase,
        proc: &mut PhaseProcess,
        sink: &mut OutputSink,
        guard: &mut Guard,
    ) -> anyhow::Result<Watched> {
        let rules = phases::rules(phase);
        let mut t = Deadlines::new(rules, self.global_timeout, self.output_timeout);
        let mut tick = tokio::time::interval(FLUSH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut buf = vec![0u8; READ_BUF];
        let mut w = Watched {
            stop: None,
            exited: None,
            eof: false,
        };
        let (sig, spool_max) = (&self.signals, self.cfg.spool_max_bytes);
        let (mut lease_open, mut held) = (true, false);
        while !(w.eof && w.exited.is_some()) {
            let running = w.exited.is_none();
            let full = self.output_waits(running, &mut held);
            tokio::select! {
                _ = sig.lost.cancelled() => { w.stop = Some(Stop::Lost); break; }
                _ = sig.expired.cancelled() => { w.stop = Some(Stop::Expired); break; }
                _ = sig.abort.cancelled() => { w.stop = Some(Stop::Abort); break; }
                r = guard.lease.changed(), if guard.watched && lease_open => match r {
                    Ok(()) => {
                        let left = lease_left(*guard.lease.borrow_and_update());
                        self.watchdog.extend(left).await;
                    }
                    // The heartbeat is gone: the watchdog's last deadline stands.
                    Err(_) => lease_open = false,
                },
                _ = sig.cancel.cancelled(), if rules.cancellable && running => {
                    w.stop = Some(Stop::Cancelled); break;
                }
                _ = sleep_until(t.global_at.unwrap_or(t.far)), if running && t.global_at.is_some() => {
                    w.stop = t.global.map(Stop::GlobalTimeout); break;
                }
                _ = sleep_until(t.output_at.unwrap_or(t.far)), if running && t.output_at.is_some() && !full => {
                    w.stop = t.output.map(Stop::OutputTimeout); break;
                }
                _ = self.spool.wait_backlog_below(spool_max), if full && !w.eof => {
                    tracing::info!("the API caught up; reading the phase's output again");
                    t.output_seen();
                }
                r = proc.output.read(&mut buf), if !w.eof && !full => match r {
                    Ok(0) | Err(_) => w.eof = true,
                    Ok(n) => {
                        sink.push(&buf[..n]);
                        t.output_seen();
                    }
                },
                s = proc.tree.wait(), if running => {
                    w.exited = Some(s.context("waiting for the phase command")?);
                    // A background child may keep the pipe open: read a little more, then go.
                    t.drain_at = Some(Instant::now() + DRAIN_AFTER_EXIT);
                }
                _ = sleep_until(t.drain_at.unwrap_or(t.far)), if t.drain_at.is_some() => break,
                _ = tick.tick() => sink.flush(false),
            }
        }
        Ok(w)
    }

    /// Backpressure: past `spool_max_bytes` waiting for the API, the output of a running
    /// phase is not read (the phase blocks on its pipe) and its silence is not counted.
    /// Once the phase exited, what is left in the pipe is read regardless. `held` is
    /// whether the output waited last time (the warning is said once).
    fn output_waits(&self, running: bool, held: &mut bool) -> bool {
        let spool_max = self.cfg.spool_max_bytes;
        let full = running && self.spool.backlog() > spool_max;
        if full && !*held {
            tracing::warn!(
                backlog = self.spool.backlog(),
                spool_max_bytes = spool_max,
                "the API is behind on this job's writes; the phase's output waits"
            );
        }
        *held = full;
        full
    }
}

/// After watching: the exit status, once the rest of the output was read (the command
/// exited) or the process group was killed (it was stopped).
async fn end_process(
    phase: Phase,
    proc: &mut PhaseProcess,
    sink: &mut OutputSink,
    w: Watched,
) -> anyhow::Result<ExitStatus> {
    match (w.stop, w.exited) {
        (None, Some(s)) => {
            output::read_after_exit(&mut proc.output, sink, w.eof).await;
            Ok(s)
        }
        (Some(why), None) => stop(phase, proc, sink, why, w.eof).await,
        (Some(_), Some(s)) => Ok(s),
        (None, None) => proc.tree.wait().await.context("waiting for the phase"),
    }
}

/// Stops the phase for `why`: says so in its output, kills its process group (SIGTERM,
/// SIGKILL after the grace) and reads what the dying tree still wrote.
async fn stop(
    phase: Phase,
    proc: &mut PhaseProcess,
    sink: &mut OutputSink,
    why: Stop,
    eof: bool,
) -> anyhow::Result<ExitStatus> {
    tracing::warn!(?why, "stopping the phase");
    sink.push(why.message().as_bytes());
    // Reserve and cleanup undo what they did to the device (keys, a VM): they get
    // longer to finish than a test does.
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
    output::read_while_dying(&mut proc.output, sink, eof).await;
    Ok(s)
}
