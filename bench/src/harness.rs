//! Processes and private names: the server and agents a scenario starts, the run's Redis
//! prefix and queue names, RSS readings, and the clean-up after each scenario.

use anyhow::{Context, anyhow, bail};
use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

/// Command-line choices the scenarios read.
#[derive(Debug, Clone)]
pub struct Options {
    pub quick: bool,
    pub bin_dir: Option<PathBuf>,
    pub amqp_uri: String,
    pub redis_url: String,
    pub agents: Option<usize>,
    pub jobs: Option<usize>,
    pub seconds: Option<u64>,
    pub server_env: Vec<(String, String)>,
}

const BUILD_HINT: &str = "build them with: cargo build --release -p testflinger-bench -p testflinger-api -p testflinger-agent";

/// State shared by the scenarios of one run.
pub struct Ctx {
    pub opts: Options,
    pub run_id: String,
    /// Every Redis key and queue of this run starts with it.
    pub prefix: String,
    pub bin_dir: PathBuf,
    pub tmp: tempfile::TempDir,
    pub http: reqwest::Client,
    /// `raw-publish` msg/s measured earlier in this run (the `submit` ratio needs it).
    pub raw_publish_rate: Option<f64>,
    queues: Mutex<BTreeSet<String>>,
    redis: redis::Client,
}

impl Ctx {
    /// Checks that RabbitMQ and Redis answer and that the server binary exists.
    pub async fn new(opts: Options) -> anyhow::Result<Ctx> {
        let bin_dir = match &opts.bin_dir {
            Some(d) => d.clone(),
            None => std::env::current_exe()
                .context("cannot find this executable's directory")?
                .parent()
                .map(Path::to_path_buf)
                .ok_or_else(|| anyhow!("this executable has no parent directory"))?,
        };
        let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
        let prefix = format!("bench-{run_id}");
        let redis = redis::Client::open(opts.redis_url.as_str())
            .with_context(|| format!("bad REDIS_URL {}", opts.redis_url))?;
        let mut con = tokio::time::timeout(
            Duration::from_secs(3),
            redis.get_multiplexed_async_connection(),
        )
        .await
        .map_err(|_| anyhow!("Redis at {} did not answer in 3 s", opts.redis_url))?
        .with_context(|| format!("cannot reach Redis at {}", opts.redis_url))?;
        let _: String = redis::cmd("PING").query_async(&mut con).await?;
        let conn = amqp_connect(&opts.amqp_uri).await?;
        let _ = conn.close(200, "probe".into()).await;
        let http = reqwest::Client::builder()
            .tcp_nodelay(true)
            .pool_max_idle_per_host(256)
            .timeout(Duration::from_secs(120))
            .build()
            .context("http client")?;
        let tmp = tempfile::Builder::new()
            .prefix(&format!("tf-{prefix}-"))
            .tempdir()
            .context("cannot create a temporary directory")?;
        let ctx = Ctx {
            opts,
            run_id,
            prefix,
            bin_dir,
            tmp,
            http,
            raw_publish_rate: None,
            queues: Mutex::new(BTreeSet::new()),
            redis,
        };
        ctx.binary("testflinger-server")?;
        Ok(ctx)
    }

    pub fn quick(&self) -> bool {
        self.opts.quick
    }

    /// Path of one of the project's binaries, or an error naming the build command.
    pub fn binary(&self, name: &str) -> anyhow::Result<PathBuf> {
        let p = self.bin_dir.join(name);
        if p.is_file() {
            Ok(p)
        } else {
            bail!(
                "{name} not found in {} ({BUILD_HINT}, or pass --bin-dir)",
                self.bin_dir.display()
            )
        }
    }

    /// A private queue name, remembered for deletion.
    pub fn queue(&self, name: &str) -> String {
        let q = format!("{}-{name}", self.prefix);
        if let Ok(mut s) = self.queues.lock() {
            s.insert(q.clone());
        }
        q
    }

    pub async fn amqp(&self) -> anyhow::Result<Connection> {
        amqp_connect(&self.opts.amqp_uri).await
    }

    pub async fn redis(&self) -> anyhow::Result<redis::aio::MultiplexedConnection> {
        Ok(self.redis.get_multiplexed_async_connection().await?)
    }

    /// Deletes this run's queues and Redis keys (never anything else).
    pub async fn cleanup(&self) -> anyhow::Result<()> {
        let queues: Vec<String> = self
            .queues
            .lock()
            .map(|mut s| std::mem::take(&mut *s).into_iter().collect())
            .unwrap_or_default();
        if !queues.is_empty() {
            let conn = self.amqp().await?;
            let mut ch = conn.create_channel().await?;
            for q in &queues {
                if let Err(e) = ch
                    .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                    .await
                {
                    // A failed delete closes the channel; go on with a new one.
                    eprintln!("testflinger-bench: could not delete queue {q}: {e}");
                    ch = conn.create_channel().await?;
                }
            }
            let _ = conn.close(200, "bench clean-up".into()).await;
        }
        let mut con = self.redis().await?;
        let pattern = format!("{}*", self.prefix);
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut con)
                .await?;
            if !keys.is_empty() {
                let _: i64 = redis::cmd("UNLINK")
                    .arg(&keys)
                    .query_async(&mut con)
                    .await?;
            }
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        Ok(())
    }

    /// A fresh directory under the run's temporary directory.
    pub fn dir(&self, name: &str) -> anyhow::Result<PathBuf> {
        let d = self.tmp.path().join(name);
        std::fs::create_dir_all(&d).with_context(|| format!("cannot create {}", d.display()))?;
        Ok(d)
    }
}

pub async fn amqp_connect(uri: &str) -> anyhow::Result<Connection> {
    tokio::time::timeout(
        Duration::from_secs(5),
        Connection::connect(uri, ConnectionProperties::default()),
    )
    .await
    .map_err(|_| anyhow!("RabbitMQ did not answer in 5 s"))?
    .context("cannot connect to RabbitMQ (AMQP_URI)")
}

/// Ready messages and consumers of a queue, or `None` when it does not exist.
pub async fn queue_counts(conn: &Connection, q: &str) -> anyhow::Result<Option<(u32, u32)>> {
    let ch = conn.create_channel().await?;
    let r = ch
        .queue_declare(
            q.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await;
    match r {
        Ok(s) => {
            let _ = ch.close(200, "count".into()).await;
            Ok(Some((s.message_count(), s.consumer_count())))
        }
        Err(_) => Ok(None),
    }
}

/// Waits until `n` consumers read queue `q` (agents are ready to take jobs).
pub async fn wait_consumers(ctx: &Ctx, q: &str, n: u32, within: Duration) -> anyhow::Result<()> {
    let conn = ctx.amqp().await?;
    let end = Instant::now() + within;
    loop {
        if let Some((_, c)) = queue_counts(&conn, q).await?
            && c >= n
        {
            let _ = conn.close(200, "ready".into()).await;
            return Ok(());
        }
        if Instant::now() > end {
            bail!(
                "fewer than {n} agents consumed queue {q} after {} s",
                within.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A child process we started; killed when dropped.
pub struct Proc {
    child: Child,
    pub pid: u32,
    log: PathBuf,
}

impl Proc {
    /// Starts `program` with a clean environment (PATH, HOME, TMPDIR, LANG kept) plus
    /// `env` (a later entry wins over an earlier one), output to `log`.
    pub fn spawn(
        name: &str,
        program: &Path,
        args: &[&str],
        env: &[(&str, String)],
        log: PathBuf,
    ) -> anyhow::Result<Proc> {
        let out = std::fs::File::create(&log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let err = out.try_clone()?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .env_clear()
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true);
        for k in ["PATH", "HOME", "TMPDIR", "LANG"] {
            if let Ok(v) = std::env::var(k) {
                cmd.env(k, v);
            }
        }
        cmd.env("RUST_LOG", "warn").env("NO_COLOR", "1");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", program.display()))?;
        let pid = child.id().ok_or_else(|| anyhow!("{name} exited at once"))?;
        Ok(Proc { child, pid, log })
    }

    /// The last lines of its output, for error messages.
    pub fn tail(&self) -> String {
        let text = strip_ansi(&std::fs::read_to_string(&self.log).unwrap_or_default());
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(8)..].join("\n")
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends `signal` (a name such as `STOP`) to this process only, through `kill(1)`.
    pub fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let st = std::process::Command::new("kill")
            .arg("-s")
            .arg(signal)
            .arg(self.pid.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .context("cannot run kill(1)")?;
        if !st.success() {
            bail!("kill -s {signal} {} failed", self.pid);
        }
        Ok(())
    }

    /// SIGKILL and reap.
    pub async fn kill(mut self) {
        let _ = self.child.kill().await;
    }

    /// Resident set size now and at peak, in bytes.
    pub fn rss(&self) -> anyhow::Result<Rss> {
        rss_of(self.pid)
    }

    /// SIGTERM, then SIGKILL after 5 s.
    pub async fn stop(mut self) {
        let _ = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(self.pid.to_string())
            .status();
        if tokio::time::timeout(Duration::from_secs(5), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Rss {
    pub now: u64,
    pub peak: u64,
    /// Private (anonymous) memory: RSS less the shared, clean pages of the binary and
    /// libraries, which the kernel can drop and other processes share.
    pub private: u64,
}

pub fn rss_of(pid: u32) -> anyhow::Result<Rss> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("cannot read /proc/{pid}/status"))?;
    let field = |name: &str| -> anyhow::Result<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .ok_or_else(|| anyhow!("no {name} in /proc/{pid}/status"))
    };
    Ok(Rss {
        now: field("VmRSS:")?,
        peak: field("VmHWM:")?,
        private: field("RssAnon:")?,
    })
}

pub const MIB: f64 = 1024.0 * 1024.0;

/// A running `testflinger-server` with this run's private Redis prefix.
pub struct Server {
    pub proc: Proc,
    pub base: String,
}

impl Server {
    /// Starts the server (no broker submission consumer: the shared `testflinger.submit`
    /// queue is not ours) and waits until `/readyz` answers.
    pub async fn start(ctx: &Ctx, tag: &str, extra: &[(&str, &str)]) -> anyhow::Result<Server> {
        let prefix = format!("{}-{tag}", ctx.prefix);
        Server::start_at(ctx, tag, &prefix, free_port()?, extra).await
    }

    /// [`Server::start`] with a given Redis prefix and port (replicas share a prefix; a
    /// restarted replica keeps its port). `extra` may override `AMQP_URI`/`REDIS_URL`.
    pub async fn start_at(
        ctx: &Ctx,
        tag: &str,
        prefix: &str,
        port: u16,
        extra: &[(&str, &str)],
    ) -> anyhow::Result<Server> {
        let bin = ctx.binary("testflinger-server")?;
        let data = ctx.dir(&format!("{tag}-data"))?;
        let mut env: Vec<(&str, String)> = vec![
            ("AMQP_URI", ctx.opts.amqp_uri.clone()),
            ("REDIS_URL", ctx.opts.redis_url.clone()),
            ("DATA_PATH", data.display().to_string()),
            ("TESTFLINGER_BIND", format!("127.0.0.1:{port}")),
            ("TESTFLINGER_REDIS_PREFIX", prefix.to_string()),
            ("TESTFLINGER_SUBMIT_CONSUMER", "false".into()),
            ("TESTFLINGER_RETENTION", "3600".into()),
        ];
        for (k, v) in extra {
            env.push((k, (*v).to_string()));
        }
        for (k, v) in &ctx.opts.server_env {
            env.push((k.as_str(), v.clone()));
        }
        let log = ctx.tmp.path().join(format!("{tag}-{port}-server.log"));
        let mut proc = Proc::spawn("testflinger-server", &bin, &[], &env, log)?;
        let base = format!("http://127.0.0.1:{port}");
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = ctx.http.get(format!("{base}/readyz")).send().await
                && r.status().is_success()
            {
                break;
            }
            if !proc.alive() {
                bail!(
                    "testflinger-server exited during start-up:\n{}",
                    proc.tail()
                );
            }
            if Instant::now() > end {
                bail!("testflinger-server not ready after 20 s:\n{}", proc.tail());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Server { proc, base })
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

/// Phase commands of a benchmark agent.
pub struct AgentSpec<'a> {
    pub setup: &'a str,
    pub test: &'a str,
}

impl AgentSpec<'_> {
    pub const TRIVIAL: AgentSpec<'static> = AgentSpec {
        setup: "true",
        test: "true",
    };
}

/// Starts one `testflinger-agent` on `queue` talking to `server`.
pub async fn start_agent(
    ctx: &Ctx,
    server: &Server,
    name: &str,
    queue: &str,
    spec: &AgentSpec<'_>,
) -> anyhow::Result<Proc> {
    let bin = ctx.binary("testflinger-agent").map_err(|e| {
        anyhow!("{e:#}; the agent is needed by this scenario, which therefore cannot run")
    })?;
    let agent_id = format!("{}-{name}", ctx.prefix);
    let dir = ctx.dir(&format!("agent-{name}"))?;
    let yaml = format!(
        "agent_id: {agent_id}\n\
         server_address: {base}\n\
         job_queues: [{queue}]\n\
         execution_basedir: {d}/run\n\
         logging_basedir: {d}/logs\n\
         results_basedir: {d}/results\n\
         logging_level: WARNING\n\
         polling_interval: 2\n\
         setup_command: {setup}\n\
         test_command: {test}\n\
         amqp_uri: {amqp}\n",
        base = server.base,
        d = dir.display(),
        setup = yaml_str(spec.setup),
        test = yaml_str(spec.test),
        amqp = yaml_str(&ctx.opts.amqp_uri),
    );
    let cfg = dir.join("agent.yaml");
    std::fs::write(&cfg, yaml).with_context(|| format!("cannot write {}", cfg.display()))?;
    let log = dir.join("agent.out");
    let cfg_s = cfg.display().to_string();
    let env = vec![("AMQP_URI", ctx.opts.amqp_uri.clone())];
    Proc::spawn(&agent_id, &bin, &["-c", &cfg_s], &env, log)
}

/// `s` as a YAML (JSON) double-quoted string.
pub fn yaml_str(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

/// A loopback TCP port free at the time of asking.
pub fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("cannot bind a loopback port")?;
    Ok(l.local_addr()?.port())
}

/// Removes terminal colour sequences (`ESC [ ... letter`).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn strips_colours() {
        assert_eq!(super::strip_ansi("\u{1b}[33m WARN\u{1b}[0m x"), " WARN x");
    }
}
