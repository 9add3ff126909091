//! `poll` and `poll-serial`: follow a job's output until it is `complete` or
//! `cancelled`.
//!
//! The live stream `GET /v1/result/<id>/log/<type>/stream` (Server-Sent Events, one JSON
//! fragment per event, an `end` event when the job is over) is used where the server
//! has it; a server that answers 404 there is polled for fragments every second
//! instead. While the job waits, a status line shows its place in the queue and an
//! estimate from the queue's wait-time statistics.

use super::queues::AgentCounts;
use super::{Ctx, job, sorted_json};
use crate::args::PollArgs;
use crate::client::seg;
use crate::output::{StatusLine, print_raw};
use anyhow::{Context, anyhow};
use bytes::Bytes;
use chrono::{DateTime, NaiveDateTime, Utc};
use futures_util::{Stream, StreamExt};
use reqwest::StatusCode;
use serde::Deserialize;
use serde_json::Value;
use std::pin::Pin;
use std::process::ExitCode;
use std::time::{Duration, Instant};
use testflinger_common::{JobState, LogType, Phase};

/// How often state (and, without the stream, output) is fetched.
const POLL_INTERVAL: Duration = Duration::from_secs(1);
/// While streaming a running job, the state is checked only every this many ticks.
const STREAM_CHECK_EVERY: u32 = 5;
/// How long to wait for the stream's `end` after the state says the job is over.
const END_GRACE: Duration = Duration::from_secs(3);
/// How long queue wait-time statistics are reused.
const WAIT_TIMES_MAX_AGE: Duration = Duration::from_secs(30);

pub async fn run(ctx: &Ctx, args: &PollArgs, log_type: LogType) -> anyhow::Result<ExitCode> {
    let job_id = args.job_id.clone();
    let reply = ctx.client.get(&format!("/v1/job/{}", seg(&job_id))).await?;
    if !reply.ok() {
        return Err(job::job_error(&reply, &job_id));
    }
    let queue = reply
        .json()?
        .get("job_queue")
        .and_then(Value::as_str)
        .map(str::to_string);
    let phase = match &args.phase {
        Some(p) => Some(p.parse::<Phase>().map_err(|e| anyhow!("--phase: {e}"))?),
        None => None,
    };
    let since =
        match &args.start_timestamp {
            Some(t) => Some(parse_timestamp(t).ok_or_else(|| {
                anyhow!("--start_timestamp: '{t}' is not an ISO-8601 date and time")
            })?),
            None => None,
        };
    let mut follower = Follower {
        ctx,
        args,
        log_type,
        job_id,
        queue,
        phase,
        since,
        next: args.start_fragment,
        status: StatusLine::new(),
        wait_times: None,
        stream_supported: None,
        failures: 0,
        error_threshold: ctx
            .config
            .get("error_threshold")
            .and_then(|v| v.parse().ok())
            .or_else(|| {
                std::env::var("TESTFLINGER_ERROR_THRESHOLD")
                    .ok()
                    .and_then(|v| v.parse().ok())
            })
            .unwrap_or(3),
    };
    if args.oneshot {
        return follower.oneshot().await;
    }
    follower.follow().await
}

fn parse_timestamp(text: &str) -> Option<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Some(t.with_timezone(&Utc));
    }
    let naive = text.trim_end_matches('Z');
    for fmt in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"] {
        if let Ok(t) = NaiveDateTime::parse_from_str(naive, fmt) {
            return Some(t.and_utc());
        }
    }
    None
}

/// One log fragment as the stream sends it.
#[derive(Debug, Deserialize)]
struct Fragment {
    fragment_number: u64,
    #[serde(default)]
    phase: Option<String>,
    #[serde(default)]
    timestamp: Option<String>,
    #[serde(default)]
    log_data: String,
}

enum Event {
    Fragment(Fragment, String),
    End,
    Other,
}

/// A Server-Sent Events reader over a response body.
struct Sse {
    body: Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>,
    buf: Vec<u8>,
    event: String,
    data: String,
}

impl Sse {
    fn new(resp: reqwest::Response) -> Sse {
        Sse {
            body: Box::pin(resp.bytes_stream()),
            buf: Vec::new(),
            event: String::new(),
            data: String::new(),
        }
    }

    /// The next event; `None` when the server closed the stream.
    async fn next(&mut self) -> anyhow::Result<Option<Event>> {
        loop {
            while let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                let raw: Vec<u8> = self.buf.drain(..=pos).collect();
                let line = String::from_utf8_lossy(&raw);
                let line = line.trim_end_matches(['\n', '\r']);
                if line.is_empty() {
                    if self.event.is_empty() && self.data.is_empty() {
                        continue;
                    }
                    let event = std::mem::take(&mut self.event);
                    let data = std::mem::take(&mut self.data);
                    return Ok(Some(Self::decode(&event, data)));
                }
                if line.starts_with(':') {
                    continue;
                }
                let (field, value) = line.split_once(':').unwrap_or((line, ""));
                let value = value.strip_prefix(' ').unwrap_or(value);
                match field {
                    "data" => {
                        if !self.data.is_empty() {
                            self.data.push('\n');
                        }
                        self.data.push_str(value);
                    }
                    "event" => self.event = value.to_string(),
                    _ => {}
                }
            }
            match self.body.next().await {
                Some(Ok(chunk)) => self.buf.extend_from_slice(&chunk),
                Some(Err(e)) => return Err(e.into()),
                None => return Ok(None),
            }
        }
    }

    fn decode(event: &str, data: String) -> Event {
        match event {
            "end" => Event::End,
            "" | "message" | "fragment" | "log" => match serde_json::from_str::<Fragment>(&data) {
                Ok(f) => Event::Fragment(f, data),
                Err(_) => Event::Other,
            },
            _ => Event::Other,
        }
    }
}

async fn next_event(sse: &mut Option<Sse>) -> anyhow::Result<Option<Event>> {
    match sse {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

struct Follower<'a> {
    ctx: &'a Ctx,
    args: &'a PollArgs,
    log_type: LogType,
    job_id: String,
    queue: Option<String>,
    phase: Option<Phase>,
    since: Option<DateTime<Utc>>,
    /// The first fragment not printed yet.
    next: u64,
    status: StatusLine,
    /// When the median wait was fetched, and the median (seconds).
    wait_times: Option<(Instant, Option<f64>)>,
    /// Whether the server has the live stream (`None` until asked).
    stream_supported: Option<bool>,
    /// Consecutive failed checks; the poll gives up above `error_threshold`.
    failures: u32,
    error_threshold: u32,
}

/// What a check of the job's state found.
struct Check {
    waiting: bool,
    /// The job is over, or the phase given with `--phase` has finished.
    done: bool,
}

impl Follower<'_> {
    async fn oneshot(&mut self) -> anyhow::Result<ExitCode> {
        let resp = self.fetch_log().await?;
        let (text, last) = self.log_text(&resp);
        if self.args.json {
            println!("{}", sorted_json(&resp));
            return Ok(ExitCode::SUCCESS);
        }
        print_raw(&text);
        if !text.is_empty() && !text.ends_with('\n') {
            println!();
        }
        println!("Last Fragment Number: {}", last.unwrap_or(-1));
        Ok(ExitCode::SUCCESS)
    }

    async fn follow(&mut self) -> anyhow::Result<ExitCode> {
        let mut sse = self.open_stream().await?;
        let ctrl_c = tokio::signal::ctrl_c();
        tokio::pin!(ctrl_c);
        let mut tick = tokio::time::interval(POLL_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ticks: u32 = 0;
        let mut waiting = true;
        let mut over_since: Option<Instant> = None;
        loop {
            tokio::select! {
                _ = &mut ctrl_c => return self.interrupted().await,
                event = next_event(&mut sse) => match event {
                    Ok(Some(Event::Fragment(f, raw))) => self.print_fragment(&f, &raw),
                    Ok(Some(Event::End)) => {
                        self.status.clear();
                        self.catch_up().await?;
                        return self.outcome().await;
                    }
                    Ok(Some(Event::Other)) => {}
                    // Closed or broken: reopened from the next fragment on a later tick.
                    Ok(None) | Err(_) => sse = None,
                },
                _ = tick.tick() => {
                    ticks = ticks.wrapping_add(1);
                    let due = sse.is_none()
                        || waiting
                        || self.phase.is_some()
                        || over_since.is_some()
                        || ticks % STREAM_CHECK_EVERY == 1;
                    if !due {
                        continue;
                    }
                    let check = match self.check().await {
                        Ok(c) => {
                            self.failures = 0;
                            c
                        }
                        Err(e) => {
                            self.failures += 1;
                            if self.failures > self.error_threshold {
                                self.status.clear();
                                return Err(e);
                            }
                            continue;
                        }
                    };
                    waiting = check.waiting;
                    if sse.is_none() {
                        // Fragments fetched after the state are complete when it is final.
                        self.poll_fragments().await?;
                        if check.done {
                            self.status.clear();
                            return self.outcome().await;
                        }
                        if self.stream_supported == Some(true) {
                            sse = self.open_stream().await?;
                        }
                    } else if check.done {
                        let since = *over_since.get_or_insert_with(Instant::now);
                        if self.phase.is_some() || since.elapsed() >= END_GRACE {
                            self.status.clear();
                            self.catch_up().await?;
                            return self.outcome().await;
                        }
                    }
                }
            }
        }
    }

    /// Opens the live stream from the next fragment; `None` when the server has none.
    async fn open_stream(&mut self) -> anyhow::Result<Option<Sse>> {
        if self.stream_supported == Some(false) || self.args.json {
            // `--json` prints the log route's own responses.
            return Ok(None);
        }
        let path = format!(
            "/v1/result/{}/log/{}/stream",
            seg(&self.job_id),
            self.log_type
        );
        let query = self.query();
        let next = self.next;
        let resp = self
            .ctx
            .client
            .open(&path, |r| {
                let r = r.query(&query).header("Accept", "text/event-stream");
                if next > 0 {
                    r.header("Last-Event-ID", (next - 1).to_string())
                } else {
                    r
                }
            })
            .await?;
        if resp.status() == StatusCode::OK {
            self.stream_supported = Some(true);
            return Ok(Some(Sse::new(resp)));
        }
        // 404 (and 405/501) means no stream on this server; any other answer on the first
        // try is taken the same way so that polling goes on regardless.
        if self.stream_supported.is_none()
            || matches!(
                resp.status(),
                StatusCode::NOT_FOUND
                    | StatusCode::METHOD_NOT_ALLOWED
                    | StatusCode::NOT_IMPLEMENTED
            )
        {
            self.stream_supported = Some(false);
        }
        Ok(None)
    }

    fn query(&self) -> Vec<(&'static str, String)> {
        let mut q = vec![("start_fragment", self.next.to_string())];
        if let Some(t) = &self.args.start_timestamp {
            q.push(("start_timestamp", t.clone()));
        }
        if let Some(p) = self.phase {
            q.push(("phase", p.to_string()));
        }
        q
    }

    /// `GET /v1/result/<id>/log/<type>` from the next fragment.
    async fn fetch_log(&self) -> anyhow::Result<Value> {
        let path = format!("/v1/result/{}/log/{}", seg(&self.job_id), self.log_type);
        let query = self.query();
        let reply = self
            .ctx
            .client
            .send(reqwest::Method::GET, &path, |r| r.query(&query))
            .await?;
        match reply.status {
            StatusCode::OK => reply.json(),
            StatusCode::NO_CONTENT => Ok(Value::Object(Default::default())),
            _ => Err(job::job_error(&reply, &self.job_id)),
        }
    }

    /// The output of a log response in phase order, and its last fragment number.
    fn log_text(&self, resp: &Value) -> (String, Option<i64>) {
        let mut text = String::new();
        let mut last: Option<i64> = None;
        let Some(phases) = resp.get(self.log_type.as_str()).and_then(Value::as_object) else {
            return (text, last);
        };
        for phase in Phase::ALL {
            let Some(entry) = phases.get(phase.as_str()) else {
                continue;
            };
            if let Some(data) = entry.get("log_data").and_then(Value::as_str) {
                text.push_str(data);
            }
            if let Some(n) = entry.get("last_fragment_number").and_then(Value::as_i64) {
                last = Some(last.map_or(n, |l| l.max(n)));
            }
        }
        (text, last)
    }

    /// Prints the fragments the server has beyond the last one printed.
    async fn poll_fragments(&mut self) -> anyhow::Result<()> {
        let resp = self.fetch_log().await?;
        let (text, last) = self.log_text(&resp);
        let Some(last) = last.and_then(|l| u64::try_from(l).ok()) else {
            return Ok(());
        };
        if last < self.next {
            return Ok(());
        }
        self.status.clear();
        if self.args.json {
            println!("{}", resp);
        } else {
            print_raw(&text);
        }
        self.next = last + 1;
        Ok(())
    }

    /// After the stream ended: whatever it did not deliver.
    async fn catch_up(&mut self) -> anyhow::Result<()> {
        self.poll_fragments().await
    }

    fn print_fragment(&mut self, f: &Fragment, raw: &str) {
        if f.fragment_number < self.next {
            return;
        }
        self.next = f.fragment_number + 1;
        if let (Some(want), Some(phase)) = (self.phase, &f.phase)
            && want.as_str() != phase
        {
            return;
        }
        if let (Some(since), Some(ts)) = (self.since, f.timestamp.as_deref())
            && parse_timestamp(ts).is_some_and(|t| t < since)
        {
            return;
        }
        self.status.clear();
        if self.args.json {
            println!("{raw}");
        } else {
            print_raw(&f.log_data);
        }
    }

    /// Looks at the job's state, and shows its place in the queue while it waits.
    async fn check(&mut self) -> anyhow::Result<Check> {
        let results = job::fetch_results(self.ctx, &self.job_id).await?;
        let state = results
            .get("job_state")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let parsed = JobState::parse_lenient(&state);
        let over = parsed.is_some_and(JobState::is_terminal);
        let phase_done = self
            .phase
            .is_some_and(|p| results.get(format!("{p}_status")).is_some());
        let waiting = parsed == Some(JobState::Waiting);
        if waiting {
            self.show_position().await;
        } else {
            self.status.clear();
        }
        Ok(Check {
            waiting,
            done: over || phase_done,
        })
    }

    async fn show_position(&mut self) {
        let path = format!("/v1/job/{}/position", seg(&self.job_id));
        let Ok(reply) = self.ctx.client.get(&path).await else {
            return;
        };
        if !reply.ok() {
            // 410: it has just left the queue.
            return;
        }
        let Ok(ahead) = reply.text().parse::<u64>() else {
            return;
        };
        let median = self.median_wait().await;
        let agents = self.queue_agents().await;
        let queue = self.queue.as_deref().unwrap_or("?");
        self.status.set(&format!(
            "Waiting in queue '{queue}': position {} ({ahead} job{} ahead), {}",
            ahead + 1,
            if ahead == 1 { "" } else { "s" },
            start_estimate(ahead, agents, median)
        ));
    }

    /// How the agents serving the job's queue stand now (`None` when unknown).
    async fn queue_agents(&mut self) -> Option<AgentCounts> {
        let queue = self.queue.clone()?;
        let reply = self
            .ctx
            .client
            .get(&format!("/v1/queues/{}/agents", seg(&queue)))
            .await
            .ok()?;
        if reply.status == StatusCode::NOT_FOUND || reply.status == StatusCode::NO_CONTENT {
            return Some(AgentCounts::default());
        }
        if !reply.ok() {
            return None;
        }
        let agents = reply.json().ok()?;
        Some(AgentCounts::of(agents.as_array()?))
    }

    /// The queue's median wait in seconds, from `GET /v1/queues/wait_times`.
    async fn median_wait(&mut self) -> Option<f64> {
        if let Some((at, median)) = self.wait_times
            && at.elapsed() < WAIT_TIMES_MAX_AGE
        {
            return median;
        }
        let queue = self.queue.clone()?;
        let median = async {
            let reply = self
                .ctx
                .client
                .send(reqwest::Method::GET, "/v1/queues/wait_times", |r| {
                    r.query(&[("queue", queue.as_str())])
                })
                .await
                .ok()?;
            if !reply.ok() {
                return None;
            }
            let stats = reply.json().ok()?;
            let p50 = stats.get(&queue)?.get("50")?;
            p50.as_f64()
                .or_else(|| p50.as_str().and_then(|s| s.parse().ok()))
        }
        .await;
        self.wait_times = Some((Instant::now(), median));
        median
    }

    /// How the job ended, on stderr, and the exit status that says it (see
    /// [`JobOutcome`]): each phase's exit code as upstream prints it, what a
    /// signal-style code means, the reason a job ended without finishing.
    async fn outcome(&mut self) -> anyhow::Result<ExitCode> {
        let results = job::fetch_results(self.ctx, &self.job_id).await?;
        let outcome = JobOutcome::of(&results, self.phase);
        for line in outcome.lines() {
            eprintln!("{line}");
        }
        Ok(ExitCode::from(outcome.exit_code()))
    }

    /// Ctrl-C: offer to cancel the job, then stop.
    async fn interrupted(&mut self) -> anyhow::Result<ExitCode> {
        self.status.clear();
        eprint!("\nCancel job {} before exiting? [y/N] ", self.job_id);
        let answer = tokio::task::spawn_blocking(|| {
            let mut line = String::new();
            std::io::stdin().read_line(&mut line).map(|_| line)
        })
        .await
        .context("cannot read the answer")?
        .unwrap_or_default();
        if matches!(answer.trim().to_lowercase().as_str(), "y" | "yes") {
            job::cancel_job(self.ctx, &self.job_id).await?;
            eprintln!("Job {} cancelled", self.job_id);
        } else if answer.is_empty() {
            eprintln!();
        }
        Ok(ExitCode::from(130))
    }
}

/// The start estimate of a waiting job with `ahead` jobs before it. It promises only
/// what the agents can keep: "starting shortly" when an idle agent is there for it;
/// otherwise it says why it waits and gives no time (job lengths are not known ahead),
/// only the queue's recent median wait as history.
pub fn start_estimate(ahead: u64, agents: Option<AgentCounts>, median: Option<f64>) -> String {
    let history = match median {
        Some(m) => format!("recent jobs waited ~{} (median)", human_duration(m)),
        None => "no wait-time data yet".to_string(),
    };
    let Some(a) = agents else {
        return format!("agents unknown; {history}");
    };
    let plural = |n: usize| if n == 1 { "" } else { "s" };
    if a.idle + a.busy == 0 {
        return if a.unavailable == 0 {
            "no agent serves this queue: it will wait until one registers".to_string()
        } else {
            format!(
                "no agent is available to run it ({} offline or in maintenance)",
                a.unavailable
            )
        };
    }
    if (a.idle as u64) > ahead {
        return format!("starting shortly ({} idle agent{})", a.idle, plural(a.idle));
    }
    format!(
        "no estimate: {} of {} agent{} busy; {history}",
        a.busy,
        a.idle + a.busy,
        plural(a.idle + a.busy)
    )
}

/// How a followed job ended, and the CLI's exit status for it (`poll`, `submit --poll`):
///
/// | exit | meaning |
/// |---|---|
/// | 0 | the job completed and every phase that ran exited 0 |
/// | 1 | the CLI failed (server unreachable, bad input): one `error:` line |
/// | 2 | bad command line (clap) |
/// | 3 | the job was cancelled |
/// | 4 | a phase exited non-zero (a failed test, provision or reservation, a timeout) |
/// | 5 | the server ended the job without a result (e.g. its agent was lost too often) |
/// | 130 | interrupted (Ctrl-C) |
#[derive(Debug, Clone, PartialEq)]
pub struct JobOutcome {
    pub state: String,
    /// `(phase, exit code)` in phase order.
    pub phases: Vec<(Phase, i64)>,
    pub reason: Option<String>,
    /// Only this phase counts (`--phase`).
    pub only: Option<Phase>,
}

impl JobOutcome {
    pub fn of(results: &Value, only: Option<Phase>) -> JobOutcome {
        JobOutcome {
            state: results
                .get("job_state")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            phases: Phase::ALL
                .iter()
                .filter(|p| only.is_none_or(|o| o == **p))
                .filter_map(|p| {
                    let code = results.get(format!("{p}_status"))?.as_i64()?;
                    Some((*p, code))
                })
                .collect(),
            reason: results
                .get("job_reason")
                .and_then(Value::as_str)
                .filter(|r| !r.is_empty())
                .map(str::to_string),
            only,
        }
    }

    pub fn exit_code(&self) -> u8 {
        if self.only.is_none() && self.state == "cancelled" {
            3
        } else if self.phases.iter().any(|(_, c)| *c != 0) {
            4
        } else if self.only.is_none() && self.phases.is_empty() && self.reason.is_some() {
            5
        } else {
            0
        }
    }

    /// What to print: one line per phase, an explanation of signal-style codes, the
    /// reason, and the state when it is not a plain completion.
    pub fn lines(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .phases
            .iter()
            .map(|(p, c)| {
                let mut line = format!("Phase '{p}' completed with exit code: {c}");
                if let Some(why) = explain_code(*c) {
                    line.push_str(&format!(" ({why})"));
                }
                line
            })
            .collect();
        if self.only.is_none() && self.state == "cancelled" {
            out.push("Job cancelled".to_string());
        }
        if let Some(r) = &self.reason {
            out.push(format!("Job ended: {r}"));
        }
        out
    }
}

/// What a phase exit code means beyond "the command failed": 46 (device recovery
/// failed) and codes of a death by signal (upstream reports -N modulo 256, so SIGTERM ->
/// 241 and SIGKILL -> 247: the agent stopped the phase for a timeout or a cancel).
pub fn explain_code(code: i64) -> Option<String> {
    let signal = |n: i64| match n {
        1 => "SIGHUP",
        2 => "SIGINT",
        6 => "SIGABRT",
        9 => "SIGKILL",
        15 => "SIGTERM",
        _ => "a signal",
    };
    match code {
        46 => Some(
            "device recovery failed: the agent is offline until an operator brings it back".into(),
        ),
        100 => Some("the agent could not run the phase command".into()),
        c @ 193..=255 => Some(format!(
            "killed by {} ({}): a timeout, a cancel or the agent stopping it",
            signal(256 - c),
            256 - c
        )),
        _ => None,
    }
}

/// `95` -> `1m 35s`.
fn human_duration(secs: f64) -> String {
    let total = secs.max(0.0).round() as u64;
    let (h, m, s) = (total / 3600, (total % 3600) / 60, total % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m {s}s"),
        _ => format!("{h}h {m}m"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_and_exit_codes() {
        use serde_json::json;
        let ok = JobOutcome::of(
            &json!({"job_state": "complete", "setup_status": 0, "test_status": 0}),
            None,
        );
        assert_eq!(ok.exit_code(), 0);
        assert_eq!(ok.lines()[1], "Phase 'test' completed with exit code: 0");
        let failed = JobOutcome::of(&json!({"job_state": "complete", "test_status": 7}), None);
        assert_eq!(failed.exit_code(), 4);
        let timed_out = JobOutcome::of(&json!({"job_state": "complete", "test_status": 241}), None);
        assert_eq!(timed_out.exit_code(), 4);
        assert!(
            timed_out.lines()[0].contains("SIGTERM (15)"),
            "{:?}",
            timed_out.lines()
        );
        assert!(explain_code(247).is_some_and(|e| e.contains("SIGKILL")));
        let reserve = JobOutcome::of(&json!({"job_state": "complete", "reserve_status": 1}), None);
        assert_eq!(reserve.exit_code(), 4);
        let cancelled = JobOutcome::of(&json!({"job_state": "cancelled", "setup_status": 0}), None);
        assert_eq!(cancelled.exit_code(), 3);
        assert!(cancelled.lines().contains(&"Job cancelled".to_string()));
        let lost = JobOutcome::of(
            &json!({"job_state": "complete", "job_reason": "agent lost; giving up after 3 attempts"}),
            None,
        );
        assert_eq!(lost.exit_code(), 5);
        // --phase: only that phase counts.
        let phase = JobOutcome::of(
            &json!({"job_state": "test", "setup_status": 0, "provision_status": 2}),
            Some(Phase::Setup),
        );
        assert_eq!(phase.exit_code(), 0);
    }

    #[test]
    fn estimates_promise_only_what_agents_can_keep() {
        let busy = AgentCounts {
            idle: 0,
            busy: 1,
            unavailable: 0,
        };
        // The reported case: the only agent busy, position 1, past waits of 0 s.
        let e = start_estimate(0, Some(busy), Some(0.0));
        assert!(e.starts_with("no estimate: 1 of 1 agent busy"), "{e}");
        assert!(!e.contains("estimated start"), "{e}");
        let idle = AgentCounts {
            idle: 1,
            busy: 0,
            unavailable: 1,
        };
        assert_eq!(
            start_estimate(0, Some(idle), None),
            "starting shortly (1 idle agent)"
        );
        assert!(start_estimate(1, Some(idle), None).starts_with("no estimate"));
        let stopped = AgentCounts {
            idle: 0,
            busy: 0,
            unavailable: 2,
        };
        assert!(start_estimate(0, Some(stopped), Some(5.0)).contains("no agent is available"));
        assert!(start_estimate(0, Some(AgentCounts::default()), None).contains("no agent serves"));
    }

    #[test]
    fn durations() {
        assert_eq!(human_duration(5.0), "5s");
        assert_eq!(human_duration(95.0), "1m 35s");
        assert_eq!(human_duration(7300.0), "2h 1m");
    }

    #[test]
    fn timestamps() {
        assert!(parse_timestamp("2024-05-01T12:00:00Z").is_some());
        assert!(parse_timestamp("2024-05-01T12:00:00+00:00").is_some());
        assert!(parse_timestamp("2024-05-01T12:00:00").is_some());
        assert!(parse_timestamp("yesterday").is_none());
    }

    #[test]
    fn sse_events() {
        let fragment = Sse::decode(
            "",
            r#"{"fragment_number":3,"phase":"test","timestamp":"t","log_data":"hi"}"#.into(),
        );
        assert!(
            matches!(fragment, Event::Fragment(ref f, _) if f.fragment_number == 3 && f.log_data == "hi")
        );
        assert!(matches!(Sse::decode("end", String::new()), Event::End));
        assert!(matches!(Sse::decode("ping", "{}".into()), Event::Other));
    }
}
