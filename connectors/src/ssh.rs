//! SSH to the device with the system `ssh` client: batch mode, key auth, short
//! timeouts, no host-key prompts. Arguments are passed as argv; the remote command is
//! fixed text built here with every variable part quoted.

use crate::config::{DeviceConfig, validate_host, validate_username};
use crate::error::{ConnectorError, Result};
use crate::process::exit_code;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

/// How to reach one user on the device.
#[derive(Debug, Clone)]
pub struct Ssh {
    pub user: String,
    pub host: String,
    pub port: Option<u16>,
    identity: Option<String>,
    options: Vec<String>,
    connect_timeout: u64,
}

/// What a remote command printed and how it ended.
#[derive(Debug)]
pub struct RemoteOutput {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Ssh {
    pub fn new(cfg: &DeviceConfig, user: &str) -> Result<Ssh> {
        let host = cfg.require_device_ip()?.to_string();
        validate_host(&host).map_err(ConnectorError::Provisioning)?;
        validate_username(user).map_err(ConnectorError::Provisioning)?;
        Ok(Ssh {
            user: user.to_string(),
            host,
            port: cfg.ssh_port,
            identity: cfg.ssh_identity_file.clone(),
            options: cfg.ssh_options.clone(),
            connect_timeout: cfg.ssh_connect_timeout(),
        })
    }

    /// `user@host`
    pub fn destination(&self) -> String {
        format!("{}@{}", self.user, self.host)
    }

    /// The command a person types to connect.
    pub fn connect_hint(&self) -> String {
        match self.port {
            Some(p) if p != 22 => format!("ssh -p {p} {}", self.destination()),
            _ => format!("ssh {}", self.destination()),
        }
    }

    fn command(&self, remote: &str) -> Command {
        let mut cmd = Command::new("ssh");
        cmd.args(["-o", "BatchMode=yes"])
            .args(["-o", &format!("ConnectTimeout={}", self.connect_timeout)])
            .args(["-o", "StrictHostKeyChecking=no"])
            .args(["-o", "UserKnownHostsFile=/dev/null"])
            .args(["-o", "LogLevel=ERROR"]);
        if let Some(p) = self.port {
            cmd.args(["-p", &p.to_string()]);
        }
        if let Some(id) = &self.identity {
            cmd.args(["-o", "IdentitiesOnly=yes", "-i", id]);
        }
        for opt in &self.options {
            cmd.args(["-o", opt]);
        }
        cmd.arg(self.destination()).arg(remote);
        cmd.stdin(Stdio::null()).kill_on_drop(true);
        cmd
    }

    /// Bound for one ssh call: the connect timeout plus time to run a short command.
    fn call_limit(&self) -> Duration {
        Duration::from_secs(self.connect_timeout + 30)
    }

    /// Whether the device answers: `ssh user@host /bin/true` succeeds.
    pub async fn reachable(&self) -> bool {
        let mut cmd = self.command("/bin/true");
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
        let Ok(mut child) = cmd.spawn() else {
            return false;
        };
        match tokio::time::timeout(self.call_limit(), child.wait()).await {
            Ok(Ok(status)) => status.success(),
            _ => false,
        }
    }

    /// Runs `remote` on the device with `input` on its stdin.
    pub async fn run(&self, remote: &str, input: &[u8]) -> Result<RemoteOutput> {
        let mut cmd = self.command(remote);
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .map_err(|e| ConnectorError::io("starting ssh", e))?;
        if let Some(mut stdin) = child.stdin.take() {
            // A remote side that exits early closes the pipe; its exit code tells.
            let _ = stdin.write_all(input).await;
        }
        let out = tokio::time::timeout(self.call_limit(), child.wait_with_output())
            .await
            .map_err(|_| {
                ConnectorError::Provisioning(format!(
                    "ssh to {} did not finish within {} s",
                    self.destination(),
                    self.call_limit().as_secs()
                ))
            })?
            .map_err(|e| ConnectorError::io("running ssh", e))?;
        Ok(RemoteOutput {
            code: exit_code(out.status),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }
}

/// Quotes a string for a POSIX shell.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// A remote path for the shell: `~/x` becomes `"$HOME"/'x'`, anything else is quoted.
pub fn remote_path(path: &str) -> String {
    match path.strip_prefix("~/") {
        Some(rest) => format!("\"$HOME\"/{}", shell_quote(rest)),
        None => shell_quote(path),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> String {
        let out = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(script)
            .env("HOME", "/home/u")
            .output()
            .expect("sh");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[test]
    fn quoting_survives_the_shell() {
        for s in ["plain", "it's", "$(touch x) `y` ; z", "a\nb", "'"] {
            assert_eq!(sh(&format!("printf %s {}", shell_quote(s))), s);
        }
        assert_eq!(
            sh(&format!("printf %s {}", remote_path("~/.ssh/my keys"))),
            "/home/u/.ssh/my keys"
        );
        assert_eq!(
            sh(&format!("printf %s {}", remote_path("/tmp/$x"))),
            "/tmp/$x"
        );
    }
}
