//! Output pumping: a phase's merged stdout and stderr buffered, masked and cut into
//! fragments (each appended to `<phase>.log` and spooled for the API), what is left in
//! the pipe read once the command exited or was stopped, and the serial log the
//! connector wrote sent in chunks.

use super::{Run, now_iso};
use crate::client::Fragment;
use crate::process::Output;
use crate::spool::{Entry, Spool};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use testflinger_common::{LogType, Phase};
use tokio::time::Instant;

/// How often buffered output is sent while a phase runs.
pub(super) const FLUSH_EVERY: Duration = Duration::from_millis(500);
/// How much one read of the phase's pipe takes at most.
pub(super) const READ_BUF: usize = 64 * 1024;
/// After a phase's command exited and its drain second ran out: output already in the
/// pipe is still read, until it stays quiet this long ...
const DRAIN_QUIET: Duration = Duration::from_millis(50);
/// ... or this much was read (a background child printing forever cannot hold the job).
const DRAIN_MAX: usize = 4 << 20;
/// How long the output of a stopped phase's dying tree is still read.
const DYING_READ: Duration = Duration::from_millis(300);
/// Serial logs are sent in chunks of this size.
const SERIAL_CHUNK: usize = 1024 * 1024;

impl Run {
    /// The sink of `phase`'s output, the banner that starts its log already in it.
    pub(super) fn output_sink(&self, phase: Phase) -> OutputSink {
        let mut sink = OutputSink {
            phase,
            log_path: self.rundir.join(format!("{phase}.log")),
            pending: Vec::new(),
            masks: self.masks.clone(),
            counter: self.output_counter.clone(),
            spool: Some(self.spool.clone()),
        };
        let line = "*".repeat(50);
        sink.push(
            format!(
                "{line}\n* Starting testflinger {phase} phase on {}\n{line}\n",
                self.cfg.agent_id
            )
            .as_bytes(),
        );
        sink
    }

    /// Streams `<phase>-serial.log`, written by the connector's serial logger.
    pub(super) async fn send_serial(&mut self, phase: Phase) -> anyhow::Result<()> {
        use tokio::io::AsyncReadExt;
        let path = self.rundir.join(format!("{phase}-serial.log"));
        let Ok(mut file) = tokio::fs::File::open(&path).await else {
            return Ok(());
        };
        // Read in pieces (a serial log can be larger than memory), cut at character
        // boundaries: a character across a 1 MiB cut must not turn into U+FFFD on both
        // sides. More than SERIAL_CHUNK bytes stay buffered until the end, so the cuts
        // are those of `utf8_chunks` over the whole file.
        let mut buf: Vec<u8> = Vec::with_capacity(2 * SERIAL_CHUNK);
        let mut eof = false;
        loop {
            while !eof && buf.len() <= SERIAL_CHUNK {
                let want = (2 * SERIAL_CHUNK - buf.len()) as u64;
                match (&mut file).take(want).read_to_end(&mut buf).await {
                    Ok(n) => eof = n == 0,
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "cannot read the rest of the serial log");
                        eof = true;
                    }
                }
            }
            if buf.is_empty() {
                break;
            }
            let cut = testflinger_common::text::utf8_cut(&buf, SERIAL_CHUNK);
            let chunk = String::from_utf8_lossy(&buf[..cut]).into_owned();
            buf.drain(..cut);
            let fragment = Fragment {
                fragment_number: self.serial_counter,
                timestamp: now_iso(),
                phase,
                log_data: chunk,
            };
            self.serial_counter += 1;
            self.push(
                "serial log",
                &Entry::Log {
                    log_type: LogType::Serial,
                    fragment,
                },
            )?;
        }
        Ok(())
    }
}

/// The command exited and its drain second is over, with the pipe still open (a
/// background child holds it): what is already written is kept, even when this task
/// was not scheduled between the deadline and the data (a loaded machine). Reads until
/// the pipe stays quiet for [`DRAIN_QUIET`] or [`DRAIN_MAX`] bytes were read.
pub(super) async fn read_after_exit(output: &mut Output, sink: &mut OutputSink, mut eof: bool) {
    let mut buf = vec![0u8; READ_BUF];
    let mut taken = 0usize;
    while !eof && taken < DRAIN_MAX {
        match tokio::time::timeout(DRAIN_QUIET, output.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {
                sink.push(&buf[..n]);
                taken += n;
            }
            Ok(_) => eof = true,
            Err(_) => break,
        }
    }
}

/// The phase was killed: what its dying tree still wrote, for [`DYING_READ`] at most.
pub(super) async fn read_while_dying(output: &mut Output, sink: &mut OutputSink, mut eof: bool) {
    let mut buf = vec![0u8; READ_BUF];
    let end = Instant::now() + DYING_READ;
    while !eof {
        match tokio::time::timeout_at(end, output.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => sink.push(&buf[..n]),
            _ => eof = true,
        }
    }
}

/// Buffers a phase's output; each flush appends to `<phase>.log` and spools one
/// fragment for the API. Secrets are masked in both.
pub(super) struct OutputSink {
    phase: Phase,
    log_path: PathBuf,
    pending: Vec<u8>,
    masks: Arc<Vec<(String, String)>>,
    counter: Arc<AtomicU64>,
    spool: Option<Spool>,
}

/// Largest output fragment sent in one request: the API refuses bodies over 16 MiB, and
/// smaller fragments keep a fast writer's output flowing while it runs.
const FRAGMENT_MAX: usize = 1 << 20;

impl OutputSink {
    pub(super) fn push(&mut self, bytes: &[u8]) {
        self.pending.extend_from_slice(bytes);
        if self.pending.len() >= FRAGMENT_MAX {
            self.flush(false);
        }
    }

    /// Sends what is buffered. Unless `all`, an incomplete UTF-8 sequence at the end, and
    /// an end that could be the start of a secret, wait for the next read, so a secret
    /// split across two reads is still masked.
    pub(super) fn flush(&mut self, all: bool) {
        if self.pending.is_empty() {
            return;
        }
        let cut = if all {
            self.pending.len()
        } else {
            match std::str::from_utf8(&self.pending) {
                Ok(_) => self.pending.len(),
                Err(e) if e.error_len().is_none() => e.valid_up_to(),
                Err(_) => self.pending.len(),
            }
        };
        if cut == 0 {
            return;
        }
        let rest = self.pending.split_off(cut);
        let chunk = std::mem::replace(&mut self.pending, rest);
        let mut text = String::from_utf8_lossy(&chunk).into_owned();
        for (secret, mask) in self.masks.iter() {
            text = text.replace(secret.as_str(), mask);
        }
        if !all {
            let longest = self.masks.iter().map(|(s, _)| s.len()).max().unwrap_or(0);
            let mut keep_from = text.len().saturating_sub(longest.saturating_sub(1));
            while !text.is_char_boundary(keep_from) {
                keep_from -= 1;
            }
            // Hold back only a tail that could begin a secret.
            let tail = &text[keep_from..];
            let held = (0..tail.len())
                .filter(|&i| tail.is_char_boundary(i))
                .find(|&i| self.masks.iter().any(|(s, _)| s.starts_with(&tail[i..])))
                .map(|i| keep_from + i);
            if let Some(at) = held {
                let mut back = text.split_off(at).into_bytes();
                back.extend_from_slice(&self.pending);
                self.pending = back;
            }
        }
        if text.is_empty() {
            return;
        }
        append(&self.log_path, &text);
        if let Some(spool) = &self.spool {
            let fragment = Fragment {
                fragment_number: self.counter.fetch_add(1, Ordering::SeqCst),
                timestamp: now_iso(),
                phase: self.phase,
                log_data: text,
            };
            let entry = Entry::Log {
                log_type: LogType::Output,
                fragment,
            };
            if let Err(e) = spool.push(&entry) {
                tracing::error!(error = %e, "cannot spool an output fragment; it is lost");
            }
        }
    }
}

fn append(path: &Path, text: &str) {
    let r = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()));
    if let Err(e) = r {
        tracing::warn!(path = %path.display(), error = %e, "cannot write the phase log");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::Meta;
    use sha2::{Digest, Sha256};

    /// A spool in `dir` and a way to read back what was spooled, in order.
    fn test_spool(dir: &Path) -> (Spool, impl FnMut() -> Vec<(LogType, Fragment)>) {
        let sdir = dir.join("spool");
        let meta = Meta {
            job_id: "j".into(),
            token: testflinger_common::protocol::FenceToken::from_bytes([1; 16]),
            attempt: 1,
            lease_ttl: 30,
        };
        let (spool, mut rx) = Spool::create(sdir.clone(), &meta).expect("spool");
        let read = move || {
            let mut out = Vec::new();
            while let Some(seq) = rx.try_recv() {
                let path = sdir.join(format!("{seq:012}.json"));
                let bytes = std::fs::read(&path).expect("entry");
                if let Ok(Entry::Log { log_type, fragment }) = serde_json::from_slice(&bytes) {
                    out.push((log_type, fragment));
                }
            }
            out
        };
        (spool, read)
    }

    #[test]
    fn output_is_masked_and_split_on_utf8_boundaries() {
        let dir = tempfile::tempdir().expect("tmp");
        let (spool, mut read) = test_spool(dir.path());
        let digest = hex::encode(Sha256::digest(b"hunter2"));
        let mask = format!("**{}**", &digest[..6]);
        let mut sink = OutputSink {
            phase: Phase::Test,
            log_path: dir.path().join("test.log"),
            pending: Vec::new(),
            masks: Arc::new(vec![("hunter2".into(), mask.clone())]),
            counter: Arc::new(AtomicU64::new(5)),
            spool: Some(spool),
        };
        let text = "password hunter2 \u{e9}";
        let bytes = text.as_bytes();
        // Cut inside the two-byte 'é'.
        sink.push(&bytes[..bytes.len() - 1]);
        sink.flush(false);
        sink.push(&bytes[bytes.len() - 1..]);
        sink.flush(false);
        let mut got = String::new();
        let mut numbers = Vec::new();
        for (lt, f) in read() {
            assert_eq!(lt, LogType::Output);
            numbers.push(f.fragment_number);
            got.push_str(&f.log_data);
        }
        assert_eq!(got, format!("password {mask} \u{e9}"));
        assert_eq!(numbers, [5, 6]);
        let log = std::fs::read_to_string(dir.path().join("test.log")).expect("log");
        assert_eq!(log, got);
        assert!(!log.contains("hunter2"));
    }

    fn sink(
        dir: &Path,
        masks: Vec<(String, String)>,
    ) -> (OutputSink, impl FnMut() -> Vec<(LogType, Fragment)>) {
        let (spool, read) = test_spool(dir);
        let sink = OutputSink {
            phase: Phase::Test,
            log_path: dir.join("test.log"),
            pending: Vec::new(),
            masks: Arc::new(masks),
            counter: Arc::new(AtomicU64::new(0)),
            spool: Some(spool),
        };
        (sink, read)
    }

    #[test]
    fn a_secret_split_across_reads_is_still_masked() {
        let dir = tempfile::tempdir().expect("tmp");
        let (mut sink, mut read) = sink(dir.path(), vec![("hunter2".into(), "**m**".into())]);
        sink.push(b"the password is hun");
        sink.flush(false);
        sink.push(b"ter2, done");
        sink.flush(false);
        sink.flush(true);
        let mut got = String::new();
        for (_, f) in read() {
            assert!(!f.log_data.contains("hun") || !f.log_data.contains("hunter2"));
            got.push_str(&f.log_data);
        }
        assert_eq!(got, "the password is **m**, done");
    }

    #[test]
    fn a_fast_writer_is_sent_in_bounded_fragments() {
        let dir = tempfile::tempdir().expect("tmp");
        let (mut sink, mut read) = sink(dir.path(), Vec::new());
        let block = vec![b'y'; 64 * 1024];
        for _ in 0..(5 * 16) {
            sink.push(&block); // 5 MiB without a tick
        }
        sink.flush(true);
        let mut total = 0;
        let mut count = 0;
        for (_, f) in read() {
            assert!(
                f.log_data.len() <= FRAGMENT_MAX + 64 * 1024,
                "{}",
                f.log_data.len()
            );
            total += f.log_data.len();
            count += 1;
        }
        assert_eq!(total, 5 << 20);
        assert!(count >= 5);
    }
}
