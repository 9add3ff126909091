//! The few Testflinger server routes connectors use (no auth, as upstream's `multi`).

use crate::error::{ConnectorError, Result};
use serde_json::{Value, json};
use std::time::Duration;

/// An HTTP client with the TLS provider installed.
pub fn http_client(timeout: Duration) -> Result<reqwest::Client> {
    // reqwest is built without a default TLS provider; installing twice is harmless.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| ConnectorError::Api(format!("cannot build an HTTP client: {e}")))
}

/// `testflinger_server` from the device config.
#[derive(Debug, Clone)]
pub struct Api {
    base: String,
    client: reqwest::Client,
}

impl Api {
    pub fn new(server: &str) -> Result<Api> {
        let base = if server.starts_with("http://") || server.starts_with("https://") {
            server.trim_end_matches('/').to_string()
        } else {
            format!("http://{}", server.trim_end_matches('/'))
        };
        Ok(Api {
            base,
            client: http_client(Duration::from_secs(30))?,
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// `POST /v1/job`: returns the new job id.
    pub async fn submit(&self, job: &Value) -> Result<String> {
        let url = format!("{}/v1/job", self.base);
        let resp = self
            .client
            .post(&url)
            .json(job)
            .send()
            .await
            .map_err(|e| unreachable(&url, &e))?;
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        if !status.is_success() {
            return Err(ConnectorError::Api(format!(
                "POST {url} answered {status}: {}",
                body.trim().chars().take(300).collect::<String>()
            )));
        }
        serde_json::from_str::<Value>(&body)
            .ok()
            .and_then(|v| v.get("job_id").and_then(Value::as_str).map(str::to_string))
            .ok_or_else(|| ConnectorError::Api(format!("POST {url}: no job_id in the answer")))
    }

    /// `GET /v1/result/<id>`: `None` when the server does not know the job (204).
    pub async fn result(&self, job_id: &str) -> Result<Option<Value>> {
        let url = format!("{}/v1/result/{job_id}", self.base);
        let resp = self
            .client
            .get(&url)
            .send()
            .await
            .map_err(|e| unreachable(&url, &e))?;
        let status = resp.status();
        if status == reqwest::StatusCode::NO_CONTENT || status == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !status.is_success() {
            return Err(ConnectorError::Api(format!("GET {url} answered {status}")));
        }
        resp.json::<Value>()
            .await
            .map(Some)
            .map_err(|e| ConnectorError::Api(format!("GET {url}: invalid JSON: {e}")))
    }

    /// The `job_state` of a job, if the server knows it.
    pub async fn job_state(&self, job_id: &str) -> Result<Option<String>> {
        Ok(self.result(job_id).await?.and_then(|v| {
            v.get("job_state")
                .and_then(Value::as_str)
                .map(str::to_string)
        }))
    }

    /// `POST /v1/job/<id>/action {"action": "cancel"}`.
    pub async fn cancel(&self, job_id: &str) -> Result<()> {
        let url = format!("{}/v1/job/{job_id}/action", self.base);
        let resp = self
            .client
            .post(&url)
            .json(&json!({"action": "cancel"}))
            .send()
            .await
            .map_err(|e| unreachable(&url, &e))?;
        let status = resp.status();
        if status.is_success() {
            Ok(())
        } else {
            let body = resp.text().await.unwrap_or_default();
            Err(ConnectorError::Api(format!(
                "cancel of {job_id} answered {status}: {}",
                body.trim().chars().take(200).collect::<String>()
            )))
        }
    }
}

fn unreachable(url: &str, e: &reqwest::Error) -> ConnectorError {
    ConnectorError::Api(format!(
        "cannot reach the Testflinger server at {url}: {}",
        chain(e)
    ))
}

/// An error and its causes on one line.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let s_text = s.to_string();
        if !out.contains(&s_text) {
            out.push_str(": ");
            out.push_str(&s_text);
        }
        cur = s.source();
    }
    out
}
