use crate::helpers::{PrivateRedis, TestApp};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread")]
async fn submit_queues_a_persistent_message_named_by_the_job_id() {
    let app = TestApp::spawn().await;
    let q = app.queue("submit");
    let id = app
        .submit(json!({"job_queue": q, "test_data": {"test_cmds": "echo hi"}}))
        .await;
    assert_eq!(app.result(&id).await, json!({"job_state": "waiting"}));
    let msg = app
        .broker()
        .get(&q)
        .await
        .expect("get")
        .expect("a message in the job queue");
    assert_eq!(msg.message_id.as_deref(), Some(id.as_str()));
    assert!(msg.persistent, "job messages must be persistent");
    let body: Value = serde_json::from_slice(&msg.body).expect("json body");
    assert_eq!(body["job_id"], json!(id));
    assert_eq!(body["test_data"]["test_cmds"], json!("echo hi"));
    msg.ack().await.expect("ack");
    // GET /v1/job/<id> returns the definition with the id and exclude_agents.
    let def: Value = app
        .get(&format!("/v1/job/{id}"))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(def["job_queue"], json!(q));
    assert_eq!(def["exclude_agents"], json!([]));
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn priorities_order_the_position_index() {
    let app = TestApp::spawn().await;
    let q = app.queue("prio");
    let low = app.submit(json!({"job_queue": q})).await;
    let low2 = app.submit(json!({"job_queue": q})).await;
    let high = app.submit(json!({"job_queue": q, "job_priority": 5})).await;
    let pos = |id: String| {
        let app = &app;
        async move {
            app.get(&format!("/v1/job/{id}/position"))
                .await
                .text()
                .await
                .expect("text")
        }
    };
    assert_eq!(pos(high.clone()).await, "0");
    assert_eq!(pos(low.clone()).await, "1");
    assert_eq!(pos(low2.clone()).await, "2");
    // The broker hands out the high-priority job first as well.
    let first = app.broker().get(&q).await.expect("get").expect("message");
    assert_eq!(first.message_id.as_deref(), Some(high.as_str()));
    first.ack().await.expect("ack");
    // A claimed job leaves the index: positions move up.
    assert_eq!(app.claim(&high, "agent-a").await["outcome"], "granted");
    let r = app.get(&format!("/v1/job/{high}/position")).await;
    assert_eq!(r.status(), 410);
    assert_eq!(pos(low.clone()).await, "0");
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn cancelled_waiting_job_is_answered_cancelled_at_claim() {
    let app = TestApp::spawn().await;
    let q = app.queue("cancel");
    let id = app.submit(json!({"job_queue": q})).await;
    let r = app
        .post_json(
            &format!("/v1/job/{id}/action"),
            &json!({"action": "cancel"}),
        )
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.expect("text"), "OK");
    assert_eq!(app.result(&id).await["job_state"], "cancelled");
    assert_eq!(
        app.get(&format!("/v1/job/{id}/position")).await.status(),
        410
    );
    assert_eq!(app.claim(&id, "agent-a").await["outcome"], "cancelled");
    let again = app
        .post_json(
            &format!("/v1/job/{id}/action"),
            &json!({"action": "cancel"}),
        )
        .await;
    assert_eq!(again.status(), 400);
    assert_eq!(
        again.text().await.expect("text"),
        "The job is already completed or cancelled"
    );
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn resubmission_with_a_job_id_is_idempotent() {
    let app = TestApp::spawn().await;
    let q = app.queue("idem");
    let id = uuid::Uuid::new_v4().to_string();
    let a = app.submit(json!({"job_queue": q, "job_id": id})).await;
    let b = app.submit(json!({"job_queue": q, "job_id": id})).await;
    assert_eq!(a, id);
    assert_eq!(b, id);
    let jobs: Value = app
        .get(&format!("/v1/queues/{q}/jobs"))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(
        jobs.as_array().map(Vec::len),
        Some(1),
        "one job, not two: {jobs}"
    );
    // Whatever number of messages exist, the job is granted once.
    assert_eq!(app.claim(&id, "a1").await["outcome"], "granted");
    assert_eq!(app.claim(&id, "a2").await["outcome"], "owned");
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn closed_broker_port_gives_503_within_a_second_and_leaves_nothing() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = closed.local_addr().expect("addr").port();
    drop(closed);
    let app =
        TestApp::spawn_with(|s| s.amqp_uri = format!("amqp://guest:guest@127.0.0.1:{port}/%2f"))
            .await;
    let q = app.queue("down");
    let started = std::time::Instant::now();
    let r = app.post_json("/v1/job", &json!({"job_queue": q})).await;
    let took = started.elapsed();
    assert_eq!(r.status(), 503);
    assert!(took < std::time::Duration::from_secs(1), "took {took:?}");
    let body: Value = r.json().await.expect("json");
    assert!(
        body["message"]
            .as_str()
            .unwrap_or("")
            .contains("not queued"),
        "{body}"
    );
    // No half-written job: the queue lists nothing.
    assert_eq!(app.get(&format!("/v1/queues/{q}/jobs")).await.status(), 204);
    let search: Value = app.get("/v1/job/search").await.json().await.expect("json");
    assert_eq!(search, json!([]));
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn legacy_pull_hands_out_each_job_once() {
    let app = TestApp::spawn().await;
    let q = app.queue("legacy");
    let mut ids = Vec::new();
    for _ in 0..6 {
        ids.push(app.submit(json!({"job_queue": q})).await);
    }
    // Without the agent cookie: 401; without a queue: 400.
    assert_eq!(app.get(&format!("/v1/job?queue={q}")).await.status(), 401);
    assert_eq!(app.get("/v1/job").await.status(), 400);
    let pull = |agent: &'static str| {
        let http = app.http.clone();
        let url = app.url(&format!("/v1/job?queue={q}&queue=other-{q}"));
        async move {
            let mut got = Vec::new();
            loop {
                let r = http
                    .get(&url)
                    .header("cookie", format!("agent_name={agent}"))
                    .send()
                    .await
                    .expect("get");
                if r.status() == 204 {
                    return got;
                }
                assert_eq!(r.status(), 200);
                let job: Value = r.json().await.expect("json");
                assert!(job["started_at"].is_string());
                got.push(job["job_id"].as_str().expect("id").to_string());
            }
        }
    };
    let (a, b) = tokio::join!(pull("legacy-a"), pull("legacy-b"));
    let mut all: Vec<String> = a.iter().chain(b.iter()).cloned().collect();
    all.sort();
    let mut expected = ids.clone();
    expected.sort();
    assert_eq!(all, expected, "each job exactly once");
    for id in &ids {
        assert_eq!(app.result(id).await["job_state"], "running");
    }
    app.cleanup().await;
    let _ = app_queue_cleanup(&q).await;
}

async fn app_queue_cleanup(q: &str) -> Result<(), testflinger_broker::BrokerError> {
    let b = testflinger_broker::Broker::new(testflinger_broker::BrokerConfig::new(
        std::env::var("AMQP_URI")
            .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into()),
    ))?;
    b.delete_queue(&format!("other-{q}")).await
}

#[tokio::test(flavor = "multi_thread")]
async fn search_filters_by_tags_and_state() {
    let app = TestApp::spawn().await;
    let q = app.queue("search");
    let a = app
        .submit(json!({"job_queue": q, "tags": ["x", "y"]}))
        .await;
    let b = app.submit(json!({"job_queue": q, "tags": ["y"]})).await;
    let ids = |v: Value| -> Vec<String> {
        let mut out: Vec<String> = v
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|j| j["job_id"].as_str().map(str::to_string))
            .collect();
        out.sort();
        out
    };
    let mut both = vec![a.clone(), b.clone()];
    both.sort();
    assert_eq!(
        ids(app
            .get("/v1/job/search?tags=y")
            .await
            .json()
            .await
            .expect("json")),
        both
    );
    assert_eq!(
        ids(app
            .get("/v1/job/search?tags=x&tags=y&match=all")
            .await
            .json()
            .await
            .expect("json")),
        vec![a.clone()]
    );
    app.post_json(&format!("/v1/job/{b}/action"), &json!({"action": "cancel"}))
        .await;
    assert_eq!(
        ids(app
            .get("/v1/job/search?tags=y&state=cancelled")
            .await
            .json()
            .await
            .expect("json")),
        vec![b.clone()]
    );
    assert_eq!(
        ids(app
            .get("/v1/job/search?tags=y&state=active")
            .await
            .json()
            .await
            .expect("json")),
        vec![a.clone()]
    );
    assert_eq!(app.get("/v1/job/search?state=bogus").await.status(), 422);
    assert_eq!(app.get("/v1/job/search?match=some").await.status(), 422);
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn exclude_agents_needs_an_allowed_agent_and_is_honoured_at_claim() {
    let app = TestApp::spawn().await;
    let q = app.queue("excl");
    let r = app
        .post_json(
            "/v1/job",
            &json!({"job_queue": q, "exclude_agents": ["dev1"]}),
        )
        .await;
    assert_eq!(r.status(), 422);
    for name in ["dev1", "dev2"] {
        app.post_json(
            &format!("/v1/agents/data/{name}-{q}"),
            &json!({"queues": [q], "state": "waiting"}),
        )
        .await;
    }
    let id = app
        .submit(json!({"job_queue": q, "exclude_agents": [format!("dev1-{q}")]}))
        .await;
    assert_eq!(
        app.claim(&id, &format!("dev1-{q}")).await["outcome"],
        "excluded"
    );
    assert_eq!(
        app.claim(&id, &format!("dev2-{q}")).await["outcome"],
        "granted"
    );
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn secrets_are_resolved_only_for_the_claiming_agent() {
    let app = TestApp::spawn().await;
    let q = app.queue("secrets");
    let path = format!("ci/{}", q.replace('.', "_"));
    let put = |p: String, body: Value| {
        let app = &app;
        async move {
            app.http
                .put(app.url(&format!("/v1/secrets/anonymous/{p}")))
                .json(&body)
                .send()
                .await
                .expect("put")
        }
    };
    let r = put(path.clone(), json!({"value": "s3cr3t-value"})).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.json::<Value>().await.expect("json"),
        json!({"expires_at": null})
    );
    let once = format!("{path}-once");
    assert_eq!(
        put(
            once.clone(),
            json!({"value": "one-time", "ephemeral": true})
        )
        .await
        .status(),
        200
    );
    assert_eq!(
        put("bad path!".into(), json!({"value": "x"}))
            .await
            .status(),
        422
    );
    assert_eq!(put(path.clone(), json!({"value": ""})).await.status(), 422);
    assert_eq!(
        put(path.clone(), json!({"value": "x", "expire_after": 0}))
            .await
            .status(),
        422
    );
    let job = json!({"job_queue": q, "test_data": {"test_cmds": "echo $TOKEN", "secrets": {"TOKEN": path, "ONCE": once, "MISSING": "no/such"}}});
    let a = app.submit(job.clone()).await;
    let b = app.submit(job).await;
    // The definition and the queue message hold paths, never values.
    let def: Value = app
        .get(&format!("/v1/job/{a}"))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(def["test_data"]["secrets"]["TOKEN"], json!(path));
    let msg = app.broker().get(&q).await.expect("get").expect("message");
    assert!(!String::from_utf8_lossy(&msg.body).contains("s3cr3t"));
    msg.ack().await.expect("ack");
    let claimed = app.claim(&a, "agent-s").await;
    assert_eq!(
        claimed["job"]["test_data"]["secrets"],
        json!({"TOKEN": "s3cr3t-value", "ONCE": "one-time", "MISSING": ""})
    );
    // The same claim retried (its first answer lost) gets the single-use value again.
    let retried = app.claim(&a, "agent-s").await;
    assert_eq!(retried["job"]["test_data"]["secrets"]["ONCE"], "one-time");
    // Single-use: gone for the next job.
    let claimed = app.claim(&b, "agent-s").await;
    assert_eq!(claimed["job"]["test_data"]["secrets"]["ONCE"], "");
    assert_eq!(
        app.http
            .delete(app.url(&format!("/v1/secrets/anonymous/{path}")))
            .send()
            .await
            .expect("delete")
            .status(),
        200
    );
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_outage_gives_503_and_the_server_recovers() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let redis = PrivateRedis::start_on(port, &[]);
    let app = TestApp::spawn_with(|s| s.redis_url = redis.url()).await;
    let q = app.queue("redis-down");
    app.submit(json!({"job_queue": q})).await;
    drop(redis);
    let started = std::time::Instant::now();
    let r = app.post_json("/v1/job", &json!({"job_queue": q})).await;
    assert_eq!(r.status(), 503, "{:?}", r.text().await);
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    let body: Value = app
        .post_json("/v1/job", &json!({"job_queue": q}))
        .await
        .json()
        .await
        .expect("json");
    assert!(
        body["message"]
            .as_str()
            .unwrap_or_default()
            .contains("Redis"),
        "{body}"
    );
    // Nothing reached the broker for the refused submissions: only the first job is there.
    let first = app
        .broker()
        .get(&q)
        .await
        .expect("get")
        .expect("the first job");
    first.ack().await.expect("ack");
    assert!(app.broker().get(&q).await.expect("get").is_none());
    // Redis back: submissions work again without restarting the server.
    let _redis = PrivateRedis::start_on(port, &[]);
    let id = app
        .wait_for(20, "submissions to work again", || async {
            let r = app.post_json("/v1/job", &json!({"job_queue": q})).await;
            if r.status() == 200 {
                r.json::<Value>().await.ok()
            } else {
                None
            }
        })
        .await;
    assert!(id["job_id"].is_string());
    let queues: Vec<String> = app.queues.lock().expect("lock").clone();
    for queue in &queues {
        let _ = app.state.broker.delete_queue(queue).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn expired_jobs_leave_the_indexes_at_the_sweep() {
    let app = TestApp::spawn().await;
    let q = app.queue("sweep");
    let keep = app.submit(json!({"job_queue": q})).await;
    let gone = app.submit(json!({"job_queue": q})).await;
    // Expiry of the job's record, as Redis does after the retention.
    let mut c = app.state.store.con();
    let _: () = redis::cmd("DEL")
        .arg(app.state.store.keys.job(&gone))
        .query_async(&mut c)
        .await
        .expect("del");
    let removed = testflinger_api::reaper::sweep_indexes(&app.state)
        .await
        .expect("sweep");
    assert!(
        removed >= 2,
        "qjobs and qpos entries of the expired job: {removed}"
    );
    let jobs: Value = app
        .get(&format!("/v1/queues/{q}/jobs"))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(jobs.as_array().map(Vec::len), Some(1));
    assert_eq!(jobs[0]["job_id"], json!(keep));
    assert_eq!(
        app.get(&format!("/v1/job/{keep}/position"))
            .await
            .text()
            .await
            .expect("text"),
        "0"
    );
    app.cleanup().await;
}

/// Issue 14.7: `provision_data` must fit a device type's shape (422 otherwise, as
/// upstream); the CLI and broker submissions share the check.
#[tokio::test(flavor = "multi_thread")]
async fn provision_data_is_validated_per_device_type() {
    let app = TestApp::spawn().await;
    let q = app.queue("provdata");
    let r = app
        .post_json(
            "/v1/job",
            &json!({"job_queue": q, "provision_data": {"skip": true, "foo": 1}}),
        )
        .await;
    assert_eq!(r.status(), 422);
    let body: Value = r.json().await.expect("json");
    assert!(
        body["detail"]["json"]["provision_data"].is_array(),
        "{body}"
    );
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("noprovision {skip}")),
        "{body}"
    );
    for ok in [
        json!({"url": "http://images.example/img.qcow2"}),
        json!({"distro": "noble"}),
        json!({"skip": true}),
    ] {
        app.submit(json!({"job_queue": q, "provision_data": ok}))
            .await;
    }
    app.cleanup().await;
}
