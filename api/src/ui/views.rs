//! The templates (askama, `api/templates/`) and the display-ready values they show.

use crate::store::views::{AgentRow, Fragment, JobRow, Provision, QueueRow};
use askama::Template;

/// What every page's frame needs.
pub struct Chrome {
    /// The navigation entry of this page (`overview`, `agents`, `jobs`, `queues`).
    pub active: &'static str,
    pub version: &'static str,
}

impl Chrome {
    pub fn new(active: &'static str) -> Chrome {
        Chrome {
            active,
            version: env!("CARGO_PKG_VERSION"),
        }
    }
}

/// Percent-encodes a query value or path segment.
pub fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// How long ago an ISO 8601 time was, in words (empty when it does not parse).
pub fn ago(iso: &str) -> String {
    let Ok(t) = chrono::DateTime::parse_from_rfc3339(iso) else {
        return String::new();
    };
    let secs = (chrono::Utc::now() - t.with_timezone(&chrono::Utc)).num_seconds();
    if secs < 0 {
        return "just now".into();
    }
    format!("{} ago", human_secs(secs as f64))
}

pub struct JobView {
    pub id: String,
    pub short: String,
    pub state: String,
    pub queue: String,
    pub queue_url: String,
    pub agent: String,
    pub agent_url: String,
    pub attempt: u64,
    pub priority: i64,
    pub tags: Vec<String>,
    pub created_at: String,
    pub created_ago: String,
    pub started_at: String,
    /// Filled on a queue page: the estimated start.
    pub eta: String,
}

impl From<&JobRow> for JobView {
    fn from(r: &JobRow) -> Self {
        JobView {
            id: r.id.clone(),
            short: r.short_id().to_string(),
            state: r.state.clone(),
            queue_url: format!("/queues/{}", enc(&r.queue)),
            queue: r.queue.clone(),
            agent_url: format!("/agents/{}", enc(&r.agent)),
            agent: r.agent.clone(),
            attempt: r.attempt,
            priority: r.priority,
            tags: r.tags.clone(),
            created_ago: ago(&r.created_at),
            created_at: r.created_at.clone(),
            started_at: r.started_at.clone(),
            eta: String::new(),
        }
    }
}

pub struct AgentView {
    pub name: String,
    pub url: String,
    pub state: String,
    pub location: String,
    pub provision_type: String,
    pub identifier: String,
    pub job_id: String,
    pub job_short: String,
    pub comment: String,
    pub updated_at: String,
    pub updated_ago: String,
    pub queues: Vec<(String, String)>,
    pub streak: String,
    pub streak_type: String,
}

impl From<&AgentRow> for AgentView {
    fn from(a: &AgentRow) -> Self {
        AgentView {
            url: format!("/agents/{}", enc(&a.name)),
            name: a.name.clone(),
            state: a.state.clone(),
            location: a.location.clone(),
            provision_type: a.provision_type.clone(),
            identifier: a.identifier.clone(),
            job_id: a.job_id.clone(),
            job_short: a.job_id.chars().take(8).collect(),
            comment: a.comment.clone(),
            updated_ago: ago(&a.updated_at),
            updated_at: a.updated_at.clone(),
            queues: a
                .queues
                .iter()
                .map(|q| (q.clone(), format!("/queues/{}", enc(q))))
                .collect(),
            streak: if a.streak_type.is_empty() {
                String::new()
            } else {
                format!("{} × {}", a.streak_count, a.streak_type)
            },
            streak_type: a.streak_type.clone(),
        }
    }
}

pub struct QueueView {
    pub name: String,
    pub url: String,
    /// The job list filtered to this queue.
    pub jobs_url: String,
    pub description: String,
    pub waiting: u64,
    pub running: u64,
    pub agents: usize,
    pub idle: usize,
    /// Median / 90th / 95th percentile wait, or `–` without samples.
    pub p50: String,
    pub p90: String,
    pub p95: String,
    pub samples: usize,
}

impl From<&QueueRow> for QueueView {
    fn from(q: &QueueRow) -> Self {
        let f = |x: Option<f64>| x.map(human_secs).unwrap_or_else(|| "–".into());
        QueueView {
            url: format!("/queues/{}", enc(&q.name)),
            jobs_url: format!("/jobs?queue={}", enc(&q.name)),
            name: q.name.clone(),
            description: q.description.clone(),
            waiting: q.waiting,
            running: q.running,
            agents: q.agents,
            idle: q.idle,
            p50: f(q.wait.as_ref().map(|w| w.p50)),
            p90: f(q.wait.as_ref().map(|w| w.p90)),
            p95: f(q.wait.as_ref().map(|w| w.p95)),
            samples: q.wait.as_ref().map_or(0, |w| w.samples),
        }
    }
}

pub struct PhaseView {
    pub name: &'static str,
    /// `pass`, `fail`, `running` or `none` (a CSS class too).
    pub outcome: &'static str,
    pub label: String,
    pub duration: String,
}

pub struct FragView {
    pub phase: String,
    pub attempt: u64,
    /// A heading line before the first fragment of a phase.
    pub mark: String,
    pub text: String,
}

/// The heading line before a phase's output: `── test ──`, or `── test (attempt 2) ──`
/// for a retried job's later attempts (the live-log script writes the same).
pub fn phase_heading(phase: &str, attempt: u64) -> String {
    if attempt > 1 {
        format!("── {phase} (attempt {attempt}) ──")
    } else {
        format!("── {phase} ──")
    }
}

pub struct LogView {
    pub log_type: &'static str,
    pub label: &'static str,
    pub frags: Vec<FragView>,
    /// The fragment number the live stream starts from.
    pub next: i64,
    pub truncated: bool,
    pub empty: bool,
}

impl LogView {
    pub fn new(
        log_type: &'static str,
        label: &'static str,
        frags: Vec<Fragment>,
        truncated: bool,
    ) -> LogView {
        let next = frags.last().map_or(0, |f| f.n + 1);
        let mut out: Vec<FragView> = Vec::with_capacity(frags.len());
        let mut last: Option<(u64, String)> = None;
        let mut at_line_start = true;
        for f in frags {
            let here = (f.attempt, f.phase.clone());
            let mark = if last.as_ref() != Some(&here) {
                last = Some(here);
                format!(
                    "{}{}\n",
                    if at_line_start { "" } else { "\n" },
                    phase_heading(&f.phase, f.attempt)
                )
            } else {
                String::new()
            };
            if !f.data.is_empty() {
                at_line_start = f.data.ends_with('\n');
            }
            out.push(FragView {
                attempt: f.attempt,
                phase: f.phase,
                mark,
                text: f.data,
            });
        }
        LogView {
            log_type,
            label,
            empty: out.is_empty(),
            frags: out,
            next,
            truncated,
        }
    }
}

#[derive(Template)]
#[template(path = "error.html")]
pub struct ErrorPage {
    pub page: Chrome,
    pub status: u16,
    pub reason: &'static str,
    pub message: String,
}

#[derive(Template)]
#[template(path = "overview.html")]
pub struct Overview {
    pub page: Chrome,
    pub agent_count: usize,
    pub by_state: Vec<(String, usize)>,
    pub queue_count: usize,
    pub queues: Vec<QueueView>,
    pub recent: Vec<JobView>,
    pub running: usize,
}

pub struct AgentFilters {
    pub state: String,
    pub queue: String,
    pub location: String,
}

impl AgentFilters {
    /// The filters as a query string prefix (`state=..&` ...), for sort links.
    pub fn query(&self) -> String {
        let mut q = String::new();
        for (k, v) in [
            ("state", &self.state),
            ("queue", &self.queue),
            ("location", &self.location),
        ] {
            if !v.is_empty() {
                q.push_str(&format!("{k}={}&", enc(v)));
            }
        }
        q
    }
}

pub struct SortColumn {
    pub label: &'static str,
    pub url: String,
    /// `ascending`, `descending` or `none` (for `aria-sort`).
    pub aria: &'static str,
}

impl SortColumn {
    pub fn new(key: &'static str, current: &str, desc: bool, filters: &str) -> SortColumn {
        let active = key == current;
        let next_desc = active && !desc;
        SortColumn {
            label: match key {
                "name" => "Name",
                "state" => "State",
                "location" => "Location",
                "job" => "Current job",
                _ => "Updated",
            },
            url: format!(
                "/agents?{filters}sort={key}&order={}",
                if next_desc { "desc" } else { "asc" }
            ),
            aria: match (active, desc) {
                (false, _) => "none",
                (true, false) => "ascending",
                (true, true) => "descending",
            },
        }
    }
}

#[derive(Template)]
#[template(path = "agents.html")]
pub struct AgentsPage {
    pub page: Chrome,
    pub total: usize,
    pub agents: Vec<AgentView>,
    pub states: Vec<&'static str>,
    pub locations: Vec<String>,
    pub filters: AgentFilters,
    pub columns: Vec<SortColumn>,
    pub sort: String,
    pub order: &'static str,
}

#[derive(Template)]
#[template(path = "agent.html")]
pub struct AgentPage {
    pub page: Chrome,
    pub agent: AgentView,
    pub current: Option<JobView>,
    pub log: Vec<String>,
    pub provisions: Vec<Provision>,
    pub jobs: Vec<JobView>,
}

pub struct JobFilters {
    pub state: String,
    pub queue: String,
    pub tags: String,
    pub limit: usize,
}

impl JobFilters {
    /// The filters as a query string prefix, for paging links.
    pub fn query(&self) -> String {
        let mut q = String::new();
        for (k, v) in [
            ("state", &self.state),
            ("queue", &self.queue),
            ("tags", &self.tags),
        ] {
            if !v.is_empty() {
                q.push_str(&format!("{k}={}&", enc(v)));
            }
        }
        if self.limit != super::DEFAULT_LIMIT {
            q.push_str(&format!("limit={}&", self.limit));
        }
        q
    }
}

#[derive(Template)]
#[template(path = "jobs.html")]
pub struct JobsPage {
    pub page: Chrome,
    pub rows: Vec<JobView>,
    pub total: usize,
    pub scanned: usize,
    pub capped: bool,
    pub from: usize,
    pub next: Option<String>,
    pub first: Option<String>,
    pub states: Vec<&'static str>,
    pub filters: JobFilters,
}

#[derive(Template)]
#[template(path = "job.html")]
pub struct JobPage {
    pub page: Chrome,
    pub job: JobView,
    pub reason: String,
    pub position: Option<i64>,
    pub eta: Option<String>,
    pub phases: Vec<PhaseView>,
    pub yaml: String,
    pub artifact: bool,
    pub logs: Vec<LogView>,
    pub can_cancel: bool,
    pub terminal: bool,
    pub device_info: Option<String>,
    pub owner: String,
}

#[derive(Template)]
#[template(path = "queues.html")]
pub struct QueuesPage {
    pub page: Chrome,
    pub queues: Vec<QueueView>,
}

#[derive(Template)]
#[template(path = "queue.html")]
pub struct QueuePage {
    pub page: Chrome,
    pub queue: QueueView,
    pub eta: String,
    pub waiting: Vec<JobView>,
    pub running: Vec<JobView>,
    pub recent: Vec<JobView>,
    pub agents: Vec<AgentView>,
}

/// Seconds in words: `42 s`, `3 min 5 s`, `2 h 10 min`.
pub fn human_secs(s: f64) -> String {
    let s = if s.is_finite() && s > 0.0 {
        s.round() as u64
    } else {
        0
    };
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min {} s", s / 60, s % 60),
        _ => format!("{} h {} min", s / 3600, (s % 3600) / 60),
    }
}
