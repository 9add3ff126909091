//! Security issue 22, item 5: nothing a client sends grows the server without bound.
//! A job's size (tags, tag length, top-level fields), the label values of `/metrics`
//! counters and the webhook backlog are bounded; each bound names its setting.

use crate::helpers::TestApp;
use futures_util::StreamExt;
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use testflinger_api::settings::Redacted;
use testflinger_broker::OutgoingMessage;

/// Redis keys under the app's prefix, but for the background tasks' own (their locks
/// come and go on their own).
async fn keys(app: &TestApp) -> Vec<String> {
    let mut c = app.state.store.con();
    let mut k: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}:*", app.prefix))
        .query_async(&mut c)
        .await
        .expect("KEYS");
    let background = ["reaper", "reaper:last", "reconciler"];
    k.retain(|k| {
        let own = k.strip_prefix(&format!("{}:", app.prefix)).unwrap_or(k);
        !background.contains(&own)
    });
    k.sort();
    k
}

/// POSTs `body` as a job; the status and the JSON answer.
async fn post_job(app: &TestApp, body: &str) -> (u16, Value) {
    let r = app.post_raw("/v1/job", body).await;
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

fn message(v: &Value) -> String {
    v["message"].as_str().unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_of_200000_tags_is_refused_naming_the_limit_and_nothing_is_stored() {
    let app = TestApp::spawn_with(|s| s.submit_consumer = true).await;
    let q = app.queue("manytags");
    let tags: Vec<String> = (0..200_000).map(|i| format!("tag{i}")).collect();
    let body = json!({"job_queue": q, "tags": tags}).to_string();
    let before = keys(&app).await;
    let (status, v) = post_job(&app, &body).await;
    assert_eq!(status, 422, "{v}");
    let m = message(&v);
    assert!(m.contains("tags"), "{m}");
    assert!(m.contains("200000 tags"), "names what was given: {m}");
    assert!(m.contains("at most 100"), "names the limit: {m}");
    assert!(
        m.contains("TESTFLINGER_MAX_JOB_TAGS"),
        "names the setting: {m}"
    );
    assert!(
        v["detail"]["json"]["tags"].is_array(),
        "upstream's shape: {v}"
    );
    assert!(v.get("job_id").is_none(), "{v}");
    assert_eq!(
        keys(&app).await,
        before,
        "nothing stored for the refused job"
    );

    // The same body published to the submit queue is refused the same way.
    let sq = app.state.settings.submit_queue.clone();
    app.queues.lock().expect("lock").push(sq.clone());
    app.wait_for(10, "the submit queue", || async {
        app.broker().message_count(&sq).await.ok()
    })
    .await;
    let (reply_to, mut replies) = app.broker().reply_queue().await.expect("reply queue");
    app.broker()
        .publish(OutgoingMessage {
            routing_key: &sq,
            body: body.as_bytes(),
            reply_to: Some(&reply_to),
            content_type: Some("application/json"),
            ..OutgoingMessage::default()
        })
        .await
        .expect("publish");
    let m = tokio::time::timeout(Duration::from_secs(10), replies.next())
        .await
        .expect("a reply in time")
        .expect("consumer open")
        .expect("message");
    let reply: Value = serde_json::from_slice(&m.body).expect("json");
    let error = reply["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("200000 tags") && error.contains("TESTFLINGER_MAX_JOB_TAGS"),
        "{reply}"
    );
    assert!(reply.get("job_id").is_none(), "{reply}");
    assert!(reply["detail"]["json"]["tags"].is_array(), "{reply}");
    assert_eq!(
        keys(&app).await,
        before,
        "nothing stored for the refused message"
    );
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_at_the_limits_is_accepted_and_one_past_any_limit_is_refused() {
    let app = TestApp::spawn().await;
    let q = app.queue("atlimit");
    // 100 tags of 128 characters (two bytes each), and test_data of exactly 1 MiB of JSON.
    let tags: Vec<String> = (0..100).map(|i| format!("{i:é>128}")).collect();
    let wrapper = json!({"test_cmds": ""}).to_string().len();
    let script = "x".repeat((1 << 20) - wrapper);
    let job = json!({"job_queue": q, "tags": tags, "test_data": {"test_cmds": script}});
    assert_eq!(job["test_data"].to_string().len(), 1 << 20);
    let id = app.submit(job.clone()).await;
    let def: Value = app
        .get(&format!("/v1/job/{id}"))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(def["tags"].as_array().map(Vec::len), Some(100));
    assert_eq!(
        def["tags"][7].as_str().map(|t| t.chars().count()),
        Some(128)
    );
    let before = keys(&app).await;

    // One more tag.
    let mut more = job.clone();
    more["tags"]
        .as_array_mut()
        .expect("tags")
        .push(json!("one-more"));
    let (status, v) = post_job(&app, &more.to_string()).await;
    assert_eq!(status, 422, "{v}");
    let m = message(&v);
    assert!(
        m.contains("got 101 tags")
            && m.contains("at most 100")
            && m.contains("TESTFLINGER_MAX_JOB_TAGS"),
        "{m}"
    );

    // One character more in a tag.
    let mut longer = job.clone();
    longer["tags"][1] = json!("x".repeat(129));
    let (status, v) = post_job(&app, &longer.to_string()).await;
    assert_eq!(status, 422, "{v}");
    let m = message(&v);
    assert!(m.contains("tags.1"), "names the tag: {m}");
    assert!(m.contains("129 characters"), "{m}");
    assert!(m.contains("at most 128"), "{m}");
    assert!(m.contains("TESTFLINGER_MAX_JOB_TAG_CHARS"), "{m}");
    assert!(v["detail"]["json"]["tags"]["1"].is_array(), "{v}");

    // One byte more in a top-level field.
    let mut larger = job.clone();
    larger["test_data"]["test_cmds"] = json!(format!("{script}x"));
    let (status, v) = post_job(&app, &larger.to_string()).await;
    assert_eq!(status, 422, "{v}");
    let m = message(&v);
    assert!(m.contains("test_data"), "{m}");
    assert!(m.contains("got 1048577 bytes"), "{m}");
    assert!(m.contains("at most 1048576 bytes"), "{m}");
    assert!(m.contains("TESTFLINGER_MAX_JOB_FIELD_BYTES"), "{m}");
    assert!(v["detail"]["json"]["test_data"].is_array(), "{v}");
    assert_eq!(
        keys(&app).await,
        before,
        "nothing stored for the refused jobs"
    );
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_keep_a_bounded_number_of_queue_labels() {
    // With auth on, jobs for queues no agent registered are parked in Redis: the
    // cheapest submission that still counts in testflinger_jobs_total.
    let app = TestApp::spawn_with(|s| {
        s.jwt_signing_key = Some(Redacted("bounds-signing-key-0123456789".into()));
    })
    .await;
    let run = uuid::Uuid::new_v4().simple().to_string();
    let started = Instant::now();
    let n = 10_000;
    let posts = futures_util::stream::iter(0..n).map(|i| {
        let app = &app;
        let run = &run;
        async move {
            let job = json!({"job_queue": format!("made-up-{run}-{i}"), "reserve_data": {}});
            let r = app.post_json("/v1/job", &job).await;
            assert_eq!(r.status(), 200, "{:?}", r.text().await);
        }
    });
    posts.buffer_unordered(32).collect::<Vec<()>>().await;
    let text = app.get("/metrics").await.text().await.expect("text");
    let bound = app.state.settings.metrics_max_label_values;
    for counter in ["testflinger_jobs_total", "testflinger_reservations_total"] {
        let series: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with(&format!("{counter}{{")))
            .collect();
        assert!(
            series.len() <= bound + 1,
            "{counter}: {} series for {n} queues; at most {bound} and `other`",
            series.len()
        );
        let other = format!("{counter}{{queue=\"other\"}} {}", n - bound);
        assert!(series.contains(&other.as_str()), "{counter}: no `{other}`");
    }
    let waiting = text
        .lines()
        .filter(|l| l.starts_with("testflinger_queue_waiting_jobs{"))
        .count();
    assert!(waiting <= bound, "{waiting} waiting-jobs series");
    eprintln!("{n} submissions and a scrape in {:?}", started.elapsed());
    app.cleanup().await;
}

/// A webhook receiver that takes each call and never answers in time.
fn slow_webhook() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in l.incoming().flatten() {
            // Keep the connection open without answering: the caller waits for its timeout.
            held.push(stream);
        }
    });
    port
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn webhook_calls_past_the_backlog_are_dropped_and_counted_without_blocking() {
    let port = slow_webhook();
    let app = TestApp::spawn_with(|s| {
        s.webhook_allowed_hosts = format!("127.0.0.1:{port}");
        s.webhook_backlog = 4;
    })
    .await;
    let q = app.queue("slowhook");
    let hook = format!("http://127.0.0.1:{port}/hook");
    // One job: its `waiting` call hangs at the receiver; each events post adds one call.
    let id = app
        .submit(json!({"job_queue": q, "job_status_webhook": hook}))
        .await;
    let mut events = Vec::new();
    for i in 0..20 {
        events.push(json!({"event_name": format!("e{i}"), "timestamp": "2026-01-01T00:00:00"}));
        let t = Instant::now();
        let r = app
            .post_json(
                &format!("/v1/job/{id}/events"),
                &json!({"agent_id": "a", "job_queue": q, "job_status_webhook": hook, "events": events}),
            )
            .await;
        assert_eq!(r.status(), 200, "{:?}", r.text().await);
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "the request path waited for the webhook: {:?}",
            t.elapsed()
        );
    }
    // Many jobs: each one's first call needs a slot too.
    for _ in 0..10 {
        app.submit(json!({"job_queue": q, "job_status_webhook": hook}))
            .await;
    }
    // 1 + 20 + 10 calls, 4 kept (the receiver answers none in this time).
    let text = app
        .wait_for(10, "the drops counted", || async {
            let text = app.get("/metrics").await.text().await.ok()?;
            (metric(&text, "testflinger_webhook_dropped_total") == 27).then_some(text)
        })
        .await;
    assert_eq!(metric(&text, "testflinger_webhook_backlog"), 4, "{text}");
    assert_eq!(
        metric(&text, "testflinger_events_dropped_total"),
        0,
        "{text}"
    );
    app.cleanup().await;
}
