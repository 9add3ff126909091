//! The Testflinger device agent: one process per device. It consumes jobs pushed over
//! RabbitMQ, claims each through the API (lease + fencing token), runs the phases with
//! `/bin/sh -c`, streams their output, and reports results and artifacts over HTTP.
//!
//! Layout:
//! - [`config`]: the agent YAML (upstream keys plus `amqp_uri`, `shutdown_grace`,
//!   `queue_type`).
//! - [`client`]: one method per API call; token header; retries on 5xx and connection
//!   failures; one-try clients with their own timeout for heartbeats and the spool.
//! - [`lifecycle`]: [`run`]: sweep and spool recovery at start, register, consume,
//!   claim, heartbeat and the agent's own lease clock, control queue,
//!   offline/maintenance, shutdown with a grace (the record is then marked offline).
//! - [`runner`]: one job: run directory, phases, output streaming, outcome, artifacts.
//! - [`spool`]: every write about a job goes to disk first, then to the API in order,
//!   retried while the API is away; only a 409 ends delivery.
//! - [`phases`]: the per-phase rules in one `match`.
//! - [`phase_env`]: the allow-list of the phases' environment.
//! - [`process`]: phase processes in their own process group; killing the tree; the
//!   agent's watchdog and the start-up sweep that make phases die with the agent.
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
pub mod spool;
pub mod telemetry;

pub use config::Config;
pub use lifecycle::run;
