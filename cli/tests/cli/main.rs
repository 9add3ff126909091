//! Integration tests: the built `testflinger` binary against a spawned
//! `testflinger-server` (real RabbitMQ and Redis, a private Redis prefix and private
//! queue names per test) and, where a job must run, a spawned `testflinger-agent`.
//!
//! The helper builds nothing: build the binaries first, in the same target dir:
//! `cargo build -p testflinger-api -p testflinger-agent` (then `cargo test -p
//! testflinger-cli`). Services: `AMQP_URI` (default `amqp://guest:guest@127.0.0.1:5672/%2f`)
//! and `REDIS_URL` (default `redis://127.0.0.1:6379/`).

mod agent;
mod auth;
mod docs_reference;
mod helpers;
mod jobs;
mod parity;
mod poll;
mod queues;
mod submit;
