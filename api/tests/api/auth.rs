//! Authentication, roles and permissions with auth on (`JWT_SIGNING_KEY` set), against
//! the real Redis and RabbitMQ.

use crate::helpers::TestApp;
use base64::Engine;
use reqwest::{Method, Response};
use serde_json::{Value, json};
use std::time::Duration;
use testflinger_api::settings::Redacted;
use testflinger_broker::OutgoingMessage;

pub(crate) const ADMIN: &str = "admin-of-test";
pub(crate) const ADMIN_SECRET: &str = "admin-secret-123456";
pub(crate) const SECRET: &str = "a-long-client-secret";

pub(crate) async fn auth_app(consumer: bool) -> TestApp {
    let app = TestApp::spawn_with(|s| {
        s.jwt_signing_key = Some(Redacted("test-signing-key-0123456789".into()));
        s.admin_id = ADMIN.into();
        s.admin_secret = Some(Redacted(ADMIN_SECRET.into()));
        s.submit_consumer = consumer;
    })
    .await;
    if consumer {
        let q = app.state.settings.submit_queue.clone();
        app.queues.lock().expect("lock").push(q.clone());
        app.wait_for(10, "the submit queue", || async {
            app.broker().message_count(&q).await.ok()
        })
        .await;
    }
    app
}

/// Sends a request with an optional bearer token and JSON body.
pub(crate) async fn call(
    app: &TestApp,
    method: Method,
    path: &str,
    bearer: Option<&str>,
    body: Option<Value>,
) -> Response {
    // The cookie names the agent for upstream's legacy pull (harmless elsewhere).
    let mut b = app
        .http
        .request(method, app.url(path))
        .header("Cookie", "agent_name=a");
    if let Some(t) = bearer {
        b = b.bearer_auth(t);
    }
    if let Some(v) = body {
        b = b.json(&v);
    }
    b.send().await.expect("request")
}

pub(crate) async fn token_response(app: &TestApp, id: &str, secret: &str) -> Response {
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}"));
    app.http
        .post(app.url("/v1/oauth2/token"))
        .header("Authorization", format!("Basic {basic}"))
        .send()
        .await
        .expect("token")
}

pub(crate) async fn tokens(app: &TestApp, id: &str, secret: &str) -> Value {
    let r = token_response(app, id, secret).await;
    assert_eq!(r.status(), 200, "token for {id}");
    r.json().await.expect("json")
}

pub(crate) async fn access(app: &TestApp, id: &str, secret: &str) -> String {
    tokens(app, id, secret).await["access_token"]
        .as_str()
        .expect("access_token")
        .to_string()
}

/// Creates a client with `body` (plus the common secret) as the admin.
pub(crate) async fn client(app: &TestApp, admin: &str, id: &str, mut body: Value) -> String {
    body["client_secret"] = json!(SECRET);
    let r = call(
        app,
        Method::PUT,
        &format!("/v1/client-permissions/{id}"),
        Some(admin),
        Some(body),
    )
    .await;
    assert_eq!(r.status(), 200, "create client {id}");
    assert_eq!(
        r.text().await.expect("text"),
        format!("Created permissions for client '{id}'")
    );
    access(app, id, SECRET).await
}

/// A unique agent name whose control queue (declared by the API when the agent
/// registers with auth on) is deleted at cleanup.
pub(crate) fn agent_name(app: &TestApp, tag: &str) -> String {
    let n = crate::helpers::unique(tag);
    app.queues
        .lock()
        .expect("lock")
        .push(testflinger_broker::topology::control_queue(&n));
    n
}

pub(crate) async fn submit_as(app: &TestApp, bearer: Option<&str>, job: Value) -> Response {
    call(app, Method::POST, "/v1/job", bearer, Some(job)).await
}

pub(crate) async fn job_id(r: Response) -> String {
    let status = r.status();
    let v: Value = r.json().await.expect("json");
    assert_eq!(status, 200, "{v}");
    v["job_id"].as_str().expect("job_id").to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_routes_answer_401_anonymous_and_403_to_contributors() {
    let app = auth_app(false).await;
    let admin = access(&app, ADMIN, ADMIN_SECRET).await;
    let contributor = client(&app, &admin, "contrib", json!({})).await;
    // The agent credential stands for agent "a" (the name `call` sends in its cookie),
    // which serves the queue.
    let agent = client(
        &app,
        &admin,
        "agent-1",
        json!({"role": "agent", "agent_id": "a"}),
    )
    .await;
    let q = app.queue("authq");
    app.queues
        .lock()
        .expect("lock")
        .push(testflinger_broker::topology::control_queue("a"));
    let r = call(
        &app,
        Method::POST,
        "/v1/agents/data/a",
        Some(&agent),
        Some(json!({"queues": [q]})),
    )
    .await;
    assert_eq!(r.status(), 200, "the agent registers its queue");
    let id = job_id(submit_as(&app, None, json!({"job_queue": q})).await).await;
    let tok = "0".repeat(32);
    let routes: Vec<(Method, String, Value)> = vec![
        (Method::GET, format!("/v1/job?queue={q}"), Value::Null),
        (
            Method::POST,
            format!("/v1/job/{id}/claim"),
            json!({"agent_id": "a"}),
        ),
        (
            Method::POST,
            format!("/v1/job/{id}/heartbeat"),
            json!({"agent_id": "a", "token": tok}),
        ),
        (
            Method::POST,
            format!("/v1/job/{id}/release"),
            json!({"agent_id": "a", "token": tok}),
        ),
        (
            Method::GET,
            format!("/v1/job/{id}/attachments"),
            Value::Null,
        ),
        (
            Method::POST,
            format!("/v1/result/{id}"),
            json!({"job_state": "setup"}),
        ),
        (
            Method::POST,
            format!("/v1/result/{id}/log/output"),
            json!({"fragment_number": 0, "timestamp": "2026-01-01T00:00:00Z", "phase": "test", "log_data": "x"}),
        ),
        (Method::POST, format!("/v1/result/{id}/artifact"), json!({})),
        (
            Method::POST,
            "/v1/agents/data/a".into(),
            json!({"state": "waiting"}),
        ),
        (Method::POST, "/v1/agents/queues".into(), json!({"x": "y"})),
        (Method::POST, "/v1/agents/images".into(), json!({"x": {}})),
        (
            Method::POST,
            "/v1/agents/provision_logs/a".into(),
            json!({"job_id": id, "exit_code": 0}),
        ),
    ];
    for (m, path, body) in &routes {
        let body = (!body.is_null()).then(|| body.clone());
        let anon = call(&app, m.clone(), path, None, body.clone()).await;
        assert_eq!(anon.status(), 401, "{m} {path} anonymous");
        let c = call(&app, m.clone(), path, Some(&contributor), body.clone()).await;
        assert_eq!(c.status(), 403, "{m} {path} as contributor");
        let v: Value = c.json().await.expect("json body");
        assert!(
            v["message"]
                .as_str()
                .is_some_and(|s| s.starts_with("Specified action requires role")),
            "{v}"
        );
        let a = call(&app, m.clone(), path, Some(&agent), body).await;
        assert!(
            a.status() != 401 && a.status() != 403,
            "{m} {path} as agent: {}",
            a.status()
        );
    }
    // Upstream agents' events relay: agents only. (As an agent, the post is judged on
    // its content: this job has no webhook, so the role check passed when the answer
    // is about the webhook.)
    let events = format!("/v1/job/{id}/events");
    let body = json!({"job_status_webhook": "http://127.0.0.1:9/hook", "events": []});
    let anon = call(&app, Method::POST, &events, None, Some(body.clone())).await;
    assert_eq!(anon.status(), 401, "events anonymous");
    let c = call(
        &app,
        Method::POST,
        &events,
        Some(&contributor),
        Some(body.clone()),
    )
    .await;
    assert_eq!(c.status(), 403, "events as contributor");
    let v: Value = c.json().await.expect("json body");
    assert!(
        v["message"]
            .as_str()
            .is_some_and(|s| s.starts_with("Specified action requires role")),
        "{v}"
    );
    let a = call(&app, Method::POST, &events, Some(&agent), Some(body)).await;
    assert_ne!(a.status(), 401, "events as agent");
    let text = a.text().await.unwrap_or_default();
    assert!(
        text.contains("job_status_webhook") && !text.contains("Specified action requires role"),
        "events as agent: {text}"
    );
    // A token that does not verify is a 403, as upstream.
    let bad = call(
        &app,
        Method::POST,
        "/v1/job",
        Some("not.a.jwt"),
        Some(json!({"job_queue": q})),
    )
    .await;
    assert_eq!(bad.status(), 403);
    // Reads stay open to anonymous callers.
    assert_eq!(app.get(&format!("/v1/job/{id}")).await.status(), 200);
    assert_eq!(app.get(&format!("/v1/result/{id}")).await.status(), 200);
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn token_refresh_and_revoke() {
    let app = auth_app(false).await;
    let t = tokens(&app, ADMIN, ADMIN_SECRET).await;
    assert_eq!(t["token_type"], "Bearer");
    assert_eq!(t["expires_in"], 600);
    let refresh = t["refresh_token"].as_str().expect("refresh").to_string();
    assert_eq!(refresh.len(), 64);
    // Wrong secret, unknown client, no header: 401 plain text.
    for r in [
        token_response(&app, ADMIN, "wrong-secret-000000").await,
        token_response(&app, "nobody", SECRET).await,
        app.http
            .post(app.url("/v1/oauth2/token"))
            .send()
            .await
            .expect("post"),
    ] {
        assert_eq!(r.status(), 401);
        assert!(
            r.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/plain")
        );
    }
    // Refresh gives a working access token, without a new refresh token.
    let r = call(
        &app,
        Method::POST,
        "/v1/oauth2/refresh",
        None,
        Some(json!({"refresh_token": refresh})),
    )
    .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.expect("json");
    assert!(v.get("refresh_token").is_none());
    let fresh = v["access_token"].as_str().expect("access").to_string();
    let r = call(
        &app,
        Method::GET,
        "/v1/client-permissions",
        Some(&fresh),
        None,
    )
    .await;
    assert_eq!(r.status(), 200);
    let list: Value = r.json().await.expect("json");
    assert_eq!(list[0]["client_id"], ADMIN);
    assert_eq!(list[0]["role"], "admin");
    // Only an admin revokes.
    let admin = fresh;
    let contributor = client(&app, &admin, "plain", json!({})).await;
    let body = json!({"refresh_token": refresh});
    let r = call(
        &app,
        Method::POST,
        "/v1/oauth2/revoke",
        Some(&contributor),
        Some(body.clone()),
    )
    .await;
    assert_eq!(r.status(), 403);
    let r = call(
        &app,
        Method::POST,
        "/v1/oauth2/revoke",
        None,
        Some(body.clone()),
    )
    .await;
    assert_eq!(r.status(), 401);
    let r = call(
        &app,
        Method::POST,
        "/v1/oauth2/revoke",
        Some(&admin),
        Some(body.clone()),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.json::<Value>().await.expect("json"),
        json!({"status": "OK"})
    );
    // Revoked: refresh and a second revoke answer 400.
    let r = call(
        &app,
        Method::POST,
        "/v1/oauth2/refresh",
        None,
        Some(body.clone()),
    )
    .await;
    assert_eq!(r.status(), 400);
    let r = call(
        &app,
        Method::POST,
        "/v1/oauth2/revoke",
        Some(&admin),
        Some(body),
    )
    .await;
    assert_eq!(r.status(), 400);
    // The refresh token is stored hashed: its text is nowhere in Redis.
    let mut c = app.state.store.con();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}:*", app.prefix))
        .query_async(&mut c)
        .await
        .expect("keys");
    assert!(keys.iter().all(|k| !k.contains(&refresh)));
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn client_permissions_are_managed_by_role() {
    let app = auth_app(false).await;
    let admin = access(&app, ADMIN, ADMIN_SECRET).await;
    let manager = client(&app, &admin, "mgr", json!({"role": "manager"})).await;
    // A short secret is refused with the field named.
    let r = call(
        &app,
        Method::PUT,
        "/v1/client-permissions/short",
        Some(&manager),
        Some(json!({"client_secret": "short"})),
    )
    .await;
    assert_eq!(r.status(), 422);
    assert!(r.text().await.expect("text").contains("client_secret"));
    // A manager cannot create an admin, nor edit the bootstrap admin, nor delete.
    let r = call(
        &app,
        Method::PUT,
        "/v1/client-permissions/boss",
        Some(&manager),
        Some(json!({"client_secret": SECRET, "role": "admin"})),
    )
    .await;
    assert_eq!(r.status(), 403);
    let r = call(
        &app,
        Method::PUT,
        &format!("/v1/client-permissions/{ADMIN}"),
        Some(&admin),
        Some(json!({"max_priority": {"*": 1}})),
    )
    .await;
    assert_eq!(r.status(), 422);
    let r = call(&app, Method::PUT, "/v1/client-permissions/ci", Some(&manager), Some(json!({"client_secret": SECRET, "max_priority": {"*": 5}, "max_reservation_time": {"q": 90000}}))).await;
    assert_eq!(r.status(), 200);
    let r = call(
        &app,
        Method::PUT,
        "/v1/client-permissions/ci",
        Some(&manager),
        Some(json!({"email": "ci@example.com"})),
    )
    .await;
    assert_eq!(
        r.text().await.expect("text"),
        "Updated permissions for client 'ci'"
    );
    let r = call(
        &app,
        Method::GET,
        "/v1/client-permissions/ci",
        Some(&manager),
        None,
    )
    .await;
    assert_eq!(
        r.json::<Value>().await.expect("json"),
        json!({"client_id": "ci", "role": "contributor", "max_priority": {"*": 5},
               "allowed_queues": [], "max_reservation_time": {"q": 90000}, "email": "ci@example.com"})
    );
    let r = call(
        &app,
        Method::DELETE,
        "/v1/client-permissions/ci",
        Some(&manager),
        None,
    )
    .await;
    assert_eq!(r.status(), 403);
    let r = call(
        &app,
        Method::DELETE,
        "/v1/client-permissions/ci",
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(r.status(), 200);
    let r = call(
        &app,
        Method::GET,
        "/v1/client-permissions/ci",
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(r.status(), 404);
    assert_eq!(token_response(&app, "ci", SECRET).await.status(), 401);
    let r = call(
        &app,
        Method::DELETE,
        &format!("/v1/client-permissions/{ADMIN}"),
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(r.status(), 422);
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn submissions_are_checked_for_priority_reservation_and_restricted_queues() {
    let app = auth_app(true).await;
    let admin = access(&app, ADMIN, ADMIN_SECRET).await;
    let plain = client(&app, &admin, "plain", json!({})).await;
    let vip = client(
        &app,
        &admin,
        "vip",
        json!({"max_priority": {"*": 10}, "max_reservation_time": {"*": 86400}}),
    )
    .await;
    let name = agent_name(&app, "rq-agent");
    let agent = client(
        &app,
        &admin,
        "agent-2",
        json!({"role": "agent", "agent_id": name}),
    )
    .await;
    let q = app.queue("perm");
    // Priority: anonymous 401, not allowed 403, allowed 200.
    let job = json!({"job_queue": q, "job_priority": 5});
    assert_eq!(submit_as(&app, None, job.clone()).await.status(), 401);
    assert_eq!(
        submit_as(&app, Some(&plain), job.clone()).await.status(),
        403
    );
    job_id(submit_as(&app, Some(&vip), job).await).await;
    let too_high = json!({"job_queue": q, "job_priority": 11});
    assert_eq!(submit_as(&app, Some(&vip), too_high).await.status(), 403);
    // Reservations: up to 6 h for anyone, longer with a permission.
    let six = json!({"job_queue": q, "reserve_data": {"timeout": 21600}});
    job_id(submit_as(&app, None, six).await).await;
    let seven = json!({"job_queue": q, "reserve_data": {"timeout": 25200}});
    assert_eq!(submit_as(&app, None, seven.clone()).await.status(), 401);
    assert_eq!(
        submit_as(&app, Some(&plain), seven.clone()).await.status(),
        403
    );
    job_id(submit_as(&app, Some(&vip), seven).await).await;
    // A restricted queue: only its owner submits (HTTP).
    let rq = app.queue("restricted");
    let r = call(
        &app,
        Method::POST,
        &format!("/v1/restricted-queues/{rq}"),
        Some(&admin),
        Some(json!({"client_id": "vip"})),
    )
    .await;
    assert_eq!(r.status(), 404, "no agent serves the queue yet");
    let r = call(
        &app,
        Method::POST,
        &format!("/v1/agents/data/{name}"),
        Some(&agent),
        Some(json!({"queues": [rq]})),
    )
    .await;
    assert_eq!(r.status(), 200);
    let r = call(
        &app,
        Method::POST,
        &format!("/v1/restricted-queues/{rq}"),
        Some(&plain),
        Some(json!({"client_id": "vip"})),
    )
    .await;
    assert_eq!(r.status(), 403);
    let r = call(
        &app,
        Method::POST,
        &format!("/v1/restricted-queues/{rq}"),
        Some(&admin),
        Some(json!({"client_id": "vip"})),
    )
    .await;
    assert_eq!(r.status(), 200);
    let r = app.get(&format!("/v1/restricted-queues/{rq}")).await;
    assert_eq!(
        r.json::<Value>().await.expect("json"),
        json!({"queue": rq, "owners": ["vip"]})
    );
    // The permission is in the token: vip takes a new one.
    let vip = access(&app, "vip", SECRET).await;
    let job = json!({"job_queue": rq});
    assert_eq!(submit_as(&app, None, job.clone()).await.status(), 401);
    assert_eq!(
        submit_as(&app, Some(&plain), job.clone()).await.status(),
        403
    );
    job_id(submit_as(&app, Some(&vip), job.clone()).await).await;
    // The same over the broker: anonymous without a header, vip with its token.
    let (reply_to, mut replies) = app.broker().reply_queue().await.expect("reply queue");
    let body = job.to_string();
    for (corr, bearer) in [("anon", None), ("plain", Some(&plain)), ("vip", Some(&vip))] {
        let header = bearer.map(|t| format!("Bearer {t}"));
        let mut headers = Vec::new();
        if let Some(h) = header {
            headers.push(("Authorization", h));
        }
        app.broker()
            .publish(OutgoingMessage {
                routing_key: &app.state.settings.submit_queue,
                body: body.as_bytes(),
                correlation_id: Some(corr),
                reply_to: Some(&reply_to),
                content_type: Some("application/json"),
                persistent: true,
                headers,
                ..OutgoingMessage::default()
            })
            .await
            .expect("publish");
        let m = tokio::time::timeout(Duration::from_secs(10), replies.next())
            .await
            .expect("a reply in time")
            .expect("open")
            .expect("message");
        let v: Value = serde_json::from_slice(&m.body).expect("json");
        assert_eq!(m.correlation_id.as_deref(), Some(corr));
        if corr == "vip" {
            assert!(v["job_id"].is_string(), "{v}");
        } else {
            assert!(
                v["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("restricted")),
                "{corr}: {v}"
            );
        }
    }
    // Lifting the restriction opens the queue again.
    let r = call(
        &app,
        Method::DELETE,
        &format!("/v1/restricted-queues/{rq}"),
        Some(&admin),
        Some(json!({"client_id": "vip"})),
    )
    .await;
    assert_eq!(r.status(), 200);
    job_id(submit_as(&app, Some(&plain), job).await).await;
    let r = call(
        &app,
        Method::DELETE,
        &format!("/v1/restricted-queues/{rq}"),
        Some(&admin),
        Some(json!({"client_id": "vip"})),
    )
    .await;
    assert_eq!(r.status(), 404);
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn only_the_owner_a_manager_or_an_admin_cancels_an_owned_job() {
    let app = auth_app(false).await;
    let admin = access(&app, ADMIN, ADMIN_SECRET).await;
    let alice = client(&app, &admin, "alice", json!({})).await;
    let bob = client(&app, &admin, "bob", json!({})).await;
    let q = app.queue("owner");
    let cancel = json!({"action": "cancel"});
    let id = job_id(submit_as(&app, Some(&alice), json!({"job_queue": q})).await).await;
    let path = format!("/v1/job/{id}/action");
    assert_eq!(
        call(&app, Method::POST, &path, None, Some(cancel.clone()))
            .await
            .status(),
        401
    );
    assert_eq!(
        call(&app, Method::POST, &path, Some(&bob), Some(cancel.clone()))
            .await
            .status(),
        403
    );
    assert_eq!(
        call(
            &app,
            Method::POST,
            &path,
            Some(&alice),
            Some(cancel.clone())
        )
        .await
        .status(),
        200
    );
    // The web UI's cancel form decides as the API's cancel does.
    let id = job_id(submit_as(&app, Some(&alice), json!({"job_queue": q})).await).await;
    let form = format!("/jobs/{id}/cancel");
    assert_eq!(
        call(&app, Method::POST, &form, None, None).await.status(),
        401,
        "UI cancel anonymous"
    );
    assert_eq!(
        call(&app, Method::POST, &form, Some(&bob), None)
            .await
            .status(),
        403,
        "UI cancel as another contributor"
    );
    assert_eq!(
        app.get(&format!("/v1/result/{id}"))
            .await
            .json::<Value>()
            .await
            .expect("json")["job_state"],
        "waiting"
    );
    // 303 to the job page (the test client follows it).
    let r = call(&app, Method::POST, &form, Some(&alice), None).await;
    assert_eq!(r.status(), 200, "UI cancel as the owner");
    assert_eq!(
        r.url().path(),
        format!("/jobs/{id}"),
        "redirected to the job page"
    );
    assert_eq!(
        app.get(&format!("/v1/result/{id}"))
            .await
            .json::<Value>()
            .await
            .expect("json")["job_state"],
        "cancelled"
    );
    let id = job_id(submit_as(&app, Some(&alice), json!({"job_queue": q})).await).await;
    let path = format!("/v1/job/{id}/action");
    assert_eq!(
        call(
            &app,
            Method::POST,
            &path,
            Some(&admin),
            Some(cancel.clone())
        )
        .await
        .status(),
        200
    );
    // An anonymous job stays cancellable by anyone, as upstream.
    let id = job_id(submit_as(&app, None, json!({"job_queue": q})).await).await;
    let path = format!("/v1/job/{id}/action");
    assert_eq!(
        call(&app, Method::POST, &path, Some(&bob), Some(cancel))
            .await
            .status(),
        200
    );
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn secrets_are_namespaced_by_the_authenticated_client() {
    let app = auth_app(false).await;
    let admin = access(&app, ADMIN, ADMIN_SECRET).await;
    let alice = client(&app, &admin, "alice", json!({})).await;
    let bob = client(&app, &admin, "bob", json!({})).await;
    let sec_agent = agent_name(&app, "sec-agent");
    let agent = client(
        &app,
        &admin,
        "agent-3",
        json!({"role": "agent", "agent_id": sec_agent}),
    )
    .await;
    let value = json!({"value": "alice-secret-value"});
    let r = call(
        &app,
        Method::PUT,
        "/v1/secrets/alice/db/pw",
        None,
        Some(value.clone()),
    )
    .await;
    assert_eq!(r.status(), 401);
    let r = call(
        &app,
        Method::PUT,
        "/v1/secrets/alice/db/pw",
        Some(&bob),
        Some(value.clone()),
    )
    .await;
    assert_eq!(r.status(), 403);
    let r = call(
        &app,
        Method::PUT,
        "/v1/secrets/alice/db/pw",
        Some(&alice),
        Some(value),
    )
    .await;
    assert_eq!(r.status(), 200);
    let q = app.queue("secrets");
    let job =
        json!({"job_queue": q, "test_data": {"test_cmds": "true", "secrets": {"PW": "db/pw"}}});
    // Bob cannot name Alice's secrets; anonymous callers cannot use secrets at all.
    let r = submit_as(&app, Some(&bob), job.clone()).await;
    assert_eq!(r.status(), 422);
    assert!(
        r.text()
            .await
            .expect("text")
            .contains("Inaccessible secret paths: db/pw")
    );
    assert_eq!(submit_as(&app, None, job.clone()).await.status(), 422);
    let id = job_id(submit_as(&app, Some(&alice), job).await).await;
    let r = call(
        &app,
        Method::POST,
        &format!("/v1/agents/data/{sec_agent}"),
        Some(&agent),
        Some(json!({"queues": [q]})),
    )
    .await;
    assert_eq!(r.status(), 200, "the agent registers its queue");
    let r = call(
        &app,
        Method::POST,
        &format!("/v1/job/{id}/claim"),
        Some(&agent),
        Some(json!({"agent_id": sec_agent})),
    )
    .await;
    let claim: Value = r.json().await.expect("json");
    assert_eq!(
        claim["job"]["test_data"]["secrets"]["PW"],
        "alice-secret-value"
    );
    // The token is 32 hex digits.
    let t = claim["token"].as_str().expect("token");
    assert_eq!(t.len(), 32);
    assert!(t.bytes().all(|b| b.is_ascii_hexdigit()));
    app.cleanup().await;
}

/// Answers every request with `status_line` and `extra` headers; counts requests.
fn fixed_server(
    status_line: &'static str,
    extra: String,
) -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::{BufRead, BufReader, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let h = hits.clone();
    std::thread::spawn(move || {
        for stream in l.incoming().flatten() {
            h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut r = BufReader::new(stream);
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
            }
            let _ = r.get_mut().write_all(
                format!("{status_line}\r\n{extra}content-length: 0\r\nconnection: close\r\n\r\n")
                    .as_bytes(),
            );
        }
    });
    (port, hits)
}

#[tokio::test(flavor = "multi_thread")]
async fn webhooks_follow_no_redirects() {
    // The allowed host redirects to one that is not allowed: the second is never called.
    let (target, target_hits) = fixed_server("HTTP/1.1 200 OK", String::new());
    let (hook, hook_hits) = fixed_server(
        "HTTP/1.1 307 Temporary Redirect",
        format!("location: http://127.0.0.1:{target}/stolen\r\n"),
    );
    let app = TestApp::spawn_with(|s| s.webhook_allowed_hosts = format!("127.0.0.1:{hook}")).await;
    let q = app.queue("redirect");
    app.submit(
        json!({"job_queue": q, "job_status_webhook": format!("http://127.0.0.1:{hook}/hook")}),
    )
    .await;
    app.wait_for(10, "the webhook call", || async {
        (hook_hits.load(std::sync::atomic::Ordering::SeqCst) > 0).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(target_hits.load(std::sync::atomic::Ordering::SeqCst), 0);
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn webhooks_follow_no_302_redirect() {
    // A 302 from the allowed host to another local server: the second is never called.
    let (target, target_hits) = fixed_server("HTTP/1.1 200 OK", String::new());
    let (hook, hook_hits) = fixed_server(
        "HTTP/1.1 302 Found",
        format!("location: http://127.0.0.1:{target}/stolen\r\n"),
    );
    let app = TestApp::spawn_with(|s| s.webhook_allowed_hosts = format!("127.0.0.1:{hook}")).await;
    let q = app.queue("redirect302");
    app.submit(
        json!({"job_queue": q, "job_status_webhook": format!("http://127.0.0.1:{hook}/hook")}),
    )
    .await;
    app.wait_for(10, "the webhook call", || async {
        (hook_hits.load(std::sync::atomic::Ordering::SeqCst) > 0).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(target_hits.load(std::sync::atomic::Ordering::SeqCst), 0);
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_allowed_webhook_host_name_that_resolves_to_a_blocked_address_is_not_called() {
    // `localhost` is in the allow-list but resolves to 127.0.0.1, a loopback address
    // (TESTFLINGER_WEBHOOK_BLOCKED_NETS): the call is never made.
    let (hook, hits) = fixed_server("HTTP/1.1 200 OK", String::new());
    let url = format!("http://localhost:{hook}/hook");
    let app = TestApp::spawn_with(|s| s.webhook_allowed_hosts = format!("localhost:{hook}")).await;
    let q = app.queue("rebind");
    app.submit(json!({"job_queue": q, "job_status_webhook": url}))
        .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        hits.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "a host name resolving to a blocked address was called"
    );
    app.cleanup().await;
    // The same job with the address itself in the allow-list is delivered: the refusal
    // above was the resolved-address check, not a broken URL.
    let app = TestApp::spawn_with(|s| {
        s.webhook_allowed_hosts = format!("localhost:{hook},127.0.0.1:{hook}")
    })
    .await;
    let q = app.queue("rebind-ok");
    app.submit(json!({"job_queue": q, "job_status_webhook": url}))
        .await;
    app.wait_for(10, "the webhook call", || async {
        (hits.load(std::sync::atomic::Ordering::SeqCst) > 0).then_some(())
    })
    .await;
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_allow_listed_address_with_a_port_is_exempt_on_that_port_only() {
    // The allow-list names 127.0.0.1 with the port of one receiver, and `localhost`
    // (which resolves to 127.0.0.1, a blocked address) without a port. A webhook to
    // `localhost` on another port must not reach 127.0.0.1 through the first entry.
    let (listed, listed_hits) = fixed_server("HTTP/1.1 200 OK", String::new());
    let (other, other_hits) = fixed_server("HTTP/1.1 200 OK", String::new());
    let app =
        TestApp::spawn_with(|s| s.webhook_allowed_hosts = format!("127.0.0.1:{listed},localhost"))
            .await;
    let q = app.queue("port");
    app.submit(
        json!({"job_queue": q, "job_status_webhook": format!("http://localhost:{other}/hook")}),
    )
    .await;
    // The listed port through the name is delivered (the check is per port, not off).
    app.submit(
        json!({"job_queue": q, "job_status_webhook": format!("http://localhost:{listed}/hook")}),
    )
    .await;
    app.wait_for(10, "the call to the listed port", || async {
        (listed_hits.load(std::sync::atomic::Ordering::SeqCst) > 0).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        other_hits.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "a host name reached a blocked address on a port the allow-list does not name for it"
    );
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_submit_to_an_unregistered_queue_creates_no_broker_queue_until_an_agent_serves_it() {
    let app = auth_app(false).await;
    let admin = access(&app, ADMIN, ADMIN_SECRET).await;
    let name = agent_name(&app, "reg-agent");
    let agent = client(
        &app,
        &admin,
        "agent-4",
        json!({"role": "agent", "agent_id": name}),
    )
    .await;
    let q = app.queue("unregistered");
    let id = job_id(submit_as(&app, None, json!({"job_queue": q})).await).await;
    assert_eq!(app.result(&id).await["job_state"], "waiting");
    // Several reaper and reconciler passes later, the broker still has no such queue.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        app.broker().message_count(&q).await.is_err(),
        "a broker queue was declared for an unregistered name"
    );
    // An agent registers the queue: the job is published to a new broker queue.
    let r = call(
        &app,
        Method::POST,
        &format!("/v1/agents/data/{name}"),
        Some(&agent),
        Some(json!({"queues": [q]})),
    )
    .await;
    assert_eq!(r.status(), 200);
    app.wait_for(15, "the parked job to be published", || async {
        (app.broker().message_count(&q).await.ok()? == 1).then_some(())
    })
    .await;
    app.cleanup().await;
}
