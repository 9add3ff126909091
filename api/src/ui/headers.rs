//! Security headers, set by one middleware around the whole server.
//!
//! * Every response: `X-Content-Type-Options: nosniff`.
//! * Every HTML response (the web UI's pages and its error pages): [`UI_CSP`], a policy
//!   with no inline script or style at all (the UI's script and stylesheet are files under
//!   `/static/`, the data they need sits in `data-` attributes), `X-Frame-Options: DENY`
//!   and `Referrer-Policy: same-origin`.
//! * The documentation site (`/docs/...`, mdBook output): mdBook's pages carry small
//!   inline scripts (the site root, the theme) that differ between pages and builds, so a
//!   page's policy allows exactly the inline scripts of that page, by their SHA-256
//!   ([`docs_csp`], computed per response: a rebuilt site needs no restart). Its styles
//!   may be inline (mdBook writes a `style` attribute; style alone cannot run code) and
//!   its pages may frame each other (mdBook's table of contents is an iframe without
//!   JavaScript), not be framed by other sites.
//!
//! `Referrer-Policy` is `same-origin`, not `no-referrer`: with `no-referrer` a browser
//! sends `Origin: null` on a form POST, and the cancel form's same-origin check would
//! refuse it. Other sites get no referrer at all.
//!
//! A handler that sets its own `Content-Security-Policy` keeps it. Status codes and
//! bodies are never changed; a `304 Not Modified` gets no policy, so the one a browser
//! cached with the page stays.

use actix_web::body::{self, BodySize, BoxBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderMap, HeaderValue};
use actix_web::middleware::Next;
use base64::Engine;
use sha2::{Digest, Sha256};
use std::collections::BTreeSet;

/// The web UI's policy: scripts, styles, fonts and connections (the live log's
/// `EventSource`, the state poll) from this server only; images also as `data:` URLs;
/// no plugins, no `<base>`, forms post here only, no framing.
pub const UI_CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
     img-src 'self' data:; font-src 'self'; connect-src 'self'; object-src 'none'; \
     base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// Biggest documentation page whose inline scripts are hashed; a bigger one gets the
/// policy without hashes (its inline scripts do not run).
const DOCS_HASH_LIMIT: usize = 8 * 1024 * 1024;

/// The documentation site's policy, allowing the inline scripts whose hashes are given.
pub fn docs_csp(hashes: &BTreeSet<String>) -> String {
    let mut script = String::from("'self'");
    for h in hashes {
        script.push_str(" 'sha256-");
        script.push_str(h);
        script.push('\'');
    }
    format!(
        "default-src 'self'; script-src {script}; style-src 'self' 'unsafe-inline'; \
         img-src 'self' data:; font-src 'self'; connect-src 'self'; object-src 'none'; \
         base-uri 'self'; form-action 'self'; frame-ancestors 'self'"
    )
}

/// The base64 SHA-256 of every inline script of an HTML page (a `<script>` without a
/// `src`), as a browser hashes it (line ends normalized to LF).
pub fn inline_script_hashes(html: &str) -> BTreeSet<String> {
    // ASCII lowercasing keeps byte offsets.
    let lower = html.to_ascii_lowercase();
    let mut out = BTreeSet::new();
    let mut at = 0;
    while let Some(i) = lower[at..].find("<script") {
        let start = at + i + "<script".len();
        let Some(gt) = lower[start..].find('>') else {
            break;
        };
        let attrs = &lower[start..start + gt];
        let body = start + gt + 1;
        let Some(end) = lower[body..].find("</script") else {
            break;
        };
        at = body + end;
        // `<scripts>` or the like: not a script element.
        if !attrs.is_empty() && !attrs.starts_with(|c: char| c.is_ascii_whitespace() || c == '/') {
            continue;
        }
        let has_src = attrs
            .split(|c: char| c.is_ascii_whitespace())
            .any(|a| a == "src" || a.starts_with("src="));
        if has_src {
            continue;
        }
        let text = html[body..at].replace("\r\n", "\n").replace('\r', "\n");
        out.insert(base64::engine::general_purpose::STANDARD.encode(Sha256::digest(text)));
    }
    out
}

fn is_docs(path: &str) -> bool {
    path == "/docs" || path.starts_with("/docs/")
}

fn is_html(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| {
            ct.trim_start()
                .to_ascii_lowercase()
                .starts_with("text/html")
        })
}

fn set_page_headers(headers: &mut HeaderMap, csp: &str, frame: &'static str) {
    if !headers.contains_key(header::CONTENT_SECURITY_POLICY)
        && let Ok(v) = HeaderValue::from_str(csp)
    {
        headers.insert(header::CONTENT_SECURITY_POLICY, v);
    }
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static(frame));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
}

/// The middleware (`middleware::from_fn`); wrap it outermost, so it sees every answer.
pub async fn security_headers(
    req: ServiceRequest,
    next: Next<BoxBody>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    // Handlers' and extractors' errors arrive here as answers; a rare Err from a
    // middleware goes on to actix as is (turning it into an answer here needs a clone of
    // the request taken beforehand, and NormalizePath's in-place rewrite panics on a
    // shared request).
    let mut res = next.call(req).await?;
    res.headers_mut().insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if res.status() == StatusCode::NOT_MODIFIED {
        return Ok(res);
    }
    // The path as routed (NormalizePath, inside, merged repeated slashes).
    let docs = is_docs(res.request().path());
    let html = is_html(res.headers());
    if !docs {
        if html {
            set_page_headers(res.headers_mut(), UI_CSP, "DENY");
        }
        return Ok(res);
    }
    let hashable = html
        && res.status() == StatusCode::OK
        && !res.headers().contains_key(header::CONTENT_SECURITY_POLICY)
        && matches!(res.response().body().size(), BodySize::Sized(n) if n as usize <= DOCS_HASH_LIMIT);
    if !hashable {
        set_page_headers(res.headers_mut(), &docs_csp(&BTreeSet::new()), "SAMEORIGIN");
        return Ok(res);
    }
    let (request, response) = res.into_parts();
    let (mut response, body) = response.into_parts();
    let bytes = body::to_bytes(body)
        .await
        .map_err(actix_web::error::ErrorInternalServerError)?;
    let hashes = inline_script_hashes(&String::from_utf8_lossy(&bytes));
    set_page_headers(response.headers_mut(), &docs_csp(&hashes), "SAMEORIGIN");
    let response = response.set_body(bytes).map_into_boxed_body();
    Ok(ServiceResponse::new(request, response))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(Sha256::digest(s))
    }

    #[test]
    fn hashes_inline_scripts_only() {
        let page = "<html><head><script>\r\nvar a = 1;\r\n</script>\
                    <script src=\"x.js\"></script><SCRIPT type=\"module\">b()</SCRIPT>\
                    <scripts>no</scripts></head></html>";
        let got = inline_script_hashes(page);
        let want: BTreeSet<String> = [b64("\nvar a = 1;\n"), b64("b()")].into();
        assert_eq!(got, want);
        let csp = docs_csp(&got);
        assert!(csp.contains(&format!("'sha256-{}'", b64("b()"))), "{csp}");
        let script = csp
            .split(';')
            .find(|d| d.trim().starts_with("script-src"))
            .expect("script-src");
        assert!(!script.contains("unsafe"), "{csp}");
        assert!(!UI_CSP.contains("unsafe"), "{UI_CSP}");
    }
}
