//! Default stage behaviour shared by every device type (upstream's `DefaultDevice`).

use crate::config::is_env_name;
use crate::context::Ctx;
use crate::error::{ConnectorError, Result};
use crate::process::exit_code;
use serde_json::Value;
use std::os::unix::fs::PermissionsExt;
use testflinger_common::job::TestCmds;
use tokio::process::Command;

/// The script `runtest` writes a string `test_cmds` to, in the working directory.
pub const SCRIPT_FILE: &str = "tf_cmd_script";

pub async fn provision(ctx: &Ctx) -> Result<i32> {
    println!(
        "Device type '{}' has no provisioning step; nothing to do.",
        ctx.device_type
    );
    Ok(0)
}

/// No type here can flash firmware: fail clearly, unless the job set `ignore_failure`.
pub async fn firmware_update(ctx: &Ctx) -> Result<i32> {
    let data = ctx.job.firmware_update_data.clone().unwrap_or_default();
    let msg = format!(
        "firmware update is not supported for device type '{}'",
        ctx.device_type
    );
    if data.get("ignore_failure").and_then(Value::as_bool) == Some(true) {
        println!("{msg}; ignored (ignore_failure: true)");
        return Ok(0);
    }
    Err(ConnectorError::Provisioning(msg))
}

pub async fn allocate(_ctx: &Ctx) -> Result<i32> {
    Ok(0)
}

pub async fn cleanup(_ctx: &Ctx) -> Result<i32> {
    Ok(0)
}

/// The environment of the test commands, on top of the connector's own: `DEVICE_IP`,
/// `AGENT_NAME`, `REBOOT_SCRIPT` (`;`-joined), the config's `env`, then `extra`, then
/// the job's resolved secrets. Later entries win.
pub fn test_env(ctx: &Ctx, extra: &[(String, String)]) -> Vec<(String, String)> {
    let cfg = &ctx.cfg;
    let mut env: Vec<(String, String)> = Vec::new();
    if let Some(ip) = &cfg.device_ip {
        env.push(("DEVICE_IP".into(), ip.clone()));
    }
    if let Some(name) = &cfg.agent_name {
        env.push(("AGENT_NAME".into(), name.clone()));
    }
    if let Some(r) = &cfg.reboot_script {
        env.push(("REBOOT_SCRIPT".into(), r.as_list().join(";")));
    }
    for (k, v) in &cfg.env {
        env.push((k.clone(), v.to_env_string()));
    }
    env.extend(extra.iter().cloned());
    if let Some(secrets) = ctx.job.test_data.as_ref().and_then(|t| t.secrets.as_ref()) {
        for (k, v) in secrets {
            if is_env_name(k) {
                env.push((k.clone(), v.clone()));
            }
        }
    }
    env
}

/// Runs `test_data.test_cmds`: a string becomes `./tf_cmd_script` (with a `#!/bin/bash`
/// line unless it has its own) and is executed; a list runs item by item with
/// `/bin/sh -c` and yields the last item's code. Returns the tests' exit code.
pub async fn runtest(ctx: &Ctx, extra: &[(String, String)]) -> Result<i32> {
    let env = test_env(ctx, extra);
    let Some(cmds) = ctx.job.test_data.as_ref().and_then(|t| t.test_cmds.clone()) else {
        println!("No test_cmds in test_data: nothing to run.");
        return Ok(0);
    };
    match cmds {
        TestCmds::Script(script) => {
            let path = ctx.dir.join(SCRIPT_FILE);
            let body = if script.starts_with("#!") {
                script
            } else {
                format!("#!/bin/bash\n{script}")
            };
            std::fs::write(&path, body)
                .map_err(|e| ConnectorError::io(format!("writing {}", path.display()), e))?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
                .map_err(|e| ConnectorError::io(format!("chmod {}", path.display()), e))?;
            let mut cmd = Command::new(&path);
            cmd.current_dir(&ctx.dir).envs(env);
            run(cmd, SCRIPT_FILE).await
        }
        TestCmds::List(items) => {
            let mut code = 0;
            for item in items {
                let mut cmd = Command::new("/bin/sh");
                cmd.arg("-c")
                    .arg(&item)
                    .current_dir(&ctx.dir)
                    .envs(env.iter().cloned());
                code = run(cmd, &item).await?;
            }
            Ok(code)
        }
    }
}

async fn run(mut cmd: Command, what: &str) -> Result<i32> {
    let status = cmd
        .kill_on_drop(true)
        .status()
        .await
        .map_err(|e| ConnectorError::io(format!("running `{what}`"), e))?;
    Ok(exit_code(status))
}
