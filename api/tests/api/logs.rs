use crate::helpers::TestApp;
use serde_json::{Value, json};

/// Claims `id` for a test agent; returns the fencing token its writes carry.
async fn hold(app: &TestApp, id: &str) -> String {
    app.claim(id, "logs-agent").await["token"]
        .as_str()
        .map(str::to_string)
        .expect("token")
}

async fn post_frag(app: &TestApp, id: &str, n: i64, ts: &str, phase: &str, data: &str) {
    let token = hold(app, id).await;
    let r = app
        .post_token(
            &format!("/v1/result/{id}/log/output"),
            &token,
            &json!({"fragment_number": n, "timestamp": ts, "phase": phase, "log_data": data}),
        )
        .await;
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
}

#[tokio::test(flavor = "multi_thread")]
async fn fragments_come_back_in_order_and_filtered() {
    let app = TestApp::spawn().await;
    let q = app.queue("logs");
    let id = app.submit(json!({"job_queue": q})).await;
    // Posted out of order, including a retried duplicate.
    post_frag(&app, &id, 2, "2026-01-01T00:00:20Z", "test", "c").await;
    post_frag(&app, &id, 0, "2026-01-01T00:00:00Z", "setup", "a").await;
    post_frag(&app, &id, 1, "2026-01-01T00:00:10+00:00", "test", "b").await;
    post_frag(&app, &id, 1, "2026-01-01T00:00:10+00:00", "test", "b").await;
    post_frag(&app, &id, 3, "2026-01-01T00:00:30.5", "cleanup", "d").await;
    let all: Value = app
        .get(&format!("/v1/result/{id}/log/output"))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(
        all["output"]["test"],
        json!({"last_fragment_number": 2, "log_data": "bc"})
    );
    assert_eq!(
        all["output"]["setup"],
        json!({"last_fragment_number": 0, "log_data": "a"})
    );
    assert_eq!(
        all["output"]["provision"],
        json!({"last_fragment_number": -1, "log_data": ""})
    );
    assert_eq!(all["output"].as_object().map(|o| o.len()), Some(7));
    let from2: Value = app
        .get(&format!("/v1/result/{id}/log/output?start_fragment=2"))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(from2["output"]["test"]["log_data"], "c");
    assert_eq!(from2["output"]["setup"]["last_fragment_number"], -1);
    let phase: Value = app
        .get(&format!("/v1/result/{id}/log/output?phase=test"))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(
        phase,
        json!({"output": {"test": {"last_fragment_number": 2, "log_data": "bc"}}})
    );
    let since: Value = app
        .get(&format!(
            "/v1/result/{id}/log/output?start_timestamp=2026-01-01T00:00:15Z"
        ))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(since["output"]["test"]["log_data"], "c");
    assert_eq!(since["output"]["cleanup"]["log_data"], "d");
    // The flattened result carries per-phase output.
    let res = app.result(&id).await;
    assert_eq!(res["test_output"], "bc");
    assert_eq!(res["setup_output"], "a");
    // Serial is a separate stream.
    let serial: Value = app
        .get(&format!("/v1/result/{id}/log/serial"))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(serial["serial"]["test"]["last_fragment_number"], -1);
    // Bad queries are 400, like upstream.
    for bad in [
        "start_fragment=-1",
        "start_fragment=x",
        "phase=nope",
        "start_timestamp=yesterday",
    ] {
        assert_eq!(
            app.get(&format!("/v1/result/{id}/log/output?{bad}"))
                .await
                .status(),
            400,
            "{bad}"
        );
    }
    // Bad fragments are 422 naming the field.
    let r = app
        .post_json(
            &format!("/v1/result/{id}/log/output"),
            &json!({"fragment_number": 9, "timestamp": "x", "phase": "test", "log_data": ""}),
        )
        .await;
    assert_eq!(r.status(), 422);
    let r = app.post_json(&format!("/v1/result/{id}/log/output"), &json!({"fragment_number": 9, "timestamp": "2026-01-01T00:00:00Z", "phase": "bogus", "log_data": ""})).await;
    assert_eq!(r.status(), 422);
    let body: Value = r.json().await.expect("json");
    assert!(body["detail"]["json"]["phase"].is_array(), "{body}");
    assert_eq!(
        app.post_json(&format!("/v1/result/{id}/log/console"), &json!({}))
            .await
            .status(),
        404
    );
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn live_stream_delivers_fragments_then_ends() {
    let app = TestApp::spawn().await;
    let q = app.queue("sse");
    let id = app.submit(json!({"job_queue": q})).await;
    post_frag(&app, &id, 0, "2026-01-01T00:00:00Z", "setup", "first ").await;
    let url = app.url(&format!("/v1/result/{id}/log/output/stream"));
    let reader = tokio::spawn({
        let http = app.http.clone();
        async move {
            let mut r = http.get(url).send().await.expect("stream");
            assert_eq!(r.status(), 200);
            let mut text = String::new();
            while let Some(chunk) = r.chunk().await.expect("chunk") {
                text.push_str(&String::from_utf8_lossy(&chunk));
            }
            text
        }
    });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    post_frag(&app, &id, 1, "2026-01-01T00:00:01Z", "test", "second").await;
    let token = hold(&app, &id).await;
    app.post_token(
        &format!("/v1/result/{id}"),
        &token,
        &json!({"job_state": "complete"}),
    )
    .await;
    let text = tokio::time::timeout(std::time::Duration::from_secs(10), reader)
        .await
        .expect("stream ended")
        .expect("join");
    let datas: Vec<Value> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str(d).ok())
        .collect();
    let logs: String = datas
        .iter()
        .filter_map(|d| d["log_data"].as_str())
        .collect();
    assert_eq!(logs, "first second");
    assert!(text.contains("event: end"), "{text}");
    assert!(text.contains("id: 1"));
    // Resuming after fragment 0 gives only the rest.
    let resumed = app
        .http
        .get(app.url(&format!("/v1/result/{id}/log/output/stream")))
        .header("Last-Event-ID", "0")
        .send()
        .await
        .expect("resume")
        .text()
        .await
        .expect("text");
    assert!(
        !resumed.contains("first") && resumed.contains("second"),
        "{resumed}"
    );
    app.cleanup().await;
}
