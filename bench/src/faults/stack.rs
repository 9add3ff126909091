//! Private service instances for the fault suite: RabbitMQ nodes of our own (own node
//! name, ports, mnesia, logs, cookie, empty plugin list) and a Redis with AOF on a free
//! port. Never the machine's shared services. Everything is killed and its directory
//! removed when the value is dropped.

use crate::harness::{Proc, free_port};
use anyhow::{Context, anyhow, bail};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const RABBIT_BIN: &str = "/usr/lib/rabbitmq/bin";

/// Where the private instances keep their files, and the Erlang cookie they share.
pub struct StackDir {
    pub dir: tempfile::TempDir,
    /// `HOME` of every node and `rabbitmqctl` call: holds `.erlang.cookie`.
    home: PathBuf,
}

impl StackDir {
    pub fn new(run_id: &str) -> anyhow::Result<StackDir> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("tf-faults-{run_id}-"))
            .tempdir()
            .context("cannot create a temporary directory")?;
        let home = dir.path().join("home");
        std::fs::create_dir_all(&home)?;
        let cookie = home.join(".erlang.cookie");
        let value = uuid::Uuid::new_v4().simple().to_string().to_uppercase();
        std::fs::write(&cookie, value)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&cookie, std::fs::Permissions::from_mode(0o400))?;
        Ok(StackDir { dir, home })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// Starts a private `epmd` when none listens on 127.0.0.1:4369 (on a machine with the
/// shared RabbitMQ it is already there and is shared: it only maps node names to ports).
/// A node would otherwise start a daemon epmd that outlives the run.
pub fn ensure_epmd(sd: &StackDir) -> anyhow::Result<Option<Proc>> {
    if std::net::TcpStream::connect_timeout(
        &"127.0.0.1:4369".parse().expect("static address"),
        Duration::from_millis(500),
    )
    .is_ok()
    {
        return Ok(None);
    }
    let log = sd.path().join("epmd.log");
    let p = Proc::spawn(
        "epmd",
        Path::new("epmd"),
        &["-address", "127.0.0.1", "-port", "4369"],
        &[],
        log,
    )?;
    std::thread::sleep(Duration::from_millis(300));
    Ok(Some(p))
}

/// One private RabbitMQ node.
pub struct Rabbit {
    pub node: String,
    pub port: u16,
    dist_port: u16,
    dir: PathBuf,
    home: PathBuf,
    proc: Option<Proc>,
}

impl Rabbit {
    /// Prepares node `name` (e.g. `tfb1234a`): ports, directories, config files.
    pub fn new(sd: &StackDir, name: &str) -> anyhow::Result<Rabbit> {
        if !Path::new(RABBIT_BIN).join("rabbitmq-server").is_file() {
            bail!("{RABBIT_BIN}/rabbitmq-server not found (install the rabbitmq-server package)");
        }
        let dir = sd.path().join(name);
        for d in ["mnesia", "log"] {
            std::fs::create_dir_all(dir.join(d))?;
        }
        let port = free_port()?;
        let mut dist_port = free_port()?;
        while dist_port == port {
            dist_port = free_port()?;
        }
        std::fs::write(dir.join("enabled_plugins"), "[].\n")?;
        std::fs::write(dir.join("advanced.config"), "[].\n")?;
        std::fs::write(dir.join("rabbitmq-env.conf"), "")?;
        std::fs::write(
            dir.join("rabbitmq.conf"),
            format!(
                "listeners.tcp.1 = 127.0.0.1:{port}\n\
                 disk_free_limit.absolute = 50MB\n\
                 log.file.level = warning\n\
                 cluster_partition_handling = pause_minority\n"
            ),
        )?;
        Ok(Rabbit {
            node: format!("{name}@localhost"),
            port,
            dist_port,
            dir,
            home: sd.home.clone(),
            proc: None,
        })
    }

    pub fn uri(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        let d = |s: &str| self.dir.join(s).display().to_string();
        vec![
            ("HOME", self.home.display().to_string()),
            ("RABBITMQ_CONF_ENV_FILE", d("rabbitmq-env.conf")),
            ("RABBITMQ_NODENAME", self.node.clone()),
            ("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1".into()),
            ("RABBITMQ_NODE_PORT", self.port.to_string()),
            ("RABBITMQ_DIST_PORT", self.dist_port.to_string()),
            ("RABBITMQ_MNESIA_BASE", d("mnesia")),
            ("RABBITMQ_LOG_BASE", d("log")),
            ("RABBITMQ_ENABLED_PLUGINS_FILE", d("enabled_plugins")),
            ("RABBITMQ_CONFIG_FILE", d("rabbitmq.conf")),
            ("RABBITMQ_ADVANCED_CONFIG_FILE", d("advanced.config")),
            ("RABBITMQ_PID_FILE", d("pid")),
            ("ERL_EPMD_ADDRESS", "127.0.0.1".into()),
            (
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
                "-kernel inet_dist_use_interface {127,0,0,1}".into(),
            ),
        ]
    }

    /// Starts the node and waits until it accepts AMQP connections (at most 90 s).
    pub async fn start(&mut self) -> anyhow::Result<()> {
        if self.proc.is_some() {
            bail!("node {} is already running", self.node);
        }
        let _ = std::fs::remove_file(self.dir.join("pid"));
        let log = self
            .dir
            .join(format!("server-{}.out", crate::events::now_ms() as u64));
        let env = self.env();
        let env: Vec<(&str, String)> = env.iter().map(|(k, v)| (*k, v.clone())).collect();
        let p = Proc::spawn(
            &self.node,
            &Path::new(RABBIT_BIN).join("rabbitmq-server"),
            &[],
            &env,
            log,
        )?;
        self.proc = Some(p);
        let end = Instant::now() + Duration::from_secs(90);
        loop {
            if let Ok(Ok(c)) = tokio::time::timeout(
                Duration::from_secs(3),
                lapin::Connection::connect(&self.uri(), lapin::ConnectionProperties::default()),
            )
            .await
            {
                let _ = c.close(200, "ready".into()).await;
                return Ok(());
            }
            let dead = self.proc.as_mut().is_none_or(|p| !p.alive());
            if dead || Instant::now() > end {
                let tail = self.proc.as_ref().map(Proc::tail).unwrap_or_default();
                self.kill().await;
                bail!(
                    "RabbitMQ node {} did not start ({}):\n{tail}",
                    self.node,
                    if dead { "it exited" } else { "90 s" }
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn beam_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.dir.join("pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Graceful stop: SIGTERM to the Erlang VM (RabbitMQ stops cleanly on it); SIGKILL
    /// after 60 s.
    pub async fn stop(&mut self) {
        if let Some(pid) = self.beam_pid() {
            signal_pid(pid, "TERM");
        }
        if let Some(mut p) = self.proc.take() {
            let end = Instant::now() + Duration::from_secs(60);
            while p.alive() && Instant::now() < end {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            if p.alive() {
                if let Some(pid) = self.beam_pid() {
                    signal_pid(pid, "KILL");
                }
                p.kill().await;
            }
        }
    }

    /// SIGKILL of the Erlang VM (a crash).
    pub async fn kill(&mut self) {
        if let Some(pid) = self.beam_pid() {
            signal_pid(pid, "KILL");
        }
        if let Some(mut p) = self.proc.take() {
            let end = Instant::now() + Duration::from_secs(10);
            while p.alive() && Instant::now() < end {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            p.kill().await;
        }
    }

    /// `rabbitmqctl -n <node> args...`; the output, or an error with it.
    pub async fn ctl(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut cmd = tokio::process::Command::new(Path::new(RABBIT_BIN).join("rabbitmqctl"));
        cmd.env_clear();
        for k in ["PATH", "LANG"] {
            if let Ok(v) = std::env::var(k) {
                cmd.env(k, v);
            }
        }
        for (k, v) in self.env() {
            cmd.env(k, v);
        }
        cmd.arg("-n").arg(&self.node).args(args);
        cmd.stdin(std::process::Stdio::null()).kill_on_drop(true);
        let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
            .await
            .map_err(|_| anyhow!("rabbitmqctl {} timed out", args.join(" ")))?
            .context("cannot run rabbitmqctl")?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if !out.status.success() {
            bail!(
                "rabbitmqctl -n {} {}: {}",
                self.node,
                args.join(" "),
                text.trim()
            );
        }
        Ok(text)
    }

    /// Makes this (running) node join `seed`'s cluster.
    pub async fn join(&self, seed: &Rabbit) -> anyhow::Result<()> {
        self.ctl(&["stop_app"]).await?;
        self.ctl(&["join_cluster", &seed.node]).await?;
        self.ctl(&["start_app"]).await?;
        Ok(())
    }
}

impl Drop for Rabbit {
    fn drop(&mut self) {
        // The wrapper script is our child; the VM is its child and would survive it.
        if self.proc.is_some()
            && let Some(pid) = self.beam_pid()
        {
            signal_pid(pid, "KILL");
        }
    }
}

/// A private `redis-server` with AOF on.
pub struct Redis {
    pub port: u16,
    dir: PathBuf,
    proc: Option<Proc>,
}

impl Redis {
    pub fn new(sd: &StackDir, name: &str) -> anyhow::Result<Redis> {
        let dir = sd.path().join(name);
        std::fs::create_dir_all(&dir)?;
        Ok(Redis {
            port: free_port()?,
            dir,
            proc: None,
        })
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Starts it (reloading its AOF, if any) and waits until it answers PING (60 s).
    pub async fn start(&mut self) -> anyhow::Result<()> {
        if self.proc.is_some() {
            bail!("redis is already running");
        }
        let port = self.port.to_string();
        let dir = self.dir.display().to_string();
        let log = self
            .dir
            .join(format!("redis-{}.out", crate::events::now_ms() as u64));
        let p = Proc::spawn(
            "redis-server",
            Path::new("redis-server"),
            &[
                "--port",
                &port,
                "--bind",
                "127.0.0.1",
                "--dir",
                &dir,
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
                "--daemonize",
                "no",
                "--protected-mode",
                "yes",
            ],
            &[],
            log,
        )?;
        self.proc = Some(p);
        let client = redis::Client::open(self.url())?;
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            let ok = async {
                let mut c = client.get_multiplexed_async_connection().await.ok()?;
                let r: String = redis::cmd("PING").query_async(&mut c).await.ok()?;
                Some(r)
            };
            if let Ok(Some(_)) = tokio::time::timeout(Duration::from_secs(2), ok).await {
                return Ok(());
            }
            let dead = self.proc.as_mut().is_none_or(|p| !p.alive());
            if dead || Instant::now() > end {
                let tail = self.proc.as_ref().map(Proc::tail).unwrap_or_default();
                if let Some(p) = self.proc.take() {
                    p.kill().await;
                }
                bail!("redis-server did not start:\n{tail}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM (Redis rewrites nothing, flushes its AOF and exits).
    pub async fn stop(&mut self) {
        if let Some(p) = self.proc.take() {
            p.stop().await;
        }
    }

    /// SIGKILL.
    pub async fn kill(&mut self) {
        if let Some(p) = self.proc.take() {
            p.kill().await;
        }
    }
}

/// The signal named `signal` without its `SIG` (`"TERM"`, `"KILL"`), and `pid` as
/// `nix` takes it.
fn signal_and_pid(pid: u32, signal: &str) -> Option<(nix::unistd::Pid, nix::sys::signal::Signal)> {
    let signal = format!("SIG{signal}").parse().ok()?;
    let pid = i32::try_from(pid).ok().filter(|p| *p > 1)?;
    Some((nix::unistd::Pid::from_raw(pid), signal))
}

/// Sends a signal to one process id with `nix`'s safe kill(2) (the workspace forbids
/// `unsafe`). `false` when it was not delivered (ESRCH: already gone).
pub fn signal_pid(pid: u32, signal: &str) -> bool {
    signal_and_pid(pid, signal)
        .is_some_and(|(pid, signal)| nix::sys::signal::kill(pid, signal).is_ok())
}

/// Sends a signal to a process group (`killpg`); `false` as for [`signal_pid`].
pub fn signal_group(pgid: u32, signal: &str) -> bool {
    signal_and_pid(pgid, signal)
        .is_some_and(|(pgid, signal)| nix::sys::signal::killpg(pgid, signal).is_ok())
}
