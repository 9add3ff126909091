//! Server settings: an optional file (`TESTFLINGER_CONFIG`, YAML or TOML), then the
//! environment. Every variable read:
//!
//! | variable | default | meaning |
//! |---|---|---|
//! | `AMQP_URI` | `amqp://guest:guest@127.0.0.1:5672/%2f` | RabbitMQ |
//! | `REDIS_URL` | `redis://127.0.0.1:6379/` | Redis |
//! | `DATA_PATH` | `./data` | artifact and attachment store; ended jobs' logs (moved out of Redis when a job ends, one file per log type and attempt) |
//! | `TESTFLINGER_BIND` | `127.0.0.1:8000` | listen address |
//! | `TESTFLINGER_REDIS_PREFIX` | `tf` | prefix of every Redis key |
//! | `TESTFLINGER_MAX_ATTEMPTS` | `3` | runs of a job before the reaper gives up |
//! | `TESTFLINGER_LEASE_TTL` | `30` | seconds a claim lasts without a heartbeat |
//! | `TESTFLINGER_RETENTION` | `604800` | seconds jobs, logs and files are kept |
//! | `TESTFLINGER_MAX_UPLOAD_BYTES` | `2147483648` | largest artifact or attachment |
//! | `TESTFLINGER_ARCHIVE_MAX_ENTRIES` | `100000` | most entries in an uploaded artifact or attachments archive (413 past it) |
//! | `TESTFLINGER_ARCHIVE_MAX_UNPACKED_BYTES` | `8589934592` | most bytes an uploaded archive may expand to, tar headers included (413 past it) |
//! | `TESTFLINGER_MAX_LOG_BYTES` | `1073741824` | bytes of `log_data` stored per job and log type (output, serial); past it a truncation notice is stored once and later fragments are accepted but dropped |
//! | `TESTFLINGER_WORKERS` | CPU count | HTTP worker threads |
//! | `TESTFLINGER_QUEUE_TYPE` | `classic` | `classic` or `quorum` job queues |
//! | `TESTFLINGER_REAPER_INTERVAL_MS` | `1000` | how often expired leases are looked for |
//! | `TESTFLINGER_RECONCILE_INTERVAL_MS` | `10000` | how often waiting jobs are compared with the broker's queues |
//! | `TESTFLINGER_CONFIRM_TIMEOUT_MS` | `10000` | how long a publish waits for the broker's confirm; past it the outcome is unclear and the job stays in the outbox |
//! | `TESTFLINGER_ATTACHMENTS_TIMEOUT` | `3600` | seconds a job waits for its attachments before it is cancelled |
//! | `TESTFLINGER_EVENTS` | `true` | publish job events to `testflinger.events` |
//! | `TESTFLINGER_SUBMIT_CONSUMER` | `true` | admit jobs published to the submit queue |
//! | `TESTFLINGER_SUBMIT_QUEUE` | `testflinger.submit` | the broker-native submission queue |
//! | `TESTFLINGER_WEBHOOK_ALLOWED_HOSTS` | empty | comma-separated hosts `job_status_webhook` may name |
//! | `TESTFLINGER_WEBHOOK_BLOCKED_NETS` | loopback, link-local, unspecified, multicast | comma-separated address ranges (CIDR) a webhook host name may not resolve to; an address listed itself in the allow-list is still reached |
//! | `TESTFLINGER_HEADER_TIMEOUT_MS` | `5000` | time for a request's head, from the connection's first byte; then 408 and close |
//! | `TESTFLINGER_BODY_TIMEOUT_MS` | `30000` | time for a request's body, from its head; then 408 and close |
//! | `TESTFLINGER_BODY_MIN_RATE` | `1024` | bytes per second of body that push the body deadline back one second (0: never) |
//! | `TESTFLINGER_KEEP_ALIVE_MS` | `5000` | how long an idle kept-alive connection stays open (0: no keep-alive) |
//! | `TESTFLINGER_SEND_TIMEOUT_MS` | `60000` | how long answer data may stay unacknowledged by a client that stopped reading before the connection is dropped (TCP_USER_TIMEOUT; 0: the kernel's default) |
//! | `TESTFLINGER_DISCONNECT_TIMEOUT_MS` | `1000` | time a closing connection gets to end (unread body discarded meanwhile) |
//! | `TESTFLINGER_LARGE_BODY_BYTES` | `1048576` | bodies this large or larger count against `TESTFLINGER_MAX_LARGE_BODIES` |
//! | `TESTFLINGER_MAX_LARGE_BODIES` | `16` | large bodies read at once (all workers); one more gets 503 with `Retry-After` |
//! | `TESTFLINGER_MAX_JOB_TAGS` | `100` | most `tags` of a submitted job (422 past it) |
//! | `TESTFLINGER_MAX_JOB_TAG_CHARS` | `128` | most characters of one tag (422 past it) |
//! | `TESTFLINGER_MAX_JOB_FIELD_BYTES` | `1048576` | most bytes of JSON in one top-level field of a submitted job (`test_data`, `provision_data`, ...; 422 past it) |
//! | `TESTFLINGER_METRICS_MAX_LABEL_VALUES` | `1000` | most label values (queues) per counter in `/metrics`; later ones are counted under `other` |
//! | `TESTFLINGER_WEBHOOK_BACKLOG` | `1000` | most webhook calls waiting, all jobs together (at most 64 per job); past it events are dropped and counted |
//! | `TESTFLINGER_LOG_FORMAT` | `text` | `text` or `json` |
//! | `JWT_SIGNING_KEY` | unset | turns authentication on; the HS256 key of access tokens (upstream's name) |
//! | `TESTFLINGER_ACCESS_TTL` | `600` | seconds an access token is valid (upstream: 10 minutes) |
//! | `JWT_LEEWAY` | `5` | seconds of clock skew tolerated on token expiry (upstream's name) |
//! | `TESTFLINGER_ADMIN_ID` | `testflinger-admin` | the bootstrap administrator's client id |
//! | `TESTFLINGER_ADMIN_SECRET` | unset | its secret; with auth on, the client is created (or its secret reset) at start-up |
//! | `TESTFLINGER_LOGIN_WINDOW` | `60` | seconds of the login rate-limit window |
//! | `TESTFLINGER_LOGIN_ATTEMPTS_PER_ADDRESS` | `30` | logins (`POST /v1/oauth2/token`) one client address may try per window; past it 429 with `Retry-After` |
//! | `TESTFLINGER_LOGIN_FAILURES_PER_CLIENT` | `10` | failed logins one client id may have per window; past it 429 with `Retry-After` (its refresh and access tokens keep working) |
//! | `TESTFLINGER_LOGIN_MAX_HASHES` | `2` | secret hashes (bcrypt) computed at once by this replica; more logins wait their turn |
//! | `TESTFLINGER_DOCS_DIR` | `docs/book` | built documentation site, served under `/docs` if present |

use serde::Deserialize;
use std::path::PathBuf;
use testflinger_common::job::JobBounds;

/// `TESTFLINGER_*` variables that are not server settings (the CLI's, the config path).
const NOT_SETTINGS: &[&str] = &[
    "config",
    "server",
    "client_id",
    "secret_key",
    "error_threshold",
];

#[derive(Debug, Clone, Deserialize)]
pub struct Settings {
    pub amqp_uri: String,
    pub redis_url: String,
    pub data_path: PathBuf,
    pub bind: String,
    pub redis_prefix: String,
    pub max_attempts: u64,
    pub lease_ttl: u64,
    pub retention: u64,
    pub max_upload_bytes: u64,
    /// Most entries in an uploaded archive ([`testflinger_archive::Limits`]).
    pub archive_max_entries: u64,
    /// Most bytes an uploaded archive may expand to ([`testflinger_archive::Limits`]).
    pub archive_max_unpacked_bytes: u64,
    pub max_log_bytes: u64,
    pub workers: usize,
    pub queue_type: String,
    pub reaper_interval_ms: u64,
    pub reconcile_interval_ms: u64,
    pub attachments_timeout: u64,
    pub confirm_timeout_ms: u64,
    pub events: bool,
    pub submit_consumer: bool,
    pub submit_queue: String,
    pub webhook_allowed_hosts: String,
    pub webhook_blocked_nets: String,
    pub header_timeout_ms: u64,
    pub body_timeout_ms: u64,
    pub body_min_rate: u64,
    pub keep_alive_ms: u64,
    pub disconnect_timeout_ms: u64,
    pub send_timeout_ms: u64,
    pub large_body_bytes: u64,
    pub max_large_bodies: usize,
    /// Most `tags` of a submitted job.
    pub max_job_tags: usize,
    /// Most characters of one tag.
    pub max_job_tag_chars: usize,
    /// Most bytes of JSON in one top-level field of a submitted job.
    pub max_job_field_bytes: usize,
    /// Most label values per counter in `/metrics` (then `other`).
    pub metrics_max_label_values: usize,
    /// Most webhook calls waiting, all jobs together.
    pub webhook_backlog: usize,
    pub log_format: String,
    #[serde(default)]
    pub jwt_signing_key: Option<Redacted>,
    pub jwt_leeway: u64,
    pub access_ttl: u64,
    pub admin_id: String,
    #[serde(default)]
    pub admin_secret: Option<Redacted>,
    /// Seconds of the login rate-limit window.
    pub login_window: u64,
    /// Logins one client address may try per window.
    pub login_attempts_per_address: u64,
    /// Failed logins one client id may have per window.
    pub login_failures_per_client: u64,
    /// bcrypt hashes computed at once by this replica.
    pub login_max_hashes: usize,
    /// The built documentation site (`scripts/docs build`), served under `/docs` when
    /// it holds an `index.html`.
    pub docs_dir: PathBuf,
}

/// Default of `TESTFLINGER_METRICS_MAX_LABEL_VALUES`.
pub const DEFAULT_MAX_LABEL_VALUES: usize = 1000;
/// Default of `TESTFLINGER_WEBHOOK_BACKLOG`.
pub const DEFAULT_WEBHOOK_BACKLOG: usize = 1000;
/// Default lifetime of an access token, seconds (upstream: 10 minutes).
pub const ACCESS_TTL: u64 = 600;
/// The bootstrap administrator's client id when `TESTFLINGER_ADMIN_ID` is not set.
pub const DEFAULT_ADMIN_ID: &str = "testflinger-admin";

/// A setting that must not appear in logs or `Debug` output (keys, secrets).
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Redacted(pub String);

impl std::fmt::Debug for Redacted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("\"***\"")
    }
}

/// Where a webhook host name may not lead unless the allow-list names the address
/// itself: loopback, link-local (cloud metadata services at 169.254.169.254),
/// unspecified, multicast and broadcast addresses.
pub const DEFAULT_BLOCKED_NETS: &str = "127.0.0.0/8,::1/128,0.0.0.0/8,::/128,169.254.0.0/16,fe80::/10,224.0.0.0/4,ff00::/8,255.255.255.255/32";

const KNOWN: &[&str] = &[
    "amqp_uri",
    "redis_url",
    "data_path",
    "bind",
    "redis_prefix",
    "max_attempts",
    "lease_ttl",
    "retention",
    "max_upload_bytes",
    "archive_max_entries",
    "archive_max_unpacked_bytes",
    "max_log_bytes",
    "workers",
    "queue_type",
    "reaper_interval_ms",
    "reconcile_interval_ms",
    "attachments_timeout",
    "confirm_timeout_ms",
    "events",
    "submit_consumer",
    "submit_queue",
    "webhook_allowed_hosts",
    "webhook_blocked_nets",
    "header_timeout_ms",
    "body_timeout_ms",
    "body_min_rate",
    "keep_alive_ms",
    "disconnect_timeout_ms",
    "send_timeout_ms",
    "large_body_bytes",
    "max_large_bodies",
    "max_job_tags",
    "max_job_tag_chars",
    "max_job_field_bytes",
    "metrics_max_label_values",
    "webhook_backlog",
    "log_format",
    "jwt_signing_key",
    "jwt_leeway",
    "access_ttl",
    "admin_id",
    "admin_secret",
    "login_window",
    "login_attempts_per_address",
    "login_failures_per_client",
    "login_max_hashes",
    "docs_dir",
];

impl Settings {
    /// Reads the file named by `TESTFLINGER_CONFIG` (if any), then the environment.
    ///
    /// Fails with a message naming the key when a value has the wrong type.
    pub fn load() -> Result<Settings, config::ConfigError> {
        let mut b = config::Config::builder()
            .set_default("amqp_uri", "amqp://guest:guest@127.0.0.1:5672/%2f")?
            .set_default("redis_url", "redis://127.0.0.1:6379/")?
            .set_default("data_path", "./data")?
            .set_default("bind", "127.0.0.1:8000")?
            .set_default("redis_prefix", "tf")?
            .set_default("max_attempts", 3)?
            .set_default("lease_ttl", 30)?
            .set_default("retention", 7 * 24 * 3600)?
            .set_default("max_upload_bytes", 2u64 << 30)?
            .set_default("max_log_bytes", 1u64 << 30)?
            .set_default(
                "archive_max_entries",
                testflinger_archive::Limits::DEFAULT_MAX_ENTRIES,
            )?
            .set_default(
                "archive_max_unpacked_bytes",
                testflinger_archive::Limits::DEFAULT_MAX_UNPACKED_BYTES,
            )?
            .set_default(
                "workers",
                std::thread::available_parallelism().map_or(2, |n| n.get()) as u64,
            )?
            .set_default("queue_type", "classic")?
            .set_default("reaper_interval_ms", 1000)?
            .set_default("reconcile_interval_ms", 10_000)?
            .set_default("attachments_timeout", 3600)?
            .set_default("confirm_timeout_ms", 10_000)?
            .set_default("events", true)?
            .set_default("submit_consumer", true)?
            .set_default("submit_queue", testflinger_broker::topology::SUBMIT_QUEUE)?
            .set_default("webhook_allowed_hosts", "")?
            .set_default("webhook_blocked_nets", DEFAULT_BLOCKED_NETS)?
            .set_default("header_timeout_ms", 5000)?
            .set_default("body_timeout_ms", 30_000)?
            .set_default("body_min_rate", 1024)?
            .set_default("keep_alive_ms", 5000)?
            .set_default("disconnect_timeout_ms", 1000)?
            .set_default("send_timeout_ms", 60_000)?
            .set_default("large_body_bytes", 1u64 << 20)?
            .set_default("max_large_bodies", 16)?
            .set_default("max_job_tags", JobBounds::DEFAULT_MAX_TAGS as u64)?
            .set_default("max_job_tag_chars", JobBounds::DEFAULT_MAX_TAG_CHARS as u64)?
            .set_default(
                "max_job_field_bytes",
                JobBounds::DEFAULT_MAX_FIELD_BYTES as u64,
            )?
            .set_default("metrics_max_label_values", DEFAULT_MAX_LABEL_VALUES as u64)?
            .set_default("webhook_backlog", DEFAULT_WEBHOOK_BACKLOG as u64)?
            .set_default("log_format", "text")?
            .set_default("jwt_leeway", 5)?
            .set_default("access_ttl", ACCESS_TTL)?
            .set_default("admin_id", DEFAULT_ADMIN_ID)?
            .set_default("login_window", 60)?
            .set_default("login_attempts_per_address", 30)?
            .set_default("login_failures_per_client", 10)?
            .set_default("login_max_hashes", 2)?
            .set_default("docs_dir", "docs/book")?;
        if let Ok(path) = std::env::var("TESTFLINGER_CONFIG") {
            b = b.add_source(config::File::with_name(&path));
        }
        b = b.add_source(
            config::Environment::with_prefix("TESTFLINGER")
                .prefix_separator("_")
                .ignore_empty(true),
        );
        for (var, key) in [
            ("AMQP_URI", "amqp_uri"),
            ("REDIS_URL", "redis_url"),
            ("DATA_PATH", "data_path"),
            ("JWT_SIGNING_KEY", "jwt_signing_key"),
            ("JWT_LEEWAY", "jwt_leeway"),
        ] {
            if let Ok(v) = std::env::var(var)
                && !v.is_empty()
            {
                b = b.set_override(key, v)?;
            }
        }
        let built = b.build()?;
        // Unknown keys are ignored by serde here (the environment may hold other programs'
        // TESTFLINGER_* variables), but a typo should not pass silently.
        if let Ok(map) = built
            .clone()
            .try_deserialize::<std::collections::HashMap<String, config::Value>>()
        {
            for key in map.keys() {
                if !KNOWN.contains(&key.as_str()) && !NOT_SETTINGS.contains(&key.as_str()) {
                    eprintln!(
                        "testflinger-server: warning: unknown setting '{key}' ignored (TESTFLINGER_{})",
                        key.to_ascii_uppercase()
                    );
                }
            }
        }
        let mut s: Settings = built.try_deserialize()?;
        s.validate().map_err(config::ConfigError::Message)?;
        if s.workers == 0 {
            s.workers = 1;
        }
        Ok(s)
    }

    fn validate(&self) -> Result<(), String> {
        if self.lease_ttl < 3 {
            return Err("TESTFLINGER_LEASE_TTL must be at least 3 seconds".into());
        }
        if self.archive_max_entries == 0 || self.archive_max_unpacked_bytes == 0 {
            return Err(
                "TESTFLINGER_ARCHIVE_MAX_ENTRIES and TESTFLINGER_ARCHIVE_MAX_UNPACKED_BYTES must be at least 1"
                    .into(),
            );
        }
        if self.max_attempts == 0 {
            return Err("TESTFLINGER_MAX_ATTEMPTS must be at least 1".into());
        }
        if self.redis_prefix.is_empty() || self.redis_prefix.contains(char::is_whitespace) {
            return Err("TESTFLINGER_REDIS_PREFIX must be non-empty without spaces".into());
        }
        if self.login_window == 0 || self.login_max_hashes == 0 {
            return Err(
                "TESTFLINGER_LOGIN_WINDOW and TESTFLINGER_LOGIN_MAX_HASHES must be at least 1"
                    .into(),
            );
        }
        if self.max_large_bodies == 0 {
            return Err("TESTFLINGER_MAX_LARGE_BODIES must be at least 1".into());
        }
        if self.max_job_tag_chars == 0
            || self.max_job_field_bytes < 1024
            || self.metrics_max_label_values == 0
            || self.webhook_backlog == 0
        {
            return Err("TESTFLINGER_MAX_JOB_TAG_CHARS, TESTFLINGER_METRICS_MAX_LABEL_VALUES and TESTFLINGER_WEBHOOK_BACKLOG must be at least 1, TESTFLINGER_MAX_JOB_FIELD_BYTES at least 1024".into());
        }
        if self.header_timeout_ms == 0 || self.body_timeout_ms == 0 {
            return Err("TESTFLINGER_HEADER_TIMEOUT_MS and TESTFLINGER_BODY_TIMEOUT_MS must be at least 1 (milliseconds)".into());
        }
        crate::net::parse_nets(&self.webhook_blocked_nets)
            .map_err(|e| format!("TESTFLINGER_WEBHOOK_BLOCKED_NETS: {e}"))?;
        if !self.submit_queue.starts_with("testflinger.") {
            return Err("TESTFLINGER_SUBMIT_QUEUE must start with 'testflinger.'".into());
        }
        self.queue_type
            .parse::<testflinger_broker::QueueType>()
            .map(|_| ())
            .map_err(|e| format!("TESTFLINGER_QUEUE_TYPE: {e}"))
    }

    /// Settings for tests: defaults plus the given overrides, without reading the
    /// environment except `AMQP_URI` and `REDIS_URL`.
    pub fn for_tests(prefix: &str, data_path: PathBuf) -> Settings {
        Settings {
            amqp_uri: std::env::var("AMQP_URI")
                .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into()),
            redis_url: std::env::var("REDIS_URL")
                .unwrap_or_else(|_| "redis://127.0.0.1:6379/".into()),
            data_path,
            bind: "127.0.0.1:0".into(),
            redis_prefix: prefix.into(),
            max_attempts: 3,
            lease_ttl: 30,
            retention: 3600,
            max_upload_bytes: 64 << 20,
            archive_max_entries: testflinger_archive::Limits::DEFAULT_MAX_ENTRIES,
            archive_max_unpacked_bytes: testflinger_archive::Limits::DEFAULT_MAX_UNPACKED_BYTES,
            max_log_bytes: 1 << 30,
            workers: 2,
            queue_type: "classic".into(),
            reaper_interval_ms: 200,
            reconcile_interval_ms: 1000,
            attachments_timeout: 3600,
            confirm_timeout_ms: 10_000,
            events: true,
            submit_consumer: false,
            submit_queue: format!("testflinger.submit.{prefix}"),
            webhook_allowed_hosts: String::new(),
            webhook_blocked_nets: DEFAULT_BLOCKED_NETS.into(),
            header_timeout_ms: 5000,
            body_timeout_ms: 30_000,
            body_min_rate: 1024,
            keep_alive_ms: 5000,
            disconnect_timeout_ms: 1000,
            send_timeout_ms: 60_000,
            large_body_bytes: 1 << 20,
            max_large_bodies: 16,
            max_job_tags: JobBounds::DEFAULT_MAX_TAGS,
            max_job_tag_chars: JobBounds::DEFAULT_MAX_TAG_CHARS,
            max_job_field_bytes: JobBounds::DEFAULT_MAX_FIELD_BYTES,
            metrics_max_label_values: DEFAULT_MAX_LABEL_VALUES,
            webhook_backlog: DEFAULT_WEBHOOK_BACKLOG,
            log_format: "text".into(),
            jwt_signing_key: None,
            jwt_leeway: 5,
            access_ttl: ACCESS_TTL,
            admin_id: DEFAULT_ADMIN_ID.into(),
            admin_secret: None,
            login_window: 60,
            login_attempts_per_address: 30,
            login_failures_per_client: 10,
            login_max_hashes: 2,
            docs_dir: PathBuf::from("docs/book"),
        }
    }

    /// The bounds of a submitted job ([`testflinger_common::job::check_bounds`]).
    pub fn job_bounds(&self) -> JobBounds {
        JobBounds {
            max_tags: self.max_job_tags,
            max_tag_chars: self.max_job_tag_chars,
            max_field_bytes: self.max_job_field_bytes,
        }
    }

    pub fn webhook_hosts(&self) -> Vec<String> {
        self.webhook_allowed_hosts
            .split(',')
            .map(|h| h.trim().to_ascii_lowercase())
            .filter(|h| !h.is_empty())
            .collect()
    }
}
