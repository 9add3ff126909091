//! Testflinger device connectors:
//! `testflinger-device-connectors <type> <stage> -c <device.yaml> <job.json>`.
//!
//! A stage runs in the job's run directory (the current directory), writes
//! `device-info.json` first, and exits 0 on success, 1 on failure, 46 when the device
//! could not be recovered (the agent then takes itself offline). A failure is also
//! recorded under `<phase>_exception_info` in `device-connector-error.json`. `runtest`
//! exits with the tests' own exit code.
//!
//! Layout:
//! - [`run`]: the command line's behaviour, shared by the binary and the tests.
//! - [`devices`]: the [`devices::Device`] trait and one module per device type
//!   (`fake`/`fake_connector`, `noprovision`, `multi`, `qemu`), registered in one macro
//!   line each.
//! - [`stages`]: default stage behaviour (`runtest` and friends); [`reserve`]: the SSH
//!   reservation every type shares.
//! - [`config`]: the device config (YAML); [`jobfile`]: the job file (JSON).
//! - [`ssh`], [`keys`], [`serial`], [`api`], [`process`]: SSH to the device, `lp:`/`gh:`
//!   key fetching, serial console capture, the server routes `multi` and `reserve` use,
//!   local command execution.
//! - [`output`]: `device-info.json` and `device-connector-error.json`.
//!
//! Device config keys: `agent_name`, `device_ip`, `reboot_script` (list or string),
//! `serial_host`, `serial_port`, `env` (map), `test_username`, `control_host`,
//! `testflinger_server`, `ssh_port`, `ssh_identity_file`, `ssh_options` (list of `-o`
//! values), `ssh_connect_timeout`, `ssh_authorized_keys`, `ssh_key_service`
//! (`{provider}`/`{user}` template), `reboot_timeout`, `reboot_command_timeout`,
//! `poll_interval`, and for `qemu`: `qemu_image`, `qemu_memory`, `qemu_cpus`, `qemu_accel`,
//! `qemu_boot_timeout`, `qemu_kvm_probe_timeout`, `qemu_state_dir`, `qemu_cache_dir`,
//! `qemu_ssh_bind`, `qemu_binary`, `qemu_extra_args`. Other keys are accepted and ignored.
//!
//! Job data never reaches a shell as code, except `test_data.test_cmds`, which is meant
//! to run. SSH keys travel on ssh's stdin; user and host names are validated.

pub mod api;
pub mod config;
pub mod context;
pub mod devices;
pub mod error;
pub mod jobfile;
pub mod keys;
pub mod output;
pub mod process;
pub mod reserve;
pub mod serial;
pub mod ssh;
pub mod stage;
pub mod stages;

pub use error::{ConnectorError, EXIT_RECOVERY_FAILED};

use config::DeviceConfig;
use context::Ctx;
use devices::DeviceType;
use jobfile::JobFile;
use serial::SerialCapture;
use stage::Stage;
use std::path::{Path, PathBuf};

/// One command line.
#[derive(Debug, Clone)]
pub struct Invocation {
    pub device_type: String,
    pub stage: String,
    pub config: PathBuf,
    pub job: PathBuf,
}

/// Runs one stage in `dir` and returns the process exit code. Errors are printed to
/// stderr as one line and recorded in `device-connector-error.json`.
pub async fn run(inv: &Invocation, dir: &Path) -> i32 {
    let Some(device_type) = DeviceType::from_name(&inv.device_type) else {
        eprintln!(
            "error: unknown device type '{}'; expected one of: {}",
            inv.device_type,
            DeviceType::NAMES.join(", ")
        );
        return 1;
    };
    let stage: Stage = match inv.stage.parse() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return 1;
        }
    };
    match run_stage(device_type, stage, inv, dir).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            if let Err(w) = output::record_error(dir, stage, &e) {
                eprintln!("warning: {w}");
            }
            e.exit_code()
        }
    }
}

async fn run_stage(
    device_type: DeviceType,
    stage: Stage,
    inv: &Invocation,
    dir: &Path,
) -> error::Result<i32> {
    let cfg = DeviceConfig::load(&inv.config)?;
    output::write_device_info(dir, &cfg)?;
    let job = JobFile::load(&inv.job)?;
    let ctx = Ctx {
        cfg,
        job,
        dir: dir.to_path_buf(),
        device_type: device_type.name(),
        stage,
    };
    let serial = SerialCapture::start(&ctx.cfg, dir, stage).await;
    let result = device_type.run(stage, &ctx).await;
    if let Some(s) = serial {
        s.stop().await;
    }
    result
}
