//! The Testflinger device agent: one process per device. It consumes jobs pushed over
//! RabbitMQ, claims each through the API (lease + fencing token), runs the phases with
//! `/bin/sh -c`, streams their output, and reports results and artifacts over HTTP.
//!
//! Layout:
//! - [`config`]: the agent YAML (upstream keys plus `amqp_uri`, `shutdown_grace`).
//! - [`client`]: one method per API call; token header; retries on 5xx only.
//! - [`lifecycle`]: [`run`]: register, consume, claim, heartbeat, control queue,
//!   offline/maintenance, shutdown with a grace.
//! - [`runner`]: one job: run directory, phases, output streaming, outcome, artifacts.
//! - [`phases`]: the per-phase rules in one `match`.
//! - [`phase_env`]: the allow-list of the phases' environment.
//! - [`process`]: phase processes in their own process group; killing the tree.
//! - [`archive`]: safe extraction of attachments, packing of artifacts.
//! - [`telemetry`]: the tracing subscriber.

pub mod archive;
pub mod client;
pub mod config;
pub mod lifecycle;
pub mod phase_env;
pub mod phases;
pub mod process;
pub mod runner;
pub mod telemetry;

pub use config::Config;
pub use lifecycle::run;
