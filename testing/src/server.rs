//! The real `testflinger-server` binary, isolated: its own port, Redis prefix and data
//! dir, settings through its environment.

use crate::Cleanup;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long the server has to answer `/readyz` after it starts.
const READY_WITHIN: Duration = Duration::from_secs(30);

/// A running `testflinger-server` with its own Redis prefix, port and temp dir (`data/`
/// is its `DATA_PATH`, `server.log` its stderr). On drop it is killed, then its Redis
/// keys (`<prefix>:*`), the broker queues it was told about ([`Server::own_queue`]) and
/// its temp dir are removed.
///
/// Its environment: `AMQP_URI` and `REDIS_URL` of the tests, `DATA_PATH`,
/// `TESTFLINGER_BIND`, `TESTFLINGER_REDIS_PREFIX`, `TESTFLINGER_SUBMIT_CONSUMER=false`
/// (the shared submission queue belongs to other servers), `RUST_LOG=info`, no
/// `TESTFLINGER_CONFIG`; then the caller's variables, which win.
///
/// Start and restart block (bounded) until `/readyz` answers 200 (Redis and RabbitMQ
/// reachable); from an async test call them in `tokio::task::block_in_place`.
pub struct Server {
    /// `http://127.0.0.1:<port>`.
    pub url: String,
    pub port: u16,
    /// Its Redis prefix.
    pub prefix: String,
    /// Its temp dir (`data/`, `server.log`); removed on drop.
    pub dir: tempfile::TempDir,
    env: Vec<(String, String)>,
    child: Child,
    // Declared last: runs after the process is killed.
    cleanup: Cleanup,
}

impl Server {
    /// Starts a server with Redis prefix `prefix` (unique to the test) and extra
    /// environment `env`; retries on another port if the first was taken meanwhile.
    #[track_caller]
    pub fn start<K, V>(prefix: &str, env: impl IntoIterator<Item = (K, V)>) -> Server
    where
        K: Into<String>,
        V: Into<String>,
    {
        let env: Vec<(String, String)> =
            env.into_iter().map(|(k, v)| (k.into(), v.into())).collect();
        let var = |name: &str, default: String| {
            env.iter()
                .rev()
                .find(|(k, _)| k == name)
                .map_or(default, |(_, v)| v.clone())
        };
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("data")).expect("data dir");
        let cleanup = Cleanup::new()
            .amqp(&var("AMQP_URI", crate::amqp_uri()))
            .redis_prefix(&var("REDIS_URL", crate::redis_url()), prefix);
        let mut last_err = String::new();
        for _ in 0..3 {
            let port = crate::free_port();
            let mut child = spawn(dir.path(), prefix, port, &env, false);
            match wait_ready(port, &mut child, dir.path()) {
                Ok(()) => {
                    return Server {
                        url: format!("http://127.0.0.1:{port}"),
                        port,
                        prefix: prefix.to_string(),
                        dir,
                        env,
                        child,
                        cleanup,
                    };
                }
                Err(e) => {
                    last_err = e;
                    let _ = child.kill();
                    let _ = child.wait();
                }
            }
        }
        panic!("testflinger-server did not start: {last_err}");
    }

    /// The binary: `TESTFLINGER_SERVER_BIN`, or `testflinger-server` next to the test's
    /// binaries.
    pub fn binary() -> PathBuf {
        match std::env::var("TESTFLINGER_SERVER_BIN") {
            Ok(p) => PathBuf::from(p),
            Err(_) => crate::binary("testflinger-server"),
        }
    }

    /// Its `DATA_PATH`.
    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// What it has written to stderr.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// Deletes broker queue `name` when the server drops.
    pub fn own_queue(&self, name: impl Into<String>) {
        self.cleanup.queue(name);
    }

    /// SIGKILLs the server (the API is down until [`Server::restart`]).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the server again on the same port, prefix, data dir and environment
    /// (appending to its log); waits until it is ready, retrying while the port is not
    /// free yet.
    #[track_caller]
    pub fn restart(&mut self) {
        self.stop();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let mut child = spawn(self.dir.path(), &self.prefix, self.port, &self.env, true);
            match wait_ready(self.port, &mut child, self.dir.path()) {
                Ok(()) => {
                    self.child = child;
                    return;
                }
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    assert!(Instant::now() < deadline, "server did not restart: {e}");
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
        // Then `cleanup` (keys, queues) and `dir` drop.
    }
}

fn spawn(dir: &Path, prefix: &str, port: u16, env: &[(String, String)], append: bool) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(append)
        .write(true)
        .truncate(!append)
        .open(dir.join("server.log"))
        .expect("server log");
    Command::new(Server::binary())
        .env("AMQP_URI", crate::amqp_uri())
        .env("REDIS_URL", crate::redis_url())
        .env("DATA_PATH", dir.join("data"))
        .env("TESTFLINGER_BIND", format!("127.0.0.1:{port}"))
        .env("TESTFLINGER_REDIS_PREFIX", prefix)
        .env("TESTFLINGER_SUBMIT_CONSUMER", "false")
        .env("RUST_LOG", "info")
        .env_remove("TESTFLINGER_CONFIG")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn testflinger-server")
}

/// Waits until `GET /readyz` answers 200, the process exits, or [`READY_WITHIN`].
fn wait_ready(port: u16, child: &mut Child, dir: &Path) -> Result<(), String> {
    let deadline = Instant::now() + READY_WITHIN;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            let log = std::fs::read_to_string(dir.join("server.log")).unwrap_or_default();
            return Err(format!("server exited with {status}: {log}"));
        }
        if get_ok(port, "/readyz") {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = std::fs::read_to_string(dir.join("server.log")).unwrap_or_default();
    Err(format!("no answer within {READY_WITHIN:?}: {log}"))
}

/// Whether `GET path` on the loopback `port` answers 200 (plain HTTP/1.0, blocking).
fn get_ok(port: u16, path: &str) -> bool {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(5)));
    if write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n").is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    s.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.") && head.ends_with(b" 200")
}
