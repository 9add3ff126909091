//! `noprovision`: the device is already installed. Provision only checks that it answers
//! over SSH; if it does not, runs the config's `reboot_script` and waits (bounded by
//! `reboot_timeout`) for it to come back. A reboot command that fails or hangs is a
//! recovery failure (exit 46); a device that stays silent is a provisioning failure.

use super::Device;
use crate::context::Ctx;
use crate::error::{ConnectorError, Result};
use crate::process::{Outcome, run_shell};
use crate::ssh::Ssh;
use std::time::Duration;
use tokio::time::Instant;

pub struct NoProvision;

impl Device for NoProvision {
    async fn provision(&self, ctx: &Ctx) -> Result<i32> {
        let ssh = Ssh::new(&ctx.cfg, &ctx.test_username()?)?;
        if ssh.reachable().await {
            println!("{} answers over SSH: nothing to provision.", ssh.destination());
            return Ok(0);
        }
        println!("{} does not answer over SSH: rebooting it.", ssh.destination());
        let reboot = ctx.cfg.reboot_script.as_ref().map(|r| r.as_list()).unwrap_or_default();
        if reboot.is_empty() {
            return Err(ConnectorError::Provisioning(format!(
                "{} is not reachable over SSH and the device config has no reboot_script",
                ssh.destination()
            )));
        }
        let limit = Duration::from_secs(ctx.cfg.reboot_command_timeout.unwrap_or(120));
        for cmd in &reboot {
            println!("Running reboot command: {cmd}");
            match run_shell(cmd, &[], limit).await? {
                Outcome::Exited(0) => {}
                Outcome::Exited(code) => {
                    return Err(ConnectorError::Recovery(format!(
                        "reboot command `{cmd}` failed with exit code {code}"
                    )));
                }
                Outcome::TimedOut => {
                    return Err(ConnectorError::Recovery(format!(
                        "reboot command `{cmd}` did not finish within {} s",
                        limit.as_secs()
                    )));
                }
            }
        }
        let wait = Duration::from_secs(ctx.cfg.reboot_timeout.unwrap_or(300));
        let deadline = Instant::now() + wait;
        let every = Duration::from_secs(2);
        loop {
            if ssh.reachable().await {
                println!("{} is back after the reboot.", ssh.destination());
                return Ok(0);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(ConnectorError::Provisioning(format!(
                    "{} did not answer over SSH within {} s of the reboot",
                    ssh.destination(),
                    wait.as_secs()
                )));
            }
            tokio::time::sleep(every.min(deadline - now)).await;
        }
    }
}
