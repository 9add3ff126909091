//! Startup errors of the binary: a clear message naming the file and the key.

use std::process::Command;

fn run_with(config: &str) -> (bool, String) {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("agent.yaml");
    std::fs::write(&path, config).expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_testflinger-agent"))
        .arg("-c")
        .arg(&path)
        .output()
        .expect("run agent");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn unknown_key_is_refused_with_file_and_key() {
    let (ok, err) = run_with("agent_id: a\nserver_address: s\njob_queues: [q]\njob_queue: q\n");
    assert!(!ok);
    assert!(
        err.contains("agent.yaml") && err.contains("job_queue"),
        "{err}"
    );
}

#[test]
fn missing_required_key_is_refused() {
    let (ok, err) = run_with("agent_id: a\nserver_address: s\n");
    assert!(!ok);
    assert!(
        err.contains("agent.yaml") && err.contains("job_queues"),
        "{err}"
    );
}

#[test]
fn missing_file_is_reported() {
    let out = Command::new(env!("CARGO_BIN_EXE_testflinger-agent"))
        .arg("-c")
        .arg("/nonexistent/agent.yaml")
        .output()
        .expect("run agent");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/agent.yaml"), "{err}");
}
