//! The real API server (`testflinger-server`) on a loopback port, with a private Redis
//! prefix and private queue names, and a small client playing the agents' role.

use crate::support::{BIN, free_port, wait_until};
use serde_json::{Value, json};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A name no other test (or test run) uses.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}-{}-{nanos:x}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// `testflinger-server` sits next to our binary after `cargo build -p testflinger-api`
/// (or any `--workspace` build) with the same target dir; `TESTFLINGER_SERVER_BIN`
/// overrides.
fn server_bin() -> PathBuf {
    if let Ok(p) = std::env::var("TESTFLINGER_SERVER_BIN") {
        return PathBuf::from(p);
    }
    let sibling = std::path::Path::new(BIN).with_file_name("testflinger-server");
    assert!(
        sibling.exists(),
        "{} not found: build the API first with `cargo build -p testflinger-api` \
         (same CARGO_TARGET_DIR), or set TESTFLINGER_SERVER_BIN",
        sibling.display()
    );
    sibling
}

pub struct ApiServer {
    pub url: String,
    pub redis_prefix: String,
    queues: Vec<String>,
    child: Child,
    _data: tempfile::TempDir,
    rt: tokio::runtime::Runtime,
    client: reqwest::Client,
    /// Fencing tokens of the jobs this test holds as their agent.
    tokens: std::sync::Mutex<std::collections::HashMap<String, String>>,
}

impl ApiServer {
    pub fn start() -> ApiServer {
        let port = free_port();
        let data = tempfile::tempdir().expect("tempdir");
        let redis_prefix = unique("tf-conn-test");
        let log = std::fs::File::create(data.path().join("server.log")).expect("log");
        let child = Command::new(server_bin())
            .env(
                "AMQP_URI",
                std::env::var("AMQP_URI")
                    .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into()),
            )
            .env(
                "REDIS_URL",
                std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".into()),
            )
            .env("DATA_PATH", data.path())
            .env("TESTFLINGER_BIND", format!("127.0.0.1:{port}"))
            .env("TESTFLINGER_REDIS_PREFIX", &redis_prefix)
            .env("TESTFLINGER_RETENTION", "900")
            .env("TESTFLINGER_WORKERS", "1")
            // Stay off the shared submission queue: it belongs to other servers.
            .env("TESTFLINGER_SUBMIT_CONSUMER", "false")
            .env("TESTFLINGER_EVENTS", "false")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start testflinger-server");
        let _ = rustls::crypto::ring::default_provider().install_default();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        // No idle connection reuse: a connection the server closed after its keep-alive
        // timeout, reused at that moment, fails with "IncompleteMessage".
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .pool_max_idle_per_host(0)
            .build()
            .expect("client");
        let mut server = ApiServer {
            url: format!("http://127.0.0.1:{port}"),
            redis_prefix,
            queues: Vec::new(),
            tokens: Default::default(),
            child,
            _data: data,
            rt,
            client,
        };
        let ready = format!("{}/readyz", server.url);
        let mut exited = None;
        wait_until("the API to be ready", Duration::from_secs(30), || {
            if let Ok(Some(status)) = server.child.try_wait() {
                exited = Some(status);
                return true;
            }
            server.rt.block_on(async {
                server
                    .client
                    .get(&ready)
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success())
            })
        });
        if let Some(status) = exited {
            let log =
                std::fs::read_to_string(server._data.path().join("server.log")).unwrap_or_default();
            panic!("testflinger-server exited ({status}): {log}");
        }
        server
    }

    /// A private job queue name, deleted from RabbitMQ when the server guard drops.
    pub fn queue(&mut self, prefix: &str) -> String {
        let q = unique(prefix);
        self.queues.push(q.clone());
        q
    }

    fn call(&self, req: reqwest::RequestBuilder) -> (u16, Value) {
        self.rt.block_on(async {
            let resp = req.send().await.expect("HTTP request");
            let status = resp.status().as_u16();
            let text = resp.text().await.unwrap_or_default();
            let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
            (status, body)
        })
    }

    pub fn submit(&self, job: &Value) -> String {
        let (status, body) = self.call(self.client.post(format!("{}/v1/job", self.url)).json(job));
        assert_eq!(status, 200, "submit: {body}");
        body["job_id"].as_str().expect("job_id").to_string()
    }

    pub fn job(&self, id: &str) -> Value {
        let (status, body) = self.call(self.client.get(format!("{}/v1/job/{id}", self.url)));
        assert_eq!(status, 200, "GET job {id}: {body}");
        body
    }

    pub fn state(&self, id: &str) -> String {
        let (status, body) = self.call(self.client.get(format!("{}/v1/result/{id}", self.url)));
        assert_eq!(status, 200, "GET result {id}: {body}");
        body["job_state"].as_str().unwrap_or_default().to_string()
    }

    /// What an agent posts when its job reaches a state, as the job's holder (a claim
    /// by a test agent, idempotent; the server takes writes from the holder only).
    pub fn post_result(&self, id: &str, result: &Value) {
        let token = self.hold(id);
        let (status, body) = self.call(
            self.client
                .post(format!("{}/v1/result/{id}", self.url))
                .header("X-Testflinger-Token", token)
                .json(result),
        );
        assert_eq!(status, 200, "POST result {id}: {body}");
    }

    /// Claims `id` as a test agent once and keeps its fencing token.
    fn hold(&self, id: &str) -> String {
        if let Some(t) = self.tokens.lock().expect("lock").get(id) {
            return t.clone();
        }
        let (status, claim) = self.call(
            self.client
                .post(format!("{}/v1/job/{id}/claim", self.url))
                .json(&serde_json::json!({"agent_id": "connectors-test-agent"})),
        );
        assert_eq!(status, 200, "claim {id}: {claim}");
        assert_eq!(claim["outcome"], "granted", "claim {id}: {claim}");
        let token = claim["token"].as_str().expect("token").to_string();
        self.tokens
            .lock()
            .expect("lock")
            .insert(id.to_string(), token.clone());
        token
    }

    pub fn result(&self, id: &str) -> Value {
        let (status, body) = self.call(self.client.get(format!("{}/v1/result/{id}", self.url)));
        assert_eq!(status, 200, "GET result {id}: {body}");
        body
    }

    /// Ids of the jobs on a queue.
    pub fn children_of(&self, queue: &str) -> Vec<String> {
        let (_, body) = self.call(
            self.client
                .get(format!("{}/v1/queues/{queue}/jobs", self.url)),
        );
        body.as_array()
            .into_iter()
            .flatten()
            .filter_map(|j| j["job_id"].as_str().map(str::to_string))
            .collect()
    }

    pub fn agent_state(&self, name: &str) -> String {
        let (_, body) = self.call(
            self.client
                .get(format!("{}/v1/agents/data/{name}", self.url)),
        );
        body["state"].as_str().unwrap_or_default().to_string()
    }

    pub fn cancel(&self, id: &str) {
        let (status, body) = self.call(
            self.client
                .post(format!("{}/v1/job/{id}/action", self.url))
                .json(&json!({"action": "cancel"})),
        );
        assert_eq!(status, 200, "cancel {id}: {body}");
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Our own keys only (the unique prefix); they would expire anyway.
        let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".into());
        if let Ok(out) = Command::new("redis-cli")
            .args(["-u", &url, "--scan", "--pattern"])
            .arg(format!("{}:*", self.redis_prefix))
            .stderr(Stdio::null())
            .output()
        {
            let keys: Vec<String> = String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|k| k.starts_with(&format!("{}:", self.redis_prefix)))
                .map(str::to_string)
                .collect();
            if !keys.is_empty() {
                let _ = Command::new("redis-cli")
                    .args(["-u", &url, "DEL"])
                    .args(&keys)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
        // Our own queues only; never a shared one.
        for q in &self.queues {
            let _ = Command::new("rabbitmqctl")
                .args(["-q", "delete_queue", q])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}
