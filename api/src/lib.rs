//! The Testflinger v1 HTTP API server.
//!
//! Layout:
//! - [`settings`]: typed settings from a file and the environment.
//! - [`startup`]: [`startup::Application`], used by main and by tests.
//! - [`routes`]: one module per route group (jobs, lease, results, agents, queues).
//! - [`submit`]: admission of a job (shared by HTTP and the broker submit queue).
//! - [`admission`]: the `testflinger.submit` consumer.
//! - [`auth`]: clients, tokens, roles and submission permissions.
//! - [`store`]: all Redis state and its atomic scripts; [`files`]: artifacts/attachments.
//! - [`reaper`]: requeues jobs whose lease expired.
//! - [`logs`]: log reads from Redis and compacted files, the compactor, SSE wake-ups.
//! - [`events`]: job events to `testflinger.events` and webhooks.
//! - [`limits`]: request body deadline, large-body cap, closing after unread bodies.
//! - [`metrics`]: Prometheus metrics at `/metrics`.
//! - [`error`]: errors at the HTTP edge.
//! - [`ui`]: the server-rendered web UI (HTML pages, live job log).

pub mod admission;
pub mod agents;
pub mod auth;
pub mod docs_site;
pub mod error;
pub mod events;
pub mod extract;
pub mod files;
pub mod jobs;
pub mod limits;
pub mod logs;
pub mod metrics;
pub mod net;
pub mod reaper;
pub mod roles;
pub mod routes;
pub mod settings;
pub mod startup;
pub mod state;
pub mod store;
pub mod telemetry;
pub mod ui;
