//! A fault scenario's world: our server(s), agents with the ledger test, a submitter
//! keeping a backlog, stale-write probes, and at the end the figures computed from the
//! ledger and the API's final answers.

use super::ledger::{self, Ledger, TestShape};
use super::proxy::Proxy;
use crate::harness::{Ctx, Proc, Server, free_port, yaml_str};
use anyhow::{Context, anyhow, bail};
use serde_json::{Map, Value, json};
use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Server settings every scenario uses: short leases so faults play out in seconds.
pub const LEASE_S: u64 = 5;
pub const REAPER_MS: u64 = 250;
pub const MAX_ATTEMPTS: u64 = 10;

/// How a scenario's world is built.
pub struct Setup {
    pub name: &'static str,
    pub agents: usize,
    pub shape: TestShape,
    /// Queue backlog the submitter keeps (jobs accepted, test not yet finished).
    pub backlog: usize,
    /// Stop submitting after this many accepted jobs (`None`: until told).
    pub jobs: Option<usize>,
    /// AMQP URI for the server and agents (default: the run's private node).
    pub amqp_uri: Option<String>,
    pub server_env: Vec<(String, String)>,
    /// Extra agent config lines (e.g. `queue_type: quorum`).
    pub agent_yaml: String,
    /// API replicas (behind one proxy when more than one).
    pub replicas: usize,
    /// Agents (by index) that reach the API through their own proxy.
    pub proxied_agents: Vec<usize>,
}

pub struct Agent {
    pub id: String,
    pub proc: Option<Proc>,
    pub proxy: Option<Proxy>,
    dir: std::path::PathBuf,
    restarts: usize,
}

#[derive(Default)]
pub struct SubmitStats {
    pub accepted: Mutex<Vec<String>>,
    pub n_accepted: AtomicUsize,
    pub s5xx: AtomicUsize,
    pub s503: AtomicUsize,
    pub other: AtomicUsize,
    pub first_error: Mutex<Option<String>>,
}

/// A fault as it happened: when it started and ended (ledger clock), and the runs it
/// hit (an agent's open runs at the start).
pub struct Fault {
    pub what: String,
    pub start: f64,
    pub end: f64,
    pub victims: Vec<(String, String)>,
}

pub struct World<'a> {
    pub ctx: &'a Ctx,
    pub setup: Setup,
    pub queue: String,
    probe_queue: String,
    prefix: String,
    pub amqp_uri: String,
    pub servers: Vec<Option<Server>>,
    pub ports: Vec<u16>,
    /// The address users and agents use: the one server, or the replicas' proxy.
    pub api: String,
    pub api_proxy: Option<Proxy>,
    pub agents: Vec<Agent>,
    pub ledger: Arc<Mutex<Ledger>>,
    script: std::path::PathBuf,
    pub stats: Arc<SubmitStats>,
    stop_submit: Arc<AtomicBool>,
    submitter: Option<tokio::task::JoinHandle<()>>,
    refresher: tokio::task::JoinHandle<()>,
    pub faults: Vec<Fault>,
    pub http: reqwest::Client,
    pub notes: Vec<String>,
    stale_tried: usize,
    stale_accepted: usize,
    probes: Vec<tokio::task::JoinHandle<ProbeResult>>,
    server_extra: Vec<(String, String)>,
    rng: u64,
}

impl<'a> World<'a> {
    /// With `TESTFLINGER_FAULTS_KEEP=<dir>`, copies this run's working directory (agent
    /// and server logs, spools, the ledger) to `<dir>/<run id>-<scenario>` for a look
    /// at what lost output; a note says where.
    fn keep_logs(&mut self) {
        let Some(keep) = std::env::var_os("TESTFLINGER_FAULTS_KEEP") else {
            return;
        };
        let to =
            std::path::Path::new(&keep).join(format!("{}-{}", self.ctx.run_id, self.setup.name));
        let ok = std::fs::create_dir_all(&to).is_ok()
            && std::process::Command::new("cp")
                .arg("-r")
                .arg(self.ctx.tmp.path())
                .arg(&to)
                .status()
                .is_ok_and(|s| s.success());
        self.notes.push(if ok {
            format!("logs kept in {}", to.display())
        } else {
            format!("could not keep the logs in {}", to.display())
        });
    }

    /// Where a job's lost output lines fall: which lines, when (estimated from the run's
    /// start, end and line count) and how far from each fault, so a loss can be traced
    /// to the fault that caused it.
    fn lost_lines_note(&self, l: &ledger::Ledger, job: &str, run: &str, text: &str) -> String {
        let Some(r) = l.runs.get(run) else {
            return format!("job {job}: lines of run {run} lost");
        };
        let printed = r.ended.unwrap_or(r.lines);
        let missing = ledger::missing_numbers(text, run, printed);
        let step = (r.last - r.start) / f64::from(printed.max(1));
        let first = missing.first().copied().unwrap_or(1);
        let last = missing.last().copied().unwrap_or(first);
        let t0 = r.start + step * f64::from(first - 1);
        let t1 = r.start + step * f64::from(last);
        let near: Vec<String> = self
            .faults
            .iter()
            .map(|f| format!("{} at {:+.1}s", f.what, f.start - t0))
            .collect();
        format!(
            "job {job} run {run}: {} of {printed} lines lost ({first}..={last}, printed about {:.1}-{:.1}s after the run started; faults relative to the first: {})",
            missing.len(),
            t0 - r.start,
            t1 - r.start,
            near.join(", ")
        )
    }

    /// Starts the server(s) and agents and waits until every agent consumes the queue.
    pub async fn start(ctx: &'a Ctx, setup: Setup) -> anyhow::Result<World<'a>> {
        let tag = setup.name;
        let queue = ctx.queue(tag);
        let probe_queue = ctx.queue(&format!("{tag}-probe"));
        let prefix = format!("{}-{tag}", ctx.prefix);
        let amqp_uri = setup
            .amqp_uri
            .clone()
            .unwrap_or_else(|| ctx.opts.amqp_uri.clone());
        let dir = ctx.dir(&format!("{tag}-faults"))?;
        let ledger_path = dir.join("ledger");
        std::fs::write(&ledger_path, "")?;
        let script = dir.join("faultjob.sh");
        std::fs::write(&script, ledger::script(&ledger_path, setup.shape))?;
        let ledger = Arc::new(Mutex::new(Ledger::new(ledger_path)));
        let l2 = ledger.clone();
        let refresher = tokio::spawn(async move {
            loop {
                if let Ok(mut l) = l2.lock() {
                    l.refresh();
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .connect_timeout(Duration::from_secs(3))
            .build()
            .context("http client")?;
        let mut server_extra: Vec<(String, String)> = vec![
            ("AMQP_URI".into(), amqp_uri.clone()),
            ("TESTFLINGER_LEASE_TTL".into(), LEASE_S.to_string()),
            (
                "TESTFLINGER_REAPER_INTERVAL_MS".into(),
                REAPER_MS.to_string(),
            ),
            ("TESTFLINGER_MAX_ATTEMPTS".into(), MAX_ATTEMPTS.to_string()),
            // One DATA_PATH for every replica, as a deployment must have (the logs of
            // ended jobs, artifacts and attachments live there: every replica serves
            // every job's).
            (
                "DATA_PATH".into(),
                ctx.dir(&format!("{tag}-data"))?.display().to_string(),
            ),
        ];
        server_extra.extend(setup.server_env.iter().cloned());
        let seed = uuid::Uuid::new_v4().as_u128() as u64 | 1;
        let mut w = World {
            ctx,
            queue,
            probe_queue,
            prefix,
            amqp_uri,
            servers: Vec::new(),
            ports: Vec::new(),
            api: String::new(),
            api_proxy: None,
            agents: Vec::new(),
            ledger,
            script,
            stats: Arc::new(SubmitStats::default()),
            stop_submit: Arc::new(AtomicBool::new(false)),
            submitter: None,
            refresher,
            faults: Vec::new(),
            http,
            notes: Vec::new(),
            stale_tried: 0,
            stale_accepted: 0,
            probes: Vec::new(),
            server_extra,
            rng: seed,
            setup,
        };
        for _ in 0..w.setup.replicas.max(1) {
            w.ports.push(free_port()?);
        }
        for i in 0..w.ports.len() {
            let s = w.start_server(i).await?;
            w.servers.push(Some(s));
        }
        if w.ports.len() > 1 {
            let ups = w
                .ports
                .iter()
                .map(|p| std::net::SocketAddr::from(([127, 0, 0, 1], *p)))
                .collect();
            let p = Proxy::start(ups).await?;
            w.api = p.url();
            w.api_proxy = Some(p);
        } else {
            w.api = format!("http://127.0.0.1:{}", w.ports[0]);
        }
        for i in 0..w.setup.agents {
            let id = format!("{}-{}-{i}", w.prefix, "agent");
            let a = w.new_agent(i, id).await?;
            w.agents.push(a);
        }
        for i in 0..w.agents.len() {
            w.launch_agent(i)?;
        }
        w.wait_consumers(w.agents.len() as u32, Duration::from_secs(90))
            .await?;
        Ok(w)
    }

    pub async fn start_server(&self, i: usize) -> anyhow::Result<Server> {
        let extra: Vec<(&str, &str)> = self
            .server_extra
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        Server::start_at(
            self.ctx,
            &format!("{}-r{i}", self.setup.name),
            &self.prefix,
            self.ports[i],
            &extra,
        )
        .await
    }

    async fn new_agent(&mut self, i: usize, id: String) -> anyhow::Result<Agent> {
        let dir = self.ctx.dir(&format!("{}-agent-{i}", self.setup.name))?;
        let proxy = if self.setup.proxied_agents.contains(&i) {
            let up = self
                .api
                .trim_start_matches("http://")
                .parse()
                .map_err(|e| anyhow!("cannot parse the API address {}: {e}", self.api))?;
            Some(Proxy::start(vec![up]).await?)
        } else {
            None
        };
        Ok(Agent {
            id,
            proc: None,
            proxy,
            dir,
            restarts: 0,
        })
    }

    /// Writes agent `i`'s config and starts it (it must not be running).
    pub fn launch_agent(&mut self, i: usize) -> anyhow::Result<()> {
        let bin = self.ctx.binary("testflinger-agent")?;
        let a = &self.agents[i];
        let base = a.proxy.as_ref().map_or(self.api.clone(), Proxy::url);
        let yaml = format!(
            "agent_id: {id}\n\
             server_address: {base}\n\
             job_queues: [{q}]\n\
             execution_basedir: {d}/run\n\
             logging_basedir: {d}/logs\n\
             results_basedir: {d}/results\n\
             logging_level: WARNING\n\
             polling_interval: 1\n\
             shutdown_grace: 2\n\
             test_command: {test}\n\
             amqp_uri: {amqp}\n{extra}",
            id = a.id,
            q = self.queue,
            d = a.dir.display(),
            test = yaml_str(&format!("bash {}", self.script.display())),
            amqp = yaml_str(&self.amqp_uri),
            extra = self.setup.agent_yaml,
        );
        let cfg = a.dir.join("agent.yaml");
        std::fs::write(&cfg, yaml).with_context(|| format!("cannot write {}", cfg.display()))?;
        let log = a.dir.join(format!("agent-{}.out", a.restarts));
        let cfg_s = cfg.display().to_string();
        let env = vec![("AMQP_URI", self.amqp_uri.clone())];
        let p = Proc::spawn(&a.id, &bin, &["-c", &cfg_s], &env, log)?;
        let a = &mut self.agents[i];
        a.restarts += 1;
        a.proc = Some(p);
        Ok(())
    }

    /// SIGKILLs agent `i`; returns its open runs at that moment.
    pub async fn kill_agent(&mut self, i: usize) -> Vec<(String, String)> {
        let victims = self.open_runs(i);
        if let Some(p) = self.agents[i].proc.take() {
            p.kill().await;
        }
        victims
    }

    pub fn open_runs(&self, i: usize) -> Vec<(String, String)> {
        self.refresh();
        self.ledger
            .lock()
            .map(|l| l.open_runs_of(&self.agents[i].id, ledger::uptime() - 1.0))
            .unwrap_or_default()
    }

    /// Gives agent `i` a new id (the next launch registers as a new agent).
    pub fn rename_agent(&mut self, i: usize) {
        let a = &mut self.agents[i];
        a.id = format!("{}-{}-{i}n{}", self.prefix, "agent", a.restarts);
    }

    pub fn refresh(&self) {
        if let Ok(mut l) = self.ledger.lock() {
            l.refresh();
        }
    }

    /// A random number below `n` (xorshift; no need for a crate).
    pub fn rand(&mut self, n: usize) -> usize {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng % n.max(1) as u64) as usize
    }

    /// The running agent whose current test has the longest still to go, if it has
    /// at least `min_s` to go; waits up to `within` for one.
    pub async fn longest_busy(&self, min_s: f64, within: Duration) -> Option<usize> {
        let end = Instant::now() + within;
        loop {
            self.refresh();
            let now = ledger::uptime();
            let best = self.ledger.lock().ok().and_then(|l| {
                (0..self.agents.len())
                    .filter(|i| self.agents[*i].proc.is_some())
                    .map(|i| (i, l.remaining_of(&self.agents[i].id, now)))
                    .max_by(|a, b| a.1.total_cmp(&b.1))
            });
            if let Some((i, r)) = best
                && (r >= min_s || Instant::now() >= end)
            {
                return Some(i);
            }
            if Instant::now() >= end {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// An agent that is running a test now, if any (else a random one).
    pub fn busy_agent(&mut self) -> usize {
        let busy: Vec<usize> = (0..self.agents.len())
            .filter(|i| self.agents[*i].proc.is_some() && !self.open_runs(*i).is_empty())
            .collect();
        if busy.is_empty() {
            let n = self.agents.len();
            self.rand(n)
        } else {
            let k = self.rand(busy.len());
            busy[k]
        }
    }

    async fn wait_consumers(&mut self, n: u32, within: Duration) -> anyhow::Result<()> {
        let conn = crate::harness::amqp_connect(&self.amqp_uri).await?;
        let end = Instant::now() + within;
        let r = loop {
            if let Some(i) = self
                .agents
                .iter_mut()
                .position(|a| a.proc.as_mut().is_some_and(|p| !p.alive()))
            {
                let a = &self.agents[i];
                let tail = a.proc.as_ref().map(Proc::tail).unwrap_or_default();
                break Err(anyhow!("agent {} exited during start-up:\n{tail}", a.id));
            }
            if let Some((_, c)) = crate::harness::queue_counts(&conn, &self.queue).await?
                && c >= n
            {
                break Ok(());
            }
            if Instant::now() > end {
                let tail = self
                    .agents
                    .first()
                    .and_then(|a| a.proc.as_ref())
                    .map(Proc::tail)
                    .unwrap_or_default();
                break Err(anyhow!(
                    "fewer than {n} agents consume queue {} after {} s; first agent's output:\n{tail}",
                    self.queue,
                    within.as_secs()
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let _ = conn.close(200, "ready".into()).await;
        r
    }

    /// Starts submitting: keeps `backlog` jobs accepted but not finished, until
    /// `setup.jobs` are accepted or [`World::stop_submitting`].
    pub fn start_submitting(&mut self) {
        let http = self.http.clone();
        let url = format!("{}/v1/job", self.api);
        let queue = self.queue.clone();
        let stats = self.stats.clone();
        let stop = self.stop_submit.clone();
        let ledger = self.ledger.clone();
        let backlog = self.setup.backlog.max(1);
        let limit = self.setup.jobs;
        self.submitter = Some(tokio::spawn(async move {
            let body = json!({"job_queue": queue, "test_data": {"test_cmds": "faults"}});
            loop {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let acc = stats.n_accepted.load(Ordering::Relaxed);
                if limit.is_some_and(|l| acc >= l) {
                    return;
                }
                let ended = ledger.lock().map(|l| l.ended_jobs.len()).unwrap_or(0);
                if acc.saturating_sub(ended) >= backlog {
                    tokio::time::sleep(Duration::from_millis(25)).await;
                    continue;
                }
                let r = http.post(&url).json(&body).send().await;
                match r {
                    Ok(resp) if resp.status().is_success() => {
                        let v: Value = resp.json().await.unwrap_or(Value::Null);
                        if let Some(id) = v.get("job_id").and_then(Value::as_str) {
                            if let Ok(mut a) = stats.accepted.lock() {
                                a.push(id.to_string());
                            }
                            stats.n_accepted.fetch_add(1, Ordering::Relaxed);
                        } else {
                            stats.other.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Ok(resp) => {
                        let st = resp.status();
                        if st.as_u16() == 503 {
                            stats.s503.fetch_add(1, Ordering::Relaxed);
                        } else if st.is_server_error() {
                            stats.s5xx.fetch_add(1, Ordering::Relaxed);
                        } else {
                            stats.other.fetch_add(1, Ordering::Relaxed);
                        }
                        let text = resp.text().await.unwrap_or_default();
                        if let Ok(mut f) = stats.first_error.lock()
                            && f.is_none()
                        {
                            *f = Some(format!("HTTP {st}: {}", text.trim()));
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(e) => {
                        stats.other.fetch_add(1, Ordering::Relaxed);
                        if let Ok(mut f) = stats.first_error.lock()
                            && f.is_none()
                        {
                            *f = Some(e.to_string());
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }));
    }

    pub async fn stop_submitting(&mut self) {
        self.stop_submit.store(true, Ordering::Relaxed);
        if let Some(t) = self.submitter.take() {
            let _ = t.await;
        }
    }

    pub fn ended_jobs(&self) -> usize {
        self.refresh();
        self.ledger.lock().map(|l| l.ended_jobs.len()).unwrap_or(0)
    }

    pub fn fault(&mut self, what: impl Into<String>, start: f64, victims: Vec<(String, String)>) {
        self.faults.push(Fault {
            what: what.into(),
            start,
            end: ledger::uptime(),
            victims,
        });
    }

    /// Starts a stale-write probe in the background (see [`Prober::probe`]).
    pub fn spawn_probe(&mut self) {
        let p = Prober {
            http: self.http.clone(),
            api: self.api.clone(),
            prefix: self.prefix.clone(),
            queue: self.probe_queue.clone(),
        };
        self.probes.push(tokio::spawn(async move {
            let mut r = ProbeResult::default();
            if let Err(e) = p.probe(&mut r, Duration::from_secs(60)).await {
                r.notes.push(format!("{e:#}"));
            }
            r
        }));
    }

    async fn job_state(&self, id: &str) -> Option<String> {
        job_state(&self.http, &self.api, id).await
    }

    /// Stops submitting and waits until every accepted job is final (or `within`);
    /// then computes the figures. Stops agents and servers.
    pub async fn finish(mut self, within: Duration) -> anyhow::Result<Map<String, Value>> {
        self.stop_submitting().await;
        for p in std::mem::take(&mut self.probes) {
            match tokio::time::timeout(Duration::from_secs(120), p).await {
                Ok(Ok(r)) => {
                    self.stale_tried += r.tried;
                    self.stale_accepted += r.accepted;
                    self.notes.extend(r.notes);
                }
                _ => self.notes.push("a stale-write probe did not finish".into()),
            }
        }
        let ids: Vec<String> = self
            .stats
            .accepted
            .lock()
            .map(|a| a.clone())
            .unwrap_or_default();
        let mut open: HashSet<String> = ids.iter().cloned().collect();
        let mut finals: BTreeMap<String, String> = BTreeMap::new();
        let end = Instant::now() + within;
        let mut first = true;
        while !open.is_empty() && Instant::now() < end {
            if !first {
                tokio::time::sleep(Duration::from_millis(1000)).await;
            }
            first = false;
            // Only ask about jobs whose test finished at least once, plus a sample of
            // the rest every pass (a job may end without a test: cancelled, given up).
            let ended: HashSet<String> = {
                self.refresh();
                self.ledger
                    .lock()
                    .map(|l| l.ended_jobs.clone())
                    .unwrap_or_default()
            };
            let ask: Vec<String> = open
                .iter()
                .filter(|j| ended.contains(*j) || self.rand(8) == 0)
                .cloned()
                .collect();
            let states = self.states(&ask).await;
            for (id, st) in states {
                if matches!(st.as_str(), "complete" | "completed" | "cancelled") {
                    open.remove(&id);
                    finals.insert(id, st);
                }
            }
        }
        // The last word on the stragglers.
        let rest: Vec<String> = open.iter().cloned().collect();
        for (id, st) in self.states(&rest).await {
            if matches!(st.as_str(), "complete" | "completed" | "cancelled") {
                open.remove(&id);
                finals.insert(id, st);
            }
        }
        let drained = ledger::uptime();
        // Results: output check and reasons.
        let mut completed = 0usize;
        let mut ended_other: BTreeMap<String, usize> = BTreeMap::new();
        let mut lines_lost = 0u64;
        let mut lost_notes: Vec<String> = Vec::new();
        let mut without_run = 0usize;
        let results = self
            .results(&finals.keys().cloned().collect::<Vec<_>>())
            .await;
        self.refresh();
        {
            let l = self
                .ledger
                .lock()
                .map_err(|_| anyhow!("ledger lock poisoned"))?;
            for (id, st) in &finals {
                let res = results.get(id);
                if st == "cancelled" || res.is_none() {
                    let reason = res
                        .and_then(|r| r.get("job_reason"))
                        .and_then(Value::as_str)
                        .unwrap_or(if res.is_none() { "no result" } else { "" });
                    *ended_other.entry(format!("{st}: {reason}")).or_insert(0) += 1;
                    continue;
                }
                completed += 1;
                let text = res.map(all_text).unwrap_or_default();
                let runs = l.finished_runs(id);
                if runs.is_empty() {
                    without_run += 1;
                    continue;
                }
                let best = runs
                    .iter()
                    .map(|(run, n)| (ledger::missing_lines(&text, run, *n), run))
                    .min_by_key(|(m, _)| *m);
                if let Some((missing, run)) = best.filter(|(m, _)| *m > 0) {
                    lines_lost += u64::from(missing);
                    lost_notes.push(self.lost_lines_note(&l, id, run, &text));
                }
            }
        }
        self.notes.extend(lost_notes.into_iter().take(5));
        if lines_lost > 0 {
            self.keep_logs();
        }
        // Agents and servers go, then whatever tests they left behind.
        let logs: Vec<(&str, String)> = [
            (
                "server",
                self.servers.iter().flatten().next().map(|s| s.proc.tail()),
            ),
            (
                "agent",
                self.agents
                    .iter()
                    .find_map(|a| a.proc.as_ref().map(Proc::tail)),
            ),
        ]
        .into_iter()
        .filter_map(|(w, t)| Some((w, t?)))
        .collect();
        let mut procs = Vec::new();
        for a in &mut self.agents {
            if let Some(p) = a.proc.take() {
                procs.push(p);
            }
        }
        crate::scenarios::stop_all(procs).await;
        for s in self.servers.iter_mut() {
            if let Some(s) = s.take() {
                s.proc.stop().await;
            }
        }
        let orphans = kill_leftovers(&self.script.display().to_string());
        tokio::time::sleep(Duration::from_millis(300)).await;
        self.refresh();
        let l = self
            .ledger
            .lock()
            .map_err(|_| anyhow!("ledger lock poisoned"))?;
        let (concurrent, overlap_max) = l.overlaps();
        let mut recovery: Option<f64> = None;
        let mut requeue: Option<f64> = None;
        let mut unrecovered = 0;
        for f in &self.faults {
            match l.first_start_after(f.end) {
                Some(t) => recovery = Some(recovery.map_or(t - f.end, |r: f64| r.max(t - f.end))),
                None => unrecovered += 1,
            }
            for (job, run) in &f.victims {
                if let Some(t) = l.restart_of(job, run, f.start) {
                    requeue = Some(requeue.map_or(t - f.start, |r: f64| r.max(t - f.start)));
                }
            }
        }
        if unrecovered > 0 {
            self.notes.push(format!(
                "{unrecovered} fault(s) not followed by any test start before the drain ended"
            ));
        }
        if l.bad_lines > 0 {
            self.notes
                .push(format!("{} unreadable ledger lines", l.bad_lines));
        }
        if orphans > 0 {
            self.notes.push(format!(
                "{orphans} test process(es) still running after their agents stopped (killed)"
            ));
        }
        if let Ok(Some(e)) = self.stats.first_error.lock().map(|e| e.clone()) {
            self.notes.push(format!("first submit error: {e}"));
        }
        if completed == 0 || self.stats.s5xx.load(Ordering::Relaxed) > 0 {
            for (what, log) in &logs {
                let t = last_lines(log, 3);
                if !t.is_empty() {
                    self.notes.push(format!("{what}, last lines: {t}"));
                }
            }
        }
        let r3 = |x: f64| (x * 1000.0).round() / 1000.0;
        let mut m = Map::new();
        m.insert("scenario".into(), json!(self.setup.name));
        m.insert("accepted".into(), json!(ids.len()));
        m.insert("completed".into(), json!(completed));
        m.insert("ended_other".into(), json!(ended_other));
        m.insert("lost".into(), json!(open.len()));
        m.insert("concurrent_runs".into(), json!(concurrent));
        m.insert("stale_writes_accepted".into(), json!(self.stale_accepted));
        m.insert("output_lines_lost".into(), json!(lines_lost));
        m.insert(
            "submit_5xx".into(),
            json!(self.stats.s5xx.load(Ordering::Relaxed)),
        );
        m.insert(
            "submit_503".into(),
            json!(self.stats.s503.load(Ordering::Relaxed)),
        );
        m.insert("recovery_s".into(), json!(recovery.map(r3)));
        m.insert("overlap_max_s".into(), json!(r3(overlap_max)));
        m.insert("requeue_max_s".into(), json!(requeue.map(r3)));
        m.insert("stale_writes_tried".into(), json!(self.stale_tried));
        m.insert(
            "submit_other_errors".into(),
            json!(self.stats.other.load(Ordering::Relaxed)),
        );
        m.insert("completed_without_test".into(), json!(without_run));
        m.insert("test_runs".into(), json!(l.runs.len()));
        m.insert("reruns".into(), json!(l.runs.len() - l.by_job.len()));
        m.insert("orphans_at_end".into(), json!(orphans));
        m.insert(
            "faults".into(),
            json!(
                self.faults
                    .iter()
                    .map(|f| json!({"what": f.what, "seconds": r3(f.end - f.start), "victims": f.victims.len()}))
                    .collect::<Vec<_>>()
            ),
        );
        m.insert(
            "params".into(),
            json!({
                "agents": self.setup.agents,
                "lease_s": LEASE_S,
                "reaper_ms": REAPER_MS,
                "max_attempts": MAX_ATTEMPTS,
                "test_ms": {"short": self.setup.shape.short_ms, "long": self.setup.shape.long_ms, "long_pct": self.setup.shape.long_pct},
            }),
        );
        let _ = drained;
        m.insert("notes".into(), json!(self.notes));
        Ok(m)
    }

    async fn states(&self, ids: &[String]) -> Vec<(String, String)> {
        use futures_util::StreamExt;
        futures_util::stream::iter(ids.iter().cloned())
            .map(|id| async move {
                let st = self.job_state(&id).await;
                st.map(|s| (id, s))
            })
            .buffer_unordered(16)
            .filter_map(|x| async move { x })
            .collect()
            .await
    }

    async fn results(&self, ids: &[String]) -> BTreeMap<String, Value> {
        use futures_util::StreamExt;
        futures_util::stream::iter(ids.iter().cloned())
            .map(|id| async move {
                for _ in 0..3 {
                    if let Ok(r) = self
                        .http
                        .get(format!("{}/v1/result/{id}", self.api))
                        .send()
                        .await
                        && r.status().is_success()
                        && let Ok(v) = r.json::<Value>().await
                    {
                        return Some((id, v));
                    }
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                None
            })
            .buffer_unordered(16)
            .filter_map(|x| async move { x })
            .collect()
            .await
    }
}

impl Drop for World<'_> {
    fn drop(&mut self) {
        self.refresher.abort();
        if let Some(t) = self.submitter.take() {
            t.abort();
        }
        for p in &self.probes {
            p.abort();
        }
        // Agents and servers die with their `Proc`s; tests they started may not.
        for a in &mut self.agents {
            if let Some(p) = &a.proc {
                // A frozen agent would not die of SIGKILL before SIGCONT? It does, but
                // its tests stay: continue them so the sweep below sees them end.
                let _ = p.signal("CONT");
            }
        }
        kill_leftovers(&self.script.display().to_string());
    }
}

/// What one probe saw.
#[derive(Default)]
pub struct ProbeResult {
    pub tried: usize,
    pub accepted: usize,
    pub notes: Vec<String>,
}

/// Makes stale writes on purpose.
#[derive(Clone)]
struct Prober {
    http: reqwest::Client,
    api: String,
    prefix: String,
    queue: String,
}

impl Prober {
    /// POST with retries while the API is unreachable or answers 5xx (up to `within`);
    /// the final status, or `None` when it never answered.
    async fn post_retry(
        &self,
        path: &str,
        body: &Value,
        token: Option<&str>,
        within: Duration,
    ) -> Option<(u16, Value)> {
        let end = Instant::now() + within;
        loop {
            let mut req = self.http.post(format!("{}{path}", self.api)).json(body);
            if let Some(t) = token {
                req = req.header(TOKEN_HEADER, t);
            }
            if let Ok(r) = req.send().await {
                let st = r.status().as_u16();
                if st < 500 {
                    let v = r.json::<Value>().await.unwrap_or(Value::Null);
                    return Some((st, v));
                }
            }
            if Instant::now() > end {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    async fn job_state(&self, id: &str) -> Option<String> {
        job_state(&self.http, &self.api, id).await
    }

    /// One stale-write probe: a job on a queue no agent reads, claimed by a zombie
    /// agent that never renews; once the reaper has requeued it, and again once another
    /// agent claimed it, writes carrying the zombie's token are tried (heartbeat, log
    /// fragment, result). Every 2xx is a stale write accepted.
    pub async fn probe(&self, r: &mut ProbeResult, within: Duration) -> anyhow::Result<()> {
        let body = json!({"job_queue": self.queue, "test_data": {"test_cmds": "probe"}});
        let (st, v) = self
            .post_retry("/v1/job", &body, None, within)
            .await
            .ok_or_else(|| anyhow!("probe: the API did not accept a job"))?;
        let id = v
            .get("job_id")
            .and_then(Value::as_str)
            .filter(|_| st == 200)
            .ok_or_else(|| anyhow!("probe: submit answered {st}: {v}"))?
            .to_string();
        let claim = |agent: &str| json!({"agent_id": format!("{}-{agent}", self.prefix)});
        // Fencing tokens are 32 hex digits (a string) on the wire.
        let token = |v: &Value| v.get("token").and_then(Value::as_str).map(str::to_string);
        let (_, c1) = self
            .post_retry(
                &format!("/v1/job/{id}/claim"),
                &claim("zombie"),
                None,
                within,
            )
            .await
            .ok_or_else(|| anyhow!("probe: no claim answer"))?;
        let Some(t1) = token(&c1) else {
            bail!("probe: the first claim was not granted: {c1}");
        };
        // The zombie never renews: wait for the reaper.
        let end = Instant::now() + within;
        loop {
            if self.job_state(&id).await.as_deref() == Some("waiting") {
                break;
            }
            if Instant::now() > end {
                r.notes.push(format!(
                    "probe {id}: not requeued within {} s",
                    within.as_secs()
                ));
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        self.stale_writes(r, &id, &t1, within).await;
        let (_, c2) = self
            .post_retry(&format!("/v1/job/{id}/claim"), &claim("heir"), None, within)
            .await
            .ok_or_else(|| anyhow!("probe: no second claim answer"))?;
        let Some(t2) = token(&c2) else {
            bail!("probe: the second claim was not granted: {c2}");
        };
        self.stale_writes(r, &id, &t1, within).await;
        // The heir ends it properly.
        let _ = self
            .post_retry(
                &format!("/v1/result/{id}"),
                &json!({"job_state": "complete"}),
                Some(&t2),
                within,
            )
            .await;
        Ok(())
    }

    async fn stale_writes(&self, r: &mut ProbeResult, id: &str, t: &str, within: Duration) {
        let agent = format!("{}-zombie", self.prefix);
        let ts = chrono::Utc::now().to_rfc3339();
        let writes = [
            (
                format!("/v1/job/{id}/heartbeat"),
                json!({"agent_id": agent, "token": t}),
                None,
            ),
            (
                format!("/v1/result/{id}/log/output"),
                json!({"fragment_number": 9999, "timestamp": ts, "phase": "test", "log_data": "STALE WRITE\n"}),
                Some(t),
            ),
            (
                format!("/v1/result/{id}"),
                json!({"device_info": {"stale": true}}),
                Some(t),
            ),
        ];
        for (path, body, tok) in writes {
            r.tried += 1;
            match self.post_retry(&path, &body, tok, within).await {
                Some((st, _)) if (200..300).contains(&st) => {
                    r.accepted += 1;
                    r.notes.push(format!("stale write accepted: {path}"));
                }
                Some(_) => {}
                None => r.notes.push(format!("stale write {path}: no answer")),
            }
        }
    }
}

/// The job's state (`GET /v1/result/<id>`: `GET /v1/job/<id>` answers the definition).
async fn job_state(http: &reqwest::Client, api: &str, id: &str) -> Option<String> {
    let r = http
        .get(format!("{api}/v1/result/{id}"))
        .send()
        .await
        .ok()?;
    if !r.status().is_success() {
        return None;
    }
    let v: Value = r.json().await.ok()?;
    v.get("job_state")
        .and_then(Value::as_str)
        .map(str::to_string)
}

/// The fencing token header (`testflinger_common::protocol::TOKEN_HEADER`).
const TOKEN_HEADER: &str = "X-Testflinger-Token";

/// The last `n` non-empty lines of `text`, joined with " | ", each cut to 300 bytes.
fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| {
            let mut end = l.len().min(300);
            while !l.is_char_boundary(end) {
                end -= 1;
            }
            &l[..end]
        })
        .collect::<Vec<_>>()
        .join(" | ")
}

/// Every string in a JSON value, one after the other (the result's output fields,
/// however they are laid out).
pub fn all_text(v: &Value) -> String {
    fn walk(v: &Value, out: &mut String) {
        match v {
            Value::String(s) => {
                out.push_str(s);
                out.push('\n');
            }
            Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            Value::Object(m) => m.values().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    let mut s = String::new();
    walk(v, &mut s);
    s
}

/// Kills the process groups of test scripts still running from `script` (tests a dead
/// agent left behind); returns how many scripts were found. Only processes whose
/// command line names this run's own script are touched.
pub fn kill_leftovers(script: &str) -> usize {
    let mut groups = HashSet::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return 0;
    };
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if !cmd.contains(script) {
            continue;
        }
        // Zombies have an empty cmdline, so this is a live script (or its `sh -c`).
        let pgrp = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                let after = s.rsplit_once(')')?.1.to_string();
                after.split_whitespace().nth(2)?.parse::<u32>().ok()
            });
        super::stack::signal_pid(pid, "KILL");
        if let Some(g) = pgrp
            && g > 1
        {
            groups.insert(g);
            super::stack::signal_group(g, "KILL");
        }
    }
    groups.len()
}
