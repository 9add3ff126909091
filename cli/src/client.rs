//! The HTTP client: one method per kind of request, and the one-line error for every
//! answer the caller did not expect.
//!
//! Upstream answers "not found" with 204 on many routes, so callers branch on the status
//! code of a [`Reply`] and turn the rest into an error with [`Reply::error`].

use anyhow::{Context, anyhow};
use reqwest::{Method, StatusCode};
use serde_json::Value;
use std::time::Duration;

/// Requests other than streams give up after this long.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub struct Client {
    base: String,
    http: reqwest::Client,
    /// The same client without an overall timeout, for long downloads and streams.
    streaming: reqwest::Client,
    debug: bool,
    session: std::sync::Arc<tokio::sync::Mutex<crate::auth::Session>>,
}

/// A request that got no answer in time (worth retrying, unlike the other failures).
#[derive(Debug)]
pub struct TimedOut(String);

impl std::fmt::Display for TimedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the server at {} did not answer in time", self.0)
    }
}

impl std::error::Error for TimedOut {}

/// A server answer read in full.
pub struct Reply {
    pub status: StatusCode,
    pub body: bytes::Bytes,
    what: String,
}

impl Client {
    pub fn new(base: String, debug: bool, session: crate::auth::Session) -> anyhow::Result<Client> {
        let build = |timeout: Option<Duration>| {
            let mut b = reqwest::Client::builder()
                .connect_timeout(CONNECT_TIMEOUT)
                .user_agent(concat!("testflinger-cli/", env!("CARGO_PKG_VERSION")));
            if let Some(t) = timeout {
                b = b.timeout(t);
            }
            b.build().context("cannot build the HTTP client")
        };
        Ok(Client {
            base,
            http: build(Some(REQUEST_TIMEOUT))?,
            streaming: build(None)?,
            debug,
            session: std::sync::Arc::new(tokio::sync::Mutex::new(session)),
        })
    }

    /// The client id this process acts as (credentials or stored login), if any.
    pub async fn client_id(&self) -> Option<String> {
        self.session.lock().await.client_id().map(str::to_string)
    }

    /// `testflinger login`: authenticates now and stores the refresh token.
    pub async fn login(&self) -> anyhow::Result<String> {
        self.session
            .lock()
            .await
            .login(&self.http, &self.base)
            .await
    }

    /// Adds the access token, when this process has credentials.
    async fn authorize(
        &self,
        r: reqwest::RequestBuilder,
    ) -> anyhow::Result<reqwest::RequestBuilder> {
        let bearer = self
            .session
            .lock()
            .await
            .bearer(&self.http, &self.base)
            .await?;
        Ok(match bearer {
            Some(t) => r.bearer_auth(t),
            None => r,
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    fn debug(&self, method: &Method, url: &str) {
        if self.debug {
            eprintln!("debug: {method} {url}");
        }
    }

    /// Sends a request built by `f` and reads the whole answer.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        f: impl FnOnce(reqwest::RequestBuilder) -> reqwest::RequestBuilder,
    ) -> anyhow::Result<Reply> {
        let url = self.url(path);
        self.debug(&method, &url);
        let what = format!("{method} {path}");
        let resp = f(self.authorize(self.http.request(method, &url)).await?)
            .send()
            .await
            .map_err(|e| self.transport_error(e))?;
        let status = resp.status();
        let body = resp.bytes().await.map_err(|e| self.transport_error(e))?;
        if self.debug {
            eprintln!("debug: -> {status} ({} bytes)", body.len());
        }
        Ok(Reply { status, body, what })
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<Reply> {
        self.send(Method::GET, path, |r| r).await
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> anyhow::Result<Reply> {
        self.send(Method::POST, path, |r| r.json(body)).await
    }

    /// Starts a request whose body the caller reads as a stream (no overall timeout).
    pub async fn open(
        &self,
        path: &str,
        f: impl FnOnce(reqwest::RequestBuilder) -> reqwest::RequestBuilder,
    ) -> anyhow::Result<reqwest::Response> {
        let url = self.url(path);
        self.debug(&Method::GET, &url);
        let resp = f(self.authorize(self.streaming.get(&url)).await?)
            .send()
            .await
            .map_err(|e| self.transport_error(e))?;
        if self.debug {
            eprintln!("debug: -> {}", resp.status());
        }
        Ok(resp)
    }

    /// The one-line error for a request that got no HTTP answer.
    pub fn transport_error(&self, e: reqwest::Error) -> anyhow::Error {
        let mut cause = String::new();
        let mut src: Option<&dyn std::error::Error> = std::error::Error::source(&e);
        while let Some(s) = src {
            cause = s.to_string();
            src = s.source();
        }
        if e.is_timeout() {
            anyhow::Error::new(TimedOut(self.base.clone()))
        } else if e.is_connect() {
            anyhow!("cannot reach the server at {}: {cause}", self.base)
        } else if cause.is_empty() {
            anyhow!("request to {} failed: {e}", self.base)
        } else {
            anyhow!("request to {} failed: {cause}", self.base)
        }
    }
}

impl Reply {
    pub fn from_parts(status: StatusCode, body: bytes::Bytes, what: String) -> Reply {
        Reply { status, body, what }
    }

    pub fn ok(&self) -> bool {
        self.status == StatusCode::OK
    }

    pub fn json(&self) -> anyhow::Result<Value> {
        serde_json::from_slice(&self.body)
            .with_context(|| format!("the server sent invalid JSON for {}", self.what))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).trim().to_string()
    }

    /// What the server said: `message` (plus `detail` for validation errors) from a JSON
    /// body, else the text body.
    pub fn message(&self) -> String {
        server_message(&self.body)
    }

    /// The error for an unexpected answer: status and the server's message.
    pub fn error(&self) -> anyhow::Error {
        let msg = self.message();
        if msg.is_empty() {
            anyhow!("{} failed: {}", self.what, self.status)
        } else {
            anyhow!("server answered {}: {msg}", self.status)
        }
    }
}

/// The message of an error body, on one line.
pub fn server_message(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let msg = match serde_json::from_str::<Value>(&text) {
        Ok(Value::Object(map)) => {
            let mut parts = Vec::new();
            match map.get("message") {
                Some(Value::String(s)) => parts.push(s.clone()),
                Some(Value::Null) | None => {}
                Some(other) => parts.push(flatten_detail(other)),
            }
            if let Some(detail) = map.get("detail").filter(|d| !is_empty(d)) {
                // Our server (and upstream's) repeats the detail in the message: say it once.
                let detail = flatten_detail(detail);
                if !parts.iter().any(|p| p.contains(&detail)) {
                    parts.push(detail);
                }
            }
            if parts.is_empty() {
                for key in ["error", "detail"] {
                    if let Some(Value::String(s)) = map.get(key) {
                        parts.push(s.clone());
                    }
                }
            }
            if parts.is_empty() {
                text.trim().to_string()
            } else {
                parts.join(": ")
            }
        }
        Ok(Value::String(s)) => s,
        _ => text.trim().to_string(),
    };
    crate::output::one_line(&msg)
}

fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Object(m) => m.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::String(s) => s.is_empty(),
        _ => false,
    }
}

/// `{"json": {"a": {"b": ["msg"]}}}` -> `a.b: msg` (several joined with `; `).
fn flatten_detail(v: &Value) -> String {
    fn walk(prefix: &str, v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    let p = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&p, v, out);
                }
            }
            Value::Array(a) if a.iter().all(|x| !x.is_object()) => {
                let msgs: Vec<String> = a
                    .iter()
                    .map(|x| match x {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    })
                    .collect();
                out.push(label(prefix, &msgs.join(" ")));
            }
            Value::String(s) => out.push(label(prefix, s)),
            other => out.push(label(prefix, &other.to_string())),
        }
    }
    fn label(prefix: &str, msg: &str) -> String {
        if prefix.is_empty() {
            msg.to_string()
        } else {
            format!("{prefix}: {msg}")
        }
    }
    let mut out = Vec::new();
    // The location level (`json`, `query`) says nothing to a user.
    match v {
        Value::Object(m) if m.keys().all(|k| k == "json" || k == "query") => {
            for inner in m.values() {
                walk("", inner, &mut out);
            }
        }
        _ => walk("", v, &mut out),
    }
    out.join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages() {
        let body =
            br#"{"detail": {"json": {"foo": ["Unknown field."]}}, "message": "Validation error"}"#;
        assert_eq!(
            server_message(body),
            "Validation error: foo: Unknown field."
        );
        assert_eq!(
            server_message(b"Job not found or already started\n"),
            "Job not found or already started"
        );
        assert_eq!(server_message(br#"{"message": "nope"}"#), "nope");
        assert_eq!(
            server_message(br#""Queue 'x' does not exist.""#),
            "Queue 'x' does not exist."
        );
    }
}

/// Percent-encodes one path segment (job ids, queue and agent names come from the user).
pub fn seg(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod seg_tests {
    #[test]
    fn encodes() {
        assert_eq!(super::seg("a b/c"), "a%20b%2Fc");
        assert_eq!(super::seg("my-queue_1.x"), "my-queue_1.x");
    }
}
