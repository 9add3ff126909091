use crate::helpers::TestApp;
use reqwest::multipart::{Form, Part};
use serde_json::json;

fn form(bytes: Vec<u8>) -> Form {
    Form::new().part(
        "file",
        Part::bytes(bytes)
            .file_name("file")
            .mime_str("application/x-gzip")
            .expect("mime"),
    )
}

fn targz(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut b = tar::Builder::new(gz);
    for (path, data) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        // Write the raw name so unsafe names reach the server as a client could send them.
        let name = h.as_old_mut().name.as_mut();
        name[..path.len()].copy_from_slice(path.as_bytes());
        h.set_cksum();
        b.append(&h, *data).expect("append");
    }
    b.into_inner().expect("tar").finish().expect("gz")
}

#[tokio::test(flavor = "multi_thread")]
async fn artifacts_round_trip_byte_for_byte_and_respect_the_limit() {
    let app = TestApp::spawn_with(|s| s.max_upload_bytes = 2 << 20).await;
    let q = app.queue("art");
    let id = app.submit(json!({"job_queue": q})).await;
    assert_eq!(
        app.get(&format!("/v1/result/{id}/artifact")).await.status(),
        204
    );
    let bytes: Vec<u8> = (0..1_500_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    // Only the job's holder may upload its artifact.
    let token = app.claim(&id, "files-agent").await["token"]
        .as_str()
        .map(str::to_string)
        .expect("token")
        .to_string();
    let r = app
        .http
        .post(app.url(&format!("/v1/result/{id}/artifact")))
        .header("X-Testflinger-Token", &token)
        .multipart(form(bytes.clone()))
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 200);
    let got = app
        .http
        .get(app.url(&format!("/v1/result/{id}/artifact")))
        .send()
        .await
        .expect("get");
    assert_eq!(got.status(), 200);
    assert_eq!(
        got.headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/x-tar")
    );
    assert_eq!(
        got.headers()
            .get("content-encoding")
            .and_then(|v| v.to_str().ok()),
        Some("gzip")
    );
    assert_eq!(got.bytes().await.expect("bytes").to_vec(), bytes);
    // Past the limit: 413 and the previous artifact is untouched.
    let big = vec![7u8; 3 << 20];
    let r = app
        .http
        .post(app.url(&format!("/v1/result/{id}/artifact")))
        .header("X-Testflinger-Token", &token)
        .multipart(form(big))
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 413);
    let again = app
        .get(&format!("/v1/result/{id}/artifact"))
        .await
        .bytes()
        .await
        .expect("bytes");
    assert_eq!(again.len(), bytes.len());
    // A multipart body without a `file` field is a 400.
    let r = app
        .http
        .post(app.url(&format!("/v1/result/{id}/artifact")))
        .header("X-Testflinger-Token", &token)
        .multipart(Form::new().text("other", "x"))
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 400);
    assert_eq!(
        app.get("/v1/result/not-a-uuid/artifact").await.status(),
        400
    );
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn attachments_hold_the_job_until_uploaded_and_unsafe_archives_are_refused() {
    let app = TestApp::spawn().await;
    let q = app.queue("attach");
    let id = app.submit(json!({"job_queue": q, "test_data": {"test_cmds": "ls", "attachments": [{"agent": "data.txt"}]}})).await;
    // Not dispatched before the upload.
    assert!(app.broker().get(&q).await.expect("get").is_none());
    assert_eq!(
        app.get(&format!("/v1/job/{id}/attachments")).await.status(),
        204
    );
    for bad in [
        &[("../evil", b"x" as &[u8])][..],
        &[("/etc/passwd", b"x" as &[u8])][..],
        &[("test/../../x", b"x" as &[u8])][..],
        &[("other/x", b"x" as &[u8])][..],
    ] {
        let r = app
            .http
            .post(app.url(&format!("/v1/job/{id}/attachments")))
            .multipart(form(targz(bad)))
            .send()
            .await
            .expect("post");
        // 400: upstream's CLI cancels the job on 400 (only).
        assert_eq!(r.status(), 400, "{:?}", bad[0].0);
        assert!(
            r.text()
                .await
                .expect("text")
                .contains("Invalid attachments archive")
        );
    }
    let r = app
        .http
        .post(app.url(&format!("/v1/job/{id}/attachments")))
        .multipart(form(b"not a tarball".to_vec()))
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 400);
    assert!(
        app.broker().get(&q).await.expect("get").is_none(),
        "still not dispatched"
    );
    let good = targz(&[("test/data.txt", b"hello")]);
    let r = app
        .http
        .post(app.url(&format!("/v1/job/{id}/attachments")))
        .multipart(form(good.clone()))
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 200);
    let msg = app
        .wait_for(5, "the job message", || async {
            app.broker().get(&q).await.expect("get")
        })
        .await;
    assert_eq!(msg.message_id.as_deref(), Some(id.as_str()));
    msg.ack().await.expect("ack");
    let got = app.get(&format!("/v1/job/{id}/attachments")).await;
    assert_eq!(
        got.headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/gzip")
    );
    assert_eq!(got.bytes().await.expect("bytes").to_vec(), good);
    let claim = app.claim(&id, "a1").await;
    assert_eq!(claim["job"]["attachments_status"], "complete");
    // A job without attachments does not take any.
    let plain = app.submit(json!({"job_queue": q})).await;
    let r = app
        .http
        .post(app.url(&format!("/v1/job/{plain}/attachments")))
        .multipart(form(good))
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 422);
    app.cleanup().await;
}

/// Issue 14.7: no job waits for its attachments forever: past
/// `TESTFLINGER_ATTACHMENTS_TIMEOUT` it is cancelled with the reason.
#[tokio::test(flavor = "multi_thread")]
async fn a_job_whose_attachments_never_come_is_cancelled_with_a_reason() {
    let app = TestApp::spawn_with(|s| s.attachments_timeout = 1).await;
    let q = app.queue("attachwait");
    let id = app.submit(json!({"job_queue": q, "test_data": {"test_cmds": "ls", "attachments": [{"agent": "data.txt"}]}})).await;
    let res = app
        .wait_for(10, "the job to be cancelled", || async {
            let r = app.result(&id).await;
            (r["job_state"] == "cancelled").then_some(r)
        })
        .await;
    assert!(
        res["job_reason"]
            .as_str()
            .is_some_and(|r| r.contains("attachments were not uploaded within 1 s")),
        "{res}"
    );
    assert_eq!(
        app.get(&format!("/v1/job/{id}/position")).await.status(),
        410
    );
    app.cleanup().await;
}
