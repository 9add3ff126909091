//! Logs at lab scale. While a job runs its log fragments live in Redis; when it ends
//! (complete or cancelled, by its agent, a user or the reaper) the compactor writes them
//! to the file store, one file per log type and attempt, and removes them from Redis
//! (see `store/logs.rs` for the order of steps that keeps a reader from seeing neither).
//! Every read ([`read`], [`tail`]) merges both, so a job reads the same before and after.
//!
//! A compacted log file `DATA_PATH/logs/<job id>/<type>.<attempt>.jsonl` holds one
//! fragment per line, as JSON `{"n","a","ms","t","p","d"}` (stored number, attempt,
//! timestamp in Unix ms and as sent, phase, `log_data`), in number order, so a read from
//! a fragment number seeks by bisection instead of scanning the file.
//!
//! Late fragments (an agent's spool delivering after the job ended, or a cancelled job's
//! agent still writing its cleanup) are accepted and stored in Redis again; the job is
//! compacted again [`LATE_DELAY_MS`] after the last of them, merging them into its files.
//!
//! SSE followers are woken by Redis pub/sub (one subscriber connection per server,
//! [`run_subscriber`], fanned out by [`LogEvents`]), not by polling.

use crate::error::{ApiError, ApiResult};
use crate::files::FileStore;
use crate::metrics::Metrics;
use crate::store::{ATTEMPT_STRIDE, Batch, Fragment, Store, now_ms};
use futures_util::StreamExt;
use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

/// Most fragments one SSE event batch carries.
pub const SSE_BATCH_FRAGMENTS: usize = 200;
/// Most bytes of `log_data` one SSE event batch carries (at least one fragment).
pub const SSE_BATCH_BYTES: usize = 256 * 1024;
/// A late fragment (written after the job ended) has its job compacted again once no
/// other came for this long, in milliseconds.
pub const LATE_DELAY_MS: u64 = 10_000;
/// Fragments read from Redis per step of a compaction.
const COMPACT_CHUNK: Batch = Batch {
    fragments: 256,
    bytes: 4 << 20,
};
/// One SSE batch.
pub const SSE_BATCH: Batch = Batch {
    fragments: SSE_BATCH_FRAGMENTS,
    bytes: SSE_BATCH_BYTES,
};
/// Jobs compacted per pass.
const COMPACT_BATCH: usize = 50;

/// The log types a job has.
pub const LOG_TYPES: [&str; 2] = ["output", "serial"];

/// Shared by every handler: the SSE fan-out and the compactor's wake-up.
#[derive(Clone, Debug, Default)]
pub struct Logs {
    pub events: LogEvents,
    /// Poked when a job ends, so its log is compacted now rather than at the next pass.
    pub compact_now: Arc<Notify>,
}

/// The attempt a stored fragment number belongs to (see [`crate::store::fragment_score`]).
pub fn attempt_of(n: i64) -> u64 {
    (n.max(0) / ATTEMPT_STRIDE) as u64 + 1
}

/// The text stored in place of the first fragment past a job's log cap.
pub fn truncation_notice(log_type: &str, cap: u64) -> String {
    format!(
        "\n[testflinger: this job's {log_type} log reached the server's limit of {cap} bytes (TESTFLINGER_MAX_LOG_BYTES); later {log_type} was not stored]\n"
    )
}

fn io_err(what: &str, e: impl std::fmt::Display) -> ApiError {
    ApiError::Internal(anyhow::anyhow!("{what}: {e}"))
}

async fn blocking<T: Send + 'static>(
    what: &'static str,
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> ApiResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| io_err(what, e))?
        .map_err(|e| io_err(what, e))
}

/// A job's fragments of `log_type` numbered `from` or more, in order, within `limit`
/// (all when `None`; a batch's byte bound counts the stored JSON of each fragment), from
/// Redis and, once the job was compacted, its files.
pub async fn read(
    store: &Store,
    files: &FileStore,
    id: &str,
    log_type: &str,
    from: i64,
    limit: Option<Batch>,
) -> ApiResult<Vec<Fragment>> {
    let r = store.log_fragments(id, log_type, from, limit).await?;
    if !r.compacted {
        return Ok(r.fragments);
    }
    let files = files.clone();
    let (id, lt) = (id.to_string(), log_type.to_string());
    let on_disk = blocking("reading a compacted log", move || {
        read_files(&files, &id, &lt, from, limit)
    })
    .await?;
    let mut all: BTreeMap<i64, Fragment> = on_disk.into_iter().map(|f| (f.n, f)).collect();
    all.extend(r.fragments.into_iter().map(|f| (f.n, f)));
    let max = limit.map_or(usize::MAX, |b| b.fragments);
    Ok(all.into_values().take(max).collect())
}

/// The newest fragments of a job's log for the web UI, oldest first: at most `max` and
/// `max_bytes` of `log_data` (at least the newest one), and whether older ones were left
/// out.
pub async fn tail(
    store: &Store,
    files: &FileStore,
    id: &str,
    log_type: &str,
    max: usize,
    max_bytes: usize,
) -> ApiResult<(Vec<Fragment>, bool)> {
    let (r, total) = store.log_newest(id, log_type, max).await?;
    let mut cut = total > r.fragments.len();
    let mut all: BTreeMap<i64, Fragment> = BTreeMap::new();
    if r.compacted {
        let files = files.clone();
        let (id, lt) = (id.to_string(), log_type.to_string());
        // JSON escaping can double the text; a window twice the byte budget holds it.
        let window = (max_bytes as u64) * 2 + 64 * 1024;
        let (on_disk, file_cut) = blocking("reading a compacted log", move || {
            tail_files(&files, &id, &lt, window)
        })
        .await?;
        cut |= file_cut;
        all.extend(on_disk.into_iter().map(|f| (f.n, f)));
    }
    all.extend(r.fragments.into_iter().map(|f| (f.n, f)));
    let mut out = Vec::new();
    let mut bytes = 0;
    let n_all = all.len();
    for f in all.into_values().rev() {
        bytes += f.data.len();
        if out.len() >= max || (bytes > max_bytes && !out.is_empty()) {
            break;
        }
        out.push(f);
    }
    cut |= out.len() < n_all;
    out.reverse();
    Ok((out, cut))
}

/// The attempts that have a compacted file of `log_type`, ascending.
fn file_attempts(dir: &Path, log_type: &str) -> std::io::Result<Vec<u64>> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(a) = name
            .strip_prefix(log_type)
            .and_then(|r| r.strip_prefix('.'))
            .and_then(|r| r.strip_suffix(".jsonl"))
            .and_then(|a| a.parse::<u64>().ok())
        {
            out.push(a);
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// Positions `r` at the start of a line at or before the first line numbered `from` or
/// more, by bisection on the byte offset (lines are in number order).
fn seek_first(r: &mut BufReader<std::fs::File>, len: u64, from: i64) -> std::io::Result<()> {
    let (mut lo, mut hi) = (0u64, len);
    let mut buf = Vec::new();
    while hi - lo > 64 * 1024 {
        let mid = lo + (hi - lo) / 2;
        r.seek(SeekFrom::Start(mid))?;
        buf.clear();
        r.read_until(b'\n', &mut buf)?;
        buf.clear();
        if r.read_until(b'\n', &mut buf)? == 0 {
            hi = mid;
            continue;
        }
        let n = std::str::from_utf8(&buf)
            .ok()
            .and_then(|l| Fragment::from_member(l.trim_end()))
            .map(|f| f.n);
        match n {
            Some(n) if n < from => lo = mid,
            _ => hi = mid,
        }
    }
    r.seek(SeekFrom::Start(lo))?;
    if lo > 0 {
        // `lo` may fall inside a line; that line is numbered below `from`.
        buf.clear();
        r.read_until(b'\n', &mut buf)?;
    }
    Ok(())
}

/// Parses lines from `r` until EOF; calls `each` per fragment, stops when it says so.
fn each_line(
    r: &mut BufReader<std::fs::File>,
    mut each: impl FnMut(Fragment) -> bool,
) -> std::io::Result<()> {
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Ok(());
        }
        if let Some(f) = Fragment::from_member(line.trim_end())
            && !each(f)
        {
            return Ok(());
        }
    }
}

/// Fragments numbered `from` or more from a job's compacted files, within `limit`.
pub fn read_files(
    files: &FileStore,
    id: &str,
    log_type: &str,
    from: i64,
    limit: Option<Batch>,
) -> std::io::Result<Vec<Fragment>> {
    let (limit, budget) = limit.map_or((usize::MAX, usize::MAX), |b| (b.fragments, b.bytes));
    let mut bytes = 0usize;
    let mut out = Vec::new();
    for a in file_attempts(&files.log_dir(id), log_type)? {
        if (a as i64).saturating_mul(ATTEMPT_STRIDE) <= from {
            continue;
        }
        let f = match std::fs::File::open(files.log_path(id, log_type, a)) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let len = f.metadata()?.len();
        let mut r = BufReader::new(f);
        seek_first(&mut r, len, from)?;
        let mut full = false;
        each_line(&mut r, |f| {
            if f.n >= from {
                if !out.is_empty() && bytes.saturating_add(f.data.len()) > budget {
                    full = true;
                    return false;
                }
                bytes = bytes.saturating_add(f.data.len());
                out.push(f);
            }
            full = out.len() >= limit;
            !full
        })?;
        if full {
            break;
        }
    }
    Ok(out)
}

/// The fragments in the last `window` bytes of each of a job's compacted files, in
/// order, and whether any file held more.
fn tail_files(
    files: &FileStore,
    id: &str,
    log_type: &str,
    window: u64,
) -> std::io::Result<(Vec<Fragment>, bool)> {
    let mut out = Vec::new();
    let mut cut = false;
    for a in file_attempts(&files.log_dir(id), log_type)? {
        let Ok(f) = std::fs::File::open(files.log_path(id, log_type, a)) else {
            continue;
        };
        let len = f.metadata()?.len();
        let mut r = BufReader::new(f);
        if len > window {
            cut = true;
            r.seek(SeekFrom::Start(len - window))?;
            let mut skip = Vec::new();
            r.read_until(b'\n', &mut skip)?;
        }
        each_line(&mut r, |f| {
            out.push(f);
            true
        })?;
    }
    Ok((out, cut))
}

/// Writes one attempt's compacted file: the fragments pushed (in number order), merged
/// with the file already there (a compaction of late fragments); a fragment pushed
/// replaces the file's line of the same number. Written to a temporary file, renamed
/// into place by [`AttemptWriter::finish`].
struct AttemptWriter {
    attempt: u64,
    tmp: PathBuf,
    path: PathBuf,
    out: BufWriter<std::fs::File>,
    old: Option<BufReader<std::fs::File>>,
    peeked: Option<(i64, String)>,
}

impl AttemptWriter {
    fn open(files: &FileStore, id: &str, log_type: &str, attempt: u64) -> std::io::Result<Self> {
        std::fs::create_dir_all(files.log_dir(id))?;
        let path = files.log_path(id, log_type, attempt);
        let tmp = files.tmp_path(&format!(
            "{id}.{log_type}.{attempt}.{}",
            uuid::Uuid::new_v4().simple()
        ));
        let old = match std::fs::File::open(&path) {
            Ok(f) => Some(BufReader::new(f)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        let mut w = AttemptWriter {
            attempt,
            out: BufWriter::new(std::fs::File::create(&tmp)?),
            tmp,
            path,
            old,
            peeked: None,
        };
        w.advance()?;
        Ok(w)
    }

    /// Reads the next line of the old file into `peeked`.
    fn advance(&mut self) -> std::io::Result<()> {
        self.peeked = None;
        let Some(r) = self.old.as_mut() else {
            return Ok(());
        };
        let mut line = String::new();
        loop {
            line.clear();
            if r.read_line(&mut line)? == 0 {
                self.old = None;
                return Ok(());
            }
            let trimmed = line.trim_end();
            if let Some(f) = Fragment::from_member(trimmed) {
                self.peeked = Some((f.n, trimmed.to_string()));
                return Ok(());
            }
        }
    }

    fn push(&mut self, f: &Fragment) -> std::io::Result<()> {
        while let Some((n, line)) = self.peeked.take() {
            if n > f.n {
                self.peeked = Some((n, line));
                break;
            }
            if n < f.n {
                self.out.write_all(line.as_bytes())?;
                self.out.write_all(b"\n")?;
            }
            self.advance()?;
        }
        self.out.write_all(f.to_member().as_bytes())?;
        self.out.write_all(b"\n")
    }

    fn finish(mut self) -> std::io::Result<()> {
        while let Some((_, line)) = self.peeked.take() {
            self.out.write_all(line.as_bytes())?;
            self.out.write_all(b"\n")?;
            self.advance()?;
        }
        let f = self.out.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        std::fs::rename(&self.tmp, &self.path)
    }
}

/// Compacts one ended job's fragments into the file store (see the module docs).
/// True when its fragments left Redis; false when the job is not ended (taken off the
/// compaction set) or a fragment came meanwhile (the caller schedules it again).
pub async fn compact_job(store: &Store, files: &FileStore, id: &str) -> ApiResult<bool> {
    let snap = store.compaction_snapshot(id).await?;
    match snap.state {
        // Expired: nothing to keep; `finish_compaction` drops what is left.
        None => return Ok(store.finish_compaction(id, &snap).await?),
        Some(state) if state.is_terminal() => {}
        Some(_) => {
            store.drop_compaction(id).await?;
            return Ok(false);
        }
    }
    for lt in LOG_TYPES {
        let mut from = 0;
        let mut writer: Option<AttemptWriter> = None;
        loop {
            let chunk = store
                .log_fragments(id, lt, from, Some(COMPACT_CHUNK))
                .await?
                .fragments;
            let Some(last) = chunk.last() else { break };
            from = last.n + 1;
            let files = files.clone();
            let job = id.to_string();
            writer = blocking("writing a compacted log", move || {
                let mut w = writer;
                for f in &chunk {
                    let a = attempt_of(f.n);
                    if w.as_ref().is_none_or(|w| w.attempt != a) {
                        if let Some(done) = w.take() {
                            done.finish()?;
                        }
                        w = Some(AttemptWriter::open(&files, &job, lt, a)?);
                    }
                    if let Some(w) = w.as_mut() {
                        w.push(f)?;
                    }
                }
                Ok(w)
            })
            .await?;
        }
        if let Some(w) = writer {
            blocking("writing a compacted log", move || w.finish()).await?;
        }
    }
    Ok(store.finish_compaction(id, &snap).await?)
}

/// One pass over the jobs due for compaction; returns how many it looked at.
pub async fn compact_due(store: &Store, files: &FileStore, metrics: &Metrics) -> ApiResult<usize> {
    let ids = store.due_compactions(now_ms(), COMPACT_BATCH).await?;
    for id in &ids {
        match compact_job(store, files, id).await {
            Ok(true) => metrics.inc("testflinger_log_compactions_total", "done"),
            Ok(false) => {
                store.schedule_compaction(id, now_ms() + 1000).await.ok();
            }
            Err(e) => {
                tracing::warn!(job.id = %id, error = %e, "could not compact the job's log; retrying in 5 s");
                metrics.inc("testflinger_log_compactions_total", "failed");
                store.schedule_compaction(id, now_ms() + 5000).await.ok();
            }
        }
    }
    Ok(ids.len())
}

/// The compactor: runs when a job ends (poked through [`Logs::compact_now`]) and every
/// `interval`. Ends at `shutdown`, after the pass under way.
pub async fn run_compactor(
    store: Store,
    files: FileStore,
    metrics: std::sync::Arc<Metrics>,
    logs: Logs,
    interval: Duration,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = logs.compact_now.notified() => {}
            _ = tokio::time::sleep(interval) => {}
        }
        loop {
            match compact_due(&store, &files, &metrics).await {
                Ok(n) if n >= COMPACT_BATCH => continue,
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "log compaction pass failed; retrying");
                    break;
                }
            }
        }
    }
}

/// Fans log events out to this server's SSE streams: one `watch` channel per followed
/// job (a counter bumped per event), dropped with its last follower.
#[derive(Clone, Debug, Default)]
pub struct LogEvents {
    followers: Arc<Mutex<HashMap<String, watch::Sender<u64>>>>,
}

/// One SSE stream's subscription to a job's log events.
#[derive(Debug)]
pub struct Follow {
    events: LogEvents,
    id: String,
    rx: Option<watch::Receiver<u64>>,
}

impl LogEvents {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, watch::Sender<u64>>> {
        self.followers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Follows a job's log events.
    pub fn follow(&self, id: &str) -> Follow {
        let rx = self
            .map()
            .entry(id.to_string())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe();
        Follow {
            events: self.clone(),
            id: id.to_string(),
            rx: Some(rx),
        }
    }

    /// Wakes the streams that follow `id`.
    pub fn wake(&self, id: &str) {
        if let Some(tx) = self.map().get(id) {
            tx.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// Wakes every stream (after the subscription was re-established: events may have
    /// been missed meanwhile).
    pub fn wake_all(&self) {
        for tx in self.map().values() {
            tx.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// How many jobs are followed.
    pub fn followed_jobs(&self) -> usize {
        self.map().len()
    }
}

impl Follow {
    /// Marks the events so far as seen: [`Follow::changed`] waits for a later one.
    pub fn seen(&mut self) {
        if let Some(rx) = self.rx.as_mut() {
            rx.borrow_and_update();
        }
    }

    /// Waits for an event not yet seen.
    pub async fn changed(&mut self) {
        match self.rx.as_mut() {
            Some(rx) => {
                if rx.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
            None => std::future::pending().await,
        }
    }
}

impl Drop for Follow {
    fn drop(&mut self) {
        self.rx.take();
        let mut map = self.events.map();
        if map.get(&self.id).is_some_and(|tx| tx.receiver_count() == 0) {
            map.remove(&self.id);
        }
    }
}

/// The server's one pub/sub subscriber: relays log events to [`LogEvents`]; reconnects
/// after a drop (waking every stream, which then reads what it missed). Ends at
/// `shutdown`.
pub async fn run_subscriber(store: Store, logs: Logs, shutdown: CancellationToken) {
    loop {
        match store.log_events().await {
            Ok(stream) => {
                logs.events.wake_all();
                let mut stream = std::pin::pin!(stream);
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        next = stream.next() => match next {
                            Some(id) => logs.events.wake(&id),
                            None => break,
                        },
                    }
                }
                tracing::warn!("the log event subscription dropped; reconnecting");
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot subscribe to log events; retrying in 1 s")
            }
        }
        logs.events.wake_all();
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}
