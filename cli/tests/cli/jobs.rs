//! One-job commands: `status`, `cancel`, `results`, `show`, `artifacts`, and the local
//! `jobs` history and `config`.

use crate::helpers::{TestEnv, short_id};
use serde_json::Value;

fn env_with_queue(tag: &str) -> (TestEnv, String) {
    let env = TestEnv::start();
    let q = env.queue(tag);
    env.register_agent(&format!("agent-{}", short_id()), &[&q], "waiting");
    (env, q)
}

#[test]
fn cancel_of_a_waiting_job_makes_status_print_cancelled() {
    let (env, q) = env_with_queue("cancel");
    let id = env.submit(&format!("job_queue: {q}\n"));
    let out = env.run(&["status", &id]);
    out.assert_ok();
    assert_eq!(out.stdout, "waiting\n");

    env.run(&["cancel", &id]).assert_ok();
    let out = env.run(&["status", &id]);
    out.assert_ok();
    assert_eq!(out.stdout, "cancelled\n");

    // A second cancel is refused by the server.
    let out = env.run(&["cancel", &id]);
    out.assert_one_line_failure();
    assert!(
        out.stderr.contains("already completed or cancelled"),
        "{out:#?}"
    );
}

#[test]
fn unknown_and_invalid_job_ids_fail_in_one_line() {
    let env = TestEnv::start();
    let unknown = uuid::Uuid::new_v4().to_string();
    for cmd in ["status", "results", "show", "artifacts", "poll"] {
        let out = env.run(&[cmd, &unknown]);
        out.assert_one_line_failure();
        assert!(out.stderr.contains("not found"), "{cmd}: {out:#?}");
    }
    let out = env.run(&["status", "not-a-job-id"]);
    out.assert_one_line_failure();
    assert!(out.stderr.contains("invalid job id"), "{out:#?}");
}

#[test]
fn results_and_show_print_what_the_server_has() {
    let (env, q) = env_with_queue("show");
    let id = env.submit(&format!(
        "job_queue: {q}\ntags: [a, b]\ntest_data:\n  test_cmds: echo hello\n"
    ));
    let out = env.run(&["results", &id]);
    out.assert_ok();
    let results: Value = serde_json::from_str(&out.stdout).expect("results JSON");
    assert_eq!(results["job_state"], "waiting");

    let out = env.run(&["show", &id]);
    out.assert_ok();
    let shown: Value = serde_json::from_str(&out.stdout).expect("show JSON");
    assert_eq!(shown, env.get_json(&format!("/v1/job/{id}")));

    let out = env.run(&["show", "--yaml", &id]);
    out.assert_ok();
    assert!(out.stdout.contains(&format!("job_queue: {q}")), "{out:#?}");
    assert!(out.stdout.contains("test_cmds: echo hello"), "{out:#?}");
}

#[test]
fn artifacts_are_saved_byte_for_byte() {
    let (env, q) = env_with_queue("artifacts");
    let id = env.submit(&format!("job_queue: {q}\n"));

    let out = env.run(&["artifacts", &id]);
    out.assert_one_line_failure();
    assert!(out.stderr.contains("no artifacts"), "{out:#?}");

    // A gzip tar as the agent builds it, with bytes that must not be decoded.
    let mut bytes = Vec::new();
    {
        let gz = flate2::write::GzEncoder::new(&mut bytes, flate2::Compression::default());
        let mut tar = tar::Builder::new(gz);
        let payload: Vec<u8> = (0..20_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut header = tar::Header::new_gnu();
        header.set_size(payload.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        tar.append_data(&mut header, "artifacts/blob.bin", &payload[..])
            .expect("append");
        tar.into_inner().expect("tar").finish().expect("gzip");
    }
    env.upload_artifact(&id, bytes.clone());

    let out = env.run(&["artifacts", "--filename", "saved.tgz", &id]);
    out.assert_ok();
    let saved = crate::helpers::read_file(&env.work().join("saved.tgz"));
    assert_eq!(saved.len(), bytes.len());
    assert!(saved == bytes, "the saved archive differs from the upload");
    assert!(!env.work().join("saved.tgz.part").exists());

    // The default file name.
    env.run(&["artifacts", &id]).assert_ok();
    assert!(crate::helpers::read_file(&env.work().join("artifacts.tgz")) == bytes);
}

#[test]
fn jobs_lists_local_history_with_states() {
    let (env, q) = env_with_queue("history");
    let a = env.submit(&format!("job_queue: {q}\n"));
    let b = env.submit(&format!("job_queue: {q}\n"));
    env.run(&["cancel", &a]).assert_ok();

    let out = env.run(&["jobs"]);
    out.assert_ok();
    assert!(
        out.stdout.contains(&a) && out.stdout.contains(&b),
        "{out:#?}"
    );
    let history: Value = serde_json::from_slice(&crate::helpers::read_file(
        &env.xdg().join("testflinger-cli-history.json"),
    ))
    .expect("history JSON");
    assert_eq!(history[&b]["queue"], q.as_str());

    // Make the server's answer differ from the file: `--status` must ask it.
    env.post_result(&b, &serde_json::json!({"job_state": "test"}));
    let out = env.run(&["jobs", "--status"]);
    out.assert_ok();
    let line_of = |id: &str| {
        out.stdout
            .lines()
            .find(|l| l.starts_with(id))
            .unwrap_or_else(|| panic!("{id} missing: {out:#?}"))
            .to_string()
    };
    assert!(line_of(&a).contains("cancelled"), "{out:#?}");
    assert!(line_of(&b).contains("test"), "{out:#?}");
}

#[test]
fn server_comes_from_flag_then_config_then_env() {
    let (env, q) = env_with_queue("config");
    let id = env.submit(&format!("job_queue: {q}\n"));
    let dead = "http://127.0.0.1:9";

    // Env only.
    let mut cmd = env.cli_without_server();
    cmd.env("TESTFLINGER_SERVER", &env.url)
        .args(["status", &id]);
    crate::helpers::run_cmd(cmd, None).assert_ok();

    // Config wins over env.
    let mut cmd = env.cli_without_server();
    cmd.args(["config", &format!("server={}", env.url)]);
    crate::helpers::run_cmd(cmd, None).assert_ok();
    let mut cmd = env.cli_without_server();
    cmd.env("TESTFLINGER_SERVER", dead).args(["status", &id]);
    let out = crate::helpers::run_cmd(cmd, None);
    out.assert_ok();
    assert_eq!(out.stdout, "waiting\n");

    // The flag wins over config.
    let mut cmd = env.cli_without_server();
    cmd.args(["--server", dead, "status", &id]);
    crate::helpers::run_cmd(cmd, None).assert_one_line_failure();

    // -c points at another file.
    let other = env.dir.path().join("other.conf");
    std::fs::write(&other, format!("[testflinger-cli]\nserver = {dead}\n")).expect("write");
    let mut cmd = env.cli_without_server();
    cmd.args(["-c", other.to_str().expect("utf-8"), "status", &id]);
    crate::helpers::run_cmd(cmd, None).assert_one_line_failure();
}
