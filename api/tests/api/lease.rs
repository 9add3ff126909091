use crate::helpers::TestApp;
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread")]
async fn unrenewed_lease_is_reaped_redelivered_with_attempt_2_and_fences_the_first_holder() {
    let app = TestApp::spawn_with(|s| {
        s.lease_ttl = 3;
        s.reaper_interval_ms = 100;
    })
    .await;
    let q = app.queue("reap");
    let id = app.submit(json!({"job_queue": q})).await;
    let first = app.broker().get(&q).await.expect("get").expect("message");
    let c1 = app.claim(&id, "zombie").await;
    first.ack().await.expect("ack");
    assert_eq!(c1["outcome"], "granted");
    assert_eq!(c1["attempt"], 1);
    let t1 = c1["token"].as_str().map(str::to_string).expect("token");
    // Writes with the live token work.
    let r = app
        .post_token(
            &format!("/v1/result/{id}"),
            &t1,
            &json!({"job_state": "setup"}),
        )
        .await;
    assert_eq!(r.status(), 200);
    // No heartbeat: after the lease (3 s) the reaper requeues it and republishes.
    let again = app
        .wait_for(10, "the job to be redelivered", || async {
            app.broker().get(&q).await.expect("get")
        })
        .await;
    assert_eq!(again.message_id.as_deref(), Some(id.as_str()));
    let res = app.result(&id).await;
    assert_eq!(res["job_state"], "waiting");
    assert_eq!(res["job_reason"], "agent lost");
    let c2 = app.claim(&id, "healthy").await;
    again.ack().await.expect("ack");
    assert_eq!(c2["outcome"], "granted");
    assert_eq!(c2["attempt"], 2);
    // The first holder is fenced off everywhere.
    let stale = app
        .post_token(
            &format!("/v1/result/{id}"),
            &t1,
            &json!({"job_state": "complete"}),
        )
        .await;
    assert_eq!(stale.status(), 409);
    let stale_log = app
        .post_token(&format!("/v1/result/{id}/log/output"), &t1, &json!({"fragment_number": 0, "timestamp": "2026-01-01T00:00:00Z", "phase": "test", "log_data": "zombie"}))
        .await;
    assert_eq!(stale_log.status(), 409);
    let hb = app
        .post_json(
            &format!("/v1/job/{id}/heartbeat"),
            &json!({"agent_id": "zombie", "token": t1}),
        )
        .await;
    assert_eq!(hb.status(), 409);
    assert_eq!(app.result(&id).await["job_state"], "running");
    // The zombie never registered: marking it lost must not invent a record.
    assert_eq!(app.get("/v1/agents/data/zombie").await.status(), 404);
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn max_attempts_exhaustion_ends_the_job_with_a_reason() {
    let app = TestApp::spawn_with(|s| {
        s.lease_ttl = 3;
        s.reaper_interval_ms = 100;
        s.max_attempts = 1;
    })
    .await;
    let q = app.queue("exhaust");
    let id = app.submit(json!({"job_queue": q})).await;
    assert_eq!(app.claim(&id, "lost-agent").await["outcome"], "granted");
    let res = app
        .wait_for(10, "the job to end", || async {
            let r = app.result(&id).await;
            (r["job_state"] == "complete").then_some(r)
        })
        .await;
    let reason = res["job_reason"].as_str().unwrap_or_default().to_string();
    assert!(
        reason.contains("agent lost") && reason.contains("1 attempts"),
        "{reason}"
    );
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn heartbeat_keeps_the_lease_and_reports_cancel() {
    let app = TestApp::spawn_with(|s| {
        s.lease_ttl = 3;
        s.reaper_interval_ms = 100;
    })
    .await;
    let q = app.queue("hb");
    let id = app.submit(json!({"job_queue": q})).await;
    let t = app.claim(&id, "busy").await["token"]
        .as_str()
        .map(str::to_string)
        .expect("token");
    for _ in 0..5 {
        let r: Value = app
            .post_json(
                &format!("/v1/job/{id}/heartbeat"),
                &json!({"agent_id": "busy", "token": t}),
            )
            .await
            .json()
            .await
            .expect("json");
        assert_eq!(r["cancel_requested"], false);
        tokio::time::sleep(std::time::Duration::from_millis(1000)).await;
    }
    // 5 s > lease: still ours because it was renewed.
    assert_eq!(app.result(&id).await["job_state"], "running");
    app.post_json(
        &format!("/v1/job/{id}/action"),
        &json!({"action": "cancel"}),
    )
    .await;
    let r: Value = app
        .post_json(
            &format!("/v1/job/{id}/heartbeat"),
            &json!({"agent_id": "busy", "token": t}),
        )
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(r["cancel_requested"], true);
    // The agent's final outcome does not overwrite cancelled.
    app.post_token(
        &format!("/v1/result/{id}"),
        &t,
        &json!({"job_state": "complete", "status": {"test": 0}}),
    )
    .await;
    let res = app.result(&id).await;
    assert_eq!(res["job_state"], "cancelled");
    assert_eq!(res["test_status"], 0);
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn release_requeues_for_another_agent() {
    let app = TestApp::spawn().await;
    let q = app.queue("release");
    let id = app.submit(json!({"job_queue": q})).await;
    let m = app.broker().get(&q).await.expect("get").expect("message");
    let t = app.claim(&id, "leaving").await["token"]
        .as_str()
        .map(str::to_string)
        .expect("token");
    m.ack().await.expect("ack");
    let r = app
        .post_json(
            &format!("/v1/job/{id}/release"),
            &json!({"agent_id": "leaving", "token": t, "reason": "agent shutting down"}),
        )
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(app.result(&id).await["job_state"], "waiting");
    let m2 = app
        .broker()
        .get(&q)
        .await
        .expect("get")
        .expect("republished message");
    assert_eq!(m2.message_id.as_deref(), Some(id.as_str()));
    m2.ack().await.expect("ack");
    let c = app.claim(&id, "next").await;
    assert_eq!(c["attempt"], 2);
    let stale = app
        .post_json(
            &format!("/v1/job/{id}/release"),
            &json!({"agent_id": "leaving", "token": t}),
        )
        .await;
    assert_eq!(stale.status(), 409);
    app.cleanup().await;
}
