use reqwest::{Client, Response};
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use testflinger_api::settings::Settings;
use testflinger_api::startup::Application;
use testflinger_api::state::AppState;
use testflinger_broker::Broker;
use testflinger_testing::Cleanup;
pub use testflinger_testing::{PrivateRedis, unique};

pub struct TestApp {
    pub base: String,
    pub http: Client,
    pub state: AppState,
    pub prefix: String,
    /// This test's queues: deleted by [`TestApp::cleanup`], else on drop.
    pub queues: std::sync::Mutex<Vec<String>>,
    handle: actix_web::dev::ServerHandle,
    /// Removes the Redis keys, the data dir and the queues left in `queues` on drop.
    guard: Cleanup,
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
        let guard = Cleanup::new()
            .amqp(&s.amqp_uri)
            .redis_prefix(&s.redis_url, &prefix)
            .dir(data);
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
            handle,
            guard,
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

    /// Removes this test's queues (through the app's broker connection) and stops the
    /// app; dropping it then removes its Redis keys and files.
    pub async fn cleanup(self) {
        let queues: Vec<String> = std::mem::take(&mut *self.queues.lock().expect("lock"));
        for q in &queues {
            let _ = self.state.broker.delete_queue(q).await;
        }
        self.handle.stop(false).await;
    }
}

impl Drop for TestApp {
    /// Without [`TestApp::cleanup`] (a failed test), the guard deletes the queues too.
    fn drop(&mut self) {
        let queues = std::mem::take(&mut *self.queues.lock().unwrap_or_else(|e| e.into_inner()));
        for q in queues {
            self.guard.queue(q);
        }
    }
}
