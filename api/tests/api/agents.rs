use crate::helpers::TestApp;
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread")]
async fn agents_queues_images_and_wait_times() {
    let app = TestApp::spawn().await;
    let q = app.queue("agents");
    let name = format!("dev-{q}");
    let r = app.post_json(&format!("/v1/agents/data/{name}"), &json!({"state": "waiting", "queues": [q], "location": "lab 1", "provision_type": "fake", "log": ["started"]})).await;
    assert_eq!(r.status(), 200);
    let cookie = r
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(
        cookie.starts_with(&format!("agent_name={name};")),
        "{cookie}"
    );
    assert_eq!(
        r.json::<Value>().await.expect("json"),
        json!({"status": "OK"})
    );
    let a: Value = app
        .get(&format!("/v1/agents/data/{name}"))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(a["state"], "waiting");
    assert_eq!(a["queues"], json!([q]));
    assert_eq!(a["location"], "lab 1");
    assert!(a.get("log").is_none());
    assert_eq!(app.get("/v1/agents/data/nobody-here").await.status(), 404);
    let list: Value = app.get("/v1/agents/data").await.json().await.expect("json");
    assert!(
        list.as_array()
            .expect("array")
            .iter()
            .any(|x| x["name"] == name.as_str())
    );
    // Queue agents: 404 for a queue nobody serves.
    let on: Value = app
        .get(&format!("/v1/queues/{q}/agents"))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(on[0]["name"], name.as_str());
    let none = app.get(&format!("/v1/queues/none-{q}/agents")).await;
    assert_eq!(none.status(), 404);
    assert!(
        none.json::<Value>().await.expect("json")["message"]
            .as_str()
            .unwrap_or_default()
            .contains("does not exist")
    );
    // Issue 14.7: a queue an agent only consumes is not listed (upstream lists
    // advertised queues only).
    let before: Value = app
        .get("/v1/agents/queues")
        .await
        .json()
        .await
        .expect("json");
    assert!(before.get(&q).is_none(), "{before}");
    // Advertised queues and images.
    assert_eq!(
        app.post_json("/v1/agents/queues", &json!({q.clone(): "a demo queue"}))
            .await
            .status(),
        200
    );
    let queues: Value = app
        .get("/v1/agents/queues")
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(queues[&q], "a demo queue");
    assert_eq!(
        app.post_json("/v1/agents/queues", &json!({q.clone(): 5}))
            .await
            .status(),
        422
    );
    assert_eq!(
        app.post_json(
            "/v1/agents/images",
            &json!({q.clone(): {"jammy": "url: http://x/jammy.img"}})
        )
        .await
        .status(),
        200
    );
    let images: Value = app
        .get(&format!("/v1/agents/images/{q}"))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(images, json!({"jammy": "url: http://x/jammy.img"}));
    assert_eq!(
        app.get(&format!("/v1/agents/images/none-{q}"))
            .await
            .json::<Value>()
            .await
            .expect("json"),
        json!({})
    );
    assert_eq!(
        app.post_json("/v1/agents/images", &json!({q.clone(): {"a.b": "x"}}))
            .await
            .status(),
        422
    );
    // Provision logs and streaks.
    for code in [0, 0, 1] {
        let r = app
            .post_json(
                &format!("/v1/agents/provision_logs/{name}"),
                &json!({"job_id": "j", "exit_code": code}),
            )
            .await;
        assert_eq!(r.status(), 200);
    }
    let a: Value = app
        .get(&format!("/v1/agents/data/{name}"))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(a["provision_streak_type"], "fail");
    assert_eq!(a["provision_streak_count"], 1);
    assert_eq!(
        app.post_json(
            "/v1/agents/provision_logs/ghost",
            &json!({"job_id": "j", "exit_code": 0})
        )
        .await
        .status(),
        404
    );
    assert_eq!(
        app.post_json(&format!("/v1/agents/data/{name}"), &json!({"bogus": 1}))
            .await
            .status(),
        422
    );
    // Wait times: one claimed job gives one sample.
    let id = app.submit(json!({"job_queue": q})).await;
    assert_eq!(app.claim(&id, &name).await["outcome"], "granted");
    let wt: Value = app
        .get(&format!("/v1/queues/wait_times?queue={q}"))
        .await
        .json()
        .await
        .expect("json");
    assert!(wt[&q]["50"].is_number(), "{wt}");
    let jobs: Value = app
        .get(&format!("/v1/queues/{q}/jobs"))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(jobs[0]["job_state"], "running");
    assert_eq!(jobs[0]["job_queue"], q.as_str());
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_jobs_claims_and_waiting() {
    let app = TestApp::spawn().await;
    let q = app.queue("metrics");
    let a = app.submit(json!({"job_queue": q})).await;
    app.submit(json!({"job_queue": q, "reserve_data": {"ssh_keys": ["lp:someone"]}}))
        .await;
    assert_eq!(app.claim(&a, "m-agent").await["outcome"], "granted");
    assert_eq!(app.claim(&a, "m-agent2").await["outcome"], "owned");
    let r = app.get("/metrics").await;
    assert_eq!(r.status(), 200);
    let text = r.text().await.expect("text");
    for line in [
        format!("testflinger_jobs_total{{queue=\"{q}\"}} 2"),
        format!("testflinger_reservations_total{{queue=\"{q}\"}} 1"),
        "testflinger_claims_total{outcome=\"granted\"} 1".to_string(),
        "testflinger_claims_total{outcome=\"owned\"} 1".to_string(),
        format!("testflinger_queue_waiting_jobs{{queue=\"{q}\"}} 1"),
        "testflinger_running_leases 1".to_string(),
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing `{line}` in:\n{text}"
        );
    }
    app.cleanup().await;
}
