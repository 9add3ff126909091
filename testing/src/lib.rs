//! The harness the workspace's tests share (a dev-dependency only).
//!
//! - [`free_port`], [`short_id`], [`unique`]: names and ports no other test uses.
//! - [`Server`]: the real `testflinger-server` binary with its own Redis prefix, data dir
//!   and port; killed and cleaned up (Redis keys, broker queues, temp dir) on drop.
//! - [`Agent`]: a `testflinger-agent` process, killed on drop.
//! - [`PrivateRedis`]: a `redis-server` of one test's own, killed on drop.
//! - [`Cleanup`]: removes a Redis prefix's keys, broker queues and directories on drop
//!   (for tests that run the API in process).
//! - [`Holder`]: holds jobs as a test agent (claim once, keep the fencing token).
//! - [`peak_rss_kib`]: a process's peak resident memory.
//! - [`reference`]: checks that a reference page names every item of a struct.
//!
//! The services are the machine's: `AMQP_URI` (default
//! `amqp://guest:guest@127.0.0.1:5672/%2f`) and `REDIS_URL` (default
//! `redis://127.0.0.1:6379/`). The binaries are the workspace's, built beforehand in the
//! same target dir (`cargo build --workspace --bins`).

mod agent;
mod cleanup;
mod docs;
mod holder;
mod private_redis;
mod server;

pub use agent::{Agent, write_agent_config};
pub use cleanup::{Cleanup, delete_keys, delete_queues};
pub use docs::{Reference, reference};
pub use holder::Holder;
pub use private_redis::PrivateRedis;
pub use server::Server;

use std::path::PathBuf;
use std::time::Duration;

/// RabbitMQ of the tests: `AMQP_URI`, or the loopback default.
pub fn amqp_uri() -> String {
    std::env::var("AMQP_URI").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// Redis of the tests: `REDIS_URL`, or the loopback default.
pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".into())
}

/// A current-thread runtime, for synchronous tests that `block_on` their async calls.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// An HTTP client for synchronous tests (installs rustls' ring provider first):
/// `timeout` per request and no idle pooled connections. A client used only inside
/// `block_on` never sees the server close an idle connection (after its keep-alive,
/// 5 s) and would reuse a dead one (hyper's `IncompleteMessage`).
pub fn http_client(timeout: Duration) -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(timeout)
        .pool_max_idle_per_host(0)
        .build()
        .expect("http client")
}

/// A loopback port nothing listens on (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Ten random hex digits.
pub fn short_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..10].to_string()
}

/// A name no other test (or test run) uses: `t-<tag>-<ten hex digits>`.
pub fn unique(tag: &str) -> String {
    format!("t-{tag}-{}", short_id())
}

/// The directory of the built binaries: the running test's `target/<profile>` (a test
/// binary lives in `target/<profile>/deps`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    exe.parent()
        .and_then(std::path::Path::parent)
        .expect("target profile dir")
        .to_path_buf()
}

/// A workspace binary (`testflinger-server`, `testflinger-agent`, ...), which must be
/// built already.
#[track_caller]
pub fn binary(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: build it first with `cargo build --workspace --bins` in the same \
         target dir",
        path.display()
    );
    path
}

/// Peak resident memory (`VmHWM`) of process `pid`, in KiB (0 if unknown).
pub fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}
