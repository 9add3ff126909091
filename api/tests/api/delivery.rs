//! The delivery guarantees under faults (DESIGN.md "Delivery guarantees"): Redis is the
//! source of truth, leases are fair to survivors, writes follow the state machine.
//! Faults that stop or restart Redis use a private `redis-server`, never the shared one.

use crate::helpers::{PrivateRedis, TestApp, unique};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

async fn job_field(app: &TestApp, id: &str, field: &str) -> Option<String> {
    let mut c = app.state.store.con();
    redis::cmd("HGET")
        .arg(app.state.store.keys.job(id))
        .arg(field)
        .query_async(&mut c)
        .await
        .expect("redis")
}

/// A job held by a live agent that renews every lease/3 survives a Redis outage twice as
/// long as its lease: the reaper's first pass after the gap grants a lease of grace.
#[tokio::test(flavor = "multi_thread")]
async fn a_redis_outage_longer_than_the_lease_reruns_no_healthy_job() {
    let mut redis = PrivateRedis::start(&["--appendonly", "yes", "--appendfsync", "always"]);
    let url = redis.url();
    let app = TestApp::spawn_with(|s| {
        s.redis_url = url;
        s.lease_ttl = 6;
    })
    .await;
    let q = app.queue("gap");
    let id = app.submit(json!({"job_queue": q})).await;
    let token = app.claim(&id, "survivor").await["token"]
        .as_str()
        .map(str::to_string)
        .expect("token");
    // The survivor renews every 2 s (lease / 3), ignoring failures, as our agent does.
    let stop = tokio_util::sync::CancellationToken::new();
    let beat = tokio::spawn({
        let (http, url, stop) = (
            app.http.clone(),
            app.url(&format!("/v1/job/{id}/heartbeat")),
            stop.clone(),
        );
        async move {
            while !stop.is_cancelled() {
                let _ = http
                    .post(&url)
                    .timeout(Duration::from_secs(1))
                    .json(&json!({"agent_id": "survivor", "token": token}))
                    .send()
                    .await;
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Redis goes away for 12 s (twice the lease) and comes back with its data (AOF).
    let _ = redis.cli(&["SHUTDOWN"]);
    let _ = redis.child.wait();
    tokio::time::sleep(Duration::from_secs(12)).await;
    redis.child = PrivateRedis::spawn(
        redis.port,
        redis.dir.path(),
        &["--appendonly", "yes", "--appendfsync", "always"],
    );
    redis.wait_ready();
    // Several reaper passes (every 200 ms in tests) and heartbeats after the outage.
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.cancel();
    let _ = beat.await;
    assert_eq!(
        job_field(&app, &id, "attempt").await.as_deref(),
        Some("1"),
        "the healthy job was re-run"
    );
    assert_eq!(
        job_field(&app, &id, "state").await.as_deref(),
        Some("running")
    );
    assert_eq!(
        job_field(&app, &id, "agent").await.as_deref(),
        Some("survivor")
    );
    app.cleanup().await;
}

/// While Redis loads its data set after a restart it answers LOADING: the API answers
/// 503 (retry later), never 500.
#[tokio::test(flavor = "multi_thread")]
async fn redis_loading_its_data_answers_503() {
    let mut redis = PrivateRedis::start(&["--appendonly", "yes"]);
    // A data set that takes a while to load: 20 000 keys, 200 µs each on load.
    let mut c = redis::Client::open(redis.url())
        .expect("client")
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    for chunk in 0..20 {
        let mut p = redis::pipe();
        for i in 0..1000 {
            p.set(format!("filler:{chunk}:{i}"), i).ignore();
        }
        let _: () = p.query_async(&mut c).await.expect("fill");
    }
    drop(c);
    let _ = redis.cli(&["SHUTDOWN"]);
    let _ = redis.child.wait();
    redis.child = PrivateRedis::spawn(
        redis.port,
        redis.dir.path(),
        &[
            "--appendonly",
            "yes",
            "--key-load-delay",
            "200",
            "--loading-process-events-interval-bytes",
            "1024",
        ],
    );
    // Wait until it listens and says LOADING.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if redis.cli(&["PING"]).contains("LOADING") {
            break;
        }
        assert!(Instant::now() < deadline, "redis never reported LOADING");
        std::thread::sleep(Duration::from_millis(20));
    }
    let url = redis.url();
    let app = TestApp::spawn_with(|s| s.redis_url = url).await;
    let q = app.queue("loading");
    let r = app.post_json("/v1/job", &json!({"job_queue": q})).await;
    assert_eq!(r.status(), 503, "{:?}", r.text().await);
    let r = app
        .get(&format!("/v1/result/{}", uuid::Uuid::new_v4()))
        .await;
    assert_eq!(r.status(), 503);
    redis.wait_ready();
    let _ = app.submit(json!({"job_queue": q})).await;
    app.cleanup().await;
}

/// A waiting job whose message is gone (the queue was purged) is published again by the
/// reconciler and can be taken.
#[tokio::test(flavor = "multi_thread")]
async fn a_purged_queues_waiting_jobs_are_published_again() {
    let app = TestApp::spawn().await;
    let q = app.queue("purged");
    let a = app.submit(json!({"job_queue": q})).await;
    let b = app.submit(json!({"job_queue": q})).await;
    assert_eq!(app.broker().message_count(&q).await.expect("count"), 2);
    // Purge our own queue: both wake-ups are lost.
    app.broker().delete_queue(&q).await.expect("delete");
    let n = app
        .wait_for(15, "the reconciler to publish the waiting jobs", || async {
            let n = app.broker().message_count(&q).await.unwrap_or(0);
            (n >= 2).then_some(n)
        })
        .await;
    assert!(n >= 2);
    let mut seen = Vec::new();
    while let Some(m) = app.broker().get(&q).await.expect("get") {
        seen.push(m.message_id.clone().unwrap_or_default());
        m.ack().await.expect("ack");
    }
    assert!(seen.contains(&a) && seen.contains(&b), "{seen:?}");
    app.cleanup().await;
}

/// Writers move a job forward only; `waiting` and `running` are the server's.
#[tokio::test(flavor = "multi_thread")]
async fn job_states_only_move_forward() {
    let app = TestApp::spawn().await;
    let q = app.queue("fsm");
    let id = app.submit(json!({"job_queue": q})).await;
    let token = app.claim(&id, "fsm-agent").await["token"]
        .as_str()
        .map(str::to_string)
        .expect("token");
    let post = |state: &'static str| {
        let app = &app;
        let id = id.clone();
        let token = &token;
        async move {
            app.post_token(
                &format!("/v1/result/{id}"),
                token,
                &json!({"job_state": state}),
            )
            .await
        }
    };
    assert_eq!(post("setup").await.status(), 200);
    assert_eq!(post("test").await.status(), 200);
    let back = post("setup").await;
    // 422 (not 409, which agents read as "lease lost").
    assert_eq!(back.status(), 422);
    let body: Value = back.json().await.expect("json");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("from 'test' to 'setup'")),
        "{body}"
    );
    for server_only in ["waiting", "running"] {
        let r = post(server_only).await;
        assert_eq!(r.status(), 422, "{server_only}");
        let body: Value = r.json().await.expect("json");
        assert!(body["detail"].to_string().contains("job_state"), "{body}");
    }
    let r = post("exploded").await;
    assert_eq!(r.status(), 422);
    assert_eq!(job_field(&app, &id, "state").await.as_deref(), Some("test"));
    // Still reaped like any running job: the lease is intact.
    let leased: Option<f64> = {
        let mut c = app.state.store.con();
        redis::cmd("ZSCORE")
            .arg(app.state.store.keys.leases())
            .arg(&id)
            .query_async(&mut c)
            .await
            .expect("zscore")
    };
    assert!(leased.is_some());
    assert_eq!(post("complete").await.status(), 200);
    assert_eq!(
        post("cleanup").await.status(),
        200,
        "an ended job keeps its state"
    );
    assert_eq!(
        job_field(&app, &id, "state").await.as_deref(),
        Some("complete")
    );
    app.cleanup().await;
}

/// A claim retried by its holder gets the same grant: no attempt is burnt.
#[tokio::test(flavor = "multi_thread")]
async fn a_retried_claim_gets_the_same_grant() {
    let app = TestApp::spawn().await;
    let q = app.queue("reclaim");
    let id = app.submit(json!({"job_queue": q})).await;
    let first = app.claim(&id, "a1").await;
    let again = app.claim(&id, "a1").await;
    assert_eq!(first["outcome"], "granted");
    assert_eq!(again["outcome"], "granted");
    assert_eq!(first["token"], again["token"]);
    assert_eq!(first["attempt"], again["attempt"]);
    assert_eq!(app.claim(&id, "a2").await["outcome"], "owned");
    app.cleanup().await;
}

/// `release` counts as a run: an agent that keeps giving a job back ends it after
/// `max_attempts` with the reason.
#[tokio::test(flavor = "multi_thread")]
async fn release_counts_towards_max_attempts() {
    let app = TestApp::spawn_with(|s| s.max_attempts = 2).await;
    let q = app.queue("release");
    let id = app.submit(json!({"job_queue": q})).await;
    for _ in 0..2 {
        let token = app.claim(&id, "full-disk").await["token"]
            .as_str()
            .map(str::to_string)
            .expect("token");
        let r = app
            .post_json(
                &format!("/v1/job/{id}/release"),
                &json!({"agent_id": "full-disk", "token": token, "reason": "disk full"}),
            )
            .await;
        assert_eq!(r.status(), 200);
    }
    assert_eq!(
        job_field(&app, &id, "state").await.as_deref(),
        Some("complete")
    );
    let reason = job_field(&app, &id, "reason").await.unwrap_or_default();
    assert!(
        reason.contains("disk full") && reason.contains("2 attempts"),
        "{reason}"
    );
    assert_eq!(app.claim(&id, "other").await["outcome"], "finished");
    app.cleanup().await;
}

/// An upstream HTTP-polling agent's job has a real lease, renewed by its writes; a
/// tokenless write to a job it does not hold is refused.
#[tokio::test(flavor = "multi_thread")]
async fn legacy_pulls_get_a_lease_renewed_by_their_writes() {
    let app = TestApp::spawn_with(|s| s.lease_ttl = 3).await;
    let q = app.queue("legacy");
    let id = app
        .submit(json!({"job_queue": q, "global_timeout": 1, "output_timeout": 1}))
        .await;
    let pulled = app
        .http
        .get(app.url(&format!("/v1/job?queue={q}")))
        .header("Cookie", "agent_name=legacy-1")
        .send()
        .await
        .expect("pull");
    assert_eq!(pulled.status(), 200);
    let job: Value = pulled.json().await.expect("json");
    assert_eq!(job["job_id"], id.as_str());
    // Writes keep it alive past its 3 s lease.
    for i in 0..5 {
        let r = app
            .post_json(
                &format!("/v1/result/{id}/log/output"),
                &json!({"fragment_number": i, "timestamp": "2026-01-01T00:00:00Z", "phase": "test", "log_data": "x"}),
            )
            .await;
        assert_eq!(r.status(), 200);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert_eq!(job_field(&app, &id, "attempt").await.as_deref(), Some("1"));
    assert_eq!(
        job_field(&app, &id, "state").await.as_deref(),
        Some("running")
    );
    // Silence past the lease: the reaper requeues it.
    app.wait_for(
        10,
        "the silent legacy agent's job to be requeued",
        || async {
            (job_field(&app, &id, "state").await.as_deref() == Some("waiting")).then_some(())
        },
    )
    .await;
    // The lost holder's late write is refused.
    let r = app
        .post_json(&format!("/v1/result/{id}"), &json!({"job_state": "test"}))
        .await;
    assert_eq!(r.status(), 409);
    app.cleanup().await;
}

/// `lost` is about a lease, not a name: an agent whose record moved on to another job
/// is not marked lost when an old lease of its name expires.
#[tokio::test(flavor = "multi_thread")]
async fn lost_is_set_per_lease_not_per_agent_name() {
    let app = TestApp::spawn_with(|s| s.lease_ttl = 3).await;
    let q = app.queue("lost");
    let agent = unique("agent");
    let r = app
        .post_json(
            &format!("/v1/agents/data/{agent}"),
            &json!({"state": "waiting", "queues": [q]}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let old = app.submit(json!({"job_queue": q})).await;
    let new = app.submit(json!({"job_queue": q})).await;
    assert_eq!(app.claim(&old, &agent).await["outcome"], "granted");
    // The agent restarted and took another job: its record names the new one, which it
    // renews; the old lease lapses.
    let token = app.claim(&new, &agent).await["token"]
        .as_str()
        .map(str::to_string)
        .expect("token");
    app.wait_for(10, "the old lease to be reaped", || async {
        let hb = app
            .post_json(
                &format!("/v1/job/{new}/heartbeat"),
                &json!({"agent_id": agent, "token": token}),
            )
            .await;
        assert_eq!(hb.status(), 200);
        (job_field(&app, &old, "state").await.as_deref() == Some("waiting")).then_some(())
    })
    .await;
    let rec: Value = app
        .get(&format!("/v1/agents/data/{agent}"))
        .await
        .json()
        .await
        .expect("json");
    assert_ne!(rec["state"], "lost", "{rec}");
    app.cleanup().await;
}

/// A retried job's result shows each attempt's output once, labelled, and fragment ids
/// stay unique across attempts.
#[tokio::test(flavor = "multi_thread")]
async fn a_retried_jobs_output_is_kept_apart_per_attempt() {
    let app = TestApp::spawn_with(|s| s.lease_ttl = 3).await;
    let q = app.queue("attempts");
    let id = app.submit(json!({"job_queue": q})).await;
    let frag = |n: i64, text: &str| json!({"fragment_number": n, "timestamp": "2026-01-01T00:00:00Z", "phase": "test", "log_data": text});
    let t1 = app.claim(&id, "first").await["token"]
        .as_str()
        .map(str::to_string)
        .expect("token");
    for (n, text) in [(0, "one-a\n"), (1, "one-b\n")] {
        let r = app
            .post_token(&format!("/v1/result/{id}/log/output"), &t1, &frag(n, text))
            .await;
        assert_eq!(r.status(), 200);
    }
    app.wait_for(10, "the first attempt to be reaped", || async {
        (job_field(&app, &id, "state").await.as_deref() == Some("waiting")).then_some(())
    })
    .await;
    let t2 = app.claim(&id, "second").await["token"]
        .as_str()
        .map(str::to_string)
        .expect("token");
    // Attempt 1's holder can no longer write.
    let late = app
        .post_token(
            &format!("/v1/result/{id}/log/output"),
            &t1,
            &frag(2, "zombie\n"),
        )
        .await;
    assert_eq!(late.status(), 409);
    for (n, text) in [(0, "two-a\n"), (1, "two-b\n"), (1, "two-b\n")] {
        let r = app
            .post_token(&format!("/v1/result/{id}/log/output"), &t2, &frag(n, text))
            .await;
        assert_eq!(r.status(), 200);
    }
    let res = app.result(&id).await;
    assert_eq!(
        res["test_output"],
        "===== attempt 1 =====\none-a\none-b\n===== attempt 2 =====\ntwo-a\ntwo-b\n",
        "{res}"
    );
    // The fragments route: the same text and a last fragment number past attempt 1's.
    let log: Value = app
        .get(&format!("/v1/result/{id}/log/output"))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(log["output"]["test"]["log_data"], res["test_output"]);
    let last = log["output"]["test"]["last_fragment_number"]
        .as_i64()
        .expect("n");
    assert!(last > 1, "{log}");
    // SSE ids are unique.
    let mut tok = app.state.store.con();
    let _: () = redis::cmd("HSET")
        .arg(app.state.store.keys.job(&id))
        .arg("state")
        .arg("complete")
        .query_async(&mut tok)
        .await
        .expect("hset");
    let text = app
        .get(&format!("/v1/result/{id}/log/output/stream"))
        .await
        .text()
        .await
        .expect("sse");
    let ids: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("id: "))
        .collect();
    let mut unique_ids = ids.clone();
    unique_ids.sort();
    unique_ids.dedup();
    assert_eq!(ids.len(), 4, "{text}");
    assert_eq!(unique_ids.len(), 4, "{text}");
    app.cleanup().await;
}

/// A definition that carries the id of a job that already ran (copied from `show`) is
/// queued as a new job; the same definition sent again while it waits is a retry.
#[tokio::test(flavor = "multi_thread")]
async fn resubmitting_a_known_job_id() {
    let app = TestApp::spawn().await;
    let q = app.queue("resubmit");
    let id = app.submit(json!({"job_queue": q})).await;
    let def: Value = app
        .get(&format!("/v1/job/{id}"))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(app.submit(def.clone()).await, id, "a retry while waiting");
    let token = app.claim(&id, "runner").await["token"]
        .as_str()
        .map(str::to_string)
        .expect("token");
    let r = app
        .post_token(
            &format!("/v1/result/{id}"),
            &token,
            &json!({"job_state": "complete"}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let again = app.submit(def).await;
    assert_ne!(again, id, "a finished job's definition must run again");
    assert_eq!(
        job_field(&app, &again, "state").await.as_deref(),
        Some("waiting")
    );
    app.cleanup().await;
}

/// Quorum job queues (`TESTFLINGER_QUEUE_TYPE=quorum`, for clustered RabbitMQ): the API
/// declares, publishes to and hands out jobs from them.
#[tokio::test(flavor = "multi_thread")]
async fn quorum_job_queues_take_and_hand_out_jobs() {
    let app = TestApp::spawn_with(|s| s.queue_type = "quorum".into()).await;
    let q = app.queue("quorum");
    let low = app.submit(json!({"job_queue": q})).await;
    let high = app.submit(json!({"job_queue": q, "job_priority": 8})).await;
    assert_eq!(app.broker().message_count(&q).await.expect("count"), 2);
    let pulled = app
        .http
        .get(app.url(&format!("/v1/job?queue={q}")))
        .header("Cookie", "agent_name=quorum-legacy")
        .send()
        .await
        .expect("pull");
    assert_eq!(pulled.status(), 200);
    let job: Value = pulled.json().await.expect("json");
    assert!(
        job["job_id"] == json!(high) || job["job_id"] == json!(low),
        "{job}"
    );
    app.cleanup().await;
}

/// A loopback TCP proxy to RabbitMQ whose broker-to-client direction can be held (the
/// broker gets every frame, the client hears nothing back: confirms never arrive).
struct ReplyHoldingProxy {
    port: u16,
    hold: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl ReplyHoldingProxy {
    async fn start(target: &str) -> ReplyHoldingProxy {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let hold = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let target = target.to_string();
        let h = hold.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(&target).await else {
                    continue;
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut cr, &mut sw).await;
                });
                let h = h.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        while h.load(Ordering::SeqCst) {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        match sr.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                // Read before the hold began: deliver once released.
                                while h.load(Ordering::SeqCst) {
                                    tokio::time::sleep(Duration::from_millis(20)).await;
                                }
                                if cw.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                            }
                        }
                    }
                });
            }
        });
        ReplyHoldingProxy { port, hold }
    }

    fn set_hold(&self, on: bool) {
        self.hold.store(on, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Issue 17: a publish whose outcome is unclear (sent, no confirm in time) keeps the job:
/// the submit answers 200, the record stays in the outbox and is published again; the
/// duplicate wake-up is harmless (the claim grants once).
#[tokio::test(flavor = "multi_thread")]
async fn an_unconfirmed_publish_keeps_the_job_and_publishes_it_again() {
    let direct = std::env::var("AMQP_URI")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let hostport = direct
        .split('@')
        .nth(1)
        .and_then(|r| r.split('/').next())
        .unwrap_or("127.0.0.1:5672")
        .to_string();
    let proxy = ReplyHoldingProxy::start(&hostport).await;
    let proxied = direct.replacen(&hostport, &format!("127.0.0.1:{}", proxy.port), 1);
    let app = TestApp::spawn_with(|s| {
        s.amqp_uri = proxied;
        s.confirm_timeout_ms = 1500;
    })
    .await;
    let q = app.queue("unconfirmed");
    // Connected, every publishing channel open (one per slot, round robin), the queue
    // declared: then the broker's replies stop.
    for _ in 0..12 {
        app.submit(json!({"job_queue": q})).await;
    }
    let checker = testflinger_broker::Broker::new(testflinger_broker::BrokerConfig::new(direct))
        .expect("broker");
    let before = checker.message_count(&q).await.expect("count");
    proxy.set_hold(true);
    let r = app.post_json("/v1/job", &json!({"job_queue": q})).await;
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    let id = r.json::<Value>().await.expect("json")["job_id"]
        .as_str()
        .expect("id")
        .to_string();
    assert_eq!(
        job_field(&app, &id, "state").await.as_deref(),
        Some("waiting")
    );
    let outbox = app.state.store.outbox(i64::MAX, 100).await.expect("outbox");
    assert!(outbox.contains(&id), "the unconfirmed job left the outbox");
    // The broker did get it.
    assert_eq!(checker.message_count(&q).await.expect("count"), before + 1);
    proxy.set_hold(false);
    // Published again from the outbox; then it leaves the outbox.
    app.wait_for(20, "the outbox to be drained", || async {
        let o = app.state.store.outbox(i64::MAX, 100).await.ok()?;
        (!o.contains(&id)).then_some(())
    })
    .await;
    assert!(checker.message_count(&q).await.expect("count") >= before + 2);
    assert_eq!(app.claim(&id, "one").await["outcome"], "granted");
    assert_eq!(app.claim(&id, "two").await["outcome"], "owned");
    app.cleanup().await;
}

/// Issue 17: a requeued job keeps its place: it is published ahead of the jobs that
/// queued behind it, not at the back of its queue.
#[tokio::test(flavor = "multi_thread")]
async fn a_requeued_job_keeps_its_place_in_line() {
    let app = TestApp::spawn_with(|s| s.lease_ttl = 3).await;
    let q = app.queue("place");
    let first = app.submit(json!({"job_queue": q})).await;
    // Its message is taken (an agent got it), then two more jobs queue behind.
    let m = app.broker().get(&q).await.expect("get").expect("message");
    m.ack().await.expect("ack");
    assert_eq!(app.claim(&first, "doomed").await["outcome"], "granted");
    let second = app.submit(json!({"job_queue": q})).await;
    let third = app.submit(json!({"job_queue": q})).await;
    // The holder dies; the reaper requeues the first job.
    app.wait_for(15, "the first job to be requeued", || async {
        (job_field(&app, &first, "state").await.as_deref() == Some("waiting")).then_some(())
    })
    .await;
    app.wait_for(10, "its new message", || async {
        (app.broker().message_count(&q).await.unwrap_or(0) >= 3).then_some(())
    })
    .await;
    let head = app.broker().get(&q).await.expect("get").expect("message");
    assert_eq!(
        head.message_id.as_deref(),
        Some(first.as_str()),
        "the requeued job went to the back (behind {second} and {third})"
    );
    head.ack().await.expect("ack");
    app.cleanup().await;
}

/// Issue 17: one job the reaper cannot handle does not stop the pass: the other expired
/// leases are still reaped.
#[tokio::test(flavor = "multi_thread")]
async fn the_reaper_goes_on_past_a_job_it_cannot_handle() {
    let app = TestApp::spawn_with(|s| s.lease_ttl = 3).await;
    let q = app.queue("reapon");
    // A broken record: the job key is not a hash (any command on it fails), and its
    // lease expired long ago, so it comes first in every pass.
    let broken = uuid::Uuid::new_v4().to_string();
    {
        let mut c = app.state.store.con();
        let _: () = redis::cmd("SET")
            .arg(app.state.store.keys.job(&broken))
            .arg("not a hash")
            .query_async(&mut c)
            .await
            .expect("set");
        let _: () = redis::cmd("ZADD")
            .arg(app.state.store.keys.leases())
            .arg(1)
            .arg(&broken)
            .query_async(&mut c)
            .await
            .expect("zadd");
    }
    let id = app.submit(json!({"job_queue": q})).await;
    assert_eq!(app.claim(&id, "gone").await["outcome"], "granted");
    app.wait_for(15, "the healthy expired job to be requeued", || async {
        (job_field(&app, &id, "state").await.as_deref() == Some("waiting")).then_some(())
    })
    .await;
    app.cleanup().await;
}

/// The API reads Redis' persistence settings and names the ones that break the promise
/// (an acknowledged write survives a Redis crash only with `appendonly yes` and
/// `appendfsync always`).
#[tokio::test(flavor = "multi_thread")]
async fn the_api_warns_about_redis_persistence_that_can_lose_acknowledged_writes() {
    use testflinger_api::store::{Store, persistence_warnings};
    for (args, expect) in [
        (
            &["--appendonly", "yes", "--appendfsync", "always"][..],
            None,
        ),
        (
            &["--appendonly", "yes", "--appendfsync", "everysec"][..],
            Some("appendfsync everysec"),
        ),
        (&["--appendonly", "no"][..], Some("appendonly no")),
    ] {
        let redis = PrivateRedis::start(args);
        let store = Store::connect(&redis.url(), &unique("persist"), 60)
            .await
            .expect("connect");
        let (aof, fsync) = store.persistence().await.expect("CONFIG GET answers");
        let warnings = persistence_warnings(&aof, &fsync);
        match expect {
            None => assert!(warnings.is_empty(), "{args:?}: {warnings:?}"),
            Some(what) => {
                assert_eq!(warnings.len(), 1, "{args:?}: {warnings:?}");
                assert!(warnings[0].contains(what), "{args:?}: {}", warnings[0]);
            }
        }
    }
}
