//! The web UI's security headers: every page (and error page) answers with a strict
//! `Content-Security-Policy` (no inline script or style), `X-Content-Type-Options:
//! nosniff`, `X-Frame-Options: DENY` and a `Referrer-Policy`, and its HTML holds no
//! inline script, event handler attribute, `javascript:` URL or inline style. The
//! documentation site's pages allow exactly their own inline scripts, by hash. The JSON
//! API gets `nosniff`.

use crate::helpers::{TestApp, unique};
use crate::ui::world;
use base64::Engine;
use reqwest::Response;
use reqwest::header::HeaderMap;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

fn header(h: &HeaderMap, name: &str) -> String {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

/// The directives of a policy: name -> its sources.
fn directives(csp: &str) -> BTreeMap<String, Vec<String>> {
    csp.split(';')
        .filter_map(|d| {
            let mut it = d.split_ascii_whitespace();
            let name = it.next()?.to_ascii_lowercase();
            Some((name, it.map(str::to_string).collect()))
        })
        .collect()
}

fn assert_directive(what: &str, d: &BTreeMap<String, Vec<String>>, name: &str, want: &[&str]) {
    let got = d
        .get(name)
        .unwrap_or_else(|| panic!("{what}: no {name} in the policy: {d:?}"));
    assert_eq!(got, want, "{what}: {name}");
}

/// The headers every page must have; returns the policy's directives.
fn assert_page_headers(what: &str, h: &HeaderMap, frame: &str) -> BTreeMap<String, Vec<String>> {
    assert_eq!(header(h, "x-content-type-options"), "nosniff", "{what}");
    assert_eq!(header(h, "x-frame-options"), frame, "{what}");
    let referrer = header(h, "referrer-policy");
    assert!(
        [
            "no-referrer",
            "same-origin",
            "strict-origin",
            "strict-origin-when-cross-origin"
        ]
        .contains(&referrer.as_str()),
        "{what}: Referrer-Policy '{referrer}'"
    );
    let csp = header(h, "content-security-policy");
    assert!(!csp.is_empty(), "{what}: no Content-Security-Policy");
    let d = directives(&csp);
    assert_directive(what, &d, "default-src", &["'self'"]);
    assert_directive(what, &d, "object-src", &["'none'"]);
    assert!(
        d.contains_key("form-action"),
        "{what}: no form-action: {csp}"
    );
    for s in d.get("script-src").expect("script-src") {
        assert!(
            s == "'self'" || s.starts_with("'sha256-"),
            "{what}: script-src allows {s}: {csp}"
        );
    }
    d
}

/// The web UI's own policy.
fn assert_ui_headers(what: &str, h: &HeaderMap) {
    let d = assert_page_headers(what, h, "DENY");
    assert_directive(what, &d, "script-src", &["'self'"]);
    assert_directive(what, &d, "style-src", &["'self'"]);
    assert_directive(what, &d, "base-uri", &["'none'"]);
    assert_directive(what, &d, "frame-ancestors", &["'none'"]);
    assert_directive(what, &d, "form-action", &["'self'"]);
    assert_directive(what, &d, "connect-src", &["'self'"]);
}

/// What in an HTML page a strict policy would block: inline scripts (a `<script>` without
/// `src`, other than a `type="application/json"` data block), `on...=` handler
/// attributes, `javascript:` URLs, `<style>` blocks and `style` attributes.
fn inline_problems(html: &str) -> Vec<String> {
    let lower = html.to_ascii_lowercase();
    let mut out = Vec::new();
    if lower.contains("javascript:") {
        out.push("a javascript: URL".into());
    }
    // Text is escaped by the templates, so every `<` opens a tag or a comment.
    let mut at = 0;
    while let Some(i) = lower[at..].find('<') {
        let start = at + i + 1;
        let end = lower[start..].find('>').map_or(lower.len(), |e| start + e);
        let tag = &lower[start..end];
        at = end;
        let name: String = tag
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '/' || *c == '!')
            .collect();
        let attrs = &tag[name.len()..];
        if name == "script" {
            let src = attrs.contains(" src=");
            let json = attrs.contains("type=\"application/json\"");
            if !src && !json {
                out.push(format!("inline <{tag}>"));
            }
        }
        if name == "style" {
            out.push("a <style> block".into());
        }
        let b = attrs.as_bytes();
        for (k, w) in b.iter().enumerate() {
            if !w.is_ascii_whitespace() {
                continue;
            }
            let rest = &attrs[k + 1..];
            let letters = rest.bytes().take_while(|c| c.is_ascii_lowercase()).count();
            let word = &rest[..letters];
            let after = rest[letters..].trim_start();
            if after.starts_with('=')
                && ((word.starts_with("on") && word.len() > 2) || word == "style")
            {
                out.push(format!("attribute {word}= in <{tag}>"));
            }
        }
    }
    out
}

async fn check_ui_page(what: &str, r: Response, status: u16) -> String {
    assert_eq!(r.status().as_u16(), status, "{what}");
    let h = r.headers().clone();
    assert!(
        header(&h, "content-type").starts_with("text/html"),
        "{what}: {h:?}"
    );
    assert_ui_headers(what, &h);
    let body = r.text().await.expect("body");
    let problems = inline_problems(&body);
    assert!(problems.is_empty(), "{what}: {problems:?}");
    body
}

#[test]
fn the_html_check_finds_what_a_strict_policy_blocks() {
    let clean = r#"<p title="x">a <a href="/x">b</a><script src="/static/a.js" defer></script><script type="application/json" id="d">{"a":1}</script>"#;
    assert_eq!(inline_problems(clean), Vec::<String>::new());
    for bad in [
        "<script>alert(1)</script>",
        "<SCRIPT >alert(1)</SCRIPT>",
        "<button onclick=\"go()\">x</button>",
        "<body\nonload=go()>",
        "<a href=\"JavaScript:go()\">x</a>",
        "<style>p{}</style>",
        "<p style=\"color: red\">x</p>",
    ] {
        assert!(!inline_problems(bad).is_empty(), "{bad}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_ui_page_sends_a_strict_policy_and_holds_no_inline_code() {
    let app = TestApp::spawn().await;
    let w = world(&app).await;
    let missing = uuid::Uuid::new_v4();
    for (path, status) in [
        ("/".to_string(), 200),
        ("/jobs".to_string(), 200),
        (format!("/jobs?queue={}&tags={}", w.queue, w.tag), 200),
        (format!("/jobs/{}", w.running), 200),
        (format!("/jobs/{}", w.waiting), 200),
        ("/queues".to_string(), 200),
        (format!("/queues/{}", w.queue), 200),
        ("/agents".to_string(), 200),
        (
            format!("/agents?queue={}&sort=state&order=desc", w.queue),
            200,
        ),
        (format!("/agents/{}", w.agent), 200),
        // The UI's error pages.
        (format!("/jobs/{missing}"), 404),
        ("/agents/no-such-agent".to_string(), 404),
        ("/queues/no-such-queue".to_string(), 404),
        ("/jobs/not-a-uuid".to_string(), 400),
        ("/jobs?state=bogus".to_string(), 400),
        ("/agents?sort=bogus".to_string(), 400),
        // Repeated slashes reach the same page (and get the same headers).
        ("//jobs".to_string(), 200),
    ] {
        let body = check_ui_page(&path, app.get(&path).await, status).await;
        if path == format!("/jobs/{}", w.running) {
            // The live log's script is a file; its data sits in data- attributes.
            assert!(body.contains("<script src=\"/static/live-log.js"), "{body}");
            assert!(
                body.contains(&format!("data-live-job=\"{}\"", w.running)),
                "{body}"
            );
            assert!(body.contains(&w.marker), "{body}");
        }
    }

    // The cancel form's answers: a refusal page, and the redirect.
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let r = http
        .post(app.url(&format!("/jobs/{}/cancel", w.waiting)))
        .header("origin", "https://evil.example")
        .send()
        .await
        .expect("POST");
    check_ui_page("cross-site cancel", r, 403).await;
    let r = http
        .post(app.url(&format!("/jobs/{}/cancel", w.waiting)))
        .header("origin", app.base.clone())
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status(), 303);
    assert_eq!(header(r.headers(), "x-content-type-options"), "nosniff");

    // The UI's files: the right type, cached, not sniffed.
    for (path, ct) in [
        ("/static/live-log.js", "text/javascript; charset=utf-8"),
        ("/static/ui.css", "text/css; charset=utf-8"),
    ] {
        let r = app.get(path).await;
        assert_eq!(r.status(), 200, "{path}");
        assert_eq!(header(r.headers(), "content-type"), ct, "{path}");
        assert!(
            header(r.headers(), "cache-control").contains("max-age="),
            "{path}"
        );
        assert_eq!(
            header(r.headers(), "x-content-type-options"),
            "nosniff",
            "{path}"
        );
    }

    // The JSON API: nosniff, and the same status and body as ever.
    let r = app.get(&format!("/v1/result/{}", w.running)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(r.headers(), "x-content-type-options"), "nosniff");
    assert!(header(r.headers(), "content-type").starts_with("application/json"));
    let v: serde_json::Value = r.json().await.expect("json");
    assert_eq!(v["job_state"], "test");
    let r = app.get("/no/such/path").await;
    assert_eq!(r.status(), 404);
    assert_eq!(header(r.headers(), "x-content-type-options"), "nosniff");
    app.cleanup().await;
}

fn sha256_source(script: &str) -> String {
    format!(
        "'sha256-{}'",
        base64::engine::general_purpose::STANDARD.encode(Sha256::digest(script))
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn docs_pages_allow_exactly_their_own_inline_scripts() {
    let site = std::env::temp_dir().join(unique("docs-csp"));
    let book = site.join("book");
    std::fs::create_dir_all(book.join("reference")).expect("mkdir");
    let root_script = "\n    const path_to_root = \"\";\n";
    let ref_script = "\n    const path_to_root = \"../\";\n";
    let index = format!(
        "<!DOCTYPE HTML>\n<html><head><script>{root_script}</script>\
         <script src=\"book.js\"></script></head><body><h1>Docs</h1>\
         <div style=\"clear: both\"></div></body></html>"
    );
    let reference = format!(
        "<!DOCTYPE HTML>\n<html><head><script>{ref_script}</script></head>\
         <body><p>job_queue</p></body></html>"
    );
    std::fs::write(book.join("index.html"), &index).expect("write");
    std::fs::write(book.join("reference/job.html"), &reference).expect("write");
    std::fs::write(book.join("book.js"), "let x = 1;").expect("write");
    let dir = book.clone();
    let app = TestApp::spawn_with(move |s| s.docs_dir = dir).await;

    for (path, script, other, body) in [
        ("/docs/", root_script, ref_script, &index),
        (
            "/docs/reference/job.html",
            ref_script,
            root_script,
            &reference,
        ),
    ] {
        let r = app.get(path).await;
        assert_eq!(r.status(), 200, "{path}");
        let h = r.headers().clone();
        // Framed by its own pages only (mdBook's table of contents is an iframe).
        let d = assert_page_headers(path, &h, "SAMEORIGIN");
        let script_src = d.get("script-src").expect("script-src").clone();
        assert_eq!(
            script_src,
            vec!["'self'".to_string(), sha256_source(script)],
            "{path}"
        );
        assert!(!script_src.contains(&sha256_source(other)), "{path}");
        assert_directive(path, &d, "frame-ancestors", &["'self'"]);
        assert_directive(path, &d, "base-uri", &["'self'"]);
        // The page itself is not changed.
        assert_eq!(&r.text().await.expect("body"), body, "{path}");

        // Revalidated: the 304 carries no policy, so the cached page keeps its own.
        {
            let etag = h.get("etag").expect("actix-files sends an ETag");
            let r = app
                .http
                .get(app.url(path))
                .header("if-none-match", etag.clone())
                .send()
                .await
                .expect("GET");
            assert_eq!(r.status(), 304, "{path}");
            assert!(
                r.headers().get("content-security-policy").is_none(),
                "{path}: a 304 with a policy would replace the cached one"
            );
        }
    }
    let r = app.get("/docs/book.js").await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(r.headers(), "x-content-type-options"), "nosniff");
    assert_eq!(r.text().await.expect("body"), "let x = 1;");
    app.cleanup().await;
    let _ = std::fs::remove_dir_all(&site);
}
