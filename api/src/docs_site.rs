//! `GET /docs/...`: the documentation site (mdBook output of `scripts/docs build`),
//! served from the directory of the `docs_dir` setting (`TESTFLINGER_DOCS_DIR`, default
//! `docs/book`) when it holds an `index.html`. `/docs` redirects to `/docs/`; paths
//! cannot leave the directory (actix-files refuses `..` and hidden files). Without a
//! built site every `/docs` path answers 404 saying how to build it.

use actix_files::Files;
use actix_web::{HttpResponse, web};
use std::path::Path;

/// Registers `/docs`: the site's files when `dir/index.html` exists, else a 404 route.
pub fn configure(cfg: &mut web::ServiceConfig, dir: &Path) {
    if dir.join("index.html").is_file() {
        cfg.service(
            Files::new("/docs", dir)
                .index_file("index.html")
                .redirect_to_slash_directory(),
        );
    } else {
        let message = format!(
            "Not found: the documentation site is not built on this server \
             (no index.html in {}; run scripts/docs build, or set TESTFLINGER_DOCS_DIR)\n",
            dir.display()
        );
        let not_built = move || {
            let body = message.clone();
            async move {
                HttpResponse::NotFound()
                    .content_type("text/plain; charset=utf-8")
                    .body(body)
            }
        };
        cfg.route("/docs", web::get().to(not_built.clone()))
            .route("/docs/{tail:.*}", web::get().to(not_built));
    }
}
