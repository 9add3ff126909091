//! Phase processes: `/bin/sh -c <command>` in its own process group with stdout and
//! stderr merged into one pipe, so a timeout or a cancel can kill the whole tree.
//!
//! Signals go to the group through `kill(1)`: the workspace forbids `unsafe`, and std
//! has no safe `killpg`.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;
use tokio::process::{Child, Command};

/// A running phase command: the process tree and its merged output, apart so that one
/// task can wait for the one while reading the other.
pub struct PhaseProcess {
    pub tree: ProcessTree,
    pub output: Output,
}

/// The shell and its process group.
pub struct ProcessTree {
    child: Child,
    pgid: u32,
}

/// The read end of the merged stdout+stderr pipe.
pub struct Output {
    rx: pipe::Receiver,
}

impl Output {
    /// Reads the next chunk of merged output; `Ok(0)` at end of file.
    pub async fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.rx.read(buf).await
    }
}

impl PhaseProcess {
    /// Starts `command` with `/bin/sh -c` in `cwd`, with `env` added to the allowed part
    /// of the agent's environment ([`crate::phase_env`]: never its credentials). Fails
    /// when the shell cannot be started.
    pub fn spawn(command: &str, cwd: &Path, env: &BTreeMap<String, String>) -> io::Result<Self> {
        let (reader, writer) = io::pipe()?;
        let writer2 = writer.try_clone()?;
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(command)
            .current_dir(cwd)
            .env_clear()
            .envs(crate::phase_env::inherited())
            .envs(env)
            .stdin(Stdio::null())
            .stdout(Stdio::from(writer))
            .stderr(Stdio::from(writer2))
            .process_group(0)
            .kill_on_drop(false);
        let child = cmd.spawn()?;
        // Our copies of the write end must go, or the reader never sees end-of-file.
        drop(cmd);
        let pgid = child
            .id()
            .ok_or_else(|| io::Error::other("phase process exited before it was tracked"))?;
        let output = pipe::Receiver::from_owned_fd(OwnedFd::from(reader))?;
        Ok(PhaseProcess {
            tree: ProcessTree { child, pgid },
            output: Output { rx: output },
        })
    }
}

impl ProcessTree {
    /// The process group id (= the shell's pid).
    pub fn pgid(&self) -> u32 {
        self.pgid
    }

    /// Waits for the shell to exit.
    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        self.child.wait().await
    }

    /// Ends the whole process group: SIGTERM, then SIGKILL after `grace`. Returns the
    /// shell's exit status.
    pub async fn kill_tree(&mut self, grace: Duration) -> io::Result<ExitStatus> {
        signal_group(self.pgid, "TERM").await;
        let status = match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(s) => s?,
            Err(_) => {
                signal_group(self.pgid, "KILL").await;
                self.child.wait().await?
            }
        };
        // Children that ignored SIGTERM while the shell died go too.
        signal_group(self.pgid, "KILL").await;
        Ok(status)
    }
}

/// Sends `signal` (a name such as `TERM`) to every process of group `pgid`.
/// Best effort: a group that is already gone is fine.
pub async fn signal_group(pgid: u32, signal: &str) {
    let r = Command::new("kill")
        .arg("-s")
        .arg(signal)
        .arg("--")
        .arg(format!("-{pgid}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await;
    if let Err(e) = r {
        tracing::warn!(pgid, signal, error = %e, "could not run kill(1)");
    }
}

/// The phase's exit code as upstream reports it: the code modulo 256, and a death by
/// signal N as -N modulo 256 (SIGKILL -> 247).
pub fn exit_code(status: ExitStatus) -> i32 {
    if let Some(c) = status.code() {
        c.rem_euclid(256)
    } else if let Some(sig) = status.signal() {
        (-sig).rem_euclid(256)
    } else {
        100
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn merges_output_and_reports_exit_code() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut p = PhaseProcess::spawn(
            "echo out; echo err >&2; exit 3",
            dir.path(),
            &BTreeMap::new(),
        )
        .expect("spawn");
        let mut all = Vec::new();
        let mut buf = [0u8; 1024];
        loop {
            let n = p.output.read(&mut buf).await.expect("read");
            if n == 0 {
                break;
            }
            all.extend_from_slice(&buf[..n]);
        }
        let status = p.tree.wait().await.expect("wait");
        assert_eq!(exit_code(status), 3);
        let text = String::from_utf8_lossy(&all);
        assert!(text.contains("out") && text.contains("err"), "{text}");
    }

    #[tokio::test]
    async fn kill_tree_kills_grandchildren() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut p = PhaseProcess::spawn(
            "sleep 300 & echo $! > child.pid; wait",
            dir.path(),
            &BTreeMap::new(),
        )
        .expect("spawn");
        let pid_file = dir.path().join("child.pid");
        let mut pid = String::new();
        for _ in 0..100 {
            pid = std::fs::read_to_string(&pid_file).unwrap_or_default();
            if !pid.trim().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let pid = pid.trim().to_string();
        assert!(!pid.is_empty());
        p.tree
            .kill_tree(Duration::from_secs(2))
            .await
            .expect("kill");
        let mut gone = false;
        for _ in 0..100 {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // Gone, or a zombie waiting for init to reap it.
            if stat.is_empty() || stat.contains(") Z") {
                gone = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(gone, "grandchild {pid} survived");
    }
}
