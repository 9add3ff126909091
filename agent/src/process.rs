//! Phase processes: `/bin/sh -c <command>` in its own process group with stdout and
//! stderr merged into one pipe, so a timeout or a cancel can kill the whole tree.
//!
//! Phases die with the agent, without `unsafe` (no `prctl`/`pre_exec`):
//! - a [`Watchdog`]: the agent binary re-executed as `testflinger-agent watchdog` in
//!   its own process group (one per agent, started with its first phase), its stdin a
//!   pipe only the agent holds. The agent writes `watch <pgid> <ms>` when a phase
//!   starts, `extend <ms>` after each lease renewal and `done` when the phase ended;
//!   the watchdog kills the watched group on end-of-file (the agent died) and on
//!   silence past the last deadline (the agent is frozen, or cannot renew its lease);
//! - a start-up [`sweep`]: each phase's group id, a random marker (also in the phase's
//!   environment as [`MARKER_ENV`]) and the agent id are recorded in
//!   `<rundir>/<phase>.pgid`; an agent starting kills the groups it recorded whose
//!   processes still carry their marker (never another agent's sharing the directory).
//!
//! Signals go to the group with `nix`'s safe `killpg` (the workspace forbids `unsafe`,
//! and std has no `killpg`).

use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use std::collections::BTreeMap;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::process::{Child, ChildStdin, Command};

/// Environment variable holding a phase's marker, so a later sweep can tell its
/// processes from whatever reused the group id.
pub const MARKER_ENV: &str = "TESTFLINGER_AGENT_PHASE";

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
    ///
    /// The grace is for the whole group, not only the shell: `/bin/sh` (dash) dies at
    /// once on SIGTERM, while the command it ran may be cleaning up (a reservation
    /// removing the keys it added), so the group gets the rest of the grace to finish.
    pub async fn kill_tree(&mut self, grace: Duration) -> io::Result<ExitStatus> {
        let deadline = tokio::time::Instant::now() + grace;
        signal_group(self.pgid, Signal::SIGTERM);
        let status = match tokio::time::timeout_at(deadline, self.child.wait()).await {
            Ok(s) => s?,
            Err(_) => {
                signal_group(self.pgid, Signal::SIGKILL);
                self.child.wait().await?
            }
        };
        while tokio::time::Instant::now() < deadline && group_alive(self.pgid) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // What ignored SIGTERM (or outlived the grace) goes now.
        signal_group(self.pgid, Signal::SIGKILL);
        Ok(status)
    }
}

/// The group id `pgid` as `killpg` takes it; `None` for 0 and 1 (our own group, and
/// "every process" to `kill(2)`) and for what does not fit a pid.
fn group_pid(pgid: u32) -> Option<Pid> {
    i32::try_from(pgid)
        .ok()
        .filter(|p| *p > 1)
        .map(Pid::from_raw)
}

/// Whether any process of group `pgid` is still there (`killpg(pgid, 0)`: the group
/// exists and may be signalled).
pub fn group_alive(pgid: u32) -> bool {
    group_pid(pgid).is_some_and(|g| killpg(g, None).is_ok())
}

/// Sends `signal` to every process of group `pgid`. Best effort: a group that is
/// already gone (`ESRCH`) is fine; any other error is logged.
pub fn signal_group(pgid: u32, signal: Signal) {
    let Some(group) = group_pid(pgid) else {
        tracing::warn!(pgid, %signal, "not a phase's process group; no signal sent");
        return;
    };
    match killpg(group, signal) {
        Ok(()) | Err(Errno::ESRCH) => {}
        Err(e) => tracing::warn!(pgid, %signal, error = %e, "cannot signal the process group"),
    }
}

/// The agent's watchdog process (see the module docs): one per agent, started on the
/// first phase, started again if it died. Closing its pipe (the agent's death) kills
/// the group it watches.
struct WatchdogProc {
    child: Child,
    stdin: ChildStdin,
}

impl WatchdogProc {
    fn spawn(grace: Duration) -> io::Result<WatchdogProc> {
        // /proc/self/exe still runs this binary after an upgrade replaced (deleted) it.
        let exe = Path::new("/proc/self/exe");
        let exe = if exe.exists() {
            exe.to_path_buf()
        } else {
            std::env::current_exe()?
        };
        let mut child = Command::new(exe)
            .arg("watchdog")
            .arg("--grace-ms")
            .arg(grace.as_millis().to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            // Not in the agent's group: a terminal's Ctrl-C must not take it away.
            .process_group(0)
            .kill_on_drop(false)
            .spawn()?;
        let stdin = child
            .stdin
            .take()
            .ok_or_else(|| io::Error::other("the watchdog has no stdin"))?;
        Ok(WatchdogProc { child, stdin })
    }

    async fn say(&mut self, line: &str) -> io::Result<()> {
        self.stdin.write_all(line.as_bytes()).await
    }
}

/// The agent's handle on its watchdog; cheap to clone, shared by its jobs.
#[derive(Clone)]
pub struct Watchdog {
    grace: Duration,
    proc: Arc<tokio::sync::Mutex<Option<WatchdogProc>>>,
}

impl Watchdog {
    /// A handle; the process starts with the first [`Watchdog::watch`]. `grace` goes
    /// between SIGTERM and SIGKILL.
    pub fn new(grace: Duration) -> Watchdog {
        Watchdog {
            grace,
            proc: Arc::new(tokio::sync::Mutex::new(None)),
        }
    }

    /// Watches group `pgid`: it is killed unless [`Watchdog::extend`] or
    /// [`Watchdog::done`] comes within `within`, or when the agent dies. Fails when no
    /// watchdog can be started (the phase would then outlive an agent crash).
    pub async fn watch(&self, pgid: u32, within: Duration) -> io::Result<()> {
        let line = format!("watch {pgid} {}\n", within.as_millis());
        let mut guard = self.proc.lock().await;
        if let Some(p) = guard.as_mut() {
            if let Ok(None) = p.child.try_wait()
                && p.say(&line).await.is_ok()
            {
                return Ok(());
            }
            tracing::warn!("the watchdog was gone; starting another");
        }
        let mut p = WatchdogProc::spawn(self.grace)?;
        p.say(&line).await?;
        *guard = Some(p);
        Ok(())
    }

    /// Moves the deadline of the watched group to `within` from now.
    pub async fn extend(&self, within: Duration) {
        self.say(&format!("extend {}\n", within.as_millis())).await;
    }

    /// The watched phase ended: nothing to kill.
    pub async fn done(&self) {
        self.say("done\n").await;
    }

    async fn say(&self, line: &str) {
        let mut guard = self.proc.lock().await;
        if let Some(p) = guard.as_mut()
            && let Err(e) = p.say(line).await
        {
            tracing::warn!(error = %e, "the watchdog is gone");
            *guard = None;
        }
    }
}

/// The watchdog itself (`testflinger-agent watchdog`): reads lines on stdin:
/// `watch <pgid> <ms>` (watch that group, deadline in `ms`), `extend <ms>`, `done`. It
/// kills the watched group (SIGTERM, SIGKILL after `grace`) when the deadline passes
/// without a line, or when its input ends (the agent died); it exits at the end of its
/// input. Blocking.
pub fn watchdog_main(grace: Duration) {
    use std::io::BufRead;
    use std::sync::mpsc::{RecvTimeoutError, sync_channel};
    // Bounded: a reader ahead by 64 lines waits (and so does the agent's write to the
    // pipe); no line is dropped.
    let (tx, rx) = sync_channel::<String>(64);
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let ms = |v: Option<&str>| {
        v.and_then(|v| v.parse::<u64>().ok())
            .map(Duration::from_millis)
    };
    // The watched group and its deadline.
    let mut watched: Option<(u32, std::time::Instant)> = None;
    loop {
        let next = match watched {
            Some((_, deadline)) => {
                let wait = deadline.saturating_duration_since(std::time::Instant::now());
                rx.recv_timeout(wait)
            }
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        match next {
            Ok(line) => {
                let mut w = line.split_whitespace();
                match (w.next(), w.next(), w.next()) {
                    (Some("watch"), Some(pgid), within) => {
                        if let (Ok(pgid), Some(within)) = (pgid.parse::<u32>(), ms(within)) {
                            watched = Some((pgid, std::time::Instant::now() + within));
                        }
                    }
                    (Some("extend"), within, _) => {
                        if let (Some((pgid, _)), Some(within)) = (watched, ms(within)) {
                            watched = Some((pgid, std::time::Instant::now() + within));
                        }
                    }
                    (Some("done"), _, _) => watched = None,
                    _ => {}
                }
            }
            Err(RecvTimeoutError::Timeout) => {
                if let Some((pgid, _)) = watched.take() {
                    eprintln!(
                        "testflinger-agent watchdog: no word from the agent in time (frozen, or its lease lapsed); killing phase group {pgid}"
                    );
                    kill_group_blocking(pgid, grace);
                }
            }
            Err(RecvTimeoutError::Disconnected) => {
                if let Some((pgid, _)) = watched {
                    eprintln!(
                        "testflinger-agent watchdog: the agent is gone; killing phase group {pgid}"
                    );
                    kill_group_blocking(pgid, grace);
                }
                return;
            }
        }
    }
}

/// SIGTERM to group `pgid`, SIGKILL after `grace` if any member still lives.
pub fn kill_group_blocking(pgid: u32, grace: Duration) {
    signal_group(pgid, Signal::SIGTERM);
    let end = std::time::Instant::now() + grace;
    while std::time::Instant::now() < end {
        if group_members(pgid).is_empty() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    signal_group(pgid, Signal::SIGKILL);
}

/// The live (not zombie) processes of group `pgid`, from `/proc`.
pub fn group_members(pgid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    let want = pgid.to_string();
    for e in entries.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // "pid (comm) state ppid pgrp ...": comm may hold spaces, so split after ')'.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        if f.len() > 2 && f[0] != "Z" && f[2] == want {
            out.push(pid);
        }
    }
    out
}

/// Whether process `pid` has `MARKER_ENV=marker` in its environment.
fn carries_marker(pid: u32, marker: &str) -> bool {
    let want = format!("{MARKER_ENV}={marker}");
    std::fs::read(format!("/proc/{pid}/environ"))
        .map(|env| env.split(|b| *b == 0).any(|kv| kv == want.as_bytes()))
        .unwrap_or(false)
}

/// Where a phase's group id and marker are recorded: `<rundir>/<phase>.pgid`.
pub fn record_path(rundir: &Path, phase: &str) -> std::path::PathBuf {
    rundir.join(format!("{phase}.pgid"))
}

/// Records `pgid marker agent_id` for the start-up sweep.
pub fn write_record(path: &Path, pgid: u32, marker: &str, agent_id: &str) -> io::Result<()> {
    std::fs::write(path, format!("{pgid} {marker} {agent_id}\n"))
}

/// The run directories under `execution_basedir` in which agent `agent_id` recorded a
/// phase (`*.pgid`): the ones a previous run of this agent left. Blocking.
pub fn run_dirs_of(execution_basedir: &Path, agent_id: &str) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let Ok(dirs) = std::fs::read_dir(execution_basedir) else {
        return out;
    };
    for d in dirs.flatten() {
        let Ok(files) = std::fs::read_dir(d.path()) else {
            continue;
        };
        let mine = files.flatten().any(|f| {
            f.path().extension().and_then(|e| e.to_str()) == Some("pgid")
                && std::fs::read_to_string(f.path())
                    .unwrap_or_default()
                    .split_whitespace()
                    .nth(2)
                    == Some(agent_id)
        });
        if mine {
            out.push(d.path());
        }
    }
    out
}

/// Kills what a previous run of agent `agent_id` left: every group recorded by it in
/// `<execution_basedir>/*/*.pgid` that still has a process carrying the recorded
/// marker, and removes those records. Records of other agents sharing the directory are
/// left alone. Blocking; returns the number of groups killed.
pub fn sweep(execution_basedir: &Path, agent_id: &str, grace: Duration) -> usize {
    let mut killed = 0;
    let Ok(dirs) = std::fs::read_dir(execution_basedir) else {
        return 0;
    };
    for d in dirs.flatten() {
        let Ok(files) = std::fs::read_dir(d.path()) else {
            continue;
        };
        for f in files.flatten() {
            let path = f.path();
            if path.extension().and_then(|e| e.to_str()) != Some("pgid") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let mut it = text.split_whitespace();
            let (pgid, marker, owner) = (it.next(), it.next(), it.next());
            if owner != Some(agent_id) {
                continue;
            }
            if let (Some(Ok(pgid)), Some(marker)) = (pgid.map(str::parse::<u32>), marker)
                && pgid > 1
            {
                let ours = group_members(pgid)
                    .into_iter()
                    .any(|pid| carries_marker(pid, marker));
                if ours {
                    tracing::warn!(pgid, record = %path.display(), "killing a phase a previous run of the agent left");
                    kill_group_blocking(pgid, grace);
                    killed += 1;
                }
            }
            let _ = std::fs::remove_file(&path);
        }
    }
    killed
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
    async fn the_sweep_kills_only_marked_groups_of_this_agent() {
        let base = tempfile::tempdir().expect("tempdir");
        let run = base.path().join("job");
        std::fs::create_dir_all(&run).expect("rundir");
        let spawn = |marker: &str| {
            let mut env = BTreeMap::new();
            env.insert(MARKER_ENV.to_string(), marker.to_string());
            PhaseProcess::spawn("sleep 300", &run, &env).expect("spawn")
        };
        let mut ours = spawn("m1");
        let mut other_agent = spawn("m2");
        let mut wrong_marker = spawn("m3");
        write_record(&run.join("a.pgid"), ours.tree.pgid(), "m1", "dev").expect("record");
        write_record(&run.join("b.pgid"), other_agent.tree.pgid(), "m2", "other").expect("record");
        write_record(
            &run.join("c.pgid"),
            wrong_marker.tree.pgid(),
            "not-m3",
            "dev",
        )
        .expect("record");
        let killed = tokio::task::spawn_blocking({
            let base = base.path().to_path_buf();
            move || sweep(&base, "dev", Duration::from_secs(1))
        })
        .await
        .expect("sweep");
        assert_eq!(killed, 1);
        let status = tokio::time::timeout(Duration::from_secs(5), ours.tree.wait())
            .await
            .expect("ours killed")
            .expect("status");
        assert!(!status.success());
        assert!(!group_members(other_agent.tree.pgid()).is_empty());
        assert!(!group_members(wrong_marker.tree.pgid()).is_empty());
        assert!(run.join("b.pgid").exists(), "another agent's record stays");
        for p in [&mut other_agent, &mut wrong_marker] {
            p.tree
                .kill_tree(Duration::from_secs(1))
                .await
                .expect("kill");
        }
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
