//! `TestLab`: a real `testflinger-server` (its own Redis prefix, data dir and port),
//! agents spawned from the built binary, unique queue names; all cleaned up on Drop.

use reqwest::StatusCode;
use serde_json::{Value, json};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use testflinger_broker::{Broker, BrokerConfig};

pub fn amqp_uri() -> String {
    std::env::var("AMQP_URI").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".into())
}

/// The server binary, built next to this test binary (`cargo build -p testflinger-api`).
fn server_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target profile dir");
    let bin = dir.join("testflinger-server");
    assert!(
        bin.exists(),
        "{} is missing: build it first with `cargo build -p testflinger-api --bin testflinger-server` in the same target dir",
        bin.display()
    );
    bin
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Server settings a test may change.
#[derive(Debug, Clone)]
pub struct ServerOpts {
    pub lease_ttl: u64,
    pub reaper_ms: u64,
    /// Extra environment of the server (e.g. `JWT_SIGNING_KEY` to turn auth on).
    pub env: Vec<(String, String)>,
    /// `TESTFLINGER_QUEUE_TYPE`: `classic` or `quorum`.
    pub queue_type: &'static str,
}

impl Default for ServerOpts {
    fn default() -> Self {
        ServerOpts {
            lease_ttl: 30,
            reaper_ms: 1000,
            env: Vec::new(),
            queue_type: "classic",
        }
    }
}

pub struct TestLab {
    pub prefix: String,
    pub queue: String,
    pub dir: tempfile::TempDir,
    pub base: String,
    pub http: reqwest::Client,
    server: Child,
    port: u16,
    opts: ServerOpts,
    agents: Vec<AgentProc>,
    queues: Vec<String>,
}

/// A spawned agent process.
pub struct AgentProc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl AgentProc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl TestLab {
    pub async fn start(name: &str) -> TestLab {
        TestLab::start_with(name, ServerOpts::default()).await
    }

    pub async fn start_with(name: &str, opts: ServerOpts) -> TestLab {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let suffix = uuid::Uuid::new_v4().simple().to_string()[..10].to_string();
        let prefix = format!("tfagent-{name}-{suffix}");
        let queue = format!("agent-test-{name}-{suffix}");
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).expect("data dir");
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(20))
            .build()
            .expect("http client");
        let mut last_err = String::new();
        for _ in 0..3 {
            let port = free_port();
            let mut server = spawn_server(dir.path(), &prefix, port, &opts, false);
            let base = format!("http://127.0.0.1:{port}");
            match wait_ready(&http, &base, &mut server, dir.path()).await {
                Ok(()) => {
                    return TestLab {
                        prefix,
                        queue: queue.clone(),
                        dir,
                        base,
                        http,
                        server,
                        port,
                        opts,
                        agents: Vec::new(),
                        queues: vec![queue],
                    };
                }
                Err(e) => {
                    last_err = e;
                    let _ = server.kill();
                    let _ = server.wait();
                }
            }
        }
        panic!("testflinger-server did not start: {last_err}");
    }

    /// SIGKILLs the server (the API is down until [`TestLab::restart_server`]).
    pub fn stop_server(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
    }

    /// Starts the server again on the same port, prefix and data dir; waits until it
    /// answers.
    pub async fn restart_server(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let mut server =
                spawn_server(self.dir.path(), &self.prefix, self.port, &self.opts, true);
            match wait_ready(&self.http, &self.base, &mut server, self.dir.path()).await {
                Ok(()) => {
                    self.server = server;
                    return;
                }
                Err(e) => {
                    let _ = server.kill();
                    let _ = server.wait();
                    assert!(Instant::now() < deadline, "server did not restart: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes an agent config (defaults + `extra` keys) and returns its path.
    pub fn agent_config(&self, agent: &str, extra: Value) -> PathBuf {
        let mut cfg = json!({
            "agent_id": agent,
            "server_address": self.base,
            "job_queues": [self.queue],
            "polling_interval": 0.5,
            "execution_basedir": self.path(&format!("run-{agent}")),
            "logging_basedir": self.path("logs"),
            "results_basedir": self.path("results"),
            "location": "lab",
            "provision_type": "fake",
            "amqp_uri": amqp_uri(),
        });
        if let (Some(o), Value::Object(e)) = (cfg.as_object_mut(), extra) {
            o.extend(e);
        }
        // JSON flow style is YAML.
        let mut yaml = String::new();
        if let Value::Object(o) = &cfg {
            for (k, v) in o {
                yaml.push_str(&format!("{k}: {v}\n"));
            }
        }
        let path = self.path(&format!("{agent}.yaml"));
        std::fs::write(&path, yaml).expect("write agent config");
        path
    }

    /// Starts an agent process with the given extra config keys.
    pub fn spawn_agent(&mut self, agent: &str, extra: Value) -> usize {
        self.spawn_agent_with(agent, extra, &[], &[])
    }

    /// Starts an agent process with extra config keys, command-line arguments and
    /// environment variables.
    pub fn spawn_agent_with(
        &mut self,
        agent: &str,
        extra: Value,
        args: &[String],
        env: &[(String, String)],
    ) -> usize {
        let cfg = self.agent_config(agent, extra);
        let log = self.path(&format!("{agent}-{}.log", self.agents.len()));
        let file = std::fs::File::create(&log).expect("agent log");
        let child = Command::new(env!("CARGO_BIN_EXE_testflinger-agent"))
            .arg("-c")
            .arg(&cfg)
            .args(args)
            .env("RUST_LOG", "testflinger_agent=debug,info")
            .env("AMQP_URI", amqp_uri())
            .envs(env.iter().cloned())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("spawn agent");
        self.agents.push(AgentProc {
            name: agent.to_string(),
            child,
            log,
        });
        self.agents.len() - 1
    }

    /// Another queue of this test, deleted with the lab.
    pub fn extra_queue(&mut self, suffix: &str) -> String {
        let q = format!("{}-{suffix}", self.queue);
        self.queues.push(q.clone());
        q
    }

    pub fn agent(&mut self, i: usize) -> &mut AgentProc {
        &mut self.agents[i]
    }

    pub fn agent_log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.agents[i].log).unwrap_or_default()
    }

    /// SIGKILL: the agent dies without releasing anything.
    pub fn kill_agent(&mut self, i: usize) {
        let a = &mut self.agents[i];
        let _ = a.child.kill();
        let _ = a.child.wait();
    }

    /// SIGTERM, then waits up to `within` for the process to exit; returns its status.
    pub async fn terminate_agent(
        &mut self,
        i: usize,
        within: Duration,
    ) -> std::process::ExitStatus {
        let pid = self.agents[i].pid();
        let _ = Command::new("kill")
            .args(["-s", "TERM", &pid.to_string()])
            .status();
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(s)) = self.agents[i].child.try_wait() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "agent did not exit within {within:?} after SIGTERM; log:\n{}",
                self.agent_log(i)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    // --- API calls -------------------------------------------------------------

    pub async fn submit(&self, mut job: Value) -> String {
        if job.get("job_queue").is_none() {
            job["job_queue"] = json!(self.queue);
        }
        // 503 means "not queued, retry later" (the server's first broker connection can
        // be slow on a loaded machine).
        let deadline = Instant::now() + Duration::from_secs(15);
        let body = loop {
            let r = self
                .http
                .post(format!("{}/v1/job", self.base))
                .json(&job)
                .send()
                .await
                .expect("submit");
            let status = r.status();
            let body: Value = r.json().await.unwrap_or(Value::Null);
            if status == StatusCode::SERVICE_UNAVAILABLE && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            assert_eq!(status, StatusCode::OK, "submit failed: {body}");
            break body;
        };
        body["job_id"].as_str().expect("job_id").to_string()
    }

    pub async fn result(&self, id: &str) -> Value {
        let r = self
            .http
            .get(format!("{}/v1/result/{id}", self.base))
            .send()
            .await
            .expect("result");
        if r.status() == StatusCode::NO_CONTENT {
            return Value::Null;
        }
        r.json().await.expect("result json")
    }

    pub async fn state(&self, id: &str) -> String {
        self.result(id).await["job_state"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    pub async fn cancel(&self, id: &str) {
        let r = self
            .http
            .post(format!("{}/v1/job/{id}/action", self.base))
            .json(&json!({"action": "cancel"}))
            .send()
            .await
            .expect("cancel");
        assert!(r.status().is_success(), "cancel: {}", r.status());
    }

    pub async fn get_agent(&self, agent: &str) -> Value {
        let r = self
            .http
            .get(format!("{}/v1/agents/data/{agent}", self.base))
            .send()
            .await
            .expect("get agent");
        if !r.status().is_success() {
            return Value::Null;
        }
        r.json().await.unwrap_or(Value::Null)
    }

    pub async fn set_agent_state(&self, agent: &str, state: &str, comment: &str) {
        let r = self
            .http
            .post(format!("{}/v1/agents/data/{agent}", self.base))
            .json(&json!({"state": state, "comment": comment}))
            .send()
            .await
            .expect("post agent");
        assert!(r.status().is_success());
    }

    pub async fn artifact(&self, id: &str) -> Option<Vec<u8>> {
        let r = self
            .http
            .get(format!("{}/v1/result/{id}/artifact", self.base))
            .send()
            .await
            .expect("artifact");
        if r.status() != StatusCode::OK {
            return None;
        }
        Some(r.bytes().await.expect("bytes").to_vec())
    }

    /// Polls `check` every 100 ms until it gives `Some`, or panics after `within`
    /// with `what` and the agents' logs.
    pub async fn wait_for<T, F, Fut>(&self, what: &str, within: Duration, mut check: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let deadline = Instant::now() + within;
        loop {
            if let Some(v) = check().await {
                return v;
            }
            if Instant::now() >= deadline {
                let logs: Vec<String> = (0..self.agents.len())
                    .map(|i| format!("--- {} ---\n{}", self.agents[i].name, self.agent_log(i)))
                    .collect();
                panic!(
                    "timed out after {within:?} waiting for {what}\n{}",
                    logs.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the job's result satisfies `pred`; returns that result.
    pub async fn wait_result(
        &self,
        id: &str,
        what: &str,
        within: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        self.wait_for(what, within, || async {
            let r = self.result(id).await;
            pred(&r).then_some(r)
        })
        .await
    }

    /// Waits for the job's final outcome (`complete` with a cleanup status, or the
    /// agent back to idle after a cancelled job).
    pub async fn wait_complete(&self, id: &str, within: Duration) -> Value {
        self.wait_result(id, "job complete", within, |r| r["job_state"] == "complete")
            .await
    }

    /// Waits until the agent is idle with no job.
    pub async fn wait_agent_idle(&self, agent: &str, within: Duration) -> Value {
        self.wait_for("agent idle", within, || async {
            let a = self.get_agent(agent).await;
            (a["job_id"] == "" && a["state"] != Value::Null && !is_phase(&a["state"])).then_some(a)
        })
        .await
    }

    /// Asserts the job stays `waiting` for `period` (used only to show something does
    /// NOT happen; bounded).
    pub async fn assert_stays_waiting(&self, id: &str, period: Duration) {
        let deadline = Instant::now() + period;
        while Instant::now() < deadline {
            let s = self.state(id).await;
            assert_eq!(s, "waiting", "job {id} left waiting");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn spawn_server(dir: &Path, prefix: &str, port: u16, opts: &ServerOpts, append: bool) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(append)
        .write(true)
        .truncate(!append)
        .open(dir.join("server.log"))
        .expect("server log");
    Command::new(server_binary())
        .env("AMQP_URI", amqp_uri())
        .env("REDIS_URL", redis_url())
        .env("DATA_PATH", dir.join("data"))
        .env("TESTFLINGER_BIND", format!("127.0.0.1:{port}"))
        .env("TESTFLINGER_REDIS_PREFIX", prefix)
        .env("TESTFLINGER_LEASE_TTL", opts.lease_ttl.to_string())
        .env("TESTFLINGER_REAPER_INTERVAL_MS", opts.reaper_ms.to_string())
        .env("TESTFLINGER_QUEUE_TYPE", opts.queue_type)
        .env("TESTFLINGER_RETENTION", "1800")
        .env("TESTFLINGER_SUBMIT_CONSUMER", "false")
        .env("TESTFLINGER_WORKERS", "2")
        .env("RUST_LOG", "info")
        .envs(opts.env.clone())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn testflinger-server")
}

async fn wait_ready(
    http: &reqwest::Client,
    base: &str,
    server: &mut Child,
    dir: &Path,
) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(Some(status)) = server.try_wait() {
            let log = std::fs::read_to_string(dir.join("server.log")).unwrap_or_default();
            return Err(format!("server exited with {status}: {log}"));
        }
        if let Ok(r) = http.get(format!("{base}/v1/")).send().await
            && r.status().is_success()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err("no answer within 20 s".into())
}

fn is_phase(v: &Value) -> bool {
    matches!(
        v.as_str(),
        Some(
            "setup" | "provision" | "firmware_update" | "test" | "allocate" | "reserve" | "cleanup"
        )
    )
}

/// Waits until a process is gone (or a zombie).
pub async fn wait_pid_gone(pid: &str, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat.is_empty() || stat.contains(") Z") {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    false
}

impl Drop for TestLab {
    fn drop(&mut self) {
        for a in &mut self.agents {
            let _ = a.child.kill();
            let _ = a.child.wait();
        }
        let _ = self.server.kill();
        let _ = self.server.wait();
        let queues = std::mem::take(&mut self.queues);
        let prefix = self.prefix.clone();
        // Own runtime on another thread: Drop may run inside the test's runtime.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                if let Ok(b) = Broker::new(BrokerConfig::new(amqp_uri())) {
                    for q in &queues {
                        let _ = b.delete_queue(q).await;
                    }
                }
                if let Ok(client) = redis::Client::open(redis_url())
                    && let Ok(mut con) = client.get_multiplexed_async_connection().await
                {
                    let mut cursor: u64 = 0;
                    loop {
                        let r: Result<(u64, Vec<String>), _> = redis::cmd("SCAN")
                            .arg(cursor)
                            .arg("MATCH")
                            .arg(format!("{prefix}*"))
                            .arg("COUNT")
                            .arg(500)
                            .query_async(&mut con)
                            .await;
                        let Ok((next, keys)) = r else { break };
                        if !keys.is_empty() {
                            let _: Result<(), _> =
                                redis::cmd("DEL").arg(&keys).query_async(&mut con).await;
                        }
                        if next == 0 {
                            break;
                        }
                        cursor = next;
                    }
                }
            });
        })
        .join();
    }
}

/// A loopback TCP proxy in front of the API that can stop forwarding: after
/// [`Proxy::cut`], connections (open and new) are held open and never answered, as a
/// network partition looks to the agent.
pub struct Proxy {
    pub port: u16,
    cut: std::sync::Arc<tokio::sync::watch::Sender<bool>>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(target: &str) -> Proxy {
        let target = target
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("proxy bind");
        let port = listener.local_addr().expect("proxy addr").port();
        let (tx, rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            let held = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                let mut rx = rx.clone();
                let held = held.clone();
                let target = target.clone();
                tokio::spawn(async move {
                    if *rx.borrow() {
                        held.lock().expect("held").push(inbound);
                        return;
                    }
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = rx.wait_for(|cut| *cut) => {
                            held.lock().expect("held").push(inbound);
                            held.lock().expect("held").push(outbound);
                        }
                    }
                });
            }
        });
        Proxy {
            port,
            cut: std::sync::Arc::new(tx),
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Stops forwarding: every byte sent from now on goes nowhere.
    pub fn cut(&self) {
        let _ = self.cut.send(true);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The live (not zombie) processes whose process group is `pgid`.
pub fn group_members(pgid: &str) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let stat = std::fs::read_to_string(format!("/proc/{name}/stat")).unwrap_or_default();
        // pid (comm) state ppid pgrp ...: split after the last ')'.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        if f.len() > 2 && f[0] != "Z" && f[2] == pgid {
            out.push(name);
        }
    }
    out
}

/// Waits until no live process is left in group `pgid`.
pub async fn wait_group_gone(pgid: &str, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if group_members(pgid).is_empty() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    group_members(pgid).is_empty()
}
