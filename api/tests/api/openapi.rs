//! The OpenAPI document (`api/openapi.json`, served at `GET /openapi.json`) against the
//! real server: every documented route exists and answers one of its documented status
//! codes, and every route the server registers is documented.

use crate::helpers::{TestApp, unique};
use serde_json::Value;
use std::collections::BTreeSet;

/// The routes registered by the `configure` functions of `api/src/routes/*.rs`, spelled
/// as there (read from the code; update this list with the routes).
/// The web UI's HTML pages (`api/src/ui`) are not API routes and are not documented.
const SERVED: &[(&str, &str)] = &[
    // mod.rs
    ("GET", "/v1"),
    ("GET", "/v1/"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("POST", "/oidc/auth-init"),
    // jobs.rs
    ("POST", "/v1/job"),
    ("GET", "/v1/job"),
    ("GET", "/v1/job/search"),
    ("GET", "/v1/job/{id}"),
    ("GET", "/v1/job/{id}/position"),
    ("POST", "/v1/job/{id}/action"),
    ("POST", "/v1/job/{id}/attachments"),
    ("GET", "/v1/job/{id}/attachments"),
    ("POST", "/v1/job/{id}/events"),
    // lease.rs
    ("POST", "/v1/job/{id}/claim"),
    ("POST", "/v1/job/{id}/heartbeat"),
    ("POST", "/v1/job/{id}/release"),
    // results.rs
    ("POST", "/v1/result/{id}"),
    ("GET", "/v1/result/{id}"),
    ("POST", "/v1/result/{id}/log/{log_type}"),
    ("GET", "/v1/result/{id}/log/{log_type}"),
    ("GET", "/v1/result/{id}/log/{log_type}/stream"),
    ("POST", "/v1/result/{id}/artifact"),
    ("GET", "/v1/result/{id}/artifact"),
    // agents.rs
    ("GET", "/v1/agents/data"),
    ("GET", "/v1/agents/data/{name}"),
    ("POST", "/v1/agents/data/{name}"),
    ("GET", "/v1/agents/queues"),
    ("POST", "/v1/agents/queues"),
    ("POST", "/v1/agents/images"),
    ("GET", "/v1/agents/images/{queue}"),
    ("POST", "/v1/agents/provision_logs/{name}"),
    // queues.rs
    ("GET", "/v1/queues/wait_times"),
    ("GET", "/v1/queues/{queue}/agents"),
    ("GET", "/v1/queues/{queue}/jobs"),
    // secrets.rs
    ("PUT", "/v1/secrets/{client_id}/{path:.*}"),
    ("DELETE", "/v1/secrets/{client_id}/{path:.*}"),
    // auth.rs
    ("POST", "/v1/oauth2/token"),
    ("POST", "/v1/oauth2/refresh"),
    ("POST", "/v1/oauth2/revoke"),
    ("GET", "/v1/client-permissions"),
    ("GET", "/v1/client-permissions/{client_id}"),
    ("PUT", "/v1/client-permissions/{client_id}"),
    ("DELETE", "/v1/client-permissions/{client_id}"),
    ("GET", "/v1/restricted-queues"),
    ("GET", "/v1/restricted-queues/{queue}"),
    ("POST", "/v1/restricted-queues/{queue}"),
    ("DELETE", "/v1/restricted-queues/{queue}"),
    // docs.rs
    ("GET", "/openapi.json"),
    ("GET", "/v1/openapi.json"),
];

/// An actix route pattern in the document's spelling of its path parameters.
fn documented_spelling(route: &str) -> String {
    route
        .replace("{id}", "{job_id}")
        .replace("{name}", "{agent_name}")
        .replace("{path:.*}", "{path}")
}

/// Routes that answer 500 to the minimal request below: an empty Redis pipeline (no
/// queue with samples yet; an empty images map) is an error in redis-rs. Remove an entry
/// once its handler returns early on nothing to do.
const KNOWN_500: &[(&str, &str)] = &[];

const METHODS: &[&str] = &["get", "put", "post", "delete", "patch", "head", "options"];

/// Every (METHOD, path template) of the document.
fn operations(doc: &Value) -> BTreeSet<(String, String)> {
    let paths = doc["paths"].as_object().expect("paths is an object");
    let mut out = BTreeSet::new();
    for (path, item) in paths {
        for m in METHODS {
            if item.get(*m).is_some() {
                out.insert((m.to_uppercase(), path.clone()));
            }
        }
    }
    out
}

/// Every `$ref` in `v` must point at something in `doc`.
fn check_refs(doc: &Value, v: &Value, at: &str) {
    match v {
        Value::Object(o) => {
            if let Some(r) = o.get("$ref").and_then(Value::as_str) {
                let pointer = r
                    .strip_prefix('#')
                    .unwrap_or_else(|| panic!("{at}: external $ref {r}"));
                assert!(doc.pointer(pointer).is_some(), "{at}: dangling $ref {r}");
            }
            for (k, x) in o {
                check_refs(doc, x, &format!("{at}/{k}"));
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                check_refs(doc, x, &format!("{at}/{i}"));
            }
        }
        _ => {}
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn openapi_document_matches_the_routes() {
    let app = TestApp::spawn().await;

    // Served at both places, as JSON, identical to the file.
    let r = app.get("/openapi.json").await;
    assert_eq!(r.status(), 200);
    let ct = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(ct.starts_with("application/json"), "content-type {ct}");
    let text = r.text().await.expect("body");
    let doc: Value = serde_json::from_str(&text).expect("the document parses as JSON");
    let v1 = app.get("/v1/openapi.json").await;
    assert_eq!(v1.status(), 200);
    assert_eq!(v1.text().await.expect("body"), text);
    let on_disk: Value = serde_json::from_str(include_str!("../../openapi.json")).expect("file");
    assert_eq!(doc, on_disk);

    let version = doc["openapi"].as_str().expect("openapi field");
    assert!(version.starts_with("3.0."), "openapi {version}");
    assert!(doc["info"]["title"].is_string() && doc["info"]["version"].is_string());
    check_refs(&doc, &doc, "#");

    // The document and the code list the same routes.
    let documented = operations(&doc);
    let served: BTreeSet<(String, String)> = SERVED
        .iter()
        .map(|(m, p)| (m.to_string(), documented_spelling(p)))
        .collect();
    let undocumented: Vec<_> = served.difference(&documented).collect();
    let phantom: Vec<_> = documented.difference(&served).collect();
    assert!(
        undocumented.is_empty(),
        "served but not documented: {undocumented:?}"
    );
    assert!(
        phantom.is_empty(),
        "documented but not in SERVED: {phantom:?}"
    );

    // The fallback is recognisable (the check below relies on it).
    let r = app.get("/v1/no-such-route").await;
    assert_eq!(r.status(), 404);
    assert_eq!(
        r.text().await.expect("body"),
        "Not found: GET /v1/no-such-route\n"
    );

    // Every documented operation reaches a handler and answers a documented status.
    let queue = app.queue("openapi");
    let agent = unique("openapi-agent");
    let job_id = uuid::Uuid::new_v4().to_string();
    for (method, template) in &documented {
        let path = template
            .replace("{job_id}", &job_id)
            .replace("{log_type}", "output")
            .replace("{queue}", &queue)
            .replace("{agent_name}", &agent)
            .replace("{client_id}", "anonymous")
            .replace("{path}", "openapi-test/secret");
        let m = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let mut req = app.http.request(m, app.url(&path));
        if method == "POST" || method == "PUT" {
            req = req.header("content-type", "application/json").body("{}");
        }
        let r = req.send().await.expect("request");
        let status = r.status().as_u16();
        let body = r.text().await.unwrap_or_default();
        let what = format!("{method} {template} ({path}) -> {status} {body:?}");
        assert_ne!(
            body,
            format!("Not found: {method} {path}\n"),
            "not routed: {what}"
        );
        if template == "/oidc/auth-init" {
            assert_eq!(status, 404, "{what}");
            assert!(body.contains("no login provider"), "{what}");
        }
        if status == 500 {
            assert!(
                KNOWN_500.contains(&(method.as_str(), template.as_str())),
                "server error: {what}"
            );
        }
        let op = &doc["paths"][template][method.to_lowercase()];
        let codes = op["responses"].as_object().expect("responses");
        assert!(
            codes.contains_key(&status.to_string()),
            "undocumented status: {what}; documented: {:?}",
            codes.keys().collect::<Vec<_>>()
        );
    }

    app.cleanup().await;
}

/// Answers schemathesis (`scripts/ci/schemathesis-test.sh`) checks against the document:
/// another method on a documented path is a 405 whose `Allow` lists the documented
/// methods; `/healthz` and `/readyz` say `text/plain`; malformed requests are refused
/// whether or not the job exists; bounds and shapes the document states hold.
#[tokio::test(flavor = "multi_thread")]
async fn undocumented_methods_and_malformed_requests_answer_as_documented() {
    let app = TestApp::spawn().await;
    let doc: Value = serde_json::from_str(include_str!("../../openapi.json")).expect("file");
    let unknown_job = uuid::Uuid::new_v4().to_string();

    // 405 with Allow on every documented path; the secrets' `{path}` spans slashes.
    for (template, item) in doc["paths"].as_object().expect("paths") {
        let path = template
            .replace("{job_id}", &unknown_job)
            .replace("{log_type}", "output")
            .replace("{queue}", "q")
            .replace("{agent_name}", "a")
            .replace("{client_id}", "c")
            .replace("{path}", "dir/secret");
        let mut documented: Vec<String> = ["get", "put", "post", "delete", "patch"]
            .iter()
            .filter(|m| item.get(**m).is_some())
            .map(|m| m.to_ascii_uppercase())
            .collect();
        documented.sort();
        let method = reqwest::Method::from_bytes(b"TRACE").expect("method");
        let r = app
            .http
            .request(method, app.url(&path))
            .send()
            .await
            .expect("TRACE");
        assert_eq!(r.status(), 405, "TRACE {path}");
        let allow = r
            .headers()
            .get("allow")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let mut allowed: Vec<String> = allow.split(", ").map(str::to_string).collect();
        allowed.sort();
        assert_eq!(allowed, documented, "Allow of {path}");
    }
    // An unknown path is still the plain-text 404.
    let r = app
        .http
        .delete(app.url("/v1/no-such-route"))
        .send()
        .await
        .expect("DELETE");
    assert_eq!(r.status(), 404);

    for probe in ["/healthz", "/readyz"] {
        let r = app.get(probe).await;
        assert_eq!(r.status(), 200, "{probe}");
        let ct = r
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok());
        assert_eq!(ct, Some("text/plain; charset=utf-8"), "{probe}");
    }

    // expire_after is bounded (it panicked the worker past chrono's range).
    let r = app
        .http
        .put(app.url("/v1/secrets/anonymous/openapi/huge"))
        .json(&serde_json::json!({"value": "v", "expire_after": 6_195_203_321_828_650u64}))
        .send()
        .await
        .expect("PUT");
    assert_eq!(r.status(), 422);
    let body = r.text().await.expect("body");
    assert!(
        body.contains("expire_after") && body.contains("315360000"),
        "{body}"
    );
    assert_eq!(app.get("/healthz").await.status(), 200);

    // The stream's position is checked before the job is looked up (204 for unknown jobs).
    let stream = format!("/v1/result/{unknown_job}/log/output/stream");
    let r = app.get(&format!("{stream}?start_fragment=-1")).await;
    assert_eq!(r.status(), 400);
    assert!(r.text().await.expect("body").contains("start_fragment"));
    let r = app
        .http
        .get(app.url(&stream))
        .header("Last-Event-ID", "x")
        .send()
        .await
        .expect("GET");
    assert_eq!(r.status(), 400);
    assert!(r.text().await.expect("body").contains("Last-Event-ID"));
    assert_eq!(app.get(&stream).await.status(), 204);

    // So is a result's job_state.
    let r = app
        .post_json(
            &format!("/v1/result/{unknown_job}"),
            &serde_json::json!({"job_state": "no-such-state"}),
        )
        .await;
    assert_eq!(r.status(), 422);
    assert!(r.text().await.expect("body").contains("job_state"));

    // Bodies and a job's sections are objects: serde would read a struct from an array.
    let r = app.post_raw("/v1/agents/data/openapi-agent", "[]").await;
    assert_eq!(r.status(), 422);
    assert!(r.text().await.expect("body").contains("JSON object"));
    let queue = app.queue("openapi-shape");
    for (field, job) in [
        (
            "reserve_data",
            serde_json::json!({"job_queue": queue, "reserve_data": [null, null]}),
        ),
        (
            "test_data",
            serde_json::json!({"job_queue": queue, "test_data": ["echo"]}),
        ),
        (
            "test_data.attachments[0]",
            serde_json::json!({"job_queue": queue, "test_data": {"attachments": [["a"]]}}),
        ),
    ] {
        let r = app.post_json("/v1/job", &job).await;
        assert_eq!(r.status(), 422, "{field}");
        let body = r.text().await.expect("body");
        assert!(body.contains(field), "{field}: {body}");
    }

    app.cleanup().await;
}
