//! The web UI's pages against the real server, Redis and RabbitMQ: each page answers
//! 200 HTML with the data it must show; bad filters and ids answer clear 4xx pages; the
//! cancel form cancels; and the list pages stay bounded with 10 000 jobs in Redis
//! (timed and printed, not asserted).

use crate::helpers::{TestApp, unique};
use reqwest::Response;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

/// The body of an HTML page, after checking its status and content type.
async fn page(app: &TestApp, path: &str, status: u16) -> String {
    let r = app.get(path).await;
    html_of(r, path, status).await
}

async fn html_of(r: Response, what: &str, status: u16) -> String {
    let got = r.status().as_u16();
    let ct = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let body = r.text().await.expect("body");
    assert_eq!(got, status, "{what}: {body}");
    assert_eq!(ct, "text/html; charset=utf-8", "{what}");
    assert!(body.starts_with("<!doctype html>"), "{what}: {body}");
    assert!(body.contains("</html>"), "{what}: not a whole page");
    body
}

/// The text of a page with askama's character references turned back.
fn unescape(body: &str) -> String {
    body.replace("&#60;", "<")
        .replace("&#62;", ">")
        .replace("&#34;", "\"")
        .replace("&#39;", "'")
        .replace("&#38;", "&")
}

/// Sets up one agent serving a fresh queue, one running job with output, one waiting job.
pub(crate) struct World {
    pub(crate) queue: String,
    pub(crate) agent: String,
    pub(crate) running: String,
    pub(crate) waiting: String,
    pub(crate) marker: String,
    pub(crate) tag: String,
    /// The running job's fencing token.
    pub(crate) token: String,
}

pub(crate) async fn world(app: &TestApp) -> World {
    let queue = app.queue("ui");
    let agent = unique("ui-agent");
    let tag = unique("tag");
    let marker = unique("marker");
    let r = app
        .post_json(
            &format!("/v1/agents/data/{agent}"),
            &json!({"state": "waiting", "queues": [queue], "location": "rack-7",
                    "comment": "bench B <ok>", "log": ["agent started"]}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let mut described = serde_json::Map::new();
    described.insert(queue.clone(), json!("UI test queue"));
    let r = app
        .post_json("/v1/agents/queues", &Value::Object(described))
        .await;
    assert_eq!(r.status(), 200);
    let job = |n: u32| {
        json!({"job_queue": queue, "tags": [tag, format!("n{n}")],
               "test_data": {"test_cmds": format!("echo {n}")}})
    };
    let running = app.submit(job(1)).await;
    let waiting = app.submit(job(2)).await;
    let grant = app.claim(&running, &agent).await;
    let token = grant["token"].as_str().expect("token").to_string();
    let r = app
        .post_token(
            &format!("/v1/result/{running}"),
            &token,
            &json!({"job_state": "setup"}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let r = app
        .post_token(
            &format!("/v1/result/{running}"),
            &token,
            &json!({"job_state": "test"}),
        )
        .await;
    assert_eq!(r.status(), 200);
    for (n, text) in [(0, "hello <b>\n"), (1, &format!("{marker}\n"))] {
        let r = app
            .post_token(
                &format!("/v1/result/{running}/log/output"),
                &token,
                &json!({"fragment_number": n, "timestamp": "2026-01-01T00:00:00Z",
                        "phase": "test", "log_data": text}),
            )
            .await;
        assert_eq!(r.status(), 200);
    }
    let r = app
        .post_json(
            &format!("/v1/agents/provision_logs/{agent}"),
            &json!({"job_id": running, "exit_code": 0, "detail": "flashed"}),
        )
        .await;
    assert_eq!(r.status(), 200);
    World {
        queue,
        agent,
        running,
        waiting,
        marker,
        tag,
        token,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_page_renders_its_data() {
    let app = TestApp::spawn().await;
    let w = world(&app).await;
    let short = |id: &str| id[..8].to_string();

    // Overview: agents by state, the queue with its depth, recent jobs.
    let body = page(&app, "/", 200).await;
    assert!(body.contains("href=\"/agents?state=waiting\""), "{body}");
    assert!(
        body.contains(&format!("href=\"/queues/{}\"", w.queue)),
        "{body}"
    );
    assert!(body.contains(&short(&w.running)) && body.contains(&short(&w.waiting)));
    assert!(body.contains("1 job(s) running"), "{body}");

    // Agents: list, filters, sorting.
    let body = page(&app, "/agents", 200).await;
    assert!(body.contains(&w.agent) && body.contains("rack-7"));
    assert!(
        body.contains(&short(&w.running)),
        "current job shown: {body}"
    );
    // Escaped, never raw HTML.
    assert!(body.contains("bench B &#60;ok&#62;"), "{body}");
    assert!(!body.contains("<ok>"));
    for (q, shown) in [
        ("state=waiting".to_string(), true),
        ("state=offline".to_string(), false),
        (format!("queue={}", w.queue), true),
        ("queue=no-such-queue".to_string(), false),
        ("location=rack-7".to_string(), true),
        ("location=rack-8".to_string(), false),
        ("sort=state&order=desc".to_string(), true),
        ("sort=updated".to_string(), true),
    ] {
        let body = page(&app, &format!("/agents?{q}"), 200).await;
        assert_eq!(body.contains(&w.agent), shown, "/agents?{q}");
    }
    let body = page(&app, "/agents?sort=name&order=asc", 200).await;
    assert!(body.contains("aria-sort=\"ascending\""), "{body}");

    // One agent: facts, recent jobs (from the claim), provision history, its log.
    let body = page(&app, &format!("/agents/{}", w.agent), 200).await;
    assert!(body.contains("rack-7") && body.contains("flashed"));
    assert!(body.contains(&format!("/jobs/{}", w.running)), "{body}");
    assert!(body.contains("1 × pass"), "provision streak: {body}");
    assert!(body.contains("agent started"), "{body}");

    // Jobs: all, by queue, by state, by tag, paged.
    let body = page(&app, "/jobs", 200).await;
    assert!(body.contains(&short(&w.running)) && body.contains(&short(&w.waiting)));
    let body = page(&app, &format!("/jobs?queue={}&state=waiting", w.queue), 200).await;
    assert!(body.contains(&short(&w.waiting)) && !body.contains(&short(&w.running)));
    let body = page(&app, &format!("/jobs?state=running&tags={}", w.tag), 200).await;
    assert!(body.contains(&short(&w.running)) && !body.contains(&short(&w.waiting)));
    let body = page(&app, &format!("/jobs?state=active&tags={},n2", w.tag), 200).await;
    assert!(body.contains(&short(&w.waiting)) && !body.contains(&short(&w.running)));
    let body = page(&app, &format!("/jobs?queue={}&limit=1", w.queue), 200).await;
    // Newest first: the waiting job was submitted last.
    assert!(body.contains(&short(&w.waiting)) && !body.contains(&short(&w.running)));
    let next = format!("/jobs?queue={}&limit=1&from=1", w.queue);
    assert!(
        unescape(&body).contains(&next),
        "next link {next} in {body}"
    );
    let body = page(&app, &next, 200).await;
    assert!(body.contains(&short(&w.running)) && !body.contains(&short(&w.waiting)));
    assert!(!body.contains("rel=\"next\""), "{body}");

    // The running job: state, attempt, phases, live log tail, YAML, cancel form.
    let body = page(&app, &format!("/jobs/{}", w.running), 200).await;
    assert!(
        body.contains("id=\"job-state\" class=\"state state-test\""),
        "{body}"
    );
    assert!(body.contains(&w.marker), "output tail: {body}");
    assert!(body.contains("hello &#60;b&#62;"), "{body}");
    assert!(
        body.contains("data-log-type=\"output\" data-next=\"2\""),
        "{body}"
    );
    assert!(
        body.contains("data-log-type=\"serial\" data-next=\"0\""),
        "{body}"
    );
    assert!(body.contains(&format!("job_queue: {}", w.queue)), "{body}");
    assert!(body.contains("test_cmds: echo 1"), "{body}");
    assert!(
        !body.contains("job_id:"),
        "the YAML must be resubmittable: {body}"
    );
    assert!(body.contains(&format!("action=\"/jobs/{}/cancel\"", w.running)));
    assert!(body.contains("<td>setup</td>") && body.contains("<td>test</td>"));
    assert!(body.contains("outcome running"), "{body}");
    assert!(body.contains("/static/live-log.js"), "{body}");
    assert!(body.contains(&w.agent));

    // The waiting job: its position.
    let body = page(&app, &format!("/jobs/{}", w.waiting), 200).await;
    assert!(body.contains("Position in queue</dt><dd>1"), "{body}");
    assert!(body.contains("No phase has run yet."), "{body}");

    // The summary the script polls.
    let r = app.get(&format!("/jobs/{}/summary.json", w.running)).await;
    assert_eq!(r.status(), 200);
    let s: Value = r.json().await.expect("json");
    assert_eq!(s["job_state"], "test");
    assert_eq!(s["terminal"], false);
    assert_eq!(s["attempt"], 1);

    // Queues: list and detail.
    let body = page(&app, "/queues", 200).await;
    assert!(body.contains(&w.queue) && body.contains("UI test queue"));
    let body = page(&app, &format!("/queues/{}", w.queue), 200).await;
    assert!(body.contains("UI test queue") && body.contains(&w.agent));
    let waiting_at = body.find("id=\"waiting-h\"").expect("waiting section");
    let running_at = body.find("id=\"running-h\"").expect("running section");
    let section = &body[waiting_at..running_at];
    assert!(section.contains(&short(&w.waiting)) && !section.contains(&short(&w.running)));
    let agents_at = body.find("id=\"agents-h\"").expect("agents section");
    assert!(body[running_at..agents_at].contains(&short(&w.running)));
    assert!(body.contains("Next job starts"), "{body}");

    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_filters_and_ids_answer_clear_4xx_pages() {
    let app = TestApp::spawn().await;
    let unknown = uuid::Uuid::new_v4();
    for (path, status, needles) in [
        (
            "/jobs?state=bogus".to_string(),
            400,
            vec!["state", "bogus", "waiting"],
        ),
        ("/jobs?limit=many".to_string(), 400, vec!["limit", "many"]),
        ("/jobs?limit=100000".to_string(), 400, vec!["limit", "200"]),
        ("/jobs?from=-1".to_string(), 400, vec!["from", "-1"]),
        (
            "/jobs?queue=a&queue=b".to_string(),
            400,
            vec!["queue", "one value"],
        ),
        (
            "/jobs?queue=amq.x".to_string(),
            400,
            vec!["queue", "amq.x", "reserved"],
        ),
        ("/jobs?colour=red".to_string(), 400, vec!["colour"]),
        (
            "/jobs/not-a-uuid".to_string(),
            400,
            vec!["not-a-uuid", "UUID"],
        ),
        (format!("/jobs/{unknown}"), 404, vec!["No job", "{unknown}"]),
        (
            "/agents?state=asleep".to_string(),
            400,
            vec!["state", "asleep", "offline"],
        ),
        (
            "/agents?sort=size".to_string(),
            400,
            vec!["sort", "size", "name"],
        ),
        (
            "/agents?order=up".to_string(),
            400,
            vec!["order", "up", "desc"],
        ),
        ("/agents/nobody-here".to_string(), 404, vec!["nobody-here"]),
        (
            "/queues/no-such-queue-here".to_string(),
            404,
            vec!["no-such-queue-here"],
        ),
        (
            "/queues/testflinger.x".to_string(),
            400,
            vec!["testflinger.x", "reserved"],
        ),
    ] {
        let body = page(&app, &path, status).await;
        let text = unescape(&body);
        for n in needles {
            let n = n.replace("{unknown}", &unknown.to_string());
            assert!(text.contains(&n), "{path}: '{n}' missing in {body}");
        }
    }
    let r = app.get(&format!("/jobs/{unknown}/summary.json")).await;
    assert_eq!(r.status(), 404);
    let r = app
        .http
        .post(app.url(&format!("/jobs/{unknown}/cancel")))
        .send()
        .await
        .expect("POST");
    html_of(r, "cancel unknown", 404).await;
    let r = app
        .http
        .post(app.url("/jobs/xyz/cancel"))
        .send()
        .await
        .expect("POST");
    html_of(r, "cancel bad id", 400).await;
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_form_cancels_and_refuses_other_sites() {
    let app = TestApp::spawn().await;
    let queue = app.queue("ui-cancel");
    let id = app
        .submit(json!({"job_queue": queue, "test_data": {"test_cmds": "true"}}))
        .await;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(15))
        .build()
        .expect("client");
    // A form on another site must not cancel.
    let r = http
        .post(app.url(&format!("/jobs/{id}/cancel")))
        .header("origin", "https://evil.example")
        .send()
        .await
        .expect("POST");
    let body = html_of(r, "cross-site cancel", 403).await;
    assert!(body.contains("another site"), "{body}");
    assert_eq!(app.result(&id).await["job_state"], "waiting");
    // Our own form: 303 back to the job, which is cancelled.
    let origin = app.base.clone();
    let r = http
        .post(app.url(&format!("/jobs/{id}/cancel")))
        .header("origin", origin)
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status(), 303);
    assert_eq!(
        r.headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default(),
        format!("/jobs/{id}")
    );
    assert_eq!(app.result(&id).await["job_state"], "cancelled");
    let body = page(&app, &format!("/jobs/{id}"), 200).await;
    assert!(body.contains("state-cancelled"), "{body}");
    assert!(
        !body.contains("data-cancel-form"),
        "no cancel once ended: {body}"
    );
    // Again: nothing to do, back to the page.
    let r = http
        .post(app.url(&format!("/jobs/{id}/cancel")))
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status(), 303);
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn static_assets_are_served() {
    let app = TestApp::spawn().await;
    for (path, ct, needle) in [
        (
            "/static/ui.css",
            "text/css; charset=utf-8",
            "prefers-color-scheme",
        ),
        (
            "/static/live-log.js",
            "text/javascript; charset=utf-8",
            "EventSource",
        ),
    ] {
        let r = app.get(path).await;
        assert_eq!(r.status(), 200, "{path}");
        assert_eq!(
            r.headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default(),
            ct
        );
        assert!(r.text().await.expect("body").contains(needle));
    }
    app.cleanup().await;
}

/// Loads 10 000 jobs (written with the store's own submit script, no broker) and times
/// every page: the figures are printed (run with `--nocapture`), not asserted, as this
/// machine is shared. What is asserted: each page answers, and the list pages read a
/// bounded page (a state filter that matches nothing stops at the scan bound).
#[tokio::test(flavor = "multi_thread")]
async fn pages_with_10000_jobs_stay_bounded() {
    const JOBS: usize = 10_000;
    let app = TestApp::spawn().await;
    let queues: Vec<String> = (0..5).map(|i| format!("{}-q{i}", app.prefix)).collect();
    let agent = unique("bench-agent");
    let r = app
        .post_json(
            &format!("/v1/agents/data/{agent}"),
            &json!({"state": "waiting", "queues": queues, "location": "bench"}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let started = Instant::now();
    let mut ids = Vec::with_capacity(JOBS);
    for chunk in (0..JOBS).collect::<Vec<_>>().chunks(500) {
        let futs = chunk.iter().map(|i| {
            let store = app.state.store.clone();
            let q = queues[i % queues.len()].clone();
            async move {
                let id = uuid::Uuid::new_v4().to_string();
                let def = json!({"job_queue": q, "tags": [format!("t{}", i % 10)],
                                 "test_data": {"test_cmds": "true"}});
                let tags = vec![format!("t{}", i % 10)];
                store
                    .create_job(&id, &def, &q, 0, false, &tags, "")
                    .await
                    .expect("create");
                id
            }
        });
        ids.extend(futures_util::future::join_all(futs).await);
    }
    println!(
        "loaded {JOBS} jobs in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    // The newest job has ended: a filter for ended jobs finds it, then scans on.
    let done = ids.last().expect("ids").clone();
    app.state
        .store
        .set_job_fields(&done, &[("state", "complete".into())])
        .await
        .expect("set");

    let pages = [
        "/".to_string(),
        "/jobs".to_string(),
        "/jobs?limit=200".to_string(),
        "/jobs?from=9000".to_string(),
        format!("/jobs?queue={}", queues[0]),
        "/jobs?tags=t3".to_string(),
        "/jobs?state=waiting".to_string(),
        "/jobs?state=complete".to_string(),
        format!("/jobs/{}", ids[0]),
        "/agents".to_string(),
        format!("/agents/{agent}"),
        "/queues".to_string(),
        format!("/queues/{}", queues[0]),
    ];
    println!(
        "{:<60} {:>9} {:>9} {:>9}",
        "page", "min ms", "median", "max ms"
    );
    for p in &pages {
        let mut times = Vec::new();
        for _ in 0..15 {
            let t = Instant::now();
            let body = page(&app, p, 200).await;
            times.push(t.elapsed().as_secs_f64() * 1000.0);
            assert!(!body.is_empty());
        }
        times.sort_by(f64::total_cmp);
        println!(
            "{:<60} {:>9.2} {:>9.2} {:>9.2}",
            p,
            times[0],
            times[times.len() / 2],
            times[times.len() - 1]
        );
    }
    let body = page(&app, "/jobs", 200).await;
    assert!(body.contains(&format!("of {JOBS} in the index")), "{body}");
    assert!(body.contains("from=50"), "next page link: {body}");
    let body = page(&app, "/jobs?state=complete", 200).await;
    assert!(body.contains(&done[..8]), "{body}");
    assert!(
        body.contains("looked at 2000 jobs without filling the page"),
        "{body}"
    );
    let body = page(&app, &format!("/queues/{}", queues[0]), 200).await;
    assert!(body.contains("<dt>Waiting</dt><dd>2000</dd>"), "{body}");
    let body = page(&app, "/", 200).await;
    assert!(body.contains("(5 of 5)"), "{body}");

    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_long_log_shows_its_newest_part() {
    let app = TestApp::spawn().await;
    let w = world(&app).await;
    let token = w.token.clone();
    let big = |c: char| format!("{}\n", c.to_string().repeat(300 * 1024));
    for (n, c) in [(2, 'x'), (3, 'y'), (4, 'z')] {
        let r = app
            .post_token(
                &format!("/v1/result/{}/log/output", w.running),
                &token,
                &json!({"fragment_number": n, "timestamp": "2026-01-01T00:00:01Z",
                        "phase": "test", "log_data": big(c)}),
            )
            .await;
        assert_eq!(r.status(), 200);
    }
    let body = page(&app, &format!("/jobs/{}", w.running), 200).await;
    assert!(
        body.contains(&"z".repeat(1000)),
        "the newest fragment is shown"
    );
    assert!(!body.contains(&"y".repeat(1000)), "older ones are left out");
    assert!(!body.contains(&w.marker));
    assert!(
        body.contains("Earlier output is not shown here"),
        "{}",
        &body[..2000]
    );
    assert!(body.contains("data-log-type=\"output\" data-next=\"5\""));
    assert!(body.len() < 400 * 1024, "page of {} bytes", body.len());
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retried_job_shows_each_attempt_apart() {
    let app = TestApp::spawn().await;
    let w = world(&app).await;
    let r = app
        .post_json(
            &format!("/v1/job/{}/release", w.running),
            &json!({"agent_id": w.agent, "token": w.token, "reason": "ui test"}),
        )
        .await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
    let grant = app.claim(&w.running, &w.agent).await;
    assert_eq!(grant["attempt"], 2, "{grant}");
    let token = grant["token"].as_str().expect("token").to_string();
    let again = unique("second");
    let r = app
        .post_token(
            &format!("/v1/result/{}/log/output", w.running),
            &token,
            &json!({"fragment_number": 0, "timestamp": "2026-01-01T00:00:02Z",
                    "phase": "test", "log_data": format!("{again}\n")}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let body = page(&app, &format!("/jobs/{}", w.running), 200).await;
    let first = body.find(&w.marker).expect("attempt 1 output");
    let heading = body
        .find("── test (attempt 2) ──")
        .expect("attempt 2 heading");
    let second = body.find(&again).expect("attempt 2 output");
    assert!(first < heading && heading < second, "{body}");
    assert!(body.contains("<dd id=\"job-attempt\">2</dd>"), "{body}");
    // The stream goes on after attempt 2's first fragment.
    let next = format!(
        "data-log-type=\"output\" data-next=\"{}\"",
        testflinger_api::store::fragment_score(2, 1)
    );
    assert!(body.contains(&next), "{next}: {body}");
    app.cleanup().await;
}
