//! Integration tests of the API against the real RabbitMQ and Redis of this machine.
//! Each test has its own Redis prefix and queue names and removes them at the end.

mod helpers;

mod agents;
mod auth;
mod authority;
mod bounds;
mod broker_submit;
mod delivery;
mod errors;
mod files;
mod jobs;
mod lease;
mod limits;
mod log_store;
mod logs;
mod openapi;
mod ui;
mod ui_headers;
mod unknown_jobs;

// Documentation: the settings reference and the /docs site.
mod docs_reference;
mod docs_site;
