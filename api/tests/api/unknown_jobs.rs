//! Writes about a job the server does not have are refused with 404 naming the job, on
//! every route that takes a job id, and store nothing.

use crate::helpers::TestApp;
use reqwest::multipart::{Form, Part};
use serde_json::json;

fn tarball_form() -> Form {
    // Any bytes: the job check comes before the upload is read.
    Form::new().part(
        "file",
        Part::bytes(vec![0x1f, 0x8b, 0, 0]).file_name("file.tar.gz"),
    )
}

/// Asserts a 404 whose body names `id`.
async fn assert_not_found(r: reqwest::Response, id: &str, what: &str) {
    let status = r.status();
    let text = r.text().await.expect("body");
    assert_eq!(status, 404, "{what}: {text}");
    assert!(
        text.contains(id),
        "{what}: the answer must name the job: {text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn every_write_about_an_unknown_job_is_refused_with_404() {
    let app = TestApp::spawn().await;
    let id = uuid::Uuid::new_v4().to_string();
    let token = "0123456789abcdef0123456789abcdef";
    let fragment = json!({
        "fragment_number": 0,
        "timestamp": "2026-01-01T00:00:00Z",
        "phase": "test",
        "log_data": "lost?\n",
    });
    let r = app
        .post_json(&format!("/v1/result/{id}"), &json!({"job_state": "test"}))
        .await;
    assert_not_found(r, &id, "POST /v1/result").await;
    let r = app
        .post_token(
            &format!("/v1/result/{id}"),
            token,
            &json!({"status": {"test": 0}}),
        )
        .await;
    assert_not_found(r, &id, "POST /v1/result with a token").await;
    for lt in ["output", "serial"] {
        let r = app
            .post_json(&format!("/v1/result/{id}/log/{lt}"), &fragment)
            .await;
        assert_not_found(r, &id, "POST /v1/result/<id>/log").await;
        let r = app
            .post_token(&format!("/v1/result/{id}/log/{lt}"), token, &fragment)
            .await;
        assert_not_found(r, &id, "POST /v1/result/<id>/log with a token").await;
    }
    let r = app
        .http
        .post(app.url(&format!("/v1/result/{id}/artifact")))
        .header("X-Testflinger-Token", token)
        .multipart(tarball_form())
        .send()
        .await
        .expect("POST");
    assert_not_found(r, &id, "POST /v1/result/<id>/artifact").await;
    let r = app
        .http
        .post(app.url(&format!("/v1/job/{id}/attachments")))
        .multipart(tarball_form())
        .send()
        .await
        .expect("POST");
    assert_not_found(r, &id, "POST /v1/job/<id>/attachments").await;
    let r = app
        .post_json(
            &format!("/v1/job/{id}/action"),
            &json!({"action": "cancel"}),
        )
        .await;
    assert_not_found(r, &id, "POST /v1/job/<id>/action").await;
    let r = app
        .post_json(
            &format!("/v1/job/{id}/events"),
            &json!({"job_status_webhook": "http://127.0.0.1:9/hook", "events": []}),
        )
        .await;
    assert_not_found(r, &id, "POST /v1/job/<id>/events").await;
    let lease = json!({"agent_id": "a1", "token": token});
    let r = app
        .post_json(&format!("/v1/job/{id}/heartbeat"), &lease)
        .await;
    assert_not_found(r, &id, "POST /v1/job/<id>/heartbeat").await;
    let r = app
        .post_json(&format!("/v1/job/{id}/release"), &lease)
        .await;
    assert_not_found(r, &id, "POST /v1/job/<id>/release").await;
    // A claim of an unknown id is not an error but a protocol answer: the agent then
    // registers a job published raw to its queue (`ClaimOutcome::Unknown`).
    let r = app
        .post_json(&format!("/v1/job/{id}/claim"), &json!({"agent_id": "a1"}))
        .await;
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.expect("json");
    assert_eq!(v["outcome"], "unknown");
    // Nothing was stored about the job: no Redis key and no file names it.
    let mut c = app.state.store.con();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}:*{id}*", app.prefix))
        .query_async(&mut c)
        .await
        .expect("KEYS");
    assert!(keys.is_empty(), "keys stored for an unknown job: {keys:?}");
    let r = app.get(&format!("/v1/result/{id}/artifact")).await;
    assert_ne!(r.status(), 200, "an artifact was stored for an unknown job");
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn writes_about_a_job_removed_after_submission_are_refused_with_404() {
    // The job existed and an agent held it; its record is then gone (retention): the
    // holder's writes and heartbeats answer 404, not 200 or 409.
    let app = TestApp::spawn().await;
    let q = app.queue("gone");
    let id = app.submit(json!({"job_queue": q})).await;
    let claim = app.claim(&id, "a-gone").await;
    let token = claim["token"].as_str().expect("token").to_string();
    let mut c = app.state.store.con();
    let _: () = redis::cmd("DEL")
        .arg(format!("{}:job:{id}", app.prefix))
        .query_async(&mut c)
        .await
        .expect("DEL");
    let fragment = json!({
        "fragment_number": 1,
        "timestamp": "2026-01-01T00:00:00Z",
        "phase": "test",
        "log_data": "x\n",
    });
    let r = app
        .post_token(&format!("/v1/result/{id}/log/output"), &token, &fragment)
        .await;
    assert_not_found(r, &id, "log after removal").await;
    let r = app
        .post_token(
            &format!("/v1/result/{id}"),
            &token,
            &json!({"job_state": "test"}),
        )
        .await;
    assert_not_found(r, &id, "result after removal").await;
    let r = app
        .post_json(
            &format!("/v1/job/{id}/heartbeat"),
            &json!({"agent_id": "a-gone", "token": token}),
        )
        .await;
    assert_not_found(r, &id, "heartbeat after removal").await;
    app.cleanup().await;
}
