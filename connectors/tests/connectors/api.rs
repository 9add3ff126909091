//! The real API server (`testflinger-server`) on a loopback port, with a private Redis
//! prefix and private queue names, and a small client playing the agents' role.

use serde_json::{Value, json};
use std::time::Duration;
pub use testflinger_testing::unique;
use testflinger_testing::{Holder, Server, http_client, runtime};

pub struct ApiServer {
    pub url: String,
    rt: tokio::runtime::Runtime,
    client: reqwest::Client,
    /// The jobs this test holds as their agent.
    holder: Holder,
    server: Server,
}

impl ApiServer {
    pub fn start() -> ApiServer {
        let server = Server::start(
            &unique("tf-conn-test"),
            [
                ("TESTFLINGER_RETENTION", "900"),
                ("TESTFLINGER_WORKERS", "1"),
                ("TESTFLINGER_EVENTS", "false"),
            ],
        );
        ApiServer {
            url: server.url.clone(),
            holder: Holder::new("connectors-test-agent"),
            rt: runtime(),
            client: http_client(Duration::from_secs(10)),
            server,
        }
    }

    /// A private job queue name, deleted from RabbitMQ when the server guard drops.
    pub fn queue(&mut self, prefix: &str) -> String {
        let q = unique(prefix);
        self.server.own_queue(&q);
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
        self.rt
            .block_on(self.holder.token(&self.client, &self.url, id))
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
