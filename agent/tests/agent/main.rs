//! Integration tests of the agent against a real `testflinger-server`, RabbitMQ and
//! Redis. Build the server first, in the same target dir:
//!
//! ```text
//! CARGO_TARGET_DIR=/work/target-agent cargo build -p testflinger-api --bin testflinger-server
//! CARGO_TARGET_DIR=/work/target-agent cargo test -p testflinger-agent
//! ```
//!
//! `AMQP_URI` and `REDIS_URL` default to the loopback services. Each test has its own
//! server, Redis prefix and queue, all removed when its `TestLab` drops.

mod auth;
mod control;
mod delivery;
mod docs_reference;
mod faults;
mod lab;
mod runs;
mod startup;
