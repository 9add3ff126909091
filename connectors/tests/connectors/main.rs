//! Integration tests: each runs the built `testflinger-device-connectors` binary in a
//! temporary run directory against real things (an sshd on a loopback port with a
//! throwaway key, TCP and HTTP servers in the test, the real API with RabbitMQ/Redis).

mod api;
mod cli;
mod docs_reference;
mod multi;
mod multi_agents;
mod noprovision;
mod qemu;
mod reserve;
mod serial;
mod support;
