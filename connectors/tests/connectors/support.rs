//! Helpers: a run directory, the binary, bounded waits, a throwaway sshd.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_testflinger-device-connectors");

/// A temporary run directory with a device config and a job file.
pub struct Run {
    pub dir: tempfile::TempDir,
}

impl Run {
    pub fn new(config_yaml: &str, job: &serde_json::Value) -> Run {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("device.yaml"), config_yaml).expect("write config");
        std::fs::write(dir.path().join("job.json"), job.to_string()).expect("write job");
        Run { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn command(&self, device_type: &str, stage: &str) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.args([device_type, stage, "-c", "device.yaml", "job.json"])
            .current_dir(self.path())
            .stdin(Stdio::null());
        cmd
    }

    /// Runs a stage to completion (bounded).
    pub fn run(&self, device_type: &str, stage: &str) -> Output {
        run_bounded(self.command(device_type, stage), Duration::from_secs(60))
    }

    pub fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.path().join(name))
            .unwrap_or_else(|e| panic!("reading {name}: {e}"))
    }

    pub fn read_json(&self, name: &str) -> serde_json::Value {
        serde_json::from_str(&self.read(name)).expect("valid JSON")
    }
}

pub fn code(out: &Output) -> i32 {
    out.status.code().unwrap_or(-1)
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs a command with captured output, killed (and failing the test) after `limit`.
pub fn run_bounded(mut cmd: Command, limit: Duration) -> Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out.expect("wait"),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!("command did not finish within {limit:?}");
        }
    }
}

/// Waits for a child to exit, killing it and failing the test after `limit`.
pub fn wait_child(child: &mut Child, limit: Duration) -> i32 {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status.code().unwrap_or(-1);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("process did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls `cond` every 20 ms until it holds; fails the test after `limit`.
pub fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A child's output, read in the background.
pub struct Collected {
    text: Arc<Mutex<String>>,
    reader: std::thread::JoinHandle<()>,
}

impl Collected {
    /// What was read so far.
    pub fn lock(&self) -> std::sync::LockResult<std::sync::MutexGuard<'_, String>> {
        self.text.lock()
    }

    /// Everything the child wrote, once its output ended (the child exited and the
    /// reader got EOF; at most 10 s, for a grandchild that keeps the pipe open): read
    /// right after the child's exit, the last lines may still be in the pipe.
    pub fn finished(&self) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.reader.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.text.lock().map(|t| t.clone()).unwrap_or_default()
    }
}

/// Collects a child's output in the background.
pub fn collect(mut r: impl Read + Send + 'static) -> Collected {
    let text = Arc::new(Mutex::new(String::new()));
    let b = text.clone();
    let reader = std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = r.read(&mut chunk) {
            if n == 0 {
                break;
            }
            if let Ok(mut t) = b.lock() {
                t.push_str(&String::from_utf8_lossy(&chunk[..n]));
            }
        }
    });
    Collected { text, reader }
}

pub use testflinger_testing::free_port;

pub fn current_user() -> String {
    let out = Command::new("id").arg("-un").output().expect("id");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// An ed25519 key pair in `dir`; returns (private key path, public key line).
pub fn keygen(dir: &Path, name: &str, comment: &str) -> (PathBuf, String) {
    let path = dir.join(name);
    let status = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
        .arg(&path)
        .stdout(Stdio::null())
        .status()
        .expect("ssh-keygen");
    assert!(status.success(), "ssh-keygen failed");
    let public = std::fs::read_to_string(path.with_extension("pub")).expect("read pub key");
    (path, public.trim().to_string())
}

/// A throwaway sshd on 127.0.0.1: its own host key, config and authorized_keys file in a
/// temp dir (never the system's), which starts out holding the "agent" key.
pub struct Sshd {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub agent_key: PathBuf,
    pub agent_pub: String,
    pub config: PathBuf,
    child: Option<Child>,
}

impl Sshd {
    /// Prepares the files without starting the server.
    pub fn prepare() -> Sshd {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let (host_key, _) = keygen(dir.path(), "host_key", "host");
        let (agent_key, agent_pub) = keygen(dir.path(), "agent_key", "agent@test");
        std::fs::write(dir.path().join("authorized_keys"), format!("{agent_pub}\n"))
            .expect("authorized_keys");
        let config = dir.path().join("sshd_config");
        let d = dir.path().display();
        std::fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nPidFile {d}/sshd.pid\n\
                 AuthorizedKeysFile {d}/authorized_keys\nStrictModes no\nUsePAM no\n\
                 PasswordAuthentication no\nKbdInteractiveAuthentication no\n\
                 PubkeyAuthentication yes\nPermitRootLogin prohibit-password\n\
                 LogLevel ERROR\nPrintMotd no\n",
                host_key.display()
            ),
        )
        .expect("sshd_config");
        // sshd running as root insists on its privilege separation directory.
        let _ = std::fs::create_dir_all("/run/sshd");
        Sshd {
            dir,
            port,
            agent_key,
            agent_pub,
            config,
            child: None,
        }
    }

    /// Prepares and starts the server in the foreground (`-D`), waiting for its banner.
    pub fn start() -> Sshd {
        let mut s = Sshd::prepare();
        let log = std::fs::File::create(s.dir.path().join("sshd.log")).expect("log");
        let child = Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(&s.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start /usr/sbin/sshd (run scripts/ci/connectors-deps.sh)");
        s.child = Some(child);
        s.wait_ready();
        s
    }

    /// Waits until the server sends its SSH banner.
    pub fn wait_ready(&self) {
        let port = self.port;
        wait_until("sshd banner", Duration::from_secs(10), || {
            let Ok(mut c) = TcpStream::connect(("127.0.0.1", port)) else {
                return false;
            };
            let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
            let mut buf = [0u8; 8];
            c.read_exact(&mut buf).is_ok() && buf.starts_with(b"SSH-")
        });
    }

    /// The command a reboot script uses to start this server as a daemon.
    pub fn daemon_command(&self) -> String {
        format!("/usr/sbin/sshd -f {}", self.config.display())
    }

    pub fn authorized_keys(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("authorized_keys")).expect("read keys")
    }

    /// Device config keys that point the connector at this server.
    pub fn device_config(&self, extra: &str) -> String {
        format!(
            "agent_name: test-agent\ndevice_ip: 127.0.0.1\ntest_username: {}\nssh_port: {}\n\
             ssh_identity_file: {}\nssh_authorized_keys: {}/authorized_keys\n{extra}",
            current_user(),
            self.port,
            self.agent_key.display(),
            self.dir.path().display()
        )
    }

    /// Whether `key` logs in: ssh with only that identity runs `true`.
    pub fn can_login(&self, key: &Path) -> bool {
        let out = run_bounded(ssh_command(self.port, key, "true"), Duration::from_secs(30));
        out.status.success()
    }
}

pub fn ssh_command(port: u16, key: &Path, remote: &str) -> Command {
    let mut cmd = Command::new("ssh");
    cmd.args([
        "-o",
        "BatchMode=yes",
        "-o",
        "ConnectTimeout=5",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "LogLevel=ERROR",
        "-o",
        "IdentitiesOnly=yes",
        "-p",
        &port.to_string(),
        "-i",
    ])
    .arg(key)
    .arg(format!("{}@127.0.0.1", current_user()))
    .arg(remote)
    .stdin(Stdio::null());
    cmd
}

impl Drop for Sshd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            return;
        }
        // A daemonized server (started by a reboot script in a test) wrote its pid here.
        if let Ok(pid) = std::fs::read_to_string(self.dir.path().join("sshd.pid")) {
            let pid = pid.trim();
            if !pid.is_empty() && pid.chars().all(|c| c.is_ascii_digit()) {
                let _ = Command::new("kill").arg(pid).status();
            }
        }
    }
}

/// A one-route HTTP server: answers each request with `respond(path)` (status, body)
/// and records the paths asked for.
pub struct HttpServer {
    pub port: u16,
    pub paths: Arc<Mutex<Vec<String>>>,
}

impl HttpServer {
    pub fn start(respond: impl Fn(&str) -> (u16, String) + Send + 'static) -> HttpServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let paths = Arc::new(Mutex::new(Vec::new()));
        let p = paths.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut s) = stream else { continue };
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let text = String::from_utf8_lossy(&req);
                let path = text.split_whitespace().nth(1).unwrap_or("").to_string();
                p.lock().expect("lock").push(path.clone());
                let (status, body) = respond(&path);
                let _ = write!(
                    s,
                    "HTTP/1.1 {status} X\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        HttpServer { port, paths }
    }
}
