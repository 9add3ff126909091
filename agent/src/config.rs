//! The agent's settings: the Testflinger agent YAML (same keys as upstream), plus
//! `amqp_uri`, `shutdown_grace` and `queue_type`. Unknown keys and missing required keys are errors
//! that name the key and the file.
//!
//! Environment variables read:
//!
//! | variable | overrides |
//! |---|---|
//! | `AMQP_URI` | `amqp_uri` (default `amqp://guest:guest@127.0.0.1:5672/%2f`) |
//! | `RUST_LOG` | `logging_level` (tracing filter syntax) |

use serde::Deserialize;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The default AMQP URI when neither the file nor `AMQP_URI` set one.
pub const DEFAULT_AMQP_URI: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// Why the configuration could not be loaded. Fix the file and start again.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid YAML: {message}")]
    Yaml { path: PathBuf, message: String },
    #[error("config file {path}: key '{key}': {message}")]
    Key {
        path: PathBuf,
        key: String,
        message: String,
    },
}

/// The agent's typed settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub agent_id: String,
    #[serde(default)]
    pub identifier: Option<String>,
    #[serde(default)]
    pub location: Option<String>,
    /// Seconds between checks of the agent's state while offline or idle.
    #[serde(default = "default_polling_interval")]
    pub polling_interval: f64,
    pub server_address: String,
    #[serde(default = "default_execution_basedir")]
    pub execution_basedir: PathBuf,
    #[serde(default = "default_logging_basedir")]
    pub logging_basedir: PathBuf,
    /// Where each job's writes are spooled until the API has them (see
    /// [`crate::spool`]); default `<execution_basedir>/.results`. Use [`Config::results_dir`].
    #[serde(default)]
    pub results_basedir: Option<PathBuf>,
    #[serde(default = "default_logging_level")]
    pub logging_level: String,
    #[serde(default)]
    pub logging_quiet: bool,
    pub job_queues: Vec<String>,
    #[serde(default)]
    pub advertised_queues: BTreeMap<String, String>,
    #[serde(default)]
    pub advertised_images: BTreeMap<String, BTreeMap<String, String>>,
    #[serde(default)]
    pub setup_command: String,
    #[serde(default)]
    pub provision_command: String,
    #[serde(default)]
    pub firmware_update_command: String,
    #[serde(default)]
    pub test_command: String,
    #[serde(default)]
    pub allocate_command: String,
    #[serde(default)]
    pub reserve_command: String,
    #[serde(default)]
    pub cleanup_command: String,
    #[serde(default)]
    pub provision_type: Option<String>,
    #[serde(default)]
    pub global_timeout: Option<u64>,
    #[serde(default)]
    pub output_timeout: Option<u64>,
    /// Declared upstream, unused.
    #[serde(default)]
    pub output_bytes: Option<u64>,
    /// AMQP URI of RabbitMQ; `AMQP_URI` overrides it.
    #[serde(default)]
    pub amqp_uri: Option<String>,
    /// Seconds a running job may still take after SIGTERM before it is released.
    #[serde(default = "default_shutdown_grace")]
    pub shutdown_grace: f64,
    /// Upstream's `--token-file`: JSON `{"refresh_token": ".."}` exchanged at
    /// `/v1/oauth2/refresh` for the agent's access token. Set from the command line.
    #[serde(skip)]
    pub token_file: Option<PathBuf>,
    /// Kind of the job queues this agent declares: `classic` (default) or `quorum`.
    /// Must match the server's `TESTFLINGER_QUEUE_TYPE` (RabbitMQ refuses a queue
    /// declared again with other arguments).
    #[serde(default = "default_queue_type")]
    pub queue_type: String,
    /// Most entries in a job's attachments archive (the server's
    /// `TESTFLINGER_ARCHIVE_MAX_ENTRIES`; [`testflinger_archive::Limits`]).
    #[serde(default = "default_archive_max_entries")]
    pub archive_max_entries: u64,
    /// Most bytes a job's attachments archive may expand to, tar headers included (the
    /// server's `TESTFLINGER_ARCHIVE_MAX_UNPACKED_BYTES`).
    #[serde(default = "default_archive_max_unpacked_bytes")]
    pub archive_max_unpacked_bytes: u64,
    /// Most bytes of a job's writes (output, serial logs, results, artifacts) waiting in
    /// the spool for the API; past it the phase's output is not read until delivery
    /// catches up, so the phase blocks on its pipe. Nothing is dropped.
    #[serde(default = "default_spool_max_bytes")]
    pub spool_max_bytes: u64,
    /// Every top-level string value of the file, exported to phases as lowercase
    /// variables (upstream behaviour the charm's wrapper scripts rely on).
    #[serde(skip)]
    pub string_values: BTreeMap<String, String>,
}

fn default_polling_interval() -> f64 {
    10.0
}
fn default_execution_basedir() -> PathBuf {
    PathBuf::from("/tmp/testflinger/run")
}
fn default_logging_basedir() -> PathBuf {
    PathBuf::from("/tmp/testflinger/logs")
}
fn default_logging_level() -> String {
    "INFO".into()
}
fn default_shutdown_grace() -> f64 {
    30.0
}
fn default_queue_type() -> String {
    "classic".into()
}
fn default_archive_max_entries() -> u64 {
    testflinger_archive::Limits::DEFAULT_MAX_ENTRIES
}
fn default_archive_max_unpacked_bytes() -> u64 {
    testflinger_archive::Limits::DEFAULT_MAX_UNPACKED_BYTES
}
fn default_spool_max_bytes() -> u64 {
    256 << 20
}

impl Config {
    /// Reads and validates `path`, then applies `AMQP_URI` from the environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut cfg = Config::from_yaml(&text, path)?;
        if let Ok(uri) = std::env::var("AMQP_URI")
            && !uri.is_empty()
        {
            cfg.amqp_uri = Some(uri);
        }
        Ok(cfg)
    }

    /// Parses the YAML text of a config file (`path` only names it in errors).
    pub fn from_yaml(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let value: Value = serde_saphyr::from_str(text).map_err(|e| ConfigError::Yaml {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Config::from_value(value, path)
    }

    /// Builds the settings from an already parsed document.
    pub fn from_value(value: Value, path: &Path) -> Result<Config, ConfigError> {
        let key_err = |key: &str, message: String| ConfigError::Key {
            path: path.to_path_buf(),
            key: key.to_string(),
            message,
        };
        let Value::Object(map) = value else {
            return Err(ConfigError::Yaml {
                path: path.to_path_buf(),
                message: "expected a mapping of keys to values at the top level".into(),
            });
        };
        let strings = string_values(&map);
        let mut cfg: Config =
            serde_path_to_error::deserialize(Value::Object(map)).map_err(|e| {
                let path_str = e.path().to_string();
                let inner = e.into_inner().to_string();
                // serde names the offending key in the message for unknown and missing keys.
                let key = if path_str == "." || path_str.is_empty() {
                    backticked(&inner).unwrap_or(path_str)
                } else {
                    path_str
                };
                key_err(&key, inner)
            })?;
        cfg.string_values = strings;
        cfg.validate().map_err(|(k, m)| key_err(k, m))?;
        if !cfg.server_address.contains("://") {
            cfg.server_address = format!("http://{}", cfg.server_address);
        }
        cfg.server_address = cfg.server_address.trim_end_matches('/').to_string();
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.agent_id.trim().is_empty() {
            return Err(("agent_id", "must not be empty".into()));
        }
        if self.server_address.trim().is_empty() {
            return Err(("server_address", "must not be empty".into()));
        }
        if self.job_queues.is_empty() {
            return Err(("job_queues", "must list at least one queue".into()));
        }
        for q in &self.job_queues {
            testflinger_common::queue::validate_queue_name(q).map_err(|e| ("job_queues", e))?;
        }
        if !(self.polling_interval > 0.0 && self.polling_interval.is_finite()) {
            return Err(("polling_interval", "must be a positive number".into()));
        }
        if !(self.shutdown_grace >= 0.0 && self.shutdown_grace.is_finite()) {
            return Err(("shutdown_grace", "must be zero or a positive number".into()));
        }
        self.queue_type
            .parse::<testflinger_broker::QueueType>()
            .map_err(|e| ("queue_type", e))?;
        if self.archive_max_entries == 0 {
            return Err(("archive_max_entries", "must be at least 1".into()));
        }
        if self.spool_max_bytes == 0 {
            return Err(("spool_max_bytes", "must be at least 1".into()));
        }
        if self.archive_max_unpacked_bytes == 0 {
            return Err(("archive_max_unpacked_bytes", "must be at least 1".into()));
        }
        Ok(())
    }

    /// The limits attachments are unpacked under.
    pub fn archive_limits(&self) -> testflinger_archive::Limits {
        testflinger_archive::Limits {
            max_entries: self.archive_max_entries,
            max_unpacked_bytes: self.archive_max_unpacked_bytes,
        }
    }

    /// The kind of job queue to declare (validated on load).
    pub fn queue_type(&self) -> testflinger_broker::QueueType {
        self.queue_type.parse().unwrap_or_default()
    }

    /// The spool directory: `results_basedir`, or `<execution_basedir>/.results`.
    pub fn results_dir(&self) -> PathBuf {
        self.results_basedir
            .clone()
            .unwrap_or_else(|| self.execution_basedir.join(".results"))
    }

    pub fn polling_interval(&self) -> Duration {
        Duration::from_secs_f64(self.polling_interval)
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs_f64(self.shutdown_grace)
    }

    pub fn amqp_uri(&self) -> String {
        self.amqp_uri
            .clone()
            .unwrap_or_else(|| DEFAULT_AMQP_URI.to_string())
    }

    /// The command configured for a phase (empty = skip the phase).
    pub fn command(&self, phase: testflinger_common::Phase) -> &str {
        use testflinger_common::Phase;
        match phase {
            Phase::Setup => &self.setup_command,
            Phase::Provision => &self.provision_command,
            Phase::FirmwareUpdate => &self.firmware_update_command,
            Phase::Test => &self.test_command,
            Phase::Allocate => &self.allocate_command,
            Phase::Reserve => &self.reserve_command,
            Phase::Cleanup => &self.cleanup_command,
        }
    }
}

/// Top-level string values, except the AMQP URI (it may hold a password).
fn string_values(map: &Map<String, Value>) -> BTreeMap<String, String> {
    map.iter()
        .filter(|(k, _)| k.as_str() != "amqp_uri")
        .filter_map(|(k, v)| v.as_str().map(|s| (k.to_lowercase(), s.to_string())))
        .collect()
}

fn backticked(msg: &str) -> Option<String> {
    let start = msg.find('`')? + 1;
    let len = msg[start..].find('`')?;
    Some(msg[start..start + len].to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_yaml(text, Path::new("agent.yaml"))
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse("agent_id: dev1\nserver_address: localhost:8000\njob_queues: [q1]\n")
            .expect("valid");
        assert_eq!(c.server_address, "http://localhost:8000");
        assert_eq!(c.polling_interval, 10.0);
        assert_eq!(c.execution_basedir, PathBuf::from("/tmp/testflinger/run"));
        assert_eq!(
            c.results_dir(),
            PathBuf::from("/tmp/testflinger/run/.results")
        );
        assert_eq!(c.queue_type(), testflinger_broker::QueueType::Classic);
        assert_eq!(
            c.string_values.get("agent_id").map(String::as_str),
            Some("dev1")
        );
    }

    #[test]
    fn unknown_key_is_named_with_the_file() {
        let e = parse("agent_id: a\nserver_address: s\njob_queues: [q]\nbogus_key: 1\n")
            .expect_err("unknown key");
        let m = e.to_string();
        assert!(m.contains("bogus_key") && m.contains("agent.yaml"), "{m}");
    }

    #[test]
    fn queue_type_is_checked() {
        let c = parse("agent_id: a\nserver_address: s\njob_queues: [q]\nqueue_type: quorum\n")
            .expect("quorum");
        assert_eq!(c.queue_type(), testflinger_broker::QueueType::Quorum);
        let e = parse("agent_id: a\nserver_address: s\njob_queues: [q]\nqueue_type: stream\n")
            .expect_err("stream");
        let m = e.to_string();
        assert!(m.contains("queue_type") && m.contains("stream"), "{m}");
    }

    #[test]
    fn missing_key_is_named() {
        let e = parse("agent_id: a\njob_queues: [q]\n").expect_err("missing");
        let m = e.to_string();
        assert!(
            m.contains("server_address") && m.contains("agent.yaml"),
            "{m}"
        );
    }

    #[test]
    fn wrong_type_names_the_key() {
        let e = parse("agent_id: a\nserver_address: s\njob_queues: q\n").expect_err("type");
        assert!(e.to_string().contains("key 'job_queues'"), "{e}");
        let e = parse("agent_id: a\nserver_address: s\njob_queues: [q]\nsetup_command: true\n")
            .expect_err("type");
        assert!(e.to_string().contains("key 'setup_command'"), "{e}");
    }
}

#[cfg(test)]
mod example {
    use super::*;

    #[test]
    fn the_shipped_example_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("testflinger-agent.example.yaml");
        let text = std::fs::read_to_string(&path).expect("example config");
        let c = Config::from_yaml(&text, &path).expect("valid example");
        assert_eq!(c.job_queues, ["lab-dev-01", "rpi4"]);
        assert_eq!(c.advertised_images["rpi4"].len(), 1);
        assert_eq!(c.shutdown_grace(), Duration::from_secs(30));
    }
}
