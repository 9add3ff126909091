//! `qemu`: a real virtual machine per device, reached over SSH like a physical one.
//!
//! - **provision** stops the device's previous VM, takes the image (the job's
//!   `provision_data.url`: a local path, `file://`, `http://` or `https://` URL; else the
//!   device config's `qemu_image`), caches a downloaded one under `qemu_cache_dir`, checks
//!   it is qcow2 or raw (`qemu-img info`), creates a copy-on-write overlay over it
//!   (`qemu-img create -b base -F fmt`: the base is only ever read) and boots the overlay:
//!   KVM when `/dev/kvm` opens and the guest starts, TCG otherwise (`qemu_accel`), user
//!   networking with SSH forwarded from `device_ip:ssh_port` (e.g. `127.0.1.N:22`), the
//!   console on a file. It waits (`qemu_boot_timeout`) for `ssh test_user@device_ip` to
//!   work; a VM that fails to start or never answers is a recovery failure (exit 46).
//!   The connector's public key (`<ssh_identity_file>.pub`) and the host name
//!   (`agent_name`) reach the guest as QEMU firmware config entries
//!   `opt/testflinger/authorized_keys` and `opt/testflinger/hostname` (the project's test
//!   image, `scripts/build-test-image`, reads both).
//! - **runtest** runs the job's commands with `ssh`/`scp` wrappers first in `PATH` that
//!   carry the device's user, port and identity, so `ssh $DEVICE_IP cmd` reaches the VM
//!   whatever port the forward uses.
//! - **allocate**, **reserve**: as every type (reserve adds the job's keys in the VM and
//!   removes them after), once the VM runs. runtest, allocate and reserve boot the VM
//!   themselves when it is not running (a job without `provision_data`).
//! - **cleanup** stops the VM and removes the overlay.
//! - **firmware_update**: a VM has no firmware to flash; says so and succeeds.
//!
//! Each stage appends what the console printed during it to `<phase>-serial.log`, which
//! the agent ships as the job's serial log (provision: the boot messages).
//!
//! The VM outlives the stage that started it (`-daemonize`): it is found again through
//! the pid file in the device's `qemu_state_dir`, checked against the process's command
//! line, and stopped by cleanup or by the next provision.

use super::Device;
use crate::context::Ctx;
use crate::error::{ConnectorError, Result};
use crate::process::exit_code;
use crate::ssh::{Ssh, shell_quote};
use crate::stages;
use serde_json::Value;
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;
use tokio::time::Instant;

pub struct Qemu;

const OVERLAY: &str = "overlay.qcow2";
const PID_FILE: &str = "qemu.pid";
const CONSOLE_LOG: &str = "console.log";
const QEMU_LOG: &str = "qemu.log";
const AUTHORIZED_KEYS: &str = "authorized_keys";
/// In `qemu_cache_dir`: written when KVM opened but started no guest, so `auto` goes
/// straight to TCG afterwards. Delete it to try KVM again.
pub const KVM_UNUSABLE: &str = "kvm-unusable";
/// The run directory's folder of `ssh`/`scp` wrappers and their config.
pub const SSH_SHIM_DIR: &str = ".testflinger-ssh";

const DEFAULT_MEMORY_MIB: u32 = 256;
const DEFAULT_BOOT_TIMEOUT: u64 = 300;
const DEFAULT_KVM_PROBE_TIMEOUT: u64 = 30;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// One device's VM: where its files are and how it is reached.
struct Vm {
    state: PathBuf,
    cache: PathBuf,
    ip: Ipv4Addr,
    port: u16,
    /// The host address the SSH forward listens on (`qemu_ssh_bind`, else `ip`).
    bind: Ipv4Addr,
    /// Where this stage's console output starts in `console.log`.
    console_mark: u64,
}

fn provisioning(msg: impl Into<String>) -> ConnectorError {
    ConnectorError::Provisioning(msg.into())
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ConnectorError {
    let context = context.into();
    move |e| ConnectorError::io(context, e)
}

fn default_root() -> PathBuf {
    std::env::temp_dir().join("testflinger-qemu")
}

impl Vm {
    fn open(ctx: &Ctx) -> Result<Vm> {
        let cfg = &ctx.cfg;
        let ip_text = cfg.require_device_ip()?;
        let ip: Ipv4Addr = ip_text.parse().map_err(|_| {
            provisioning(format!(
                "device_ip: '{ip_text}' is not an IPv4 address; the qemu type forwards SSH \
                 from a local address such as 127.0.1.1"
            ))
        })?;
        let port = cfg.ssh_port.unwrap_or(22);
        let bind = match &cfg.qemu_ssh_bind {
            Some(b) => b
                .parse()
                .map_err(|_| provisioning(format!("qemu_ssh_bind: '{b}' is not an IPv4 address")))?,
            None => ip,
        };
        let state = cfg
            .qemu_state_dir
            .as_ref()
            .map(PathBuf::from)
            .unwrap_or_else(|| default_root().join(format!("{ip}-{port}")));
        let cache = cfg
            .qemu_cache_dir
            .as_ref()
            .map(PathBuf::from)
            .unwrap_or_else(|| default_root().join("cache"));
        for d in [&state, &cache] {
            std::fs::create_dir_all(d).map_err(io(format!("creating {}", d.display())))?;
        }
        let mut vm = Vm {
            state,
            cache,
            ip,
            port,
            bind,
            console_mark: 0,
        };
        vm.console_mark = vm.console_len();
        Ok(vm)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.state.join(name)
    }

    fn console_len(&self) -> u64 {
        std::fs::metadata(self.path(CONSOLE_LOG)).map_or(0, |m| m.len())
    }

    /// Appends the console output since the stage started to `<phase>-serial.log`.
    fn save_console(&self, ctx: &Ctx) {
        let Ok(mut src) = std::fs::File::open(self.path(CONSOLE_LOG)) else {
            return;
        };
        let start = if self.console_len() < self.console_mark {
            0
        } else {
            self.console_mark
        };
        let mut buf = Vec::new();
        if src.seek(SeekFrom::Start(start)).is_err() || src.read_to_end(&mut buf).is_err() {
            return;
        }
        if buf.is_empty() {
            return;
        }
        let dest = ctx.dir.join(format!("{}-serial.log", ctx.stage.phase()));
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&dest)
            .and_then(|mut f| f.write_all(&buf));
        if let Err(e) = written {
            eprintln!("warning: cannot write {}: {e}", dest.display());
        }
    }

    /// The pid of this device's running qemu, if any: the pid file's process must still
    /// run and name this pid file on its command line (against pid reuse).
    fn pid(&self) -> Option<u32> {
        let pid_file = self.path(PID_FILE);
        let pid: u32 = std::fs::read_to_string(&pid_file).ok()?.trim().parse().ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let needle = pid_file.to_string_lossy().into_owned();
        let ours = cmdline
            .split(|b| *b == 0)
            .any(|arg| arg == needle.as_bytes());
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let zombie = stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
        (ours && !zombie).then_some(pid)
    }

    fn running(&self) -> bool {
        self.pid().is_some()
    }

    /// Stops the VM: SIGTERM, then SIGKILL after 10 s. Returns whether one was running.
    async fn stop(&self) -> bool {
        let Some(pid) = self.pid() else {
            let _ = std::fs::remove_file(self.path(PID_FILE));
            return false;
        };
        use nix::sys::signal::Signal;
        for (signal, wait) in [(Signal::SIGTERM, 10), (Signal::SIGKILL, 5)] {
            // `nix`'s safe kill(2) (no `unsafe` here). An error is ESRCH (the VM is gone
            // already) or EPERM (the pid is no longer ours): the wait below decides.
            if let Ok(pid) = i32::try_from(pid) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal);
            }
            let deadline = Instant::now() + Duration::from_secs(wait);
            while self.pid().is_some() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            if self.pid().is_none() {
                break;
            }
        }
        let _ = std::fs::remove_file(self.path(PID_FILE));
        true
    }

    /// The last `n` lines of a file of the state directory, for error messages.
    fn tail(&self, name: &str, n: usize) -> String {
        let text = std::fs::read(self.path(name)).unwrap_or_default();
        let text = String::from_utf8_lossy(&text);
        let lines: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        lines[lines.len().saturating_sub(n)..].join(" | ")
    }
}

/// Where the image comes from: the job's `provision_data.url`, else `qemu_image`.
fn image_source(ctx: &Ctx) -> Result<String> {
    match ctx.job.provision_data.as_ref().and_then(|p| p.get("url")) {
        Some(Value::String(s)) if !s.trim().is_empty() => Ok(s.trim().to_string()),
        Some(other) => Err(provisioning(format!(
            "provision_data.url: expected a local path or an http(s) URL (a non-empty \
             string), got {other}"
        ))),
        None => ctx.cfg.qemu_image.clone().ok_or_else(|| {
            provisioning(
                "no image to boot: the job has no provision_data.url and the device config \
                 has no qemu_image",
            )
        }),
    }
}

/// FNV-1a: a stable short name for a URL in the cache.
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The cache file for `url`: a hash of the URL plus its last path segment, sanitized.
pub fn cache_name(url: &str) -> String {
    let last = url
        .split(['?', '#'])
        .next()
        .unwrap_or("")
        .rsplit('/')
        .find(|s| !s.is_empty())
        .unwrap_or("image");
    let clean: String = last
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(80)
        .collect();
    format!("{:016x}-{}", fnv1a(url), clean.trim_start_matches('.'))
}

/// The local file of the base image, downloading an http(s) one into the cache.
async fn base_image(src: &str, cache: &Path) -> Result<PathBuf> {
    let lower = src.to_ascii_lowercase();
    if lower.starts_with("http://") || lower.starts_with("https://") {
        return download(src, cache).await;
    }
    let path = if let Some(p) = src.strip_prefix("file://") {
        p
    } else if src.contains("://") {
        return Err(provisioning(format!(
            "provision_data.url: '{src}' has an unsupported scheme; accepted: a local \
             path, file://, http:// or https://"
        )));
    } else {
        src
    };
    let p = Path::new(path);
    if !p.is_file() {
        return Err(provisioning(format!(
            "image '{src}' is not a readable file on the agent's host"
        )));
    }
    std::fs::canonicalize(p).map_err(io(format!("resolving {src}")))
}

async fn download(url: &str, cache: &Path) -> Result<PathBuf> {
    let dest = cache.join(cache_name(url));
    if dest.is_file() {
        println!("Image {url}: using the cached copy {}", dest.display());
        return Ok(dest);
    }
    let fail = |why: String| provisioning(format!("downloading image {url}: {why}"));
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .read_timeout(Duration::from_secs(60))
        .build()
        .map_err(|e| fail(e.to_string()))?;
    println!("Downloading image {url}");
    let mut resp = client
        .get(url)
        .send()
        .await
        .map_err(|e| fail(crate::api::chain(&e)))?;
    if !resp.status().is_success() {
        return Err(fail(format!("the server answered {}", resp.status())));
    }
    let part = cache.join(format!(
        ".{}.{}.part",
        cache_name(url),
        std::process::id()
    ));
    let mut file = tokio::fs::File::create(&part)
        .await
        .map_err(io(format!("creating {}", part.display())))?;
    let mut total: u64 = 0;
    let result: Result<()> = async {
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| fail(crate::api::chain(&e)))?
        {
            file.write_all(&chunk)
                .await
                .map_err(io(format!("writing {}", part.display())))?;
            total += chunk.len() as u64;
        }
        file.flush()
            .await
            .map_err(io(format!("writing {}", part.display())))?;
        Ok(())
    }
    .await;
    if let Err(e) = result {
        let _ = std::fs::remove_file(&part);
        return Err(e);
    }
    if total == 0 {
        let _ = std::fs::remove_file(&part);
        return Err(fail("the server sent an empty file".into()));
    }
    std::fs::rename(&part, &dest).map_err(io(format!("moving the image to {}", dest.display())))?;
    println!("Downloaded {total} bytes to {}", dest.display());
    Ok(dest)
}

/// Runs `qemu-img` with `args`, returning its stdout; fails with its stderr.
async fn qemu_img(args: &[&str]) -> Result<String> {
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        Command::new("qemu-img")
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .map_err(|_| provisioning(format!("qemu-img {} did not finish within 120 s", args[0])))?
    .map_err(|e| {
        ConnectorError::io(
            "running qemu-img (install qemu-utils: scripts/ci/qemu-deps.sh)",
            e,
        )
    })?;
    if !out.status.success() {
        return Err(provisioning(format!(
            "qemu-img {} failed (exit {}): {}",
            args[0],
            exit_code(out.status),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The image's format, which must be qcow2 or raw.
async fn image_format(src: &str, base: &Path) -> Result<&'static str> {
    let path = base.to_string_lossy();
    let info = qemu_img(&["info", "--output=json", "--", &path]).await?;
    let format = serde_json::from_str::<Value>(&info)
        .ok()
        .and_then(|v| v.get("format").and_then(Value::as_str).map(str::to_string))
        .unwrap_or_default();
    match format.as_str() {
        "qcow2" => Ok("qcow2"),
        "raw" => Ok("raw"),
        other => Err(provisioning(format!(
            "image '{src}' is in format '{other}'; the qemu device type boots qcow2 or raw"
        ))),
    }
}

/// A value for a QEMU `-opt key=value,...` list: commas are doubled.
fn qemu_opt(value: &str) -> String {
    value.replace(',', ",,")
}

/// `agent_name` as a host name: lower-case letters, digits and dashes, at most 63.
fn hostname(ctx: &Ctx) -> String {
    let name: String = ctx
        .cfg
        .agent_name
        .as_deref()
        .unwrap_or("testflinger-vm")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(63)
        .collect();
    let name = name.trim_matches('-').to_string();
    if name.is_empty() {
        "testflinger-vm".into()
    } else {
        name
    }
}

fn identity(ctx: &Ctx) -> Result<&str> {
    ctx.cfg.ssh_identity_file.as_deref().ok_or_else(|| {
        provisioning(
            "the qemu device type needs ssh_identity_file in the device config: the \
             connector's private key, whose .pub is authorized in the VM",
        )
    })
}

fn kvm_opens() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// The accelerator to try first, and whether to fall back to TCG when KVM stays silent.
fn choose_accel(ctx: &Ctx, vm: &Vm) -> (Accel, bool) {
    match ctx.cfg.qemu_accel.as_deref().unwrap_or("auto") {
        "kvm" => (Accel::Kvm, false),
        "tcg" => (Accel::Tcg, false),
        _ => {
            if !kvm_opens() {
                println!("/dev/kvm cannot be opened: using TCG (software emulation).");
                (Accel::Tcg, false)
            } else if vm.cache.join(KVM_UNUSABLE).exists() {
                println!(
                    "KVM started no guest earlier on this host ({}): using TCG.",
                    vm.cache.join(KVM_UNUSABLE).display()
                );
                (Accel::Tcg, false)
            } else {
                (Accel::Kvm, true)
            }
        }
    }
}

/// How a boot wait ended without an error.
enum Boot {
    Ready,
    KvmSilent,
}

impl Vm {
    async fn start(&self, ctx: &Ctx, format_note: &str, accel: Accel) -> Result<()> {
        let cfg = &ctx.cfg;
        let _ = std::fs::remove_file(self.path(PID_FILE));
        let memory = cfg.qemu_memory.unwrap_or(DEFAULT_MEMORY_MIB);
        let cpus = cfg.qemu_cpus.unwrap_or(1);
        let binary = cfg
            .qemu_binary
            .clone()
            .unwrap_or_else(|| "qemu-system-x86_64".into());
        let log = std::fs::File::create(self.path(QEMU_LOG))
            .map_err(io(format!("creating {}", self.path(QEMU_LOG).display())))?;
        let log2 = log.try_clone().map_err(io("duplicating the qemu log"))?;
        let p = |name: &str| qemu_opt(&self.path(name).to_string_lossy());
        let mut cmd = Command::new(&binary);
        cmd.args(["-name", &qemu_opt(&format!("testflinger-{}", hostname(ctx)))])
            .args(["-machine", "pc", "-accel", accel.name()])
            .args(["-m", &memory.to_string(), "-smp", &cpus.to_string()])
            .args(["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"])
            .args([
                "-chardev",
                &format!("file,id=console,path={},append=on", p(CONSOLE_LOG)),
            ])
            .args(["-serial", "chardev:console"])
            .args([
                "-drive",
                &format!("file={},if=virtio,format=qcow2", p(OVERLAY)),
            ])
            .args([
                "-netdev",
                &format!("user,id=net0,hostfwd=tcp:{}:{}-:22", self.bind, self.port),
            ])
            .args(["-device", "virtio-net-pci,netdev=net0"])
            .args(["-device", "virtio-rng-pci"])
            .args([
                "-fw_cfg",
                &format!(
                    "name=opt/testflinger/authorized_keys,file={}",
                    p(AUTHORIZED_KEYS)
                ),
            ])
            .args([
                "-fw_cfg",
                &format!("name=opt/testflinger/hostname,string={}", hostname(ctx)),
            ])
            .arg("-pidfile")
            .arg(self.path(PID_FILE))
            .arg("-daemonize")
            .args(&cfg.qemu_extra_args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .kill_on_drop(true);
        println!(
            "Starting the VM: {binary}, {} ({}), {memory} MiB, {cpus} CPU(s), disk {} over \
             {format_note}, SSH forwarded from {}:{}",
            accel.name().to_uppercase(),
            if accel == Accel::Kvm {
                "hardware virtualization"
            } else {
                "software emulation"
            },
            self.path(OVERLAY).display(),
            self.bind,
            self.port
        );
        let mut child = cmd
            .spawn()
            .map_err(|e| ConnectorError::Recovery(format!("cannot start {binary}: {e}")))?;
        // With -daemonize the command returns once the VM is set up.
        let status = tokio::time::timeout(Duration::from_secs(60), child.wait())
            .await
            .map_err(|_| {
                ConnectorError::Recovery(format!("{binary} did not start the VM within 60 s"))
            })?
            .map_err(io(format!("waiting for {binary}")))?;
        if !status.success() {
            return Err(ConnectorError::Recovery(format!(
                "{binary} failed to start the VM (exit {}): {}",
                exit_code(status),
                self.tail(QEMU_LOG, 3)
            )));
        }
        Ok(())
    }

    /// Waits until the VM answers SSH. With `probe`, a KVM guest that writes nothing on
    /// its console by then counts as KVM not working.
    async fn wait_ssh(&self, ssh: &Ssh, limit: Duration, probe: Option<Duration>) -> Result<Boot> {
        let started = Instant::now();
        let deadline = started + limit;
        loop {
            if !self.running() {
                return Err(ConnectorError::Recovery(format!(
                    "the VM stopped while booting; console: {}; qemu: {}",
                    self.tail(CONSOLE_LOG, 3),
                    self.tail(QEMU_LOG, 3)
                )));
            }
            if probe.is_some_and(|p| started.elapsed() >= p) && self.console_len() == 0 {
                return Ok(Boot::KvmSilent);
            }
            if ssh.reachable().await {
                return Ok(Boot::Ready);
            }
            if Instant::now() >= deadline {
                return Err(ConnectorError::Recovery(format!(
                    "the VM did not answer SSH at {} (port {}) within {} s; last console \
                     lines: {}",
                    ssh.destination(),
                    self.port,
                    limit.as_secs(),
                    self.tail(CONSOLE_LOG, 3)
                )));
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    async fn new_overlay(&self, base: &Path, format: &str) -> Result<()> {
        let overlay = self.path(OVERLAY);
        let _ = std::fs::remove_file(&overlay);
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            &base.to_string_lossy(),
            "-F",
            format,
            &overlay.to_string_lossy(),
        ])
        .await?;
        Ok(())
    }

    /// Boots a fresh overlay of the job's (or the default) image and waits for SSH.
    async fn provision(&mut self, ctx: &Ctx) -> Result<()> {
        if self.stop().await {
            println!("Stopped the device's previous VM.");
        }
        let _ = std::fs::remove_file(self.path(CONSOLE_LOG));
        self.console_mark = 0;
        let user = ctx.test_username()?;
        let ssh = Ssh::new(&ctx.cfg, &user)?;
        let key_file = format!("{}.pub", identity(ctx)?);
        let key = std::fs::read_to_string(&key_file).map_err(|e| {
            provisioning(format!(
                "cannot read {key_file} (the public half of ssh_identity_file, authorized \
                 in the VM): {e}"
            ))
        })?;
        let keys_path = self.path(AUTHORIZED_KEYS);
        std::fs::write(&keys_path, key.trim().to_string() + "\n")
            .map_err(io(format!("writing {}", keys_path.display())))?;

        let src = image_source(ctx)?;
        let base = base_image(&src, &self.cache).await?;
        let format = image_format(&src, &base).await?;
        let note = format!("{format} base {}", base.display());
        println!("Image {src}: {note}");

        let (mut accel, mut probe) = choose_accel(ctx, self);
        let limit = Duration::from_secs(
            ctx.cfg
                .qemu_boot_timeout
                .unwrap_or(DEFAULT_BOOT_TIMEOUT)
                .max(1),
        );
        let probe_limit = Duration::from_secs(
            ctx.cfg
                .qemu_kvm_probe_timeout
                .unwrap_or(DEFAULT_KVM_PROBE_TIMEOUT)
                .max(1),
        );
        loop {
            self.new_overlay(&base, format).await?;
            let started = Instant::now();
            self.start(ctx, &note, accel).await?;
            let waited = self
                .wait_ssh(&ssh, limit, probe.then_some(probe_limit))
                .await;
            match waited {
                Ok(Boot::Ready) => {
                    println!(
                        "The VM answers SSH at {} after {:.1} s ({}).",
                        ssh.destination(),
                        started.elapsed().as_secs_f64(),
                        accel.name().to_uppercase()
                    );
                    return Ok(());
                }
                Ok(Boot::KvmSilent) => {
                    self.stop().await;
                    let marker = self.cache.join(KVM_UNUSABLE);
                    let why = format!(
                        "/dev/kvm opened, but a KVM guest wrote nothing on its console \
                         within {} s; using TCG from now on (delete this file to try KVM \
                         again)\n",
                        probe_limit.as_secs()
                    );
                    let _ = std::fs::write(&marker, &why);
                    println!(
                        "KVM started no guest within {} s: falling back to TCG (recorded \
                         in {}).",
                        probe_limit.as_secs(),
                        marker.display()
                    );
                    let _ = std::fs::remove_file(self.path(CONSOLE_LOG));
                    accel = Accel::Tcg;
                    probe = false;
                }
                Err(e) => {
                    self.stop().await;
                    return Err(e);
                }
            }
        }
    }

    /// Boots the VM when it is not running (a job without a provision phase, or a VM
    /// that died between phases).
    async fn ensure_running(&mut self, ctx: &Ctx) -> Result<()> {
        if self.running() {
            return Ok(());
        }
        println!("The device's VM is not running: booting it.");
        self.provision(ctx).await.map_err(|e| match e {
            ConnectorError::Provisioning(m) => {
                ConnectorError::Recovery(format!("the VM could not be brought back: {m}"))
            }
            other => other,
        })
    }
}

/// Writes `ssh` and `scp` wrappers into the run directory that use a config naming the
/// device's user, port and identity, and returns the directory to put first in `PATH`.
fn ssh_shim(ctx: &Ctx, vm: &Vm) -> Result<PathBuf> {
    let dir = ctx.dir.join(SSH_SHIM_DIR);
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).map_err(io(format!("creating {}", bin.display())))?;
    let user = ctx.test_username()?;
    let identity = identity(ctx)?;
    let quote = |s: &str| format!("\"{}\"", s.replace('"', ""));
    let config = dir.join("ssh_config");
    let text = format!(
        "# Written by the qemu device connector: `ssh $DEVICE_IP` reaches this job's VM.\n\
         Host {ip}\n  User {user}\n  Port {port}\n  IdentityFile {id}\n  IdentitiesOnly yes\n  \
         StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n  \
         BatchMode yes\n  ConnectTimeout {timeout}\n\nMatch all\n  Include ~/.ssh/config\n",
        ip = vm.ip,
        port = vm.port,
        id = quote(identity),
        timeout = ctx.cfg.ssh_connect_timeout(),
    );
    std::fs::write(&config, text).map_err(io(format!("writing {}", config.display())))?;
    let path = std::env::var_os("PATH").unwrap_or_default();
    for tool in ["ssh", "scp"] {
        let Some(real) = std::env::split_paths(&path)
            .map(|d| d.join(tool))
            .find(|p| p.is_file() && p.parent() != Some(bin.as_path()))
        else {
            continue;
        };
        let script = format!(
            "#!/bin/sh\nexec {} -F {} \"$@\"\n",
            shell_quote(&real.to_string_lossy()),
            shell_quote(&config.to_string_lossy())
        );
        let file = bin.join(tool);
        std::fs::write(&file, script).map_err(io(format!("writing {}", file.display())))?;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o755))
            .map_err(io(format!("chmod {}", file.display())))?;
    }
    Ok(bin)
}

/// Runs `body` on the device's VM and saves the console output of the stage.
macro_rules! with_vm {
    ($ctx:expr, |$vm:ident| $body:expr) => {{
        #[allow(unused_mut)]
        let mut $vm = Vm::open($ctx)?;
        let result: Result<i32> = async { $body }.await;
        $vm.save_console($ctx);
        result
    }};
}

impl Device for Qemu {
    async fn provision(&self, ctx: &Ctx) -> Result<i32> {
        with_vm!(ctx, |vm| {
            vm.provision(ctx).await?;
            Ok(0)
        })
    }

    async fn firmware_update(&self, _ctx: &Ctx) -> Result<i32> {
        println!(
            "qemu device: a virtual machine has no firmware to flash; nothing was updated."
        );
        Ok(0)
    }

    async fn runtest(&self, ctx: &Ctx) -> Result<i32> {
        with_vm!(ctx, |vm| {
            vm.ensure_running(ctx).await?;
            let bin = ssh_shim(ctx, &vm)?;
            let mut path = std::ffi::OsString::from(bin.as_os_str());
            if let Some(old) = std::env::var_os("PATH") {
                path.push(":");
                path.push(old);
            }
            let extra = [("PATH".to_string(), path.to_string_lossy().into_owned())];
            stages::runtest(ctx, &extra).await
        })
    }

    async fn allocate(&self, ctx: &Ctx) -> Result<i32> {
        with_vm!(ctx, |vm| {
            vm.ensure_running(ctx).await?;
            stages::allocate(ctx).await
        })
    }

    async fn reserve(&self, ctx: &Ctx) -> Result<i32> {
        with_vm!(ctx, |vm| {
            vm.ensure_running(ctx).await?;
            crate::reserve::reserve(ctx).await
        })
    }

    async fn cleanup(&self, ctx: &Ctx) -> Result<i32> {
        with_vm!(ctx, |vm| {
            let stopped = vm.stop().await;
            let overlay = vm.path(OVERLAY);
            let removed = overlay.exists();
            match std::fs::remove_file(&overlay) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(ConnectorError::io(
                        format!("removing {}", overlay.display()),
                        e,
                    ));
                }
            }
            let _ = std::fs::remove_file(vm.path(AUTHORIZED_KEYS));
            println!(
                "{}; {}.",
                if stopped {
                    "VM stopped"
                } else {
                    "No VM was running"
                },
                if removed {
                    "overlay removed"
                } else {
                    "no overlay to remove"
                }
            );
            Ok(0)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_names_are_stable_and_safe() {
        let a = cache_name("https://example.com/images/disk.qcow2?token=1");
        assert!(a.ends_with("-disk.qcow2"), "{a}");
        assert_eq!(a, cache_name("https://example.com/images/disk.qcow2?token=1"));
        assert_ne!(a, cache_name("https://example.com/other/disk.qcow2"));
        let b = cache_name("http://h/../..");
        assert!(!b.contains('/'), "{b}");
        assert_eq!(qemu_opt("/a,b"), "/a,,b");
    }
}
