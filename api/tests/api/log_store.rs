//! Logs at lab scale: an ended job's log leaves Redis for the file store and reads the
//! same; the per-job cap; SSE woken by pub/sub (no polling) in bounded batches.

use crate::helpers::{PrivateRedis, TestApp};
use serde_json::{Map, Value, json};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

async fn claim_token(app: &TestApp, id: &str, agent: &str) -> String {
    app.claim(id, agent).await["token"]
        .as_str()
        .map(str::to_string)
        .expect("token")
}

async fn post_frag(
    app: &TestApp,
    id: &str,
    token: &str,
    log_type: &str,
    n: i64,
    phase: &str,
    data: &str,
) {
    let ts = format!("2026-01-01T00:{:02}:{:02}Z", (n / 60) % 60, n % 60);
    let r = app
        .post_token(
            &format!("/v1/result/{id}/log/{log_type}"),
            token,
            &json!({"fragment_number": n, "timestamp": ts, "phase": phase, "log_data": data}),
        )
        .await;
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
}

async fn get_json(app: &TestApp, path: &str) -> Value {
    let r = app.get(path).await;
    assert_eq!(r.status(), 200, "{path}");
    r.json().await.expect("json")
}

/// This test's Redis keys that hold log fragments.
async fn log_keys(app: &TestApp) -> Vec<String> {
    let mut c = app.state.store.con();
    redis::cmd("KEYS")
        .arg(format!("{}:log:*", app.prefix))
        .query_async(&mut c)
        .await
        .expect("KEYS")
}

/// The `_output`/`_serial` fields of `GET /v1/result/<id>`.
async fn result_logs(app: &TestApp, id: &str) -> Map<String, Value> {
    app.result(id)
        .await
        .as_object()
        .expect("object")
        .iter()
        .filter(|(k, _)| k.ends_with("_output") || k.ends_with("_serial"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Every read of a job's logs: the fragments route with each filter, both log types.
async fn fragment_reads(app: &TestApp, id: &str) -> Vec<Value> {
    let mut out = Vec::new();
    for lt in ["output", "serial"] {
        for q in [
            "",
            "?start_fragment=2",
            "?start_fragment=1000000001",
            "?phase=test",
            "?start_timestamp=2026-01-01T00:00:03Z",
            "?phase=setup&start_fragment=1",
        ] {
            out.push(get_json(app, &format!("/v1/result/{id}/log/{lt}{q}")).await);
        }
    }
    out
}

/// Reads an SSE stream until it has `want` data events or ends; returns the events.
async fn sse_events(app: &TestApp, id: &str, lt: &str, want: usize) -> (Vec<Value>, bool) {
    let mut r = app
        .http
        .get(app.url(&format!("/v1/result/{id}/log/{lt}/stream")))
        .send()
        .await
        .expect("stream");
    assert_eq!(r.status(), 200);
    let mut text = String::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if want > 0 {
            // A live job's stream does not end; stop once everything came.
            let events = parse_events(&text);
            if events.len() >= want {
                return (events, false);
            }
        }
        let chunk = tokio::time::timeout_at(deadline.into(), r.chunk())
            .await
            .expect("stream stalled")
            .expect("chunk");
        match chunk {
            Some(c) => text.push_str(&String::from_utf8_lossy(&c)),
            None => return (parse_events(&text), text.contains("event: end")),
        }
    }
}

fn parse_events(text: &str) -> Vec<Value> {
    text.split("\n\n")
        .filter(|e| !e.contains("event: "))
        .filter_map(|e| e.lines().find_map(|l| l.strip_prefix("data: ")))
        .filter_map(|d| serde_json::from_str(d).ok())
        .collect()
}

/// A retried job's logs (two attempts, both log types, several phases) read the same
/// from Redis while it runs and from the file store after it ended, and leave Redis.
#[tokio::test(flavor = "multi_thread")]
async fn ended_job_log_moves_to_file_store_and_reads_the_same() {
    let app = TestApp::spawn().await;
    let q = app.queue("compact");
    let id = app.submit(json!({"job_queue": q})).await;
    let t1 = claim_token(&app, &id, "first").await;
    post_frag(&app, &id, &t1, "output", 0, "setup", "attempt one setup\n").await;
    post_frag(&app, &id, &t1, "output", 1, "test", "attempt one test\n").await;
    post_frag(&app, &id, &t1, "serial", 0, "test", "serial one\n").await;
    let r = app
        .post_json(
            &format!("/v1/job/{id}/release"),
            &json!({"agent_id": "first", "token": t1, "reason": "retry"}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let t2 = claim_token(&app, &id, "second").await;
    for n in 0..6 {
        let phase = if n < 2 { "setup" } else { "test" };
        post_frag(&app, &id, &t2, "output", n, phase, &format!("two-{n} ")).await;
    }
    post_frag(&app, &id, &t2, "serial", 0, "test", "serial two\n").await;

    let before_result = result_logs(&app, &id).await;
    assert!(
        before_result["test_output"]
            .as_str()
            .is_some_and(|t| t.contains("===== attempt 2 =====")),
        "{before_result:?}"
    );
    let before_reads = fragment_reads(&app, &id).await;
    let (before_sse, _) = sse_events(&app, &id, "output", 8).await;
    assert_eq!(before_sse.len(), 8);
    let (before_serial_sse, _) = sse_events(&app, &id, "serial", 2).await;
    assert!(!log_keys(&app).await.is_empty());

    let r = app
        .post_token(
            &format!("/v1/result/{id}"),
            &t2,
            &json!({"job_state": "complete"}),
        )
        .await;
    assert_eq!(r.status(), 200);
    app.wait_for(10, "the log to leave Redis", || async {
        log_keys(&app).await.is_empty().then_some(())
    })
    .await;
    let files = &app.state.files;
    for (lt, a) in [("output", 1), ("output", 2), ("serial", 1), ("serial", 2)] {
        let p = files.log_path(&id, lt, a);
        let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{p:?}: {e}"));
        assert!(!text.is_empty(), "{p:?}");
    }
    assert_eq!(result_logs(&app, &id).await, before_result);
    assert_eq!(fragment_reads(&app, &id).await, before_reads);
    let (after_sse, ended) = sse_events(&app, &id, "output", 0).await;
    assert!(ended, "the stream of an ended job ends");
    assert_eq!(after_sse, before_sse);
    let (after_serial_sse, _) = sse_events(&app, &id, "serial", 0).await;
    assert_eq!(after_serial_sse, before_serial_sse);
    // Resuming mid-log from the files.
    let resumed = app
        .http
        .get(app.url(&format!("/v1/result/{id}/log/output/stream")))
        .header("Last-Event-ID", "1000000003")
        .send()
        .await
        .expect("resume")
        .text()
        .await
        .expect("text");
    let resumed: Vec<Value> = parse_events(&resumed);
    assert_eq!(resumed, before_sse[before_sse.len() - 2..].to_vec());
    // The web UI's job page shows the compacted log.
    let page = app
        .get(&format!("/jobs/{id}"))
        .await
        .text()
        .await
        .expect("page");
    assert!(
        page.contains("two-5") && page.contains("attempt one setup"),
        "{page}"
    );

    // A late fragment (the agent's spool) is accepted, read at once, and compacted
    // into the files later.
    post_frag(&app, &id, &t2, "output", 6, "cleanup", "late").await;
    let all = get_json(&app, &format!("/v1/result/{id}/log/output")).await;
    assert_eq!(
        all["output"]["cleanup"]["log_data"],
        "===== attempt 2 =====\nlate"
    );
    assert_eq!(log_keys(&app).await.len(), 1);
    assert!(
        testflinger_api::logs::compact_job(&app.state.store, &app.state.files, &id)
            .await
            .expect("compact")
    );
    assert!(log_keys(&app).await.is_empty());
    let all = get_json(&app, &format!("/v1/result/{id}/log/output")).await;
    assert_eq!(
        all["output"]["cleanup"]["log_data"],
        "===== attempt 2 =====\nlate"
    );
    assert_eq!(all["output"]["test"], before_reads[0]["output"]["test"]);
    app.cleanup().await;
}

/// Past `max_log_bytes` a log gets one truncation notice; later fragments are accepted
/// (200) and not stored; the other log type has its own budget.
#[tokio::test(flavor = "multi_thread")]
async fn log_cap_truncates_with_one_notice() {
    let app = TestApp::spawn_with(|s| s.max_log_bytes = 10).await;
    let q = app.queue("cap");
    let id = app.submit(json!({"job_queue": q})).await;
    let t = claim_token(&app, &id, "capped").await;
    post_frag(&app, &id, &t, "output", 0, "test", "123456").await;
    post_frag(&app, &id, &t, "output", 1, "test", "7890").await;
    post_frag(&app, &id, &t, "output", 2, "test", "over").await;
    post_frag(&app, &id, &t, "output", 3, "test", "more").await;
    // The same fragment delivered again does not count twice.
    post_frag(&app, &id, &t, "output", 0, "test", "123456").await;
    post_frag(&app, &id, &t, "serial", 0, "test", "serial ok").await;
    let check = |all: Value| {
        let text = all["output"]["test"]["log_data"]
            .as_str()
            .expect("text")
            .to_string();
        assert!(text.starts_with("1234567890\n[testflinger: "), "{text}");
        assert!(text.contains("limit of 10 bytes"), "{text}");
        assert_eq!(text.matches("[testflinger:").count(), 1, "{text}");
        assert!(!text.contains("over") && !text.contains("more"), "{text}");
    };
    check(get_json(&app, &format!("/v1/result/{id}/log/output")).await);
    let serial = get_json(&app, &format!("/v1/result/{id}/log/serial")).await;
    assert_eq!(serial["serial"]["test"]["log_data"], "serial ok");
    // The same after compaction.
    app.post_token(
        &format!("/v1/result/{id}"),
        &t,
        &json!({"job_state": "complete"}),
    )
    .await;
    app.wait_for(10, "the log to leave Redis", || async {
        log_keys(&app).await.is_empty().then_some(())
    })
    .await;
    check(get_json(&app, &format!("/v1/result/{id}/log/output")).await);
    app.cleanup().await;
}

/// Reads an SSE response's chunked body frame by frame from a raw connection: the size
/// of each HTTP chunk (one write of the stream), until `want` data events came.
async fn sse_chunk_sizes(port: u16, path: &str, want: usize) -> Vec<(usize, usize)> {
    let s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let (rd, mut wr) = s.into_split();
    wr.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut rd = BufReader::new(rd);
    let mut line = String::new();
    loop {
        line.clear();
        rd.read_line(&mut line).await.expect("head");
        if line == "\r\n" || line.is_empty() {
            break;
        }
    }
    let mut sizes = Vec::new();
    let mut events = 0;
    while events < want {
        line.clear();
        rd.read_line(&mut line).await.expect("chunk size");
        let size = usize::from_str_radix(line.trim(), 16).expect("hex size");
        if size == 0 {
            break;
        }
        let mut buf = vec![0u8; size + 2];
        rd.read_exact(&mut buf).await.expect("chunk");
        let text = String::from_utf8_lossy(&buf);
        let n = text.matches("data: {").count();
        events += n;
        sizes.push((n, size));
    }
    sizes
}

/// The first SSE batch of a long log is bounded (fragments and bytes), the rest follows.
#[tokio::test(flavor = "multi_thread")]
async fn sse_batches_are_bounded() {
    let app = TestApp::spawn().await;
    let q = app.queue("batch");
    let id = app.submit(json!({"job_queue": q})).await;
    let t = claim_token(&app, &id, "batcher").await;
    for n in 0..450 {
        post_frag(&app, &id, &t, "output", n, "test", "0123456789").await;
    }
    let big = "x".repeat(200 * 1024);
    for n in 450..453 {
        post_frag(&app, &id, &t, "output", n, "test", &big).await;
    }
    let port: u16 = app
        .base
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port");
    let sizes = sse_chunk_sizes(port, &format!("/v1/result/{id}/log/output/stream"), 453).await;
    let events: usize = sizes.iter().map(|s| s.0).sum();
    assert_eq!(events, 453, "{sizes:?}");
    assert_eq!(
        sizes[0].0,
        testflinger_api::logs::SSE_BATCH_FRAGMENTS,
        "{sizes:?}"
    );
    assert!(
        sizes
            .iter()
            .all(|(n, b)| *n <= testflinger_api::logs::SSE_BATCH_FRAGMENTS
                && *b <= testflinger_api::logs::SSE_BATCH_BYTES + 64 * 1024),
        "{sizes:?}"
    );
    app.cleanup().await;
}

/// `INFO commandstats` calls per command.
async fn command_calls(c: &mut redis::aio::MultiplexedConnection) -> Map<String, Value> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(c)
        .await
        .expect("INFO");
    info.lines()
        .filter_map(|l| l.strip_prefix("cmdstat_"))
        .filter_map(|l| {
            let (name, rest) = l.split_once(':')?;
            let calls = rest
                .strip_prefix("calls=")?
                .split(',')
                .next()?
                .parse::<u64>()
                .ok()?;
            Some((name.to_string(), json!(calls)))
        })
        .collect()
}

/// An idle SSE stream sends Redis nothing (no polling); a new fragment reaches it
/// promptly through the pub/sub notification.
#[tokio::test(flavor = "multi_thread")]
async fn sse_is_woken_without_polling() {
    let redis = PrivateRedis::start(&["--appendonly", "no"]);
    let url = redis.url();
    let app = TestApp::spawn_with(|s| {
        s.redis_url = url.clone();
        s.reaper_interval_ms = 600_000;
        s.reconcile_interval_ms = 600_000;
        s.events = false;
    })
    .await;
    let q = app.queue("nopoll");
    let id = app.submit(json!({"job_queue": q})).await;
    let t = claim_token(&app, &id, "quiet").await;
    post_frag(&app, &id, &t, "output", 0, "test", "hello ").await;
    let mut r = app
        .http
        .get(app.url(&format!("/v1/result/{id}/log/output/stream")))
        .send()
        .await
        .expect("stream");
    let first = r.chunk().await.expect("chunk").expect("first batch");
    assert!(String::from_utf8_lossy(&first).contains("hello"));
    let mut c = redis::Client::open(url.as_str())
        .expect("client")
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = command_calls(&mut c).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = command_calls(&mut c).await;
    let moved: Vec<String> = after
        .iter()
        .filter(|(k, v)| k.as_str() != "info" && before.get(k.as_str()) != Some(v))
        .map(|(k, v)| format!("{k}: {:?} -> {v}", before.get(k.as_str())))
        .collect();
    assert!(
        moved.is_empty(),
        "an idle stream sent Redis commands: {moved:?}"
    );
    let sent = Instant::now();
    post_frag(&app, &id, &t, "output", 1, "test", "world").await;
    let next = tokio::time::timeout(Duration::from_secs(2), r.chunk())
        .await
        .expect("woken within 2 s")
        .expect("chunk")
        .expect("second batch");
    assert!(String::from_utf8_lossy(&next).contains("world"));
    assert!(
        sent.elapsed() < Duration::from_secs(1),
        "{:?}",
        sent.elapsed()
    );
    drop(r);
    app.cleanup().await;
    drop(redis);
}

/// A job cancelled by a user, and one the reaper gives up on, have their logs compacted
/// too (those end without their agent's last state report).
#[tokio::test(flavor = "multi_thread")]
async fn cancelled_and_reaped_jobs_are_compacted() {
    let app = TestApp::spawn_with(|s| {
        s.max_attempts = 1;
        s.lease_ttl = 1;
    })
    .await;
    let q = app.queue("endings");
    let cancelled = app.submit(json!({"job_queue": q})).await;
    let t = claim_token(&app, &cancelled, "canceller").await;
    post_frag(&app, &cancelled, &t, "output", 0, "test", "before cancel").await;
    let r = app
        .post_json(
            &format!("/v1/job/{cancelled}/action"),
            &json!({"action": "cancel"}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let reaped = app.submit(json!({"job_queue": q})).await;
    let t2 = claim_token(&app, &reaped, "vanishing").await;
    post_frag(&app, &reaped, &t2, "serial", 0, "test", "then silence").await;
    app.wait_for(20, "both logs to leave Redis", || async {
        log_keys(&app).await.is_empty().then_some(())
    })
    .await;
    assert_eq!(app.result(&reaped).await["job_state"], "complete");
    assert!(app.state.files.log_path(&cancelled, "output", 1).exists());
    assert!(app.state.files.log_path(&reaped, "serial", 1).exists());
    assert_eq!(app.result(&cancelled).await["test_output"], "before cancel");
    let serial = get_json(&app, &format!("/v1/result/{reaped}/log/serial")).await;
    assert_eq!(serial["serial"]["test"]["log_data"], "then silence");
    app.cleanup().await;
}
