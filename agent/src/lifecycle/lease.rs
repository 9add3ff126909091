//! The agent's lease clock on a job it runs: the heartbeat renews the lease and moves
//! the deadline by which the agent stops the job itself; a cancel or a 409 in its
//! answer reaches the job.

use crate::client::{ApiClient, ClientError};
use crate::runner::JobSignals;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::{Instant, sleep_until};

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

/// Renews the lease every third of its length, first at `next`; each call waits at
/// most [`heartbeat_timeout`], a failed one is tried again after a tenth of the lease.
/// A successful renewal moves the lease deadline (`lease_tx`: when it was sent, plus
/// the lease, minus the margin); when that deadline passes first, `expired` is
/// cancelled and the loop ends ("lease lost" on the agent's clock). A cancel in the
/// answer reaches the running phase; a 409 cancels `lost`.
pub(super) async fn heartbeat_loop(
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
