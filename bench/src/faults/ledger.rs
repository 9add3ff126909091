//! The ledger: what every job's test actually did, written by the test itself, so overlap
//! and loss are computed from facts rather than from the API's own view.
//!
//! The test command (a bash script, [`script`]) appends one line per event to the ledger
//! file, each a single `write(2)` with `O_APPEND` (atomic for lines this short):
//!
//! - `S <job> <run> <agent> <t> <ms>`: the test started (run = a fresh id per
//!   execution) and will take about `ms` milliseconds;
//! - `L <job> <run> <n> <t>`: it printed output line `n` (`TFL <run> <n>`) to stdout;
//! - `E <job> <run> <n> <t>`: it finished after printing lines 1..=n.
//!
//! `t` is `/proc/uptime` (seconds since boot, 10 ms steps: monotonic, the same clock for
//! every process). The attempt of a run is its rank among the job's starts. The test
//! ignores SIGPIPE: like a test on a real device it goes on whether or not anyone still
//! reads its console, which is what makes a test left behind by a dead agent visible.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// How long tests run: `long_pct` % of them take `long_ms`, the rest `short_ms`.
#[derive(Debug, Clone, Copy)]
pub struct TestShape {
    pub short_ms: (u64, u64),
    pub long_ms: (u64, u64),
    pub long_pct: u64,
    /// Milliseconds between output lines.
    pub line_ms: u64,
}

/// The job script: `bash <path>` is the agents' `test_command`.
pub fn script(ledger: &Path, shape: TestShape) -> String {
    format!(
        r#"#!/bin/bash
# testflinger-bench faults: a test of random length that prints numbered lines and
# records what it does in the ledger (see bench/src/faults/ledger.rs).
trap '' PIPE
L='{ledger}'
job=${{PWD##*/}}
run=$$x$RANDOM$RANDOM
agent=${{agent_id:-unknown}}
if (( RANDOM % 100 < {long_pct} )); then lo={llo}; hi={lhi}; else lo={slo}; hi={shi}; fi
ms=$(( lo + (RANDOM * 32768 + RANDOM) % (hi - lo + 1) ))
read -r up _ < /proc/uptime
echo "S $job $run $agent $up $ms" >> "$L"
n=$(( ms / {line_ms} ))
(( n < 2 )) && n=2
step=$(( ms / n ))
pause=$(printf '%d.%03d' $(( step / 1000 )) $(( step % 1000 )))
for (( i = 1; i <= n; i++ )); do
  echo "TFL $run $i"
  read -r up _ < /proc/uptime
  echo "L $job $run $i $up" >> "$L"
  sleep "$pause"
done
read -r up _ < /proc/uptime
echo "E $job $run $n $up" >> "$L"
"#,
        ledger = ledger.display(),
        long_pct = shape.long_pct,
        llo = shape.long_ms.0,
        lhi = shape.long_ms.1.max(shape.long_ms.0),
        slo = shape.short_ms.0,
        shi = shape.short_ms.1.max(shape.short_ms.0),
        line_ms = shape.line_ms.max(10),
    )
}

/// Seconds since boot, the ledger's clock.
pub fn uptime() -> f64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// One execution of a job's test.
#[derive(Debug, Clone)]
pub struct Run {
    pub job: String,
    pub agent: String,
    pub start: f64,
    /// Planned length in seconds.
    pub planned: f64,
    /// Time of the last record (line or end).
    pub last: f64,
    /// Output lines printed (highest `n` of an `L` record).
    pub lines: u32,
    /// Set when the test finished (`E`): lines printed.
    pub ended: Option<u32>,
}

/// The parsed ledger, read incrementally.
pub struct Ledger {
    path: PathBuf,
    offset: u64,
    partial: String,
    pub runs: HashMap<String, Run>,
    /// Runs of each job, in start order.
    pub by_job: HashMap<String, Vec<String>>,
    /// Start times, in file order (for "first claim after").
    pub starts: Vec<f64>,
    pub ended_jobs: std::collections::HashSet<String>,
    pub bad_lines: usize,
}

impl Ledger {
    pub fn new(path: PathBuf) -> Ledger {
        Ledger {
            path,
            offset: 0,
            partial: String::new(),
            runs: HashMap::new(),
            by_job: HashMap::new(),
            starts: Vec::new(),
            ended_jobs: Default::default(),
            bad_lines: 0,
        }
    }

    /// Reads what was appended since the last call.
    pub fn refresh(&mut self) {
        let Ok(mut f) = std::fs::File::open(&self.path) else {
            return;
        };
        if f.seek(SeekFrom::Start(self.offset)).is_err() {
            return;
        }
        let mut buf = Vec::new();
        if f.read_to_end(&mut buf).is_err() {
            return;
        }
        self.offset += buf.len() as u64;
        self.partial.push_str(&String::from_utf8_lossy(&buf));
        let text = std::mem::take(&mut self.partial);
        let mut rest = text.as_str();
        while let Some(i) = rest.find('\n') {
            let line = &rest[..i];
            rest = &rest[i + 1..];
            self.apply(line);
        }
        self.partial = rest.to_string();
    }

    fn apply(&mut self, line: &str) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let t = |s: &str| s.parse::<f64>().ok();
        match f.as_slice() {
            ["S", job, run, agent, ts, ms] => {
                let (Some(ts), Some(ms)) = (t(ts), t(ms)) else {
                    self.bad_lines += 1;
                    return;
                };
                self.runs.insert(
                    run.to_string(),
                    Run {
                        job: job.to_string(),
                        agent: agent.to_string(),
                        start: ts,
                        planned: ms / 1000.0,
                        last: ts,
                        lines: 0,
                        ended: None,
                    },
                );
                self.by_job
                    .entry(job.to_string())
                    .or_default()
                    .push(run.to_string());
                self.starts.push(ts);
            }
            [kind @ ("L" | "E"), job, run, n, ts] => {
                let (Some(ts), Ok(n)) = (t(ts), n.parse::<u32>()) else {
                    self.bad_lines += 1;
                    return;
                };
                let Some(r) = self.runs.get_mut(*run) else {
                    self.bad_lines += 1;
                    return;
                };
                r.last = r.last.max(ts);
                if *kind == "L" {
                    r.lines = r.lines.max(n);
                } else {
                    r.ended = Some(n);
                    self.ended_jobs.insert(job.to_string());
                }
            }
            [] => {}
            _ => self.bad_lines += 1,
        }
    }

    /// Jobs whose runs overlapped in time, and the longest overlap in seconds. A run
    /// spans its start to its last record.
    pub fn overlaps(&self) -> (usize, f64) {
        let mut jobs = 0;
        let mut max = 0.0f64;
        for runs in self.by_job.values() {
            let spans: Vec<(f64, f64)> = runs
                .iter()
                .filter_map(|r| self.runs.get(r))
                .map(|r| (r.start, r.last))
                .collect();
            let mut hit = false;
            for i in 0..spans.len() {
                for j in i + 1..spans.len() {
                    let o = spans[i].1.min(spans[j].1) - spans[i].0.max(spans[j].0);
                    if o > 0.0 {
                        hit = true;
                        max = max.max(o);
                    }
                }
            }
            if hit {
                jobs += 1;
            }
        }
        (jobs, max)
    }

    /// Seconds the open runs of `agent` still have to go (0 when none).
    pub fn remaining_of(&self, agent: &str, now: f64) -> f64 {
        self.open_runs_of(agent, now - 1.0)
            .iter()
            .filter_map(|(_, r)| self.runs.get(r))
            .map(|r| r.start + r.planned - now)
            .fold(0.0, f64::max)
    }

    /// Runs of `agent` that started, have not ended, and wrote a record at or after
    /// `since` (a test killed mid-run never ends): (job, run).
    pub fn open_runs_of(&self, agent: &str, since: f64) -> Vec<(String, String)> {
        self.runs
            .iter()
            .filter(|(_, r)| r.agent == agent && r.ended.is_none() && r.last >= since)
            .map(|(id, r)| (r.job.clone(), id.clone()))
            .collect()
    }

    /// The first test start at or after `t`.
    pub fn first_start_after(&self, t: f64) -> Option<f64> {
        self.starts
            .iter()
            .copied()
            .filter(|s| *s >= t)
            .min_by(f64::total_cmp)
    }

    /// The first start of `job` by a run other than `run`, after `t`.
    pub fn restart_of(&self, job: &str, run: &str, t: f64) -> Option<f64> {
        self.by_job
            .get(job)?
            .iter()
            .filter(|r| r.as_str() != run)
            .filter_map(|r| self.runs.get(r))
            .map(|r| r.start)
            .filter(|s| *s >= t)
            .min_by(f64::total_cmp)
    }

    /// Runs of `job` that finished their test: (run id, lines printed).
    pub fn finished_runs(&self, job: &str) -> Vec<(String, u32)> {
        self.by_job
            .get(job)
            .map(|rs| {
                rs.iter()
                    .filter_map(|r| Some((r.clone(), self.runs.get(r)?.ended?)))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Lines a finished run printed that `result_text` lacks (`TFL <run> <n>`, whole lines).
pub fn missing_lines(result_text: &str, run: &str, printed: u32) -> u32 {
    missing_numbers(result_text, run, printed).len() as u32
}

/// The numbers of the lines [`missing_lines`] counts, ascending.
pub fn missing_numbers(result_text: &str, run: &str, printed: u32) -> Vec<u32> {
    let have: std::collections::HashSet<&str> = result_text.lines().map(str::trim).collect();
    (1..=printed)
        .filter(|n| !have.contains(format!("TFL {run} {n}").as_str()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_finds_overlaps() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("ledger");
        std::fs::write(
            &p,
            "S j1 r1 a1 10.00 5000\nL j1 r1 1 10.50\nL j1 r1 2 14.00\nS j1 r2 a2 12.00 100\nL j1 r2 1 12.10\nE j1 r2 1 12.20\nS j2 r3 a1 20.00 1500\nE j2 r3 0 2",
        )
        .expect("write");
        let mut l = Ledger::new(p.clone());
        l.refresh();
        // The last line has no newline yet: not read.
        assert_eq!(l.runs.len(), 3);
        assert!(l.runs["r3"].ended.is_none());
        std::fs::write(
            &p,
            "S j1 r1 a1 10.00 5000\nL j1 r1 1 10.50\nL j1 r1 2 14.00\nS j1 r2 a2 12.00 100\nL j1 r2 1 12.10\nE j1 r2 1 12.20\nS j2 r3 a1 20.00 1500\nE j2 r3 0 21.5\n",
        )
        .expect("write");
        l.refresh();
        assert_eq!(l.runs["r3"].ended, Some(0));
        let (jobs, max) = l.overlaps();
        assert_eq!(jobs, 1);
        assert!((max - 0.2).abs() < 1e-9, "{max}");
        assert_eq!(l.open_runs_of("a1", 0.0), vec![("j1".into(), "r1".into())]);
        assert!(l.open_runs_of("a1", 15.0).is_empty());
        assert_eq!(l.restart_of("j1", "r1", 11.0), Some(12.0));
        assert_eq!(l.finished_runs("j1"), vec![("r2".into(), 1)]);
        assert!((l.remaining_of("a1", 14.5) - 0.5).abs() < 1e-9);
    }

    #[test]
    fn counts_missing_lines() {
        let text = "banner\nTFL r1 1\nTFL r1 3\n";
        assert_eq!(missing_lines(text, "r1", 3), 1);
        assert_eq!(missing_lines(text, "r2", 2), 2);
    }
}
