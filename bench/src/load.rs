//! HTTP submit load: N workers posting jobs until a count or a deadline is reached.

use crate::stats::Samples;
use serde_json::Value;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub struct LoadResult {
    pub ok: usize,
    pub errors: usize,
    pub first_error: Option<String>,
    pub latency: Samples,
    pub elapsed: Duration,
    /// Ids of accepted jobs, with the time of their 200 (Unix ms), when asked for.
    pub accepted: Vec<(String, f64)>,
}

pub struct Load<'a> {
    pub http: &'a reqwest::Client,
    pub url: String,
    pub concurrency: usize,
    /// Stop after this many requests (accepted or not)...
    pub count: Option<usize>,
    /// ...or at this time, whichever comes first.
    pub duration: Duration,
    pub keep_ids: bool,
}

impl Load<'_> {
    /// Posts `body(i)` for request number i.
    pub async fn run(&self, body: impl Fn(usize) -> Value + Send + Sync + 'static) -> LoadResult {
        let body = Arc::new(body);
        let next = Arc::new(AtomicUsize::new(0));
        let start = Instant::now();
        let deadline = start + self.duration;
        let mut tasks = Vec::new();
        for _ in 0..self.concurrency.max(1) {
            let http = self.http.clone();
            let url = self.url.clone();
            let body = body.clone();
            let next = next.clone();
            let count = self.count;
            let keep = self.keep_ids;
            tasks.push(tokio::spawn(async move {
                let mut r = LoadResult {
                    ok: 0,
                    errors: 0,
                    first_error: None,
                    latency: Samples::with_capacity(4096),
                    elapsed: Duration::ZERO,
                    accepted: Vec::new(),
                };
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if count.is_some_and(|c| i >= c) || Instant::now() >= deadline {
                        break;
                    }
                    let b = serde_json::to_vec(&body(i)).unwrap_or_default();
                    let t0 = Instant::now();
                    let resp = http
                        .post(&url)
                        .header("content-type", "application/json")
                        .body(b)
                        .send()
                        .await;
                    let outcome = match resp {
                        Ok(resp) if resp.status().is_success() => {
                            match resp.json::<Value>().await {
                                Ok(v) => Ok(v),
                                Err(e) => Err(format!("bad response body: {e}")),
                            }
                        }
                        Ok(resp) => {
                            let status = resp.status();
                            let text = resp.text().await.unwrap_or_default();
                            Err(format!("HTTP {status}: {}", text.trim()))
                        }
                        Err(e) => Err(e.to_string()),
                    };
                    match outcome {
                        Ok(v) => {
                            r.latency.push(t0.elapsed().as_secs_f64() * 1000.0);
                            r.ok += 1;
                            if keep {
                                let id = v
                                    .get("job_id")
                                    .and_then(Value::as_str)
                                    .unwrap_or_default()
                                    .to_string();
                                r.accepted.push((id, crate::events::now_ms()));
                            }
                        }
                        Err(e) => {
                            r.errors += 1;
                            if r.first_error.is_none() {
                                r.first_error = Some(e);
                            }
                        }
                    }
                }
                r
            }));
        }
        let mut total = LoadResult {
            ok: 0,
            errors: 0,
            first_error: None,
            latency: Samples::default(),
            elapsed: Duration::ZERO,
            accepted: Vec::new(),
        };
        for t in tasks {
            match t.await {
                Ok(r) => {
                    total.ok += r.ok;
                    total.errors += r.errors;
                    total.first_error = total.first_error.or(r.first_error);
                    total.latency.extend(r.latency);
                    total.accepted.extend(r.accepted);
                }
                Err(e) => {
                    total.errors += 1;
                    total.first_error.get_or_insert_with(|| e.to_string());
                }
            }
        }
        total.elapsed = start.elapsed();
        total
    }
}

/// A trivial job for `queue`.
pub fn job(queue: &str) -> Value {
    serde_json::json!({"job_queue": queue, "test_data": {"test_cmds": "true"}})
}
