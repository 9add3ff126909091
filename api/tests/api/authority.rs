//! Least authority with auth on (DESIGN.md "Who may do what"): an agent credential acts
//! only as its own agent, for the jobs it holds; tokens end when their client is deleted
//! or changed; logins cannot be used to attack; a stale holder's write is never applied.

use crate::auth::{
    ADMIN, ADMIN_SECRET, SECRET, access, agent_name, auth_app, call, client, job_id, submit_as,
    token_response, tokens,
};
use crate::helpers::TestApp;
use reqwest::Method;
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use testflinger_api::settings::Redacted;

/// An agent client standing for a fresh agent that registered `queues`; returns the
/// agent's name and its access token.
async fn agent(app: &TestApp, admin: &str, tag: &str, queues: &[&str]) -> (String, String) {
    let name = agent_name(app, tag);
    let token = client(app, admin, &name, json!({"role": "agent"})).await;
    let r = call(
        app,
        Method::POST,
        &format!("/v1/agents/data/{name}"),
        Some(&token),
        Some(json!({"queues": queues, "state": "waiting"})),
    )
    .await;
    assert_eq!(r.status(), 200, "agent {name} registers");
    (name, token)
}

async fn message(r: reqwest::Response) -> (u16, String) {
    let status = r.status().as_u16();
    (status, r.text().await.unwrap_or_default())
}

/// The status of a bodiless request with an optional bearer token.
async fn status_of(app: &TestApp, method: Method, path: &str, bearer: Option<&str>) -> u16 {
    call(app, method, path, bearer, None)
        .await
        .status()
        .as_u16()
}

async fn job_state(app: &TestApp, id: &str) -> Value {
    app.result(id).await
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_acts_only_as_itself_on_its_own_queues_and_jobs() {
    let app = auth_app(false).await;
    let admin = access(&app, ADMIN, ADMIN_SECRET).await;
    let q = app.queue("own");
    let restricted = app.queue("restricted");
    let (a, a_tok) = agent(&app, &admin, "dev-a", &[&q]).await;
    let (b, b_tok) = agent(&app, &admin, "dev-b", &[&restricted]).await;
    let alice = client(&app, &admin, "alice", json!({})).await;
    let r = call(
        &app,
        Method::PUT,
        "/v1/secrets/alice/db/pw",
        Some(&alice),
        Some(json!({"value": "alice-secret"})),
    )
    .await;
    assert_eq!(r.status(), 200);

    // A job on a queue agent B does not serve: B's claim by id is refused, job unchanged.
    let job =
        json!({"job_queue": q, "test_data": {"test_cmds": "true", "secrets": {"PW": "db/pw"}}});
    let id = job_id(submit_as(&app, Some(&alice), job).await).await;
    let (status, body) = message(
        call(
            &app,
            Method::POST,
            &format!("/v1/job/{id}/claim"),
            Some(&b_tok),
            Some(json!({"agent_id": b})),
        )
        .await,
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("may not serve"), "{body}");
    assert!(!body.contains("alice-secret"), "{body}");
    assert_eq!(job_state(&app, &id).await["job_state"], "waiting");
    // Nor under a made-up or another agent's id.
    for fake in ["made-up-agent", a.as_str()] {
        let (status, body) = message(
            call(
                &app,
                Method::POST,
                &format!("/v1/job/{id}/claim"),
                Some(&b_tok),
                Some(json!({"agent_id": fake})),
            )
            .await,
        )
        .await;
        assert_eq!(status, 403, "claim as {fake}: {body}");
        assert!(!body.contains("alice-secret"), "{body}");
    }
    assert_eq!(job_state(&app, &id).await["job_state"], "waiting");
    // Upstream's pull by queue: B may not ask for A's queue, nor as A (cookie).
    let r = app
        .http
        .get(app.url(&format!("/v1/job?queue={q}")))
        .header("Cookie", format!("agent_name={b}"))
        .bearer_auth(&b_tok)
        .send()
        .await
        .expect("poll");
    assert_eq!(r.status(), 403);
    let r = app
        .http
        .get(app.url(&format!("/v1/job?queue={q}")))
        .header("Cookie", format!("agent_name={a}"))
        .bearer_auth(&b_tok)
        .send()
        .await
        .expect("poll");
    assert_eq!(r.status(), 403);
    assert_eq!(job_state(&app, &id).await["job_state"], "waiting");

    // A claims it: the secret goes to A, the holder.
    let r = call(
        &app,
        Method::POST,
        &format!("/v1/job/{id}/claim"),
        Some(&a_tok),
        Some(json!({"agent_id": a})),
    )
    .await;
    assert_eq!(r.status(), 200);
    let claim: Value = r.json().await.expect("json");
    assert_eq!(claim["outcome"], "granted");
    assert_eq!(claim["job"]["test_data"]["secrets"]["PW"], "alice-secret");
    let token = claim["token"].as_str().expect("token").to_string();
    // Another agent of the same queue asking for the job A holds gets no grant and no
    // secret: the grant (and its secrets) is the lease holder's, for its attempt.
    let (c, c_tok) = agent(&app, &admin, "dev-c", &[&q]).await;
    let r = call(
        &app,
        Method::POST,
        &format!("/v1/job/{id}/claim"),
        Some(&c_tok),
        Some(json!({"agent_id": c})),
    )
    .await;
    assert_eq!(r.status(), 200);
    let other: Value = r.json().await.expect("json");
    assert_eq!(other["outcome"], "owned", "{other}");
    assert!(other.get("job").is_none_or(Value::is_null), "{other}");
    assert!(!other.to_string().contains("alice-secret"), "{other}");
    // B, even with A's token (leaked), writes nothing about A's job and reads neither
    // its secrets nor its attachments.
    let writes: Vec<(String, Value)> = vec![
        (
            format!("/v1/job/{id}/heartbeat"),
            json!({"agent_id": b, "token": token}),
        ),
        (
            format!("/v1/job/{id}/release"),
            json!({"agent_id": b, "token": token}),
        ),
        (
            format!("/v1/result/{id}"),
            json!({"job_state": "setup", "status": {"setup": 9}}),
        ),
        (
            format!("/v1/result/{id}/log/output"),
            json!({"fragment_number": 0, "timestamp": "2026-01-01T00:00:00Z", "phase": "setup", "log_data": "forged"}),
        ),
    ];
    for (path, body) in &writes {
        let r = app
            .http
            .post(app.url(path))
            .bearer_auth(&b_tok)
            .header("X-Testflinger-Token", &token)
            .json(body)
            .send()
            .await
            .expect("write");
        let (status, text) = message(r).await;
        assert_eq!(status, 403, "{path}: {text}");
    }
    let r = call(
        &app,
        Method::POST,
        &format!("/v1/job/{id}/claim"),
        Some(&b_tok),
        Some(json!({"agent_id": b})),
    )
    .await;
    assert_eq!(
        r.status(),
        403,
        "B cannot re-read the grant (secrets) of A's attempt"
    );
    assert_eq!(
        status_of(
            &app,
            Method::GET,
            &format!("/v1/job/{id}/attachments"),
            Some(&b_tok)
        )
        .await,
        403
    );
    let res = job_state(&app, &id).await;
    assert_eq!(res["job_state"], "running", "{res}");
    assert!(res.get("setup_status").is_none(), "{res}");
    assert!(
        res.get("setup_output")
            .is_none_or(|o| !o.as_str().unwrap_or("").contains("forged")),
        "{res}"
    );
    // A itself can.
    let r = app
        .http
        .post(app.url(&format!("/v1/result/{id}")))
        .bearer_auth(&a_tok)
        .header("X-Testflinger-Token", &token)
        .json(&json!({"job_state": "setup"}))
        .send()
        .await
        .expect("write");
    assert_eq!(r.status(), 200);

    // Another agent's record: B cannot put A in maintenance; A's record is unchanged.
    for path in [
        format!("/v1/agents/data/{a}"),
        format!("/v1/agents/provision_logs/{a}"),
    ] {
        let body = if path.contains("provision") {
            json!({"job_id": id, "exit_code": 1})
        } else {
            json!({"state": "maintenance", "comment": "hijacked"})
        };
        let (status, text) =
            message(call(&app, Method::POST, &path, Some(&b_tok), Some(body)).await).await;
        assert_eq!(status, 403, "{path}: {text}");
    }
    let rec: Value = app
        .get(&format!("/v1/agents/data/{a}"))
        .await
        .json()
        .await
        .expect("json");
    assert_ne!(rec["state"], "maintenance", "{rec}");
    assert!(rec.get("provision_streak_type").is_none(), "{rec}");
    // An admin may; queues an admin set bound what the agent registers.
    let r = call(
        &app,
        Method::PUT,
        &format!("/v1/client-permissions/{b}"),
        Some(&admin),
        Some(json!({"agent_queues": [restricted]})),
    )
    .await;
    assert_eq!(r.status(), 200);
    let b_tok = access(&app, &b, SECRET).await;
    let r = call(
        &app,
        Method::POST,
        &format!("/v1/agents/data/{b}"),
        Some(&b_tok),
        Some(json!({"queues": [restricted, q]})),
    )
    .await;
    assert_eq!(
        r.status(),
        403,
        "B registers a queue outside its agent_queues"
    );
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn deleting_or_changing_a_client_ends_its_tokens_at_once() {
    let app = auth_app(false).await;
    let admin = access(&app, ADMIN, ADMIN_SECRET).await;
    let manager = client(&app, &admin, "boss", json!({"role": "manager"})).await;
    let t = tokens(&app, "boss", SECRET).await;
    let refresh = t["refresh_token"].as_str().expect("refresh").to_string();
    assert_eq!(
        status_of(&app, Method::GET, "/v1/client-permissions", Some(&manager)).await,
        200
    );
    // Deleted: its access token no longer lists clients, its refresh token is dead.
    assert_eq!(
        status_of(
            &app,
            Method::DELETE,
            "/v1/client-permissions/boss",
            Some(&admin)
        )
        .await,
        200
    );
    assert_eq!(
        status_of(&app, Method::GET, "/v1/client-permissions", Some(&manager)).await,
        401
    );
    let refresh_with = |tok: String| {
        let app = &app;
        async move {
            app.http
                .post(app.url("/v1/oauth2/refresh"))
                .json(&json!({"refresh_token": tok}))
                .send()
                .await
                .expect("refresh")
                .status()
        }
    };
    assert_eq!(refresh_with(refresh.clone()).await, 400);
    // Re-created under the same id: the old tokens stay dead; new ones work.
    let fresh = client(&app, &admin, "boss", json!({"role": "manager"})).await;
    let r = call(
        &app,
        Method::GET,
        "/v1/client-permissions",
        Some(&manager),
        None,
    )
    .await;
    assert_eq!(
        r.status(),
        401,
        "an old access token revived by a re-created id"
    );
    assert_eq!(
        refresh_with(refresh).await,
        400,
        "an old refresh token revived"
    );
    assert_eq!(
        status_of(&app, Method::GET, "/v1/client-permissions", Some(&fresh)).await,
        200
    );
    // Changed (here demoted): its tokens end at once.
    let t = tokens(&app, "boss", SECRET).await;
    let r = call(
        &app,
        Method::PUT,
        "/v1/client-permissions/boss",
        Some(&admin),
        Some(json!({"role": "contributor"})),
    )
    .await;
    assert_eq!(r.status(), 200);
    let old = t["access_token"].as_str().expect("access").to_string();
    assert_eq!(
        status_of(&app, Method::GET, "/v1/client-permissions", Some(&old)).await,
        401
    );
    let refresh = t["refresh_token"].as_str().expect("refresh").to_string();
    assert_eq!(refresh_with(refresh).await, 400);
    app.cleanup().await;
}

/// The login tests measure time spent hashing: they run one at a time.
static HASHING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A login from `source` (a loopback address of this machine).
async fn login_from(app: &TestApp, source: &str, id: &str, secret: &str) -> reqwest::Response {
    use base64::Engine;
    let http = reqwest::Client::builder()
        .local_address(source.parse::<std::net::IpAddr>().expect("address"))
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}"));
    http.post(app.url("/v1/oauth2/token"))
        .header("Authorization", format!("Basic {basic}"))
        .send()
        .await
        .expect("login")
}

/// One flood of 16 parallel guessers (10 guesses each, at client `victim`, from
/// `from`) with a good login of `good` from `good_from` in the middle: checks every
/// guess is answered 401 or 429 (with `Retry-After`), at least 130 with 429, and returns
/// how long the good login took.
async fn flood_with_a_good_login(
    app: &TestApp,
    victim: &str,
    from: &str,
    good: &str,
    good_from: &str,
) -> Duration {
    let mut flood = Vec::new();
    for g in 0..16 {
        let base = app.base.clone();
        let (victim, from) = (victim.to_string(), from.to_string());
        flood.push(tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .local_address(from.parse::<std::net::IpAddr>().expect("address"))
                .build()
                .expect("client");
            let mut statuses = Vec::new();
            for i in 0..10 {
                use base64::Engine;
                let basic = base64::engine::general_purpose::STANDARD
                    .encode(format!("{victim}:wrong-guess-{g}-{i}"));
                let r = http
                    .post(format!("{base}/v1/oauth2/token"))
                    .header("Authorization", format!("Basic {basic}"))
                    .send()
                    .await
                    .expect("guess");
                if r.status() == 429 {
                    assert!(
                        r.headers().get("retry-after").is_some(),
                        "429 without Retry-After"
                    );
                }
                statuses.push(r.status().as_u16());
            }
            statuses
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let start = Instant::now();
    let r = login_from(app, good_from, good, SECRET).await;
    let took = start.elapsed();
    assert_eq!(r.status(), 200);
    let mut all = Vec::new();
    for f in flood {
        all.extend(f.await.expect("guesser"));
    }
    let limited = all.iter().filter(|s| **s == 429).count();
    assert!(all.iter().all(|s| *s == 401 || *s == 429), "{all:?}");
    assert!(
        limited >= 130,
        "only {limited} of {} guesses answered 429",
        all.len()
    );
    took
}

#[tokio::test(flavor = "multi_thread")]
async fn a_login_flood_is_answered_429_while_a_good_login_stays_fast() {
    let _one = HASHING.lock().await;
    let app = auth_app(false).await;
    let admin = access(&app, ADMIN, ADMIN_SECRET).await;
    // The other tests of this binary share the machine's two cores: a round whose good
    // login was slowed by them is tried again (at most three rounds, each a new flood
    // from a new address at a new victim); the flood must be refused in every round.
    let mut took = Vec::new();
    for round in 1..=3 {
        let (victim, good) = (format!("victim-{round}"), format!("good-{round}"));
        client(&app, &admin, &victim, json!({})).await;
        client(&app, &admin, &good, json!({})).await;
        let t = flood_with_a_good_login(
            &app,
            &victim,
            &format!("127.0.1.{round}"),
            &good,
            &format!("127.0.2.{round}"),
        )
        .await;
        took.push(t);
        if t < Duration::from_secs(1) {
            break;
        }
    }
    println!("good logins during floods took {took:?}");
    assert!(
        took.iter().any(|t| *t < Duration::from_secs(1)),
        "a good login took {took:?} during floods (at least one under 1 s expected)"
    );
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_login_costs_the_same_for_known_and_unknown_ids() {
    let _one = HASHING.lock().await;
    let app = TestApp::spawn_with(|s| {
        s.jwt_signing_key = Some(Redacted("test-signing-key-0123456789".into()));
        s.admin_id = ADMIN.into();
        s.admin_secret = Some(Redacted(ADMIN_SECRET.into()));
        s.login_attempts_per_address = 1000;
        s.login_failures_per_client = 1000;
    })
    .await;
    let admin = access(&app, ADMIN, ADMIN_SECRET).await;
    client(&app, &admin, "known", json!({})).await;
    // Warm-up (the decoy hash is made at the first unknown id).
    let _ = token_response(&app, "nobody-warm", "x").await;
    // Medians of 9 alternating tries; the other tests of this binary share the cores,
    // so a round they disturbed is measured again (at most three rounds).
    let mut rounds = Vec::new();
    for round in 0..3 {
        let (mut known, mut unknown) = (Vec::new(), Vec::new());
        for i in 0..9 {
            let t = Instant::now();
            assert_eq!(
                token_response(&app, "known", "wrong-secret").await.status(),
                401
            );
            known.push(t.elapsed());
            let t = Instant::now();
            let r = token_response(&app, &format!("nobody-{round}-{i}"), "wrong-secret").await;
            assert_eq!(r.status(), 401);
            unknown.push(t.elapsed());
        }
        known.sort();
        unknown.sort();
        let (k, u) = (known[4].as_secs_f64(), unknown[4].as_secs_f64());
        let ratio = k.max(u) / k.min(u);
        rounds.push(format!(
            "known {k:.3} s vs unknown {u:.3} s (ratio {ratio:.2})"
        ));
        if ratio <= 1.2 {
            break;
        }
    }
    println!("{rounds:?}");
    assert!(
        rounds.last().is_some_and(|r| {
            r.rsplit_once("ratio ")
                .and_then(|(_, x)| x.trim_end_matches(')').parse::<f64>().ok())
                .is_some_and(|x| x <= 1.2)
        }),
        "known and unknown ids cost different times: {rounds:?}"
    );
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stale_write_racing_a_requeue_is_never_applied() {
    let app = TestApp::spawn().await;
    let q = app.queue("race");
    let tries = 1000;
    let mut applied_after_refusal = 0;
    let mut refused = 0;
    for i in 0..tries {
        let id = app.submit(json!({"job_queue": q})).await;
        let c = app.claim(&id, "racer").await;
        let token = c["token"].as_str().expect("token").to_string();
        // The holder reports while it gives the job back (a requeue) at the same time.
        let (result_path, release_path) =
            (format!("/v1/result/{id}"), format!("/v1/job/{id}/release"));
        let (report_body, release_body) = (
            json!({"status": {"setup": i}, "job_state": "setup"}),
            json!({"agent_id": "racer", "token": token}),
        );
        let report = app.post_token(&result_path, &token, &report_body);
        let requeue = app.post_json(&release_path, &release_body);
        let (report, requeue) = tokio::join!(report, requeue);
        assert_eq!(requeue.status(), 200);
        let status = report.status();
        let res = app.result(&id).await;
        if status == 409 {
            refused += 1;
            if res.get("setup_status").is_some() {
                applied_after_refusal += 1;
            }
        } else {
            assert_eq!(status, 200);
        }
    }
    assert_eq!(
        applied_after_refusal, 0,
        "{applied_after_refusal} of {refused} refused reports were applied anyway"
    );
    println!("{refused} of {tries} reports lost the race and were refused, none applied");
    app.cleanup().await;
}
