//! `GET /openapi.json` (and `/v1/openapi.json`): the OpenAPI 3.0 document of every route
//! this server serves, upstream's v1 routes and ours. The document is `api/openapi.json`;
//! `api/tests/api/openapi.rs` checks it against the routes.

use actix_web::{HttpResponse, web};

/// The document, compiled in.
pub const OPENAPI_JSON: &str = include_str!("../../openapi.json");

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/openapi.json", web::get().to(openapi))
        .route("/v1/openapi.json", web::get().to(openapi));
}

async fn openapi() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(OPENAPI_JSON)
}
