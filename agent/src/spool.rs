//! The job's outbox on disk: nothing the device produced is lost while the API is away.
//!
//! Every write about a job (output and serial fragments, results, artifacts, the final
//! outcome, a release) is first stored in `<results_dir>/<agent_id>/<job_id>/` as a
//! numbered file (`000000000042.json`, an artifact's tarball next to it), then
//! delivered in order by one task ([`deliver`]), which removes each file once the API
//! accepted it. While the API cannot be reached the task keeps the files and keeps
//! trying; only a 409 (lease lost) or a 404 (the server has no such job any more) ends
//! delivery (the spool is then dropped, with a log line: the job belongs to someone else,
//! or nobody). Another refusal (4xx) drops that one entry with a warning:
//! retrying cannot help.
//!
//! `meta.json` holds what a restarted agent needs to finish delivery: the job id, its
//! fencing token and lease length ([`recover`]).
//!
//! Memory stays bounded however far delivery falls behind: the queue is the directory.
//! The writer and the delivery task share one number through a watch channel (how many
//! entries are stored; one value, never a list), and delivery reads the entries from
//! disk in order. Nothing is dropped for lack of room; an artifact is packed into a
//! file in the spool and uploaded streaming from it. The disk is bounded too: the
//! runner stops reading a phase's output while more than `spool_max_bytes` wait
//! ([`Spool::wait_backlog_below`]), so a phase that outpaces the API (or runs while it
//! is away) blocks on its pipe.

use crate::client::{ApiClient, ClientError, Fragment};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use testflinger_common::LogType;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// How long one delivery attempt may take before it counts as failed.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest pause between two attempts while the API is away.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// What a restarted agent needs to deliver a job's spool.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Meta {
    pub job_id: String,
    pub token: testflinger_common::protocol::FenceToken,
    pub attempt: u64,
    /// Seconds.
    pub lease_ttl: u64,
}

/// One write about a job, in the order the agent made them.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Entry {
    /// `POST /v1/result/<id>/log/<type>`
    Log {
        log_type: LogType,
        fragment: Fragment,
    },
    /// `POST /v1/result/<id>`; `last` marks the final outcome.
    Result {
        body: Value,
        #[serde(default)]
        last: bool,
    },
    /// `POST /v1/result/<id>/artifact` with the tarball stored as `file` in the spool.
    Artifact { file: String },
    /// `POST /v1/job/<id>/release`: the job goes back to its queue.
    Release { reason: String },
    /// `POST /v1/agents/provision_logs/<agent>` (not fenced).
    ProvisionLog { exit_code: i32, detail: String },
}

impl Entry {
    /// Whether this entry ends the job for this agent (final outcome or release).
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            Entry::Result { last: true, .. } | Entry::Release { .. }
        )
    }
}

/// How delivery ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivered {
    /// Every entry reached the API (or was refused for good); the spool is removed.
    All,
    /// 409 (the lease is gone) or 404 (the job is gone): the spool is removed, nothing
    /// more is sent.
    LeaseLost,
}

/// A handle to write entries into a job's spool; cheap to clone. Delivery ends only
/// after [`Spool::close`] (dropping handles does not end it).
#[derive(Debug, Clone)]
pub struct Spool {
    dir: PathBuf,
    inner: Arc<Mutex<Inner>>,
    /// The sequence number below which every entry is delivered (or dropped).
    delivered: Arc<watch::Sender<u64>>,
    /// Bytes stored and not delivered yet (entries and artifact files): what
    /// [`Spool::wait_backlog_below`] holds the phase's output back on.
    backlog: Arc<AtomicU64>,
}

#[derive(Debug)]
struct Inner {
    next: u64,
    /// How many entries are stored (the next sequence number) and whether the writer
    /// closed the spool: a watch, so what waits for delivery is never held in memory.
    tx: watch::Sender<Stored>,
    terminal: bool,
}

/// What the writer has stored: entries below `next`; `closed` once no more will come.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    pub next: u64,
    pub closed: bool,
}

/// The entries waiting for delivery, in order: from `cursor` up to what the writer
/// stored.
#[derive(Debug)]
pub struct Pending {
    cursor: u64,
    stored: watch::Receiver<Stored>,
}

impl Pending {
    fn new(first: u64, stored: watch::Receiver<Stored>) -> Pending {
        Pending {
            cursor: first,
            stored,
        }
    }

    /// The next sequence number to deliver; waits while the writer has nothing more;
    /// `None` once the spool is closed and every entry was handed out.
    pub async fn recv(&mut self) -> Option<u64> {
        loop {
            let s = *self.stored.borrow_and_update();
            if self.cursor < s.next {
                self.cursor += 1;
                return Some(self.cursor - 1);
            }
            if s.closed || self.stored.changed().await.is_err() {
                // Closed: what was stored before the close still goes out.
                let s = *self.stored.borrow();
                if self.cursor < s.next {
                    self.cursor += 1;
                    return Some(self.cursor - 1);
                }
                return None;
            }
        }
    }

    /// Entries stored and not yet handed out.
    pub fn waiting(&self) -> u64 {
        self.stored.borrow().next.saturating_sub(self.cursor)
    }

    /// Like [`Pending::recv`] without waiting: `None` when nothing is stored yet.
    pub fn try_recv(&mut self) -> Option<u64> {
        let s = *self.stored.borrow();
        (self.cursor < s.next).then(|| {
            self.cursor += 1;
            self.cursor - 1
        })
    }
}

fn entry_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:012}.json"))
}

/// Writes `bytes` to `path` atomically (a temporary file, then a rename).
fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

impl Spool {
    /// The spool directory of `job_id`: `<results_dir>/<agent_id>/<job_id>`.
    pub fn dir_for(results_dir: &Path, agent_id: &str, job_id: &str) -> PathBuf {
        results_dir.join(agent_id).join(job_id)
    }

    /// Starts a new spool in `dir` (an old one there is removed). Fails when the
    /// directory cannot be written.
    pub fn create(dir: PathBuf, meta: &Meta) -> io::Result<(Spool, Pending)> {
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        std::fs::create_dir_all(&dir)?;
        let meta = serde_json::to_vec_pretty(meta).map_err(io::Error::other)?;
        write_atomic(&dir.join("meta.json"), &meta)?;
        let (tx, rx) = watch::channel(Stored {
            next: 0,
            closed: false,
        });
        Ok((
            Spool {
                dir,
                inner: Arc::new(Mutex::new(Inner {
                    next: 0,
                    tx,
                    terminal: false,
                })),
                delivered: Arc::new(watch::Sender::new(0)),
                backlog: Arc::new(AtomicU64::new(0)),
            },
            Pending::new(0, rx),
        ))
    }

    /// Opens a spool a previous run left: its meta, a handle to add entries, and every
    /// stored entry queued for delivery. `None` when `dir` holds no readable meta.
    pub fn reopen(dir: PathBuf) -> Option<(Meta, Spool, Pending)> {
        let meta: Meta =
            serde_json::from_slice(&std::fs::read(dir.join("meta.json")).ok()?).ok()?;
        let mut seqs: Vec<u64> = std::fs::read_dir(&dir)
            .ok()?
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.strip_suffix(".json")?.parse::<u64>().ok()
            })
            .collect();
        seqs.sort_unstable();
        let terminal = seqs.last().is_some_and(|s| {
            std::fs::read(entry_path(&dir, *s))
                .ok()
                .and_then(|b| serde_json::from_slice::<Entry>(&b).ok())
                .is_some_and(|e| e.is_terminal())
        });
        let next = seqs.last().map_or(0, |s| s + 1);
        let first = seqs.first().copied().unwrap_or(next);
        // Delivery goes from `first` to `next`; a gap (an entry a crash left unwritten)
        // is skipped as unreadable.
        let (tx, rx) = watch::channel(Stored {
            next,
            closed: false,
        });
        let backlog: u64 = std::fs::read_dir(&dir)
            .ok()?
            .flatten()
            .filter(|e| e.file_name() != "meta.json")
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum();
        Some((
            meta,
            Spool {
                dir,
                inner: Arc::new(Mutex::new(Inner { next, tx, terminal })),
                delivered: Arc::new(watch::Sender::new(first)),
                backlog: Arc::new(AtomicU64::new(backlog)),
            },
            Pending::new(first, rx),
        ))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether a final outcome or a release is stored.
    pub fn has_terminal(&self) -> bool {
        self.inner.lock().map(|i| i.terminal).unwrap_or(false)
    }

    /// Stores `entry` and queues it for delivery; returns its sequence number. Fails
    /// when the disk refuses it.
    pub fn push(&self, entry: &Entry) -> io::Result<u64> {
        self.push_with(entry, None)
    }

    /// Waits until entry `seq` was delivered (or dropped), at most `within`; whether it
    /// was.
    pub async fn wait_delivered(&self, seq: u64, within: Duration) -> bool {
        let mut rx = self.delivered.subscribe();
        matches!(
            tokio::time::timeout(within, rx.wait_for(|d| *d > seq)).await,
            Ok(Ok(_))
        )
    }

    /// Bytes stored and not delivered yet.
    pub fn backlog(&self) -> u64 {
        self.backlog.load(Ordering::SeqCst)
    }

    /// Waits until at most `max` bytes wait for delivery. The phase's output is read
    /// only then: a phase writing faster than the API takes it (or while the API is
    /// away) blocks on its pipe instead of filling the disk, and nothing is dropped.
    pub async fn wait_backlog_below(&self, max: u64) {
        let mut rx = self.delivered.subscribe();
        while self.backlog() > max {
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// Where to pack an artifact before [`Spool::push_artifact_file`] takes it: a file
    /// in the spool directory that delivery never reads.
    pub fn artifact_staging(&self) -> PathBuf {
        self.dir.join("artifact.partial")
    }

    /// Moves the packed artifact at `tarball` (in the spool directory, see
    /// [`Spool::artifact_staging`]) into the spool and stores its entry. Fails when the
    /// disk refuses it.
    pub fn push_artifact_file(&self, tarball: &Path) -> io::Result<u64> {
        self.push_with(
            &Entry::Artifact {
                file: String::new(),
            },
            Some(tarball),
        )
    }

    fn push_with(&self, entry: &Entry, file: Option<&Path>) -> io::Result<u64> {
        let mut inner = self
            .inner
            .lock()
            .map_err(|_| io::Error::other("spool lock poisoned"))?;
        let seq = inner.next;
        let mut entry = entry.clone();
        let mut size = 0;
        if let Some(src) = file {
            let name = format!("{seq:012}.tar.gz");
            size += std::fs::metadata(src)?.len();
            std::fs::rename(src, self.dir.join(&name))?;
            entry = Entry::Artifact { file: name };
        }
        let bytes = serde_json::to_vec(&entry).map_err(io::Error::other)?;
        write_atomic(&entry_path(&self.dir, seq), &bytes)?;
        size += bytes.len() as u64;
        self.backlog.fetch_add(size, Ordering::SeqCst);
        inner.next = seq + 1;
        inner.terminal |= entry.is_terminal();
        inner.tx.send_modify(|s| s.next = seq + 1);
        Ok(seq)
    }

    /// No more entries: delivery ends after the last one stored.
    pub fn close(&self) {
        if let Ok(i) = self.inner.lock() {
            i.tx.send_modify(|s| s.closed = true);
        }
    }
}

/// Removes a spool directory (after full delivery or a lost lease).
pub fn remove(dir: &Path) {
    if let Err(e) = std::fs::remove_dir_all(dir)
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot remove the spool");
    }
}

/// Delivers the entries of `spool` in the order `pending` names them, until the writer
/// closes the spool and everything is delivered ([`Delivered::All`], the directory is
/// removed) or the API answers 409 ([`Delivered::LeaseLost`]: `lost` is cancelled, the
/// directory is removed). While the API is unreachable or failing it keeps trying; the
/// caller bounds that by dropping the task.
pub async fn deliver(
    client: ApiClient,
    meta: Meta,
    spool: Spool,
    mut pending: Pending,
    lost: CancellationToken,
) -> Delivered {
    let client = client.once(ATTEMPT_TIMEOUT);
    let dir = spool.dir.clone();
    // What an entry took on disk leaves the backlog once it is delivered or dropped.
    let done = |seq: u64, size: u64| {
        let _ = spool
            .backlog
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |b| {
                Some(b.saturating_sub(size))
            });
        spool.delivered.send_replace(seq + 1);
    };
    while let Some(seq) = pending.recv().await {
        let (path, mut size, entry) = read_entry(&dir, seq);
        let entry = match entry {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(entry = %path.display(), error = %e, "unreadable spool entry; skipping it");
                let _ = std::fs::remove_file(&path);
                done(seq, size);
                continue;
            }
        };
        if let Entry::Artifact { file } = &entry {
            size += std::fs::metadata(dir.join(file)).map_or(0, |m| m.len());
        }
        let mut pause = Duration::from_millis(100);
        let mut failures = 0u32;
        loop {
            match send(&client, &meta, &dir, &entry).await {
                Ok(()) => break,
                Err(ClientError::LeaseLost(m)) => {
                    tracing::warn!(job.id = %meta.job_id, message = %m, "lease lost; dropping the spool");
                    lost.cancel();
                    remove(&dir);
                    return Delivered::LeaseLost;
                }
                Err(ClientError::JobGone(m)) => {
                    let left = pending.waiting() + 1;
                    tracing::warn!(job.id = %meta.job_id, message = %m, entries = left, "the API has no such job any more; dropping its spool");
                    lost.cancel();
                    remove(&dir);
                    return Delivered::LeaseLost;
                }
                Err(e @ (ClientError::Rejected { .. } | ClientError::Protocol(_))) => {
                    tracing::warn!(job.id = %meta.job_id, error = %e, entry = %path.display(), "the API refused a spooled write; dropping it");
                    break;
                }
                Err(ClientError::Unavailable(e) | ClientError::StoreDown(e)) => {
                    failures += 1;
                    if failures == 1 || failures.is_multiple_of(20) {
                        tracing::warn!(job.id = %meta.job_id, error = %e, failures, "the API is unavailable; keeping the spool and retrying");
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(MAX_BACKOFF);
                }
            }
        }
        if failures > 0 {
            tracing::info!(job.id = %meta.job_id, failures, "the API answers again; delivering the spool");
        }
        if entry.is_terminal() {
            // The last entry: gone at once, so that a crash now cannot leave a spool
            // that looks unfinished (a restart would release a finished job).
            break;
        }
        if let Entry::Artifact { file } = &entry {
            let _ = std::fs::remove_file(dir.join(file));
        }
        let _ = std::fs::remove_file(&path);
        done(seq, size);
    }
    remove(&dir);
    Delivered::All
}

/// Spooled entry `seq` of `dir`: its path, the bytes it takes on disk, and the entry
/// (or why it cannot be read).
fn read_entry(dir: &Path, seq: u64) -> (PathBuf, u64, Result<Entry, String>) {
    let path = entry_path(dir, seq);
    let size = std::fs::metadata(&path).map_or(0, |m| m.len());
    let entry = std::fs::read(&path)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice::<Entry>(&b).map_err(|e| e.to_string()));
    (path, size, entry)
}

async fn send(
    client: &ApiClient,
    meta: &Meta,
    dir: &Path,
    entry: &Entry,
) -> Result<(), ClientError> {
    match entry {
        Entry::Log { log_type, fragment } => {
            client
                .post_log(&meta.job_id, meta.token, *log_type, fragment)
                .await
        }
        Entry::Result { body, .. } => client.post_result(&meta.job_id, meta.token, body).await,
        Entry::Artifact { file } => {
            client
                .post_artifact_file(&meta.job_id, meta.token, &dir.join(file))
                .await
        }
        Entry::Release { reason } => client.release(&meta.job_id, meta.token, reason).await,
        Entry::ProvisionLog { exit_code, detail } => {
            client
                .post_provision_log(&meta.job_id, *exit_code, detail)
                .await
        }
    }
}

/// The spools a previous run of this agent left, oldest first by name.
pub fn leftovers(results_dir: &Path, agent_id: &str) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(results_dir.join(agent_id))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.join("meta.json").exists())
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use testflinger_common::Phase;

    fn meta() -> Meta {
        Meta {
            job_id: "j".into(),
            token: testflinger_common::protocol::FenceToken::from_bytes([7; 16]),
            attempt: 1,
            lease_ttl: 30,
        }
    }

    fn fragment(n: u64) -> Entry {
        Entry::Log {
            log_type: LogType::Output,
            fragment: Fragment {
                fragment_number: n,
                timestamp: "t".into(),
                phase: Phase::Test,
                log_data: format!("line {n}\n"),
            },
        }
    }

    #[tokio::test]
    async fn pending_hands_out_every_stored_entry_then_ends_after_close() {
        let tmp = tempfile::tempdir().expect("tmp");
        let (spool, mut rx) = Spool::create(tmp.path().join("j"), &meta()).expect("create");
        assert_eq!(rx.try_recv(), None);
        let waiter = tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(seq) = rx.recv().await {
                got.push(seq);
            }
            got
        });
        for n in 0..3 {
            spool.push(&fragment(n)).expect("push");
        }
        assert!(spool.backlog() > 0);
        // Stored before the close: still handed out.
        spool.push(&fragment(3)).expect("push");
        spool.close();
        assert_eq!(waiter.await.expect("join"), [0, 1, 2, 3]);
    }

    #[test]
    fn entries_survive_a_restart_in_order() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path().join("a").join("j");
        let (spool, mut rx) = Spool::create(dir.clone(), &meta()).expect("create");
        for n in 0..3 {
            spool.push(&fragment(n)).expect("push");
        }
        let staged = spool.artifact_staging();
        std::fs::write(&staged, b"tarball").expect("stage");
        spool.push_artifact_file(&staged).expect("artifact");
        assert!(!staged.exists());
        assert_eq!(rx.try_recv(), Some(0));
        assert!(!spool.has_terminal());
        drop(spool);

        let (m, spool, mut rx) = Spool::reopen(dir.clone()).expect("reopen");
        assert_eq!(m, meta());
        assert!(!spool.has_terminal());
        let seqs: Vec<u64> = std::iter::from_fn(|| rx.try_recv()).collect();
        assert_eq!(seqs, [0, 1, 2, 3]);
        spool
            .push(&Entry::Release { reason: "r".into() })
            .expect("release");
        assert!(spool.has_terminal());
        assert_eq!(rx.try_recv(), Some(4));
        assert!(dir.join("000000000003.tar.gz").exists());
        assert_eq!(leftovers(tmp.path(), "a"), [dir]);
    }
}
