//! `TestLab`: a real `testflinger-server` (its own Redis prefix, data dir and port),
//! agents spawned from the built binary, unique queue names; all cleaned up on Drop.

use reqwest::StatusCode;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use testflinger_testing::{Agent, Server, short_id, write_agent_config};
pub use testflinger_testing::{amqp_uri, redis_url};

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

impl ServerOpts {
    fn env(&self) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = [
            ("TESTFLINGER_LEASE_TTL", self.lease_ttl.to_string()),
            ("TESTFLINGER_REAPER_INTERVAL_MS", self.reaper_ms.to_string()),
            ("TESTFLINGER_QUEUE_TYPE", self.queue_type.to_string()),
            ("TESTFLINGER_RETENTION", "1800".to_string()),
            ("TESTFLINGER_WORKERS", "2".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        env.extend(self.env.iter().cloned());
        env
    }
}

pub struct TestLab {
    pub prefix: String,
    pub queue: String,
    pub base: String,
    pub http: reqwest::Client,
    // Dropped in this order: the agents, then the server (which removes its Redis keys,
    // queues and temp dir).
    agents: Vec<Agent>,
    server: Server,
}

impl TestLab {
    pub async fn start(name: &str) -> TestLab {
        TestLab::start_with(name, ServerOpts::default()).await
    }

    pub async fn start_with(name: &str, opts: ServerOpts) -> TestLab {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let suffix = short_id();
        let prefix = format!("tfagent-{name}-{suffix}");
        let queue = format!("agent-test-{name}-{suffix}");
        let server = tokio::task::block_in_place(|| Server::start(&prefix, opts.env()));
        server.own_queue(&queue);
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(20))
            .build()
            .expect("http client");
        TestLab {
            prefix,
            queue,
            base: server.url.clone(),
            http,
            agents: Vec::new(),
            server,
        }
    }

    /// The lab's directory (agent configs, run dirs, logs; the server's `server.log`).
    pub fn dir(&self) -> &Path {
        self.server.dir.path()
    }

    /// What the server has logged.
    pub fn server_log(&self) -> String {
        self.server.log()
    }

    /// SIGKILLs the server (the API is down until [`TestLab::restart_server`]).
    pub fn stop_server(&mut self) {
        self.server.stop();
    }

    /// Starts the server again on the same port, prefix and data dir; waits until it
    /// answers.
    pub async fn restart_server(&mut self) {
        tokio::task::block_in_place(|| self.server.restart());
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir().join(name)
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
        let path = self.path(&format!("{agent}.yaml"));
        write_agent_config(&path, &cfg);
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
        let mut env = env.to_vec();
        env.insert(
            0,
            ("RUST_LOG".into(), "testflinger_agent=debug,info".into()),
        );
        self.agents
            .push(Agent::start_with(agent, &cfg, &log, args, &env));
        self.agents.len() - 1
    }

    /// Another queue of this test, deleted with the lab.
    pub fn extra_queue(&mut self, suffix: &str) -> String {
        let q = format!("{}-{suffix}", self.queue);
        self.server.own_queue(&q);
        q
    }

    pub fn agent(&mut self, i: usize) -> &mut Agent {
        &mut self.agents[i]
    }

    pub fn agent_log(&self, i: usize) -> String {
        self.agents[i].log_text()
    }

    /// SIGKILL: the agent dies without releasing anything.
    pub fn kill_agent(&mut self, i: usize) {
        self.agents[i].kill();
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
