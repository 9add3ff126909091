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
    let noise: Vec<u8> = (0..1_500_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    // An artifact is a gzip tar (issue 13.3); it comes back byte for byte, modes included.
    let bytes = testflinger_archive::hostile::targz(&[
        testflinger_archive::hostile::file("artifacts/noise.bin", &noise, 0o640),
        testflinger_archive::hostile::file("artifacts/run.sh", b"#!/bin/sh\n", 0o755),
    ]);
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
    assert_eq!(
        got.headers()
            .get("content-length")
            .and_then(|v| v.to_str().ok()),
        Some(bytes.len().to_string().as_str())
    );
    let body = got.bytes().await.expect("bytes").to_vec();
    assert_eq!(body, bytes);
    // What `Content-Encoding: gzip` promises: the body decodes to the tar, modes kept.
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(&body[..]));
    let mut seen = Vec::new();
    for e in tar.entries().expect("a tar") {
        let mut e = e.expect("entry");
        let mode = e.header().mode().expect("mode");
        let name = e.path().expect("path").display().to_string();
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut e, &mut data).expect("read");
        seen.push((name, mode, data.len()));
    }
    assert_eq!(
        seen,
        [
            ("artifacts/noise.bin".to_string(), 0o640, noise.len()),
            ("artifacts/run.sh".to_string(), 0o755, 10)
        ]
    );
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

/// The test process's peak resident memory (`VmHWM` of /proc/self/status), in KiB.
pub fn peak_rss_kib() -> u64 {
    testflinger_testing::peak_rss_kib(std::process::id())
}

async fn upload_attachments(app: &TestApp, id: &str, gz: Vec<u8>) -> (u16, String) {
    let r = app
        .http
        .post(app.url(&format!("/v1/job/{id}/attachments")))
        .multipart(form(gz))
        .send()
        .await
        .expect("post");
    (r.status().as_u16(), r.text().await.expect("text"))
}

/// Issue 13.2: every gzip member is checked, and a gzip bomb is refused by its declared
/// size, with memory that does not grow with what the archive expands to.
#[tokio::test(flavor = "multi_thread")]
async fn attachments_hiding_in_a_second_gzip_member_or_in_a_bomb_are_refused() {
    use testflinger_archive::hostile;
    let app = TestApp::spawn().await;
    let q = app.queue("attachbomb");
    let id = app.submit(json!({"job_queue": q, "test_data": {"test_cmds": "ls", "attachments": [{"agent": "data.txt"}]}})).await;
    let before = peak_rss_kib();

    // 10 GiB of zeros in about 10 MB.
    let bomb = hostile::bomb("test/zeros", 10 << 30);
    let started = std::time::Instant::now();
    let (status, text) = upload_attachments(&app, &id, bomb).await;
    let took = started.elapsed();
    assert_eq!(status, 413, "{text}");
    assert!(
        text.contains("member 'test/zeros' (10737418240 bytes)"),
        "{text}"
    );
    assert!(text.contains("8589934592"), "{text}");
    assert!(
        text.contains("TESTFLINGER_ARCHIVE_MAX_UNPACKED_BYTES"),
        "{text}"
    );
    assert!(took < std::time::Duration::from_secs(10), "{took:?}");

    let two = hostile::two_members(
        &[hostile::file("test/ok", b"fine", 0o644)],
        &[hostile::file("../x", b"evil", 0o644)],
    );
    let (status, text) = upload_attachments(&app, &id, two).await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("Invalid attachments archive"), "{text}");
    assert!(text.contains("member '../x'"), "{text}");

    // Zeros behind a header that declares 1 byte: cut off after the header budget.
    let (status, text) =
        upload_attachments(&app, &id, hostile::lying_bomb("test/small", 1 << 30)).await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("'test/small'"), "{text}");

    let after = peak_rss_kib();
    println!(
        "test process peak RSS: {before} KiB before the hostile uploads, {after} KiB after (+{} KiB), bomb refused in {took:?}",
        after.saturating_sub(before)
    );
    assert!(
        after.saturating_sub(before) < 64 * 1024,
        "peak RSS grew by {} KiB",
        after - before
    );
    // Nothing was stored and the job still waits for its attachments.
    assert_eq!(
        app.get(&format!("/v1/job/{id}/attachments")).await.status(),
        204
    );
    assert!(app.broker().get(&q).await.expect("get").is_none());
    app.cleanup().await;
}

/// The entry limit and the unpacked-size limit come from the server's settings.
#[tokio::test(flavor = "multi_thread")]
async fn the_archive_limits_are_settings() {
    use testflinger_archive::hostile;
    let app = TestApp::spawn_with(|s| {
        s.archive_max_entries = 3;
        s.archive_max_unpacked_bytes = 1 << 20;
    })
    .await;
    let q = app.queue("attachlimits");
    let id = app.submit(json!({"job_queue": q, "test_data": {"test_cmds": "ls", "attachments": [{"agent": "data.txt"}]}})).await;
    let four: Vec<Vec<u8>> = (0..4)
        .map(|i| hostile::file(&format!("test/f{i}"), b"x", 0o644))
        .collect();
    let (status, text) = upload_attachments(&app, &id, hostile::targz(&four)).await;
    assert_eq!(status, 413, "{text}");
    assert!(text.contains("member 'test/f3'"), "{text}");
    assert!(text.contains("3 entries"), "{text}");
    assert!(text.contains("TESTFLINGER_ARCHIVE_MAX_ENTRIES"), "{text}");
    let big = hostile::targz(&[hostile::file("test/big", &vec![1u8; 2 << 20], 0o644)]);
    let (status, text) = upload_attachments(&app, &id, big).await;
    assert_eq!(status, 413, "{text}");
    assert!(text.contains("1048576"), "{text}");
    let ok = hostile::targz(&four[..3]);
    let (status, text) = upload_attachments(&app, &id, ok).await;
    assert_eq!(status, 200, "{text}");
    app.cleanup().await;
}

async fn upload_artifact(app: &TestApp, id: &str, token: &str, gz: Vec<u8>) -> (u16, String) {
    let r = app
        .http
        .post(app.url(&format!("/v1/result/{id}/artifact")))
        .header("X-Testflinger-Token", token)
        .multipart(form(gz))
        .send()
        .await
        .expect("post");
    (r.status().as_u16(), r.text().await.expect("text"))
}

/// Issue 13.3: an artifact must be a gzip tar (every member, the same limits), so what
/// `GET` serves with `Content-Encoding: gzip` is gzip.
#[tokio::test(flavor = "multi_thread")]
async fn an_artifact_that_is_not_a_gzip_tar_is_refused() {
    use testflinger_archive::hostile;
    let app = TestApp::spawn().await;
    let q = app.queue("artcheck");
    let id = app.submit(json!({"job_queue": q})).await;
    let token = app.claim(&id, "files-agent").await["token"]
        .as_str()
        .map(str::to_string)
        .expect("token");
    let good = hostile::targz(&[hostile::file("artifacts/r.txt", b"result", 0o755)]);
    let (status, text) = upload_artifact(&app, &id, &token, good.clone()).await;
    assert_eq!(status, 200, "{text}");
    for (what, bytes, want, says) in [
        (
            "plain text",
            b"just some text".to_vec(),
            400,
            "not a gzip tar archive",
        ),
        (
            "gzip of no tar",
            hostile::gzip(&[7u8; 5000]),
            400,
            "not a gzip tar archive",
        ),
        (
            "traversal in a second gzip member",
            hostile::two_members(
                &[hostile::file("artifacts/a", b"1", 0o644)],
                &[hostile::file("../x", b"evil", 0o644)],
            ),
            400,
            "member '../x'",
        ),
        (
            "a symbolic link",
            hostile::targz(&[hostile::member(
                "artifacts/l",
                tar::EntryType::Symlink,
                0,
                &[],
                "/etc/passwd",
            )]),
            400,
            "symbolic link",
        ),
        (
            "a bomb",
            hostile::bomb("artifacts/zeros", 10 << 30),
            413,
            "TESTFLINGER_ARCHIVE_MAX_UNPACKED_BYTES",
        ),
    ] {
        let (status, text) = upload_artifact(&app, &id, &token, bytes).await;
        assert_eq!(status, want, "{what}: {text}");
        assert!(text.contains("Invalid artifact archive"), "{what}: {text}");
        assert!(text.contains(says), "{what}: {text}");
    }
    // The accepted artifact is untouched, served as it was stored.
    let got = app.get(&format!("/v1/result/{id}/artifact")).await;
    assert_eq!(got.status(), 200);
    assert_eq!(
        got.headers()
            .get("content-length")
            .and_then(|v| v.to_str().ok()),
        Some(good.len().to_string().as_str())
    );
    assert_eq!(got.bytes().await.expect("bytes").to_vec(), good);
    app.cleanup().await;
}
