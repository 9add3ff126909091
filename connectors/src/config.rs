//! The device config (YAML), as upstream's connectors read it, plus our SSH and timing
//! keys. Keys a device type does not use are ignored, so one file can serve several
//! types; per-type keys stay in [`DeviceConfig::extra`].

use crate::error::{ConnectorError, Result};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

/// A scalar environment value (`PORT: 22` is as good as `PORT: "22"`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum EnvValue {
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
}

impl EnvValue {
    pub fn to_env_string(&self) -> String {
        match self {
            EnvValue::Bool(b) => b.to_string(),
            EnvValue::Int(i) => i.to_string(),
            EnvValue::Float(f) => f.to_string(),
            EnvValue::Str(s) => s.clone(),
        }
    }
}

/// One command, or a list of them (upstream writes `reboot_script` as a list).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Commands {
    One(String),
    Many(Vec<String>),
}

impl Commands {
    pub fn as_list(&self) -> Vec<String> {
        match self {
            Commands::One(s) => vec![s.clone()],
            Commands::Many(v) => v.clone(),
        }
    }
}

/// Every key this crate reads. See the crate docs for what each one does.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct DeviceConfig {
    pub agent_name: Option<String>,
    pub device_ip: Option<String>,
    pub reboot_script: Option<Commands>,
    pub serial_host: Option<String>,
    pub serial_port: Option<u16>,
    pub env: BTreeMap<String, EnvValue>,
    pub test_username: Option<String>,
    pub control_host: Option<String>,
    pub testflinger_server: Option<String>,
    /// SSH port of the device (default 22).
    pub ssh_port: Option<u16>,
    /// Private key the connector logs in with.
    pub ssh_identity_file: Option<String>,
    /// Extra `-o` options for every ssh call, e.g. `["Ciphers=aes128-ctr"]`.
    pub ssh_options: Vec<String>,
    /// Seconds for ssh's `ConnectTimeout` (default 5).
    pub ssh_connect_timeout: Option<u64>,
    /// The authorized_keys file on the device that `reserve` edits
    /// (default `~/.ssh/authorized_keys` of the test user).
    pub ssh_authorized_keys: Option<String>,
    /// URL template for `lp:`/`gh:` keys with `{provider}` (`lp`/`gh`) and `{user}`.
    pub ssh_key_service: Option<String>,
    /// Seconds noprovision waits for the device after `reboot_script` (default 300).
    pub reboot_timeout: Option<u64>,
    /// Seconds one `reboot_script` command may run (default 120).
    pub reboot_command_timeout: Option<u64>,
    /// Seconds between server polls in `multi` and `reserve` (default 10 and 5).
    pub poll_interval: Option<f64>,
    /// `qemu`: the default image (local path or http(s) URL, qcow2 or raw) when the job's
    /// `provision_data.url` gives none.
    pub qemu_image: Option<String>,
    /// `qemu`: guest memory in MiB (default 256).
    pub qemu_memory: Option<u32>,
    /// `qemu`: guest CPUs (default 1).
    pub qemu_cpus: Option<u32>,
    /// `qemu`: `auto` (default: KVM when `/dev/kvm` works, else TCG), `kvm` or `tcg`.
    pub qemu_accel: Option<String>,
    /// `qemu`: seconds to wait for the VM to answer SSH after it starts (default 300).
    pub qemu_boot_timeout: Option<u64>,
    /// `qemu`: seconds a KVM guest has to write its first console byte before `auto`
    /// falls back to TCG (default 30).
    pub qemu_kvm_probe_timeout: Option<u64>,
    /// `qemu`: this device's directory (overlay, pid file, console log). Default
    /// `<tmp>/testflinger-qemu/<device_ip>-<ssh_port>`.
    pub qemu_state_dir: Option<String>,
    /// `qemu`: downloaded base images, shared by devices. Default
    /// `<tmp>/testflinger-qemu/cache`.
    pub qemu_cache_dir: Option<String>,
    /// `qemu`: the host address the SSH forward listens on (default `device_ip`); e.g.
    /// `0.0.0.0` in a container whose port is published.
    pub qemu_ssh_bind: Option<String>,
    /// `qemu`: the emulator (default `qemu-system-x86_64`).
    pub qemu_binary: Option<String>,
    /// `qemu`: extra emulator arguments, appended as given (e.g. `["-cpu", "host"]`).
    pub qemu_extra_args: Vec<String>,
    /// Keys for other device types.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

impl DeviceConfig {
    /// Reads and parses the device config.
    ///
    /// Fails with a message naming the file when it is missing, unreadable or not a
    /// YAML mapping with the expected key types.
    pub fn load(path: &Path) -> Result<DeviceConfig> {
        let err = |message: String| ConnectorError::Config {
            path: path.to_path_buf(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        if text.trim().is_empty() {
            return Err(err("file is empty".into()));
        }
        let cfg: DeviceConfig =
            serde_saphyr::from_str(&text).map_err(|e| err(one_line(&e.to_string())))?;
        cfg.validate().map_err(err)?;
        Ok(cfg)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        if let Some(user) = &self.test_username {
            validate_username(user).map_err(|m| format!("test_username: {m}"))?;
        }
        if let Some(ip) = &self.device_ip {
            validate_host(ip).map_err(|m| format!("device_ip: {m}"))?;
        }
        for (name, _) in self.env.iter() {
            if !is_env_name(name) {
                return Err(format!(
                    "env: '{name}' is not a valid environment variable name"
                ));
            }
        }
        if let Some(p) = self.poll_interval
            && !(p.is_finite() && p > 0.0)
        {
            return Err("poll_interval must be a positive number of seconds".into());
        }
        if let Some(a) = &self.qemu_accel
            && !["auto", "kvm", "tcg"].contains(&a.as_str())
        {
            return Err(format!(
                "qemu_accel: '{a}' is not an accelerator; expected auto, kvm or tcg"
            ));
        }
        if let Some(m) = self.qemu_memory
            && !(64..=1_048_576).contains(&m)
        {
            return Err(format!(
                "qemu_memory: {m} MiB is out of range; expected 64 to 1048576"
            ));
        }
        for (key, dir) in [
            ("qemu_state_dir", &self.qemu_state_dir),
            ("qemu_cache_dir", &self.qemu_cache_dir),
        ] {
            if let Some(d) = dir
                && !Path::new(d).is_absolute()
            {
                return Err(format!(
                    "{key}: '{d}' is not an absolute path (the VM outlives the stage's \
                     working directory)"
                ));
            }
        }
        if let Some(b) = &self.qemu_ssh_bind
            && b.parse::<std::net::Ipv4Addr>().is_err()
        {
            return Err(format!(
                "qemu_ssh_bind: '{b}' is not an IPv4 address (e.g. 127.0.1.1 or 0.0.0.0)"
            ));
        }
        if let Some(c) = self.qemu_cpus
            && !(1..=256).contains(&c)
        {
            return Err(format!("qemu_cpus: {c} is out of range; expected 1 to 256"));
        }
        Ok(())
    }

    /// The device address, or a provisioning error naming the missing key.
    pub fn require_device_ip(&self) -> Result<&str> {
        self.device_ip
            .as_deref()
            .ok_or_else(|| ConnectorError::Provisioning("device config has no device_ip".into()))
    }

    pub fn ssh_connect_timeout(&self) -> u64 {
        self.ssh_connect_timeout.unwrap_or(5).max(1)
    }

    pub fn poll_interval(&self, default: f64) -> Duration {
        Duration::from_secs_f64(self.poll_interval.unwrap_or(default))
    }
}

/// Keeps error messages to one line (serde-saphyr adds a source snippet).
pub fn one_line(msg: &str) -> String {
    msg.lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(|l| l.strip_prefix("error: ").unwrap_or(l))
        .unwrap_or("invalid")
        .to_string()
}

pub fn is_env_name(name: &str) -> bool {
    name.chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// A user name that is safe as the user part of an ssh destination.
pub fn validate_username(user: &str) -> std::result::Result<(), String> {
    let ok = user
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        && user
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
        && user.len() <= 64;
    if ok {
        Ok(())
    } else {
        Err(format!("'{user}' is not a valid user name"))
    }
}

/// A host name or address that cannot be mistaken for an ssh option.
pub fn validate_host(host: &str) -> std::result::Result<(), String> {
    let ok = host
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric() || c == '[')
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ".-:[]%_".contains(c));
    if ok {
        Ok(())
    } else {
        Err(format!("'{host}' is not a valid host name or address"))
    }
}
