//! `noprovision` against a real sshd on a loopback port.

use crate::support::{Run, Sshd, code, stderr, stdout};
use serde_json::json;

fn job() -> serde_json::Value {
    json!({"job_queue": "q", "provision_data": {"skip": false}})
}

#[test]
fn reachable_device_provisions_without_reboot() {
    let sshd = Sshd::start();
    let run = Run::new(
        &sshd.device_config("reboot_script: [\"touch rebooted\"]\n"),
        &job(),
    );
    let out = run.run("noprovision", "provision");
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(
        stdout(&out).contains("answers over SSH"),
        "{}",
        stdout(&out)
    );
    assert!(!run.path().join("rebooted").exists());
}

#[test]
fn failing_reboot_command_is_a_recovery_failure() {
    let sshd = Sshd::prepare(); // never started: the device does not answer
    let run = Run::new(
        &sshd.device_config("reboot_script:\n  - \"true\"\n  - \"exit 5\"\n"),
        &job(),
    );
    let out = run.run("noprovision", "provision");
    assert_eq!(code(&out), 46, "{}", stderr(&out));
    let errors = run.read_json("device-connector-error.json");
    let info = &errors["provision_exception_info"];
    assert_eq!(info["exception_name"], "RecoveryError");
    assert!(
        info["exception_message"]
            .as_str()
            .is_some_and(|m| m.contains("exit 5") && m.contains("exit code 5")),
        "{info}"
    );
}

#[test]
fn hanging_reboot_command_is_a_recovery_failure() {
    let sshd = Sshd::prepare();
    let run = Run::new(
        &sshd.device_config("reboot_script: [\"sleep 30\"]\nreboot_command_timeout: 1\n"),
        &job(),
    );
    let out = run.run("noprovision", "provision");
    assert_eq!(code(&out), 46, "{}", stderr(&out));
    assert!(stderr(&out).contains("did not finish within 1 s"));
}

#[test]
fn device_that_stays_down_fails_provisioning_after_the_bounded_wait() {
    let sshd = Sshd::prepare();
    let run = Run::new(
        &sshd.device_config("reboot_script: [\"touch rebooted\"]\nreboot_timeout: 1\n"),
        &job(),
    );
    let out = run.run("noprovision", "provision");
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    assert!(run.path().join("rebooted").exists(), "reboot_script ran");
    let errors = run.read_json("device-connector-error.json");
    assert_eq!(
        errors["provision_exception_info"]["exception_name"],
        "ProvisioningError"
    );

    // No reboot_script at all: a plain provisioning failure naming the missing key.
    let run = Run::new(&sshd.device_config(""), &job());
    let out = run.run("noprovision", "provision");
    assert_eq!(code(&out), 1);
    assert!(
        stderr(&out).contains("no reboot_script"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn reboot_that_brings_the_device_back_succeeds() {
    let sshd = Sshd::prepare();
    // The "reboot" starts the device's sshd (daemonized; stopped by the Sshd guard).
    let run = Run::new(
        &sshd.device_config(&format!(
            "reboot_script: [\"{}\"]\nreboot_timeout: 30\n",
            sshd.daemon_command()
        )),
        &job(),
    );
    let out = run.run("noprovision", "provision");
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(
        stdout(&out).contains("is back after the reboot"),
        "{}",
        stdout(&out)
    );
}
