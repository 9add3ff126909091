//! `qemu` with real VMs: the project's test image (`scripts/build-test-image`, built once
//! and cached under target/), real qemu, real ssh, and for the end-to-end tests real
//! agents against the real API, RabbitMQ and Redis.
//!
//! Each VM forwards SSH from its own loopback address and a free port; VM-heavy tests
//! take a lock so that at most one of them boots VMs at a time (the CI machine has few
//! cores).

use crate::api::ApiServer;
use crate::support::{
    BIN, Run, code, collect, keygen, run_bounded, stderr, stdout, wait_child, wait_until,
};
use serde_json::json;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use testflinger_testing::Agent;

static VM_LOCK: Mutex<()> = Mutex::new(());

fn vm_lock() -> std::sync::MutexGuard<'static, ()> {
    VM_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// The test image and the kernel release inside it, built once per test run.
fn image() -> &'static (PathBuf, String) {
    static IMAGE: OnceLock<(PathBuf, String)> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/build-test-image");
        let out = run_bounded(Command::new(&script), Duration::from_secs(600));
        assert!(
            out.status.success(),
            "{} failed (run scripts/ci/qemu-deps.sh as root first): {}",
            script.display(),
            stderr(&out)
        );
        let path = PathBuf::from(stdout(&out).trim());
        let release = std::fs::read_to_string(path.with_file_name("kernel-release"))
            .expect("kernel-release next to the image");
        (path, release.trim().to_string())
    })
}

/// A loopback address and free port for one VM's SSH forward.
fn device_addr() -> (Ipv4Addr, u16) {
    static N: AtomicU8 = AtomicU8::new(1);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let ip = Ipv4Addr::new(127, 77, (std::process::id() % 250) as u8, n);
    let port = TcpListener::bind((ip, 0))
        .expect("bind a loopback address")
        .local_addr()
        .expect("addr")
        .port();
    (ip, port)
}

/// One qemu device: its config, key and state directory.
struct QemuDevice {
    ip: Ipv4Addr,
    port: u16,
    key: PathBuf,
    state: PathBuf,
    config: String,
}

impl QemuDevice {
    fn new(dir: &Path, name: &str, extra: &str) -> QemuDevice {
        let (ip, port) = device_addr();
        let (key, _) = keygen(dir, &format!("{name}_key"), &format!("{name}@agent"));
        let state = dir.join(format!("{name}-state"));
        let config = format!(
            "agent_name: {name}\ndevice_ip: {ip}\nssh_port: {port}\ntest_username: ubuntu\n\
             ssh_identity_file: {key}\nqemu_image: {image}\nqemu_state_dir: {state}\n\
             qemu_cache_dir: {cache}\nqemu_memory: 256\n{extra}",
            key = key.display(),
            image = image().0.display(),
            state = state.display(),
            cache = dir.join("cache").display(),
        );
        QemuDevice {
            ip,
            port,
            key,
            state,
            config,
        }
    }

    /// The pid of the device's VM while it runs.
    fn vm_pid(&self) -> Option<u32> {
        let pid = std::fs::read_to_string(self.state.join("qemu.pid")).ok()?;
        let pid: u32 = pid.trim().parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        (!stat.contains(") Z")).then_some(pid)
    }

    fn ssh(&self, key: &Path, remote: &str) -> std::process::Output {
        let mut cmd = Command::new("ssh");
        cmd.args([
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=10",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "LogLevel=ERROR",
            "-o",
            "IdentitiesOnly=yes",
            "-p",
            &self.port.to_string(),
            "-i",
        ])
        .arg(key)
        .arg(format!("ubuntu@{}", self.ip))
        .arg(remote)
        .stdin(Stdio::null());
        run_bounded(cmd, Duration::from_secs(60))
    }
}

impl Drop for QemuDevice {
    fn drop(&mut self) {
        if let Some(pid) = self.vm_pid() {
            let _ = Command::new("kill").arg(pid.to_string()).status();
        }
    }
}

/// Serves one file over HTTP to every GET; counts the requests.
fn file_server(path: &Path) -> (u16, Arc<Mutex<u32>>) {
    let body = std::fs::read(path).expect("read image");
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let hits = Arc::new(Mutex::new(0));
    let h = hits.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            *h.lock().expect("lock") += 1;
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            );
            let _ = s.write_all(&body);
        }
    });
    (port, hits)
}

fn start_qemu_agent(dir: &Path, name: &str, url: &str, queue: &str, device: &QemuDevice) -> Agent {
    let home = dir.join(name);
    std::fs::create_dir_all(&home).expect("agent dir");
    let config = home.join("device.yaml");
    std::fs::write(&config, &device.config).expect("device config");
    let cmd = |stage: &str| {
        format!(
            "{BIN} qemu {stage} -c {} testflinger.json",
            config.display()
        )
    };
    let agent = format!(
        "agent_id: {name}\nserver_address: {url}\njob_queues: [{queue}]\npolling_interval: 0.2\n\
         execution_basedir: {d}/run\nlogging_basedir: {d}/logs\nresults_basedir: {d}/results\n\
         provision_command: {p}\nallocate_command: {a}\ntest_command: {t}\n\
         reserve_command: {r}\ncleanup_command: {c}\n",
        d = home.display(),
        p = cmd("provision"),
        a = cmd("allocate"),
        t = cmd("runtest"),
        r = cmd("reserve"),
        c = cmd("cleanup"),
    );
    let path = home.join("agent.yaml");
    std::fs::write(&path, agent).expect("agent config");
    Agent::start(name, &path, &home.join("agent.log"))
}

#[test]
fn two_qemu_agents_run_jobs_side_by_side_over_ssh() {
    let (image_path, release) = image();
    let _vms = vm_lock();
    let before = std::fs::read(image_path).expect("read base");
    let mut api = ApiServer::start();
    let qa = api.queue("qemu-a");
    let qb = api.queue("qemu-b");
    let dir = tempfile::tempdir().expect("tempdir");
    // Agent a picks its accelerator itself (KVM when it works, else TCG after the
    // probe); agent b is forced onto TCG.
    let a = QemuDevice::new(
        dir.path(),
        "qemu-a",
        "qemu_accel: auto\nqemu_kvm_probe_timeout: 15\n",
    );
    let b = QemuDevice::new(dir.path(), "qemu-b", "qemu_accel: tcg\n");
    let _agents = [
        start_qemu_agent(dir.path(), "qemu-a", &api.url, &qa, &a),
        start_qemu_agent(dir.path(), "qemu-b", &api.url, &qb, &b),
    ];
    let (http_port, hits) = file_server(image_path);
    let test_cmds =
        "set -e\nssh $DEVICE_IP uname -a\necho \"vm-host=$(ssh $DEVICE_IP hostname)\"\n";
    let job_a = api.submit(&json!({
        "job_queue": qa,
        "provision_data": {"url": image_path.display().to_string()},
        "test_data": {"test_cmds": test_cmds},
    }));
    let job_b = api.submit(&json!({
        "job_queue": qb,
        "provision_data": {"url": format!("http://127.0.0.1:{http_port}/images/testflinger-test.qcow2")},
        "test_data": {"test_cmds": test_cmds},
    }));
    let mut most_vms = 0;
    wait_until(
        "both qemu jobs to complete",
        Duration::from_secs(600),
        || {
            let running = [&a, &b].iter().filter(|d| d.vm_pid().is_some()).count();
            most_vms = most_vms.max(running);
            std::thread::sleep(Duration::from_millis(200));
            api.state(&job_a) == "complete" && api.state(&job_b) == "complete"
        },
    );
    assert_eq!(most_vms, 2, "the two VMs never ran at the same time");
    for (job, name) in [(&job_a, "qemu-a"), (&job_b, "qemu-b")] {
        let result = api.result(job);
        let provision = result["provision_output"].as_str().unwrap_or_default();
        let out = result["test_output"].as_str().unwrap_or_default();
        assert_eq!(result["provision_status"], 0, "{name}: {provision}");
        assert_eq!(result["test_status"], 0, "{name}: {out}");
        // `ssh $DEVICE_IP uname -a` ran in the VM: its kernel, its host name.
        assert!(
            out.contains(&format!("Linux {name} {release} ")),
            "{name} test output: {out}"
        );
        assert!(out.contains(&format!("vm-host={name}")), "{out}");
        assert!(provision.contains("answers SSH"), "{provision}");
        // The serial log is the VM's console: the kernel's boot messages.
        let serial = result["provision_serial"].as_str().unwrap_or_default();
        assert!(
            serial.contains(&format!("Linux version {release}")),
            "{name} provision serial log: {}",
            &serial[..serial.len().min(2000)]
        );
        assert!(serial.contains("testflinger test image"), "{serial}");
    }
    let pa = api.result(&job_a)["provision_output"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        pa.contains("(KVM)") || pa.contains("(TCG)"),
        "accelerator not reported: {pa}"
    );
    // Where /dev/kvm opens but runs no guest (nested virtualization), `auto` fell back to
    // TCG and recorded it for the next boots.
    assert_eq!(
        pa.contains("falling back to TCG"),
        dir.path().join("cache/kvm-unusable").exists(),
        "{pa}"
    );
    // The URL image was downloaded once into the cache.
    assert_eq!(*hits.lock().expect("lock"), 1);
    // Cleanup stopped both VMs and removed their overlays; the base never changed.
    for d in [&a, &b] {
        wait_until("the VM to stop", Duration::from_secs(30), || {
            d.vm_pid().is_none()
        });
        assert!(!d.state.join("overlay.qcow2").exists());
    }
    assert!(std::fs::read(image_path).expect("read base") == before);
}

#[test]
fn vm_that_never_answers_ssh_exits_46_and_the_agent_goes_offline() {
    let _ = image();
    let mut api = ApiServer::start();
    let queue = api.queue("qemu-dead");
    let dir = tempfile::tempdir().expect("tempdir");
    // A raw disk of zeros: qemu runs, nothing ever boots.
    let dead = dir.path().join("blank.img");
    std::fs::write(&dead, vec![0u8; 4 << 20]).expect("blank image");
    let d = QemuDevice::new(
        dir.path(),
        "qemu-dead",
        "qemu_accel: tcg\nqemu_boot_timeout: 8\n",
    );
    let _agent = start_qemu_agent(dir.path(), "qemu-dead", &api.url, &queue, &d);
    let job = api.submit(&json!({
        "job_queue": queue,
        "provision_data": {"url": dead.display().to_string()},
        "test_data": {"test_cmds": "echo should-not-run"},
    }));
    wait_until(
        "the job to end and the agent to go offline",
        Duration::from_secs(120),
        || api.state(&job) == "complete" && api.agent_state("qemu-dead") == "offline",
    );
    let result = api.result(&job);
    assert_eq!(result["provision_status"], 46, "{result}");
    let out = result["provision_output"].as_str().unwrap_or_default();
    assert!(out.contains("did not answer SSH"), "{out}");
    assert!(out.contains("raw base"), "{out}");
    assert!(
        !result["test_output"]
            .as_str()
            .unwrap_or_default()
            .contains("should-not-run")
    );
    assert!(d.vm_pid().is_none(), "the dead VM was left running");
}

#[test]
fn reservation_on_a_raw_image_lets_the_user_in_and_removes_the_key() {
    let (image_path, release) = image();
    let _vms = vm_lock();
    let dir = tempfile::tempdir().expect("tempdir");
    let raw = dir.path().join("test.raw");
    let out = run_bounded(
        {
            let mut c = Command::new("qemu-img");
            c.args(["convert", "-f", "qcow2", "-O", "raw"])
                .arg(image_path)
                .arg(&raw);
            c
        },
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let before = std::fs::read(&raw).expect("read raw");
    let d = QemuDevice::new(dir.path(), "qemu-res", "qemu_accel: tcg\n");
    let (user_key, user_pub) = keygen(dir.path(), "user_key", "user@laptop");
    let run = Run::new(
        &d.config,
        &json!({
            "job_queue": "q",
            "provision_data": {"url": format!("file://{}", raw.display())},
            "reserve_data": {"ssh_keys": [user_pub], "timeout": 600},
        }),
    );
    let out = run_bounded(run.command("qemu", "provision"), Duration::from_secs(400));
    assert_eq!(code(&out), 0, "{}{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains("raw base"), "{}", stdout(&out));
    assert!(run.read("provision-serial.log").contains(release.as_str()));
    // Before the reservation the user's key does not get in.
    assert!(!d.ssh(&user_key, "true").status.success());

    let mut child = run
        .command("qemu", "reserve")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn reserve");
    let text = collect(child.stdout.take().expect("stdout"));
    let err = collect(child.stderr.take().expect("stderr"));
    let started = Instant::now();
    wait_until("the reservation", Duration::from_secs(120), || {
        let s = text.lock().expect("lock").clone();
        assert!(
            started.elapsed() < Duration::from_secs(110) || s.contains("RESERVED"),
            "reserve: {s} {}",
            err.lock().expect("lock")
        );
        s.contains("TESTFLINGER SYSTEM RESERVED")
    });
    let shown = text.lock().expect("lock").clone();
    assert!(
        shown.contains(&format!("ssh -p {} ubuntu@{}", d.port, d.ip)),
        "{shown}"
    );
    let inside = d.ssh(&user_key, "uname -r; cat ~/.ssh/authorized_keys");
    assert!(inside.status.success(), "user login: {}", stderr(&inside));
    assert!(stdout(&inside).contains(release.as_str()));
    assert!(stdout(&inside).contains("user@laptop"));

    // End the reservation as the agent does on cancel.
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    assert_eq!(
        wait_child(&mut child, Duration::from_secs(60)),
        0,
        "{}",
        err.lock().expect("lock")
    );
    assert!(
        !d.ssh(&user_key, "true").status.success(),
        "key still works"
    );
    let keys = d.ssh(&d.key, "cat ~/.ssh/authorized_keys");
    assert!(keys.status.success(), "{}", stderr(&keys));
    assert!(!stdout(&keys).contains("user@laptop"), "{}", stdout(&keys));
    assert!(stdout(&keys).contains("qemu-res@agent"), "agent key lost");

    let out = run.run("qemu", "cleanup");
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(
        stdout(&out).contains("VM stopped; overlay removed"),
        "{}",
        stdout(&out)
    );
    assert!(d.vm_pid().is_none());
    assert!(!d.state.join("overlay.qcow2").exists());
    assert!(
        std::fs::read(&raw).expect("read raw") == before,
        "base changed"
    );
}

#[test]
fn bad_images_and_settings_fail_clearly_without_booting() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = QemuDevice::new(dir.path(), "qemu-bad", "");
    let job = |url: serde_json::Value| json!({"job_queue": "q", "provision_data": {"url": url}});

    let tcg = format!("{}qemu_accel: tcg\n", d.config);
    let run = Run::new(&tcg, &job(json!("ftp://example.com/x.img")));
    let out = run.run("qemu", "provision");
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("provision_data.url")
            && stderr(&out).contains("ftp://example.com/x.img")
            && stderr(&out).contains("http://"),
        "{}",
        stderr(&out)
    );

    let run = Run::new(&d.config, &job(json!(42)));
    let out = run.run("qemu", "provision");
    assert_eq!(code(&out), 1);
    assert!(
        stderr(&out).contains("provision_data.url"),
        "{}",
        stderr(&out)
    );

    let run = Run::new(&d.config, &job(json!("/nonexistent/disk.qcow2")));
    let out = run.run("qemu", "provision");
    assert_eq!(code(&out), 1);
    assert!(stderr(&out).contains("/nonexistent/disk.qcow2"));

    let vmdk = dir.path().join("disk.vmdk");
    let made = Command::new("qemu-img")
        .args(["create", "-q", "-f", "vmdk"])
        .arg(&vmdk)
        .arg("1M")
        .status()
        .expect("qemu-img");
    assert!(made.success());
    let run = Run::new(&d.config, &job(json!(vmdk.display().to_string())));
    let out = run.run("qemu", "provision");
    assert_eq!(code(&out), 1);
    assert!(
        stderr(&out).contains("'vmdk'") && stderr(&out).contains("qcow2 or raw"),
        "{}",
        stderr(&out)
    );

    let run = Run::new(&format!("{}qemu_accel: hvf\n", d.config), &json!({}));
    let out = run.run("qemu", "provision");
    assert_eq!(code(&out), 1);
    assert!(
        stderr(&out).contains("qemu_accel") && stderr(&out).contains("auto, kvm or tcg"),
        "{}",
        stderr(&out)
    );

    let run = Run::new(
        &d.config.replace("qemu_state_dir: /", "qemu_state_dir: "),
        &json!({}),
    );
    let out = run.run("qemu", "provision");
    assert_eq!(code(&out), 1);
    assert!(
        stderr(&out).contains("qemu_state_dir") && stderr(&out).contains("absolute"),
        "{}",
        stderr(&out)
    );

    let run = Run::new(&d.config, &json!({"job_queue": "q"}));
    let out = run.run("qemu", "firmware_update");
    assert_eq!(code(&out), 0);
    assert!(
        stdout(&out).contains("no firmware to flash"),
        "{}",
        stdout(&out)
    );
    // Cleanup with no VM is fine.
    let out = run.run("qemu", "cleanup");
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(
        stdout(&out).contains("No VM was running"),
        "{}",
        stdout(&out)
    );
}
