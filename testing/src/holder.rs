//! Holding jobs as a test agent.

use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::Mutex;

/// The jobs a test holds as their agent: each is claimed once (`POST
/// /v1/job/<id>/claim`, idempotent for the same agent) and its fencing token kept; the
/// server accepts writes about a job from its holder only.
#[derive(Debug)]
pub struct Holder {
    agent_id: String,
    tokens: Mutex<HashMap<String, String>>,
}

impl Holder {
    pub fn new(agent_id: &str) -> Holder {
        Holder {
            agent_id: agent_id.to_string(),
            tokens: Mutex::new(HashMap::new()),
        }
    }

    /// The fencing token of `job_id` on the server at `base`, claiming the job the first
    /// time; panics unless the claim is granted.
    pub async fn token(&self, http: &reqwest::Client, base: &str, job_id: &str) -> String {
        if let Some(t) = self.tokens.lock().expect("lock").get(job_id) {
            return t.clone();
        }
        let resp = http
            .post(format!("{base}/v1/job/{job_id}/claim"))
            .json(&json!({"agent_id": self.agent_id}))
            .send()
            .await
            .expect("POST claim");
        let status = resp.status().as_u16();
        let body = resp.text().await.unwrap_or_default();
        assert_eq!(status, 200, "claim {job_id}: {body}");
        let v: Value = serde_json::from_str(&body).expect("claim json");
        assert_eq!(v["outcome"], "granted", "claim {job_id}: {body}");
        let token = v["token"].as_str().expect("token").to_string();
        self.tokens
            .lock()
            .expect("lock")
            .insert(job_id.to_string(), token.clone());
        token
    }
}
