//! Running local commands: operator commands from the device config and the job's
//! `test_cmds`. Nothing else from the job is ever handed to a shell.

use crate::error::{ConnectorError, Result};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::Duration;
use tokio::process::Command;

/// The exit code as a shell reports it (128 + signal for a killed process).
pub fn exit_code(status: ExitStatus) -> i32 {
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1)
}

/// How a bounded command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Exited(i32),
    TimedOut,
}

/// Runs `/bin/sh -c <command>` with inherited output, killed after `limit`.
pub async fn run_shell(
    command: &str,
    env: &[(String, String)],
    limit: Duration,
) -> Result<Outcome> {
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c").arg(command).kill_on_drop(true);
    cmd.envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    run_bounded(cmd, limit, command).await
}

/// Runs a prepared command in its own process group; after `limit` the whole group is
/// killed, so a hung grandchild cannot outlive the stage holding its output open.
pub async fn run_bounded(mut cmd: Command, limit: Duration, what: &str) -> Result<Outcome> {
    cmd.process_group(0);
    let mut child = cmd
        .spawn()
        .map_err(|e| ConnectorError::io(format!("starting `{what}`"), e))?;
    match tokio::time::timeout(limit, child.wait()).await {
        Ok(status) => {
            let status =
                status.map_err(|e| ConnectorError::io(format!("waiting for `{what}`"), e))?;
            Ok(Outcome::Exited(exit_code(status)))
        }
        Err(_) => {
            // The group id is the child's pid (`process_group(0)`). `nix`'s safe
            // `killpg` (the crate forbids unsafe); ESRCH (the group is gone) is fine, and
            // the child itself is killed below in any case.
            if let Some(pgid) = child.id().and_then(|p| i32::try_from(p).ok())
                && pgid > 1
            {
                let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
            }
            let _ = child.kill().await;
            Ok(Outcome::TimedOut)
        }
    }
}
