//! A `testflinger-agent` process.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// A `testflinger-agent -c <config>` process with its stderr in a log file; killed
/// (SIGKILL) on drop.
pub struct Agent {
    /// Its agent id (for messages).
    pub name: String,
    pub child: Child,
    /// Its stderr, appended to.
    pub log: PathBuf,
}

impl Agent {
    /// Starts the built `testflinger-agent` with `config`, stderr appended to `log`.
    pub fn start(name: &str, config: &Path, log: &Path) -> Agent {
        Agent::start_with(name, config, log, &[], &[])
    }

    /// [`Agent::start`] with extra command-line arguments and environment (over
    /// `AMQP_URI` of the tests).
    pub fn start_with(
        name: &str,
        config: &Path,
        log: &Path,
        args: &[String],
        env: &[(String, String)],
    ) -> Agent {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("agent log");
        let child = Command::new(crate::binary("testflinger-agent"))
            .arg("-c")
            .arg(config)
            .args(args)
            .env("AMQP_URI", crate::amqp_uri())
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("spawn testflinger-agent");
        Agent {
            name: name.to_string(),
            child,
            log: log.to_path_buf(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What it has written to its log.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL: the agent dies without releasing anything.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Writes an agent config file: `config` (an object) as JSON, which is YAML.
pub fn write_agent_config(path: &Path, config: &serde_json::Value) {
    std::fs::write(path, config.to_string()).expect("write agent config");
}
