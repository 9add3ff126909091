//! A `redis-server` of one test's own.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `redis-server` of this test's own: a free port, its own directory, killed on drop.
pub struct PrivateRedis {
    pub child: Child,
    pub port: u16,
    pub dir: tempfile::TempDir,
}

impl PrivateRedis {
    /// Starts one on a free port with `extra` arguments and waits until it answers.
    pub fn start(extra: &[&str]) -> PrivateRedis {
        Self::start_on(crate::free_port(), extra)
    }

    /// [`PrivateRedis::start`] on a given port (a Redis coming back where it was).
    pub fn start_on(port: u16, extra: &[&str]) -> PrivateRedis {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut r = PrivateRedis {
            child: Self::spawn(port, dir.path(), extra),
            port,
            dir,
        };
        r.wait_ready();
        r
    }

    /// Starts the process only (`--save ""`, data in `dir`).
    pub fn spawn(port: u16, dir: &Path, extra: &[&str]) -> Child {
        Command::new("redis-server")
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--save",
                "",
            ])
            .arg("--dir")
            .arg(dir)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (Debian package redis-server) must be installed")
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Waits until the server answers PING with PONG (not LOADING).
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.cli(&["PING"]).trim() == "PONG" {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("private redis on port {} did not start", self.port);
    }

    /// Runs `redis-cli` against it; returns its stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
