use crate::helpers::TestApp;
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_gets_clear_4xx_and_writes_nothing() {
    let app = TestApp::spawn().await;
    let q = app.queue("errors");
    let cases: Vec<(&str, u16, &str)> = vec![
        ("{not json", 400, "malformed JSON"),
        ("", 400, "empty"),
        ("[1,2]", 422, "object"),
        (r#"{"test_data": {}}"#, 422, "job_queue"),
        (r#"{"job_queue": ""}"#, 422, "job_queue"),
        (r#"{"job_queue": "amq.direct"}"#, 422, "reserved"),
        (r#"{"job_queue": "testflinger.submit"}"#, 422, "reserved"),
        (r#"{"job_queue": "a\u0007b"}"#, 422, "non-printable"),
        (r#"{"job_queue": "q", "surprise": 1}"#, 422, "surprise"),
        (
            r#"{"job_queue": "q", "test_data": {"test_cmds": 3}}"#,
            422,
            "test_data.test_cmds",
        ),
        (
            r#"{"job_queue": "q", "reserve_data": {"ssh_keys": ["bad:key"]}}"#,
            422,
            "reserve_data.ssh_keys",
        ),
        (
            r#"{"job_queue": "q", "reserve_data": {"timeout": "soon"}}"#,
            422,
            "reserve_data.timeout",
        ),
        (
            r#"{"job_queue": "q", "global_timeout": -5}"#,
            422,
            "global_timeout",
        ),
        (
            r#"{"job_queue": "q", "job_priority": "high"}"#,
            422,
            "job_priority",
        ),
        (
            r#"{"job_queue": "q", "provision_data": [1]}"#,
            422,
            "provision_data",
        ),
        (
            r#"{"job_queue": "q", "job_id": "not-a-uuid"}"#,
            400,
            "Invalid job_id",
        ),
    ];
    for (body, status, needle) in cases {
        let r = app.post_raw("/v1/job", body).await;
        assert_eq!(r.status().as_u16(), status, "{body}");
        let text = r.text().await.expect("text");
        assert!(text.contains(needle), "{body} -> {text}");
    }
    let long = "x".repeat(201);
    assert_eq!(
        app.post_json("/v1/job", &json!({"job_queue": long}))
            .await
            .status(),
        422
    );
    let search: Value = app.get("/v1/job/search").await.json().await.expect("json");
    assert_eq!(search, json!([]), "no record was written");
    // Ids and lookups.
    let unknown = uuid::Uuid::new_v4();
    assert_eq!(app.get("/v1/job/nope").await.status(), 400);
    assert_eq!(app.get(&format!("/v1/job/{unknown}")).await.status(), 204);
    assert_eq!(
        app.get(&format!("/v1/result/{unknown}")).await.status(),
        204
    );
    assert_eq!(app.get("/v1/result/nope").await.status(), 400);
    let pos = app.get(&format!("/v1/job/{unknown}/position")).await;
    assert_eq!(pos.status(), 410);
    assert_eq!(
        pos.text().await.expect("text"),
        "Job not found or already started\n"
    );
    let bad = app.get("/v1/job/zzz/position").await;
    assert_eq!(bad.status(), 400);
    assert_eq!(bad.text().await.expect("text"), "Invalid job id\n");
    // Cancelling an unknown job: 404 (upstream answers 400 "already completed or
    // cancelled"; issue 13: writes about unknown jobs are 404 everywhere).
    assert_eq!(
        app.post_json(
            &format!("/v1/job/{unknown}/action"),
            &json!({"action": "cancel"})
        )
        .await
        .status(),
        404
    );
    let id = app.submit(json!({"job_queue": q})).await;
    assert_eq!(
        app.post_json(
            &format!("/v1/job/{id}/action"),
            &json!({"action": "explode"})
        )
        .await
        .status(),
        422
    );
    assert_eq!(
        app.post_json(&format!("/v1/job/{id}/action"), &json!({"verb": "cancel"}))
            .await
            .status(),
        422
    );
    // Results: unknown keys 422; an unknown job 404 (upstream accepts and drops it; we
    // say the write went nowhere).
    assert_eq!(
        app.post_json(
            &format!("/v1/result/{id}"),
            &json!({"status": {"test": 0}, "extra": 1})
        )
        .await
        .status(),
        422
    );
    assert_eq!(
        app.post_json(
            &format!("/v1/result/{id}"),
            &json!({"status": {"nophase": 0}})
        )
        .await
        .status(),
        422
    );
    assert_eq!(
        app.post_json(
            &format!("/v1/result/{unknown}"),
            &json!({"job_state": "test"})
        )
        .await
        .status(),
        404
    );
    assert_eq!(
        app.get(&format!("/v1/result/{unknown}")).await.status(),
        204
    );
    // A waiting job has no holder: a tokenless write is refused (409).
    assert_eq!(
        app.post_json(
            &format!("/v1/result/{id}"),
            &json!({"job_state": "setup", "device_info": {"device_ip": "10.0.0.5"}})
        )
        .await
        .status(),
        409
    );
    let token = app.claim(&id, "errors-agent").await["token"]
        .as_str()
        .map(str::to_string)
        .expect("token");
    assert_eq!(
        app.post_token(
            &format!("/v1/result/{id}"),
            &token,
            &json!({"job_state": "setup", "device_info": {"device_ip": "10.0.0.5"}})
        )
        .await
        .status(),
        200
    );
    let res = app.result(&id).await;
    assert_eq!(res["device_info"]["device_ip"], "10.0.0.5");
    // A token is 32 hex digits.
    let r = app
        .http
        .post(app.url(&format!("/v1/result/{id}")))
        .header("X-Testflinger-Token", "abc")
        .json(&json!({}))
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 400);
    // Lease routes: bad bodies.
    assert_eq!(
        app.post_json(&format!("/v1/job/{id}/claim"), &json!({}))
            .await
            .status(),
        422
    );
    assert_eq!(
        app.post_json(&format!("/v1/job/{id}/claim"), &json!({"agent_id": ""}))
            .await
            .status(),
        400
    );
    assert_eq!(
        app.claim(&unknown.to_string(), "a").await["outcome"],
        "unknown"
    );
    // Identity, OIDC probe, unknown routes.
    assert_eq!(
        app.get("/v1/").await.text().await.expect("text"),
        format!("Testflinger Server v{}", env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(app.get("/v1").await.status(), 200);
    assert_eq!(
        app.post_json("/oidc/auth-init", &json!({})).await.status(),
        404
    );
    let nf = app.get("/v2/whatever").await;
    assert_eq!(nf.status(), 404);
    assert!(nf.text().await.expect("text").starts_with("Not found"));
    assert_eq!(app.get("/readyz").await.status(), 200);
    app.cleanup().await;
}
