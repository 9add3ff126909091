use reqwest::{Client, Response};
use serde_json::{Value, json};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use testflinger_api::settings::Settings;
use testflinger_api::startup::Application;
use testflinger_api::state::AppState;
use testflinger_broker::Broker;

pub struct TestApp {
    pub base: String,
    pub http: Client,
    pub state: AppState,
    pub prefix: String,
    pub queues: std::sync::Mutex<Vec<String>>,
    data: PathBuf,
    handle: actix_web::dev::ServerHandle,
}

pub fn unique(tag: &str) -> String {
    format!(
        "t-{tag}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    )
}

impl TestApp {
    pub async fn spawn() -> TestApp {
        Self::spawn_with(|_| {}).await
    }

    pub async fn spawn_with(f: impl FnOnce(&mut Settings)) -> TestApp {
        let prefix = unique("api");
        let data = std::env::temp_dir().join(&prefix);
        let mut s = Settings::for_tests(&prefix, data.clone());
        f(&mut s);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let app = Application::build(s, Some(listener))
            .await
            .expect("build app");
        let base = format!("http://127.0.0.1:{}", app.port());
        let state = app.state.clone();
        let handle = app.handle();
        tokio::spawn(app.run_until_stopped());
        TestApp {
            base,
            http: Client::builder()
                .timeout(Duration::from_secs(15))
                .build()
                .expect("client"),
            state,
            prefix,
            queues: std::sync::Mutex::new(Vec::new()),
            data,
            handle,
        }
    }

    /// A fresh queue name, deleted at cleanup.
    pub fn queue(&self, tag: &str) -> String {
        let q = unique(tag);
        self.queues.lock().expect("lock").push(q.clone());
        q
    }

    pub fn broker(&self) -> &Broker {
        &self.state.broker
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub async fn get(&self, path: &str) -> Response {
        self.http.get(self.url(path)).send().await.expect("GET")
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> Response {
        self.http
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .expect("POST")
    }

    pub async fn post_raw(&self, path: &str, body: &str) -> Response {
        self.http
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .expect("POST")
    }

    pub async fn post_token(&self, path: &str, token: &str, body: &Value) -> Response {
        self.http
            .post(self.url(path))
            .header("X-Testflinger-Token", token)
            .json(body)
            .send()
            .await
            .expect("POST")
    }

    pub async fn submit(&self, job: Value) -> String {
        let r = self.post_json("/v1/job", &job).await;
        let status = r.status();
        let body: Value = r.json().await.expect("json");
        assert_eq!(status, 200, "submit failed: {body}");
        body["job_id"].as_str().expect("job_id").to_string()
    }

    pub async fn result(&self, id: &str) -> Value {
        let r = self.get(&format!("/v1/result/{id}")).await;
        assert_eq!(r.status(), 200);
        r.json().await.expect("json")
    }

    pub async fn claim(&self, id: &str, agent: &str) -> Value {
        let r = self
            .post_json(&format!("/v1/job/{id}/claim"), &json!({"agent_id": agent}))
            .await;
        assert_eq!(r.status(), 200);
        r.json().await.expect("json")
    }

    /// Polls `f` until it returns Some, or panics after `secs`.
    pub async fn wait_for<T, F, Fut>(&self, secs: u64, what: &str, mut f: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(v) = f().await {
                return v;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Removes this test's queues, Redis keys and files.
    pub async fn cleanup(self) {
        let queues: Vec<String> = self.queues.lock().expect("lock").clone();
        for q in &queues {
            let _ = self.state.broker.delete_queue(q).await;
        }
        let mut c = self.state.store.con();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}:*", self.prefix))
            .query_async(&mut c)
            .await
            .unwrap_or_default();
        if !keys.is_empty() {
            let _: redis::RedisResult<()> = redis::cmd("DEL").arg(keys).query_async(&mut c).await;
        }
        let _ = std::fs::remove_dir_all(&self.data);
        self.handle.stop(false).await;
    }
}

/// A `redis-server` of this test's own: a free port, its own directory, killed on drop.
pub struct PrivateRedis {
    pub child: Child,
    pub port: u16,
    pub dir: tempfile::TempDir,
}

impl PrivateRedis {
    /// Starts one on a free port with `extra` arguments and waits until it answers.
    pub fn start(extra: &[&str]) -> PrivateRedis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        Self::start_on(port, extra)
    }

    /// [`PrivateRedis::start`] on a given port (a Redis coming back where it was).
    pub fn start_on(port: u16, extra: &[&str]) -> PrivateRedis {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut r = PrivateRedis {
            child: Self::spawn(port, dir.path(), extra),
            port,
            dir,
        };
        r.wait_ready();
        r
    }

    pub fn spawn(port: u16, dir: &std::path::Path, extra: &[&str]) -> Child {
        Command::new("redis-server")
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--save",
                "",
            ])
            .arg("--dir")
            .arg(dir)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (Debian package redis-server) must be installed")
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Waits until the server answers PING with PONG (not LOADING).
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.cli(&["PING"]).trim() == "PONG" {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("private redis on port {} did not start", self.port);
    }

    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
