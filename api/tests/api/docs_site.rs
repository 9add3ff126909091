//! `GET /docs/...`: the built documentation site, served from `docs_dir` when it holds
//! an `index.html`; a 404 that says how to build it otherwise.

use crate::helpers::{TestApp, unique};
use reqwest::StatusCode;

#[tokio::test]
async fn serves_the_built_site_under_docs() {
    let site = std::env::temp_dir().join(unique("docs-site"));
    let book = site.join("book");
    std::fs::create_dir_all(book.join("reference")).expect("mkdir");
    std::fs::write(book.join("index.html"), "<h1>Testflinger docs</h1>").expect("write");
    std::fs::write(book.join("reference/job.html"), "<p>job_queue</p>").expect("write");
    std::fs::write(book.join("book.js"), "let x = 1;").expect("write");
    // A file beside the site, which must stay out of reach.
    std::fs::write(site.join("secret.txt"), "not for you").expect("write");
    let dir = book.clone();
    let app = TestApp::spawn_with(move |s| s.docs_dir = dir).await;

    let r = app.get("/docs/").await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.text().await.expect("body").contains("Testflinger docs"));

    let r = app.get("/docs/reference/job.html").await;
    assert_eq!(r.status(), StatusCode::OK);
    let ct = r.headers()["content-type"]
        .to_str()
        .expect("ct")
        .to_string();
    assert!(ct.starts_with("text/html"), "content-type {ct}");
    assert!(r.text().await.expect("body").contains("job_queue"));

    let r = app.get("/docs/book.js").await;
    assert_eq!(r.status(), StatusCode::OK);
    let ct = r.headers()["content-type"]
        .to_str()
        .expect("ct")
        .to_string();
    assert!(ct.contains("javascript"), "content-type {ct}");

    // `/docs` sends the browser to `/docs/`, so the site's relative links resolve.
    let no_redirect = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let r = no_redirect.get(app.url("/docs")).send().await.expect("get");
    assert!(r.status().is_redirection(), "status {}", r.status());
    assert_eq!(r.headers()["location"], "/docs/");

    assert_eq!(
        app.get("/docs/missing.html").await.status(),
        StatusCode::NOT_FOUND
    );
    // No way out of the site's directory, raw or percent-encoded.
    for path in [
        "/docs/../secret.txt",
        "/docs/%2e%2e/secret.txt",
        "/docs/..%2fsecret.txt",
    ] {
        let r = app.get(path).await;
        let status = r.status();
        let body = r.text().await.unwrap_or_default();
        assert!(
            !body.contains("not for you"),
            "{path} reached a file outside the site ({status})"
        );
    }
    // The API routes are untouched.
    assert_eq!(app.get("/healthz").await.status(), StatusCode::OK);
    app.cleanup().await;
    let _ = std::fs::remove_dir_all(&site);
}

#[tokio::test]
async fn without_a_built_site_docs_says_how_to_build_it() {
    let dir = std::env::temp_dir().join(unique("docs-none")).join("book");
    let app = TestApp::spawn_with(move |s| s.docs_dir = dir).await;
    for path in ["/docs", "/docs/", "/docs/index.html"] {
        let r = app.get(path).await;
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "{path}");
        let body = r.text().await.expect("body");
        assert!(body.contains("scripts/docs build"), "{path}: {body}");
        assert!(body.contains("TESTFLINGER_DOCS_DIR"), "{path}: {body}");
    }
    app.cleanup().await;
}
