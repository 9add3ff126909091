//! The broker-native submission path (`testflinger.submit`) and job events.

use crate::helpers::TestApp;
use serde_json::{Value, json};
use std::time::Duration;
use testflinger_broker::OutgoingMessage;
use testflinger_broker::topology::{EVENTS_EXCHANGE, REJECTED_QUEUE};

async fn admission_app() -> TestApp {
    let app = TestApp::spawn_with(|s| s.submit_consumer = true).await;
    let q = app.state.settings.submit_queue.clone();
    app.queues.lock().expect("lock").push(q.clone());
    // The admission task declares its queue in the background: wait for it, or a message
    // published now would find no queue.
    app.wait_for(10, "the submit queue", || async {
        app.broker().message_count(&q).await.ok()
    })
    .await;
    app
}

async fn next_json(c: &mut testflinger_broker::Consumer) -> (Value, testflinger_broker::Incoming) {
    let m = tokio::time::timeout(Duration::from_secs(10), c.next())
        .await
        .expect("a message in time")
        .expect("consumer open")
        .expect("message");
    (serde_json::from_slice(&m.body).expect("json"), m)
}

#[tokio::test(flavor = "multi_thread")]
async fn published_job_is_admitted_answered_and_idempotent() {
    let app = admission_app().await;
    let q = app.queue("amqp-submit");
    let (reply_to, mut replies) = app.broker().reply_queue().await.expect("reply queue");
    let job_id = uuid::Uuid::new_v4().to_string();
    let body = json!({"job_queue": q, "test_data": {"test_cmds": "echo from amqp"}}).to_string();
    for _ in 0..2 {
        app.broker()
            .publish(OutgoingMessage {
                routing_key: &app.state.settings.submit_queue,
                body: body.as_bytes(),
                message_id: Some(&job_id),
                correlation_id: Some("corr-1"),
                reply_to: Some(&reply_to),
                // Old publishers send JSON as text/plain.
                content_type: Some("text/plain"),
                persistent: true,
                mandatory: true,
                ..OutgoingMessage::default()
            })
            .await
            .expect("publish");
    }
    for _ in 0..2 {
        let (reply, m) = next_json(&mut replies).await;
        assert_eq!(reply, json!({"job_id": job_id}));
        assert_eq!(m.correlation_id.as_deref(), Some("corr-1"));
    }
    assert_eq!(app.result(&job_id).await["job_state"], "waiting");
    let jobs: Value = app
        .get(&format!("/v1/queues/{q}/jobs"))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(
        jobs.as_array().map(Vec::len),
        Some(1),
        "one job for two deliveries"
    );
    let msg = app
        .broker()
        .get(&q)
        .await
        .expect("get")
        .expect("queued job");
    assert_eq!(msg.message_id.as_deref(), Some(job_id.as_str()));
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_published_job_is_answered_and_copied_to_rejected() {
    let app = admission_app().await;
    let (reply_to, mut replies) = app.broker().reply_queue().await.expect("reply queue");
    let corr = uuid::Uuid::new_v4().to_string();
    let body = json!({"job_queue": "x", "test_data": {"test_cmd": "typo"}}).to_string();
    app.broker()
        .publish(OutgoingMessage {
            routing_key: &app.state.settings.submit_queue,
            body: body.as_bytes(),
            correlation_id: Some(&corr),
            reply_to: Some(&reply_to),
            content_type: Some("application/json"),
            ..OutgoingMessage::default()
        })
        .await
        .expect("publish");
    let (reply, _) = next_json(&mut replies).await;
    let error = reply["error"].as_str().unwrap_or_default();
    assert!(error.contains("test_data.test_cmd"), "{reply}");
    assert!(
        reply["detail"]["json"]["test_data"]["test_cmd"].is_array(),
        "{reply}"
    );
    // The rejected copy carries the reason; other messages there are left alone.
    let mut others = Vec::new();
    let mut found = None;
    for _ in 0..1000 {
        let Some(m) = app.broker().get(REJECTED_QUEUE).await.expect("get") else {
            break;
        };
        if m.correlation_id.as_deref() == Some(corr.as_str()) {
            found = Some(m);
            break;
        }
        others.push(m);
    }
    for m in others {
        m.requeue().await.expect("requeue");
    }
    let m = found.expect("the rejected copy");
    assert_eq!(m.body, body.as_bytes());
    assert!(
        m.headers
            .get("x-rejection-reason")
            .is_some_and(|r| r.contains("test_cmd")),
        "{:?}",
        m.headers
    );
    m.ack().await.expect("ack");
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_subscriber_sees_every_state_change_of_a_job_in_order() {
    let app = TestApp::spawn().await;
    let q = app.queue("events");
    let mut events = app
        .broker()
        .subscribe(EVENTS_EXCHANGE, "job.#")
        .await
        .expect("subscribe");
    let id = app.submit(json!({"job_queue": q})).await;
    let token = app.claim(&id, "ev-agent").await["token"]
        .as_str()
        .map(str::to_string)
        .expect("token");
    let phases = ["setup", "provision", "test", "cleanup", "complete"];
    for state in phases {
        app.post_token(
            &format!("/v1/result/{id}"),
            &token,
            &json!({"job_state": state}),
        )
        .await;
    }
    let mut seen = Vec::new();
    while seen.len() < 2 + phases.len() {
        let (ev, m) = next_json(&mut events).await;
        if ev["job_id"] != json!(id) {
            continue; // other tests' jobs on the shared exchange
        }
        assert_eq!(ev["job_queue"], json!(q));
        assert_eq!(
            m.routing_key,
            format!("job.{q}.{}", ev["job_state"].as_str().unwrap_or(""))
        );
        if ev["job_state"] == "running" {
            assert_eq!(ev["agent_id"], "ev-agent");
            assert_eq!(ev["attempt"], 1);
        }
        seen.push((
            ev["job_state"].as_str().unwrap_or("").to_string(),
            ev["previous_state"].as_str().map(str::to_string),
        ));
    }
    let expected: Vec<(String, Option<String>)> = vec![
        ("waiting".into(), None),
        ("running".into(), Some("waiting".into())),
        ("setup".into(), Some("running".into())),
        ("provision".into(), Some("setup".into())),
        ("test".into(), Some("provision".into())),
        ("cleanup".into(), Some("test".into())),
        ("complete".into(), Some("cleanup".into())),
    ];
    assert_eq!(seen, expected);
    app.cleanup().await;
}

/// A one-request-at-a-time HTTP server recording PUT bodies.
fn webhook_server() -> (u16, std::sync::mpsc::Receiver<(String, String)>) {
    use std::io::{BufRead, BufReader, Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for stream in l.incoming().flatten() {
            let mut r = BufReader::new(stream);
            let mut line = String::new();
            let _ = r.read_line(&mut line);
            let mut len = 0usize;
            loop {
                let mut h = String::new();
                if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                    break;
                }
                if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0; len];
            let _ = r.read_exact(&mut body);
            let _ = r
                .get_mut()
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
            if tx
                .send((
                    line.trim().to_string(),
                    String::from_utf8_lossy(&body).into_owned(),
                ))
                .is_err()
            {
                return;
            }
        }
    });
    (port, rx)
}

#[tokio::test(flavor = "multi_thread")]
async fn webhook_gets_events_only_for_allowed_hosts() {
    let (port, rx) = webhook_server();
    let app = TestApp::spawn_with(|s| s.webhook_allowed_hosts = format!("127.0.0.1:{port}")).await;
    let q = app.queue("hook");
    let id = app
        .submit(
            json!({"job_queue": q, "job_status_webhook": format!("http://127.0.0.1:{port}/hook")}),
        )
        .await;
    let (line, body) =
        tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(10)))
            .await
            .expect("join")
            .expect("a webhook call");
    assert!(line.starts_with("PUT /hook"), "{line}");
    let ev: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(ev["job_id"], json!(id));
    assert_eq!(ev["job_state"], "waiting");
    app.cleanup().await;

    // Not in the allow-list: nothing is sent.
    let (port2, rx2) = webhook_server();
    let app = TestApp::spawn().await;
    let q = app.queue("hook2");
    app.submit(
        json!({"job_queue": q, "job_status_webhook": format!("http://127.0.0.1:{port2}/hook")}),
    )
    .await;
    let got = tokio::task::spawn_blocking(move || rx2.recv_timeout(Duration::from_secs(2)))
        .await
        .expect("join");
    assert!(got.is_err(), "an unlisted webhook host must not be called");
    app.cleanup().await;
}

/// Issue 14.7: upstream agents post their cumulative phase events to
/// `POST /v1/job/<id>/events`; new ones reach the events exchange, and the post (without
/// `job_status_webhook`) reaches the job's own webhook once per post.
#[tokio::test(flavor = "multi_thread")]
async fn upstream_agent_events_feed_our_events_and_the_webhook() {
    let (port, rx) = webhook_server();
    let app = TestApp::spawn_with(|s| s.webhook_allowed_hosts = format!("127.0.0.1:{port}")).await;
    let q = app.queue("agentevents");
    let hook = format!("http://127.0.0.1:{port}/hook");
    let mut events = app
        .broker()
        .subscribe(
            testflinger_broker::topology::EVENTS_EXCHANGE,
            &format!("job.{q}.event.#"),
        )
        .await
        .expect("subscribe");
    let id = app
        .submit(json!({"job_queue": q, "job_status_webhook": hook}))
        .await;
    // The submit's own state event reaches the webhook first.
    let rx = std::sync::Arc::new(std::sync::Mutex::new(rx));
    let next_call = |secs: u64| {
        let rx = rx.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                rx.lock()
                    .expect("lock")
                    .recv_timeout(Duration::from_secs(secs))
            })
            .await
            .expect("join")
        }
    };
    let (_, first) = next_call(10).await.expect("waiting event");
    assert!(first.contains("\"waiting\""), "{first}");
    let e1 =
        json!({"event_name": "job_start", "timestamp": "2026-01-01T00:00:00", "detail": "url"});
    let e2 = json!({"event_name": "provision_start", "timestamp": "2026-01-01T00:00:01"});
    for list in [vec![e1.clone()], vec![e1.clone(), e2.clone()]] {
        let r = app
            .post_json(
                &format!("/v1/job/{id}/events"),
                &json!({"agent_id": "up-1", "job_queue": q, "job_status_webhook": hook, "events": list}),
            )
            .await;
        assert_eq!(r.status(), 200, "{:?}", r.text().await);
        let (line, body) = next_call(10).await.expect("relayed post");
        assert!(line.starts_with("PUT /hook"), "{line}");
        let v: Value = serde_json::from_str(&body).expect("json");
        assert!(v.get("job_status_webhook").is_none(), "{v}");
        assert_eq!(v["events"].as_array().map(Vec::len), Some(list.len()));
    }
    // Each event once on the exchange, in order.
    let mut names = Vec::new();
    while names.len() < 2 {
        let (ev, m) = next_json(&mut events).await;
        assert!(
            m.routing_key.starts_with(&format!("job.{q}.event.")),
            "{}",
            m.routing_key
        );
        assert_eq!(ev["job_id"], json!(id));
        names.push(ev["event_name"].as_str().unwrap_or_default().to_string());
    }
    assert_eq!(names, ["job_start", "provision_start"]);
    // Another address, an unknown job, a bad id, a missing webhook.
    let r = app
        .post_json(
            &format!("/v1/job/{id}/events"),
            &json!({"job_status_webhook": "http://127.0.0.1:1/elsewhere", "events": []}),
        )
        .await;
    assert_eq!(r.status(), 403);
    let unknown = uuid::Uuid::new_v4();
    let r = app
        .post_json(
            &format!("/v1/job/{unknown}/events"),
            &json!({"job_status_webhook": hook, "events": []}),
        )
        .await;
    assert_eq!(r.status(), 404);
    assert_eq!(
        app.post_json("/v1/job/nope/events", &json!({"job_status_webhook": hook}))
            .await
            .status(),
        400
    );
    let r = app
        .post_json(&format!("/v1/job/{id}/events"), &json!({"events": []}))
        .await;
    assert_eq!(r.status(), 422);
    app.cleanup().await;
}
