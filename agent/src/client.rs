//! The agent's view of the Testflinger HTTP API: one method per call.
//!
//! With a token file (upstream's `token_file`: JSON `{"refresh_token": ".."}`), every
//! request carries `Authorization: Bearer <access token>`; the access token is obtained
//! at `POST /v1/oauth2/refresh`, cached, and fetched again once on a 401 (the request is
//! then replayed), as upstream's agent does.
//!
//! Writes about a job carry the fencing token in [`TOKEN_HEADER`]; a 409 answer means
//! the lease was lost and becomes [`ClientError::LeaseLost`], never retried; a 404 means
//! the server has no such job and becomes [`ClientError::JobGone`], never retried. Server
//! errors (5xx) and connection failures are retried with exponential back-off (5 tries,
//! 60 s per request by default; [`ApiClient::once`] makes a client that tries once with
//! its own timeout, for heartbeats and the spool, which keep their own pace); other
//! 4xx answers are the caller's to handle ([`ClientError::Rejected`]).

use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::time::Duration;
use testflinger_common::LogType;
use testflinger_common::protocol::{
    ClaimRequest, ClaimResponse, FenceToken, HeartbeatResponse, LeaseRequest, TOKEN_HEADER,
};

/// What went wrong with an API call, sorted by what the caller can do.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// 409: the job moved on (reaped, released, re-claimed). Stop working on it.
    #[error("lease lost: {0}")]
    LeaseLost(String),
    /// 404 to a write about a job (result, log, artifact, heartbeat, release): the server
    /// has no such job any more (removed, or another server's). Stop working on it and
    /// drop what is still to be sent about it; retrying cannot help.
    #[error("job gone: {0}")]
    JobGone(String),
    /// Another 4xx: the request is wrong or not allowed; retrying will not help.
    #[error("the API refused the request ({status}): {message}")]
    Rejected { status: u16, message: String },
    /// The API could not be reached or kept failing (5xx) after the retries. Retry later.
    #[error("the API is unavailable: {0}")]
    Unavailable(String),
    /// The API answered 503 last: it is up but its state store (Redis) is not. No lease
    /// can be taken from its holder meanwhile (the reaper needs Redis too, and grants a
    /// lease of grace when Redis returns). Retry later.
    #[error("the API's state store is unavailable: {0}")]
    StoreDown(String),
    /// The API answered something we cannot read.
    #[error("unexpected answer from the API: {0}")]
    Protocol(String),
}

/// One log fragment as `POST /v1/result/<id>/log/<type>` takes it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Fragment {
    pub fragment_number: u64,
    pub timestamp: String,
    pub phase: testflinger_common::Phase,
    pub log_data: String,
}

/// A cheap-to-clone API client for one agent.
#[derive(Debug, Clone)]
pub struct ApiClient {
    http: reqwest::Client,
    base: String,
    agent_id: String,
    attempts: u32,
    auth: Option<std::sync::Arc<Credentials>>,
    /// Per-request timeout overriding the client's 60 s.
    timeout: Option<Duration>,
}

/// The agent's refresh token and the access token it was last exchanged for.
struct Credentials {
    refresh_token: String,
    access: tokio::sync::Mutex<Option<String>>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Credentials(***)")
    }
}

/// Reads upstream's token file: JSON `{"refresh_token": "<token>"}`. Errors name the
/// file and what is wrong with it.
pub fn read_token_file(path: &std::path::Path) -> Result<String, ClientError> {
    let bad = |m: String| ClientError::Protocol(format!("token file {}: {m}", path.display()));
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| {
        bad(format!(
            "not JSON ({e}); expected {{\"refresh_token\": \"...\"}}"
        ))
    })?;
    match v.get("refresh_token").and_then(Value::as_str) {
        Some(t) if !t.trim().is_empty() => Ok(t.trim().to_string()),
        _ => Err(bad(
            "no non-empty \"refresh_token\" string; expected {\"refresh_token\": \"...\"}".into(),
        )),
    }
}

impl ApiClient {
    /// Builds a client for `base` (e.g. `http://127.0.0.1:8000`). Fails only when the
    /// TLS stack cannot be initialised.
    pub fn new(base: &str, agent_id: &str) -> Result<ApiClient, ClientError> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| ClientError::Protocol(format!("cannot build HTTP client: {e}")))?;
        Ok(ApiClient {
            http,
            base: base.trim_end_matches('/').to_string(),
            agent_id: agent_id.to_string(),
            attempts: 5,
            auth: None,
            timeout: None,
        })
    }

    /// The same client, but each call is tried once and waits at most `timeout` for
    /// the answer (connecting included); a timeout is [`ClientError::Unavailable`].
    pub fn once(&self, timeout: Duration) -> ApiClient {
        ApiClient {
            attempts: 1,
            timeout: Some(timeout),
            ..self.clone()
        }
    }

    /// The same client with at most `attempts` tries of `timeout` each.
    pub fn quick(&self, attempts: u32, timeout: Duration) -> ApiClient {
        ApiClient {
            attempts: attempts.max(1),
            timeout: Some(timeout),
            ..self.clone()
        }
    }

    /// Authenticates every request with an access token obtained from this refresh
    /// token (see the module docs).
    pub fn with_refresh_token(mut self, refresh_token: String) -> ApiClient {
        self.auth = Some(std::sync::Arc::new(Credentials {
            refresh_token,
            access: tokio::sync::Mutex::new(None),
        }));
        self
    }

    /// Like [`ApiClient::with_refresh_token`] with the token read from upstream's token
    /// file; a path that does not exist leaves the client unauthenticated (as upstream).
    pub fn with_token_file(self, path: Option<&std::path::Path>) -> Result<ApiClient, ClientError> {
        match path {
            Some(p) if p.exists() => Ok(self.with_refresh_token(read_token_file(p)?)),
            Some(p) => {
                tracing::warn!(path = %p.display(), "no token file: requests to the API are not authenticated");
                Ok(self)
            }
            None => Ok(self),
        }
    }

    /// The cached access token, exchanging the refresh token when there is none or
    /// `renew` is set.
    async fn access_token(&self, renew: bool) -> Result<Option<String>, ClientError> {
        let Some(creds) = &self.auth else {
            return Ok(None);
        };
        let mut cached = creds.access.lock().await;
        if let Some(t) = cached.as_ref()
            && !renew
        {
            return Ok(Some(t.clone()));
        }
        let r = self
            .http
            .post(self.url("/v1/oauth2/refresh"))
            .json(&json!({"refresh_token": creds.refresh_token}))
            .send()
            .await
            .map_err(|e| ClientError::Unavailable(format!("token refresh: {e}")))?;
        if r.status().is_server_error() {
            return Err(ClientError::Unavailable(format!(
                "token refresh: {}",
                r.status()
            )));
        }
        if !r.status().is_success() {
            let status = r.status().as_u16();
            return Err(ClientError::Rejected {
                status,
                message: format!(
                    "the refresh token in the token file was refused: {}",
                    message_of(r).await
                ),
            });
        }
        let v: Value = Self::json(r).await?;
        let t = v
            .get("access_token")
            .and_then(Value::as_str)
            .ok_or_else(|| ClientError::Protocol("no access_token in the refresh answer".into()))?
            .to_string();
        *cached = Some(t.clone());
        Ok(Some(t))
    }

    pub fn agent_id(&self) -> &str {
        &self.agent_id
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// Sends the request built by `build`, retrying connection errors and 5xx.
    async fn send(&self, build: impl Fn() -> RequestBuilder) -> Result<Response, ClientError> {
        let mut delay = Duration::from_millis(200);
        let mut last = String::new();
        let mut last_503 = false;
        for attempt in 0..self.attempts {
            if attempt > 0 {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            let mut req = build();
            if let Some(t) = self.timeout {
                req = req.timeout(t);
            }
            match self.access_token(false).await {
                Ok(Some(t)) => req = req.bearer_auth(t),
                Ok(None) => {}
                Err(ClientError::Unavailable(e)) => {
                    last = e;
                    continue;
                }
                Err(e) => return Err(e),
            }
            let mut res = req.send().await;
            // An expired or rejected access token: fetch a new one once and replay.
            if let Ok(r) = &res
                && r.status() == StatusCode::UNAUTHORIZED
                && self.auth.is_some()
            {
                match self.access_token(true).await {
                    Ok(Some(t)) => {
                        let mut again = build().bearer_auth(t);
                        if let Some(to) = self.timeout {
                            again = again.timeout(to);
                        }
                        res = again.send().await
                    }
                    Ok(None) => {}
                    Err(ClientError::Unavailable(e)) => {
                        last = e;
                        continue;
                    }
                    Err(e) => return Err(e),
                }
            }
            match res {
                Ok(r) if r.status().is_server_error() => {
                    last_503 = r.status() == StatusCode::SERVICE_UNAVAILABLE;
                    last = format!("{} {}", r.status(), message_of(r).await);
                }
                Ok(r) if r.status() == StatusCode::CONFLICT => {
                    return Err(ClientError::LeaseLost(message_of(r).await));
                }
                Ok(r) => return Ok(r),
                Err(e) if e.is_builder() => return Err(ClientError::Protocol(e.to_string())),
                Err(e) => {
                    last_503 = false;
                    last = e.to_string();
                }
            }
            tracing::debug!(attempt, error = %last, "API call failed; retrying");
        }
        if last_503 {
            return Err(ClientError::StoreDown(last));
        }
        Err(ClientError::Unavailable(last))
    }

    /// Checks for success (any 2xx); other answers become `Rejected`.
    async fn ok(r: Response) -> Result<Response, ClientError> {
        if r.status().is_success() {
            Ok(r)
        } else {
            let status = r.status().as_u16();
            Err(ClientError::Rejected {
                status,
                message: message_of(r).await,
            })
        }
    }

    /// Like [`ApiClient::ok`] for a write about `job_id`: a 404 becomes `JobGone`.
    async fn job_ok(r: Response, job_id: &str) -> Result<Response, ClientError> {
        if r.status() == StatusCode::NOT_FOUND {
            return Err(ClientError::JobGone(format!(
                "the API has no job {job_id}: {}",
                message_of(r).await
            )));
        }
        Self::ok(r).await
    }

    async fn json<T: serde::de::DeserializeOwned>(r: Response) -> Result<T, ClientError> {
        r.json::<T>()
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))
    }

    fn post_json(&self, path: &str, body: &Value, token: Option<FenceToken>) -> RequestBuilder {
        let mut b = self.http.request(Method::POST, self.url(path)).json(body);
        if let Some(t) = token {
            b = b.header(TOKEN_HEADER, t.to_string());
        }
        b
    }

    /// `GET /v1/` answers below 500.
    pub async fn ping(&self) -> Result<(), ClientError> {
        let r = self.send(|| self.http.get(self.url("/v1/"))).await?;
        Self::ok(r).await.map(|_| ())
    }

    /// `POST /v1/agents/data/<agent>`: registers or updates this agent's record.
    pub async fn post_agent(&self, body: &Value) -> Result<(), ClientError> {
        let path = format!("/v1/agents/data/{}", self.agent_id);
        let r = self.send(|| self.post_json(&path, body, None)).await?;
        Self::ok(r).await.map(|_| ())
    }

    /// `GET /v1/agents/data/<agent>`; `None` when the server does not know the agent.
    pub async fn get_agent(&self) -> Result<Option<Value>, ClientError> {
        let path = format!("/v1/agents/data/{}", self.agent_id);
        let r = self.send(|| self.http.get(self.url(&path))).await?;
        if r.status() == StatusCode::NOT_FOUND || r.status() == StatusCode::NO_CONTENT {
            return Ok(None);
        }
        Self::json(Self::ok(r).await?).await.map(Some)
    }

    /// `POST /v1/agents/queues`
    pub async fn post_queues(&self, queues: &Value) -> Result<(), ClientError> {
        let r = self
            .send(|| self.post_json("/v1/agents/queues", queues, None))
            .await?;
        Self::ok(r).await.map(|_| ())
    }

    /// `POST /v1/agents/images`
    pub async fn post_images(&self, images: &Value) -> Result<(), ClientError> {
        let r = self
            .send(|| self.post_json("/v1/agents/images", images, None))
            .await?;
        Self::ok(r).await.map(|_| ())
    }

    /// `POST /v1/agents/provision_logs/<agent>`
    pub async fn post_provision_log(
        &self,
        job_id: &str,
        exit_code: i32,
        detail: &str,
    ) -> Result<(), ClientError> {
        let path = format!("/v1/agents/provision_logs/{}", self.agent_id);
        let body = json!({"job_id": job_id, "exit_code": exit_code, "detail": detail});
        let r = self.send(|| self.post_json(&path, &body, None)).await?;
        Self::ok(r).await.map(|_| ())
    }

    /// `POST /v1/job/<id>/claim`
    pub async fn claim(&self, job_id: &str) -> Result<ClaimResponse, ClientError> {
        let path = format!("/v1/job/{job_id}/claim");
        let body = serde_json::to_value(ClaimRequest {
            agent_id: self.agent_id.clone(),
        })
        .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let r = self.send(|| self.post_json(&path, &body, None)).await?;
        Self::json(Self::ok(r).await?).await
    }

    /// `POST /v1/job/<id>/heartbeat`; `LeaseLost` when the token is stale, `JobGone`
    /// when the server has no such job.
    pub async fn heartbeat(
        &self,
        job_id: &str,
        token: FenceToken,
    ) -> Result<HeartbeatResponse, ClientError> {
        let path = format!("/v1/job/{job_id}/heartbeat");
        let body = self.lease_body(token, None)?;
        let r = self.send(|| self.post_json(&path, &body, None)).await?;
        Self::json(Self::job_ok(r, job_id).await?).await
    }

    /// `POST /v1/job/<id>/release`: gives the job back so it is queued again.
    pub async fn release(
        &self,
        job_id: &str,
        token: FenceToken,
        reason: &str,
    ) -> Result<(), ClientError> {
        let path = format!("/v1/job/{job_id}/release");
        let body = self.lease_body(token, Some(reason.to_string()))?;
        let r = self.send(|| self.post_json(&path, &body, None)).await?;
        Self::job_ok(r, job_id).await.map(|_| ())
    }

    fn lease_body(&self, token: FenceToken, reason: Option<String>) -> Result<Value, ClientError> {
        serde_json::to_value(LeaseRequest {
            agent_id: self.agent_id.clone(),
            token,
            reason,
        })
        .map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// `POST /v1/job` with a raw body; returns the job id the API assigned.
    pub async fn submit_job(&self, body: &[u8]) -> Result<String, ClientError> {
        let body = body.to_vec();
        let r = self
            .send(|| {
                self.http
                    .post(self.url("/v1/job"))
                    .header("content-type", "application/json")
                    .body(body.clone())
            })
            .await?;
        let v: Value = Self::json(Self::ok(r).await?).await?;
        v.get("job_id")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| ClientError::Protocol("no job_id in the answer".into()))
    }

    /// `GET /v1/result/<id>`; `None` for an unknown job (204).
    pub async fn get_result(&self, job_id: &str) -> Result<Option<Value>, ClientError> {
        let path = format!("/v1/result/{job_id}");
        let r = self.send(|| self.http.get(self.url(&path))).await?;
        if r.status() == StatusCode::NO_CONTENT {
            return Ok(None);
        }
        Self::json(Self::ok(r).await?).await.map(Some)
    }

    /// The `job_state` of a job, if it is known.
    pub async fn job_state(&self, job_id: &str) -> Result<Option<String>, ClientError> {
        Ok(self.get_result(job_id).await?.and_then(|v| {
            v.get("job_state")
                .and_then(Value::as_str)
                .map(str::to_string)
        }))
    }

    /// `POST /v1/result/<id>` (job_state, status, device_info) with the fencing token.
    pub async fn post_result(
        &self,
        job_id: &str,
        token: FenceToken,
        body: &Value,
    ) -> Result<(), ClientError> {
        let path = format!("/v1/result/{job_id}");
        let r = self
            .send(|| self.post_json(&path, body, Some(token)))
            .await?;
        Self::job_ok(r, job_id).await.map(|_| ())
    }

    /// `POST /v1/result/<id>/log/<type>` with the fencing token.
    pub async fn post_log(
        &self,
        job_id: &str,
        token: FenceToken,
        log_type: LogType,
        fragment: &Fragment,
    ) -> Result<(), ClientError> {
        let path = format!("/v1/result/{job_id}/log/{log_type}");
        let body =
            serde_json::to_value(fragment).map_err(|e| ClientError::Protocol(e.to_string()))?;
        let r = self
            .send(|| self.post_json(&path, &body, Some(token)))
            .await?;
        Self::job_ok(r, job_id).await.map(|_| ())
    }

    /// `POST /v1/result/<id>/artifact`: uploads the gzip tar at `path`, streamed from
    /// the file (read again from the start on each try; never held in memory).
    /// Errors: [`ClientError::Protocol`] when the file cannot be read; the others as
    /// for every call (a 400 or 413 from the server's archive check is `Rejected`).
    pub async fn post_artifact_file(
        &self,
        job_id: &str,
        token: FenceToken,
        path: &std::path::Path,
    ) -> Result<(), ClientError> {
        let len = tokio::fs::metadata(path)
            .await
            .map_err(|e| {
                ClientError::Protocol(format!("cannot read the artifact {}: {e}", path.display()))
            })?
            .len();
        let url = format!("/v1/result/{job_id}/artifact");
        let r = self
            .send(|| {
                let body = match std::fs::File::open(path) {
                    Ok(f) => {
                        reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::with_capacity(
                            tokio::fs::File::from_std(f),
                            64 * 1024,
                        ))
                    }
                    // Gone since the check above: the request fails and is retried.
                    Err(e) => reqwest::Body::wrap_stream(futures_util::stream::once(async move {
                        Err::<bytes::Bytes, _>(e)
                    })),
                };
                let part = reqwest::multipart::Part::stream_with_length(body, len)
                    .file_name("file")
                    .mime_str("application/x-gzip");
                let mut form = reqwest::multipart::Form::new();
                if let Ok(part) = part {
                    form = form.part("file", part);
                }
                self.http
                    .post(self.url(&url))
                    .header(TOKEN_HEADER, token.to_string())
                    .multipart(form)
            })
            .await?;
        Self::job_ok(r, job_id).await.map(|_| ())
    }

    /// `GET /v1/job/<id>/attachments`, streamed into the file `dest` (created or
    /// truncated); `false` when there are none (204). Errors: the download broke off
    /// ([`ClientError::Unavailable`]) or `dest` cannot be written
    /// ([`ClientError::Protocol`]).
    pub async fn get_attachments_to(
        &self,
        job_id: &str,
        dest: &std::path::Path,
    ) -> Result<bool, ClientError> {
        use futures_util::StreamExt;
        use tokio::io::AsyncWriteExt;
        let path = format!("/v1/job/{job_id}/attachments");
        let r = self.send(|| self.http.get(self.url(&path))).await?;
        if r.status() == StatusCode::NO_CONTENT {
            return Ok(false);
        }
        let r = Self::ok(r).await?;
        let disk = |e: std::io::Error| {
            ClientError::Protocol(format!("cannot write {}: {e}", dest.display()))
        };
        let mut file = tokio::fs::File::create(dest).await.map_err(disk)?;
        let mut body = r.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| ClientError::Unavailable(e.to_string()))?;
            file.write_all(&chunk).await.map_err(disk)?;
        }
        file.flush().await.map_err(disk)?;
        Ok(true)
    }
}

/// The human message of an error answer: the JSON `message`, else the text.
async fn message_of(r: Response) -> String {
    let text = r.text().await.unwrap_or_default();
    match serde_json::from_str::<Value>(&text) {
        Ok(v) => match v.get("message") {
            Some(Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
            None => text.trim().to_string(),
        },
        Err(_) => text.trim().to_string(),
    }
}
