//! `submit`: what is printed, what the server gets, and how failures read.

use crate::helpers::{TestEnv, assert_uuid, short_id};
use std::io::Read;

#[test]
fn quiet_prints_only_the_id_and_the_job_is_stored_as_written() {
    let env = TestEnv::start();
    let q = env.queue("quiet");
    env.register_agent(&format!("agent-{}", short_id()), &[&q], "waiting");
    env.write_work_file(
        "job.yaml",
        &format!("job_queue: {q}\nname: quiet test\ntest_data:\n  test_cmds: echo hi\n"),
    );
    let out = env.run(&["submit", "-q", "job.yaml"]);
    out.assert_ok();
    assert_eq!(out.stderr, "", "{out:#?}");
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 1, "{out:#?}");
    assert_uuid(lines[0]);
    let job = env.get_json(&format!("/v1/job/{}", lines[0]));
    assert_eq!(job["job_queue"], q.as_str());
    assert_eq!(job["name"], "quiet test");
    assert_eq!(job["test_data"]["test_cmds"], "echo hi");
    assert_eq!(env.job_state(lines[0]), "waiting");
}

#[test]
fn submit_prints_job_id_line_and_reads_json_from_stdin() {
    let env = TestEnv::start();
    let q = env.queue("stdin");
    env.register_agent(&format!("agent-{}", short_id()), &[&q], "waiting");
    let job = format!(r#"{{"job_queue": "{q}", "test_data": {{"test_cmds": "true"}}}}"#);
    let out = env.run_stdin(&["submit", "-"], &job);
    out.assert_ok();
    let id = out
        .stdout
        .trim()
        .strip_prefix("job_id: ")
        .unwrap_or_else(|| panic!("{out:#?}"));
    assert_uuid(id);
    assert_eq!(env.job_state(id), "waiting");
}

#[test]
fn unknown_field_fails_with_the_servers_message() {
    let env = TestEnv::start();
    let q = env.queue("unknown");
    env.register_agent(&format!("agent-{}", short_id()), &[&q], "waiting");
    env.write_work_file(
        "job.yaml",
        &format!("job_queue: {q}\nbogus_field: 1\ntest_data:\n  test_cmds: echo hi\n"),
    );
    let out = env.run(&["submit", "job.yaml"]);
    out.assert_one_line_failure();
    assert!(out.stderr.contains("bogus_field"), "{out:#?}");
    assert!(out.stderr.contains("422"), "{out:#?}");
    assert_eq!(out.stdout, "");
    // Nothing was queued.
    assert_eq!(env.get(&format!("/v1/queues/{q}/jobs")).status(), 204);
}

#[test]
fn invalid_yaml_names_line_and_column() {
    let env = TestEnv::start();
    env.write_work_file("bad.yaml", "job_queue: q\ntest_data:\n  test_cmds: [echo\n");
    let out = env.run(&["submit", "bad.yaml"]);
    out.assert_one_line_failure();
    assert!(out.stderr.contains("bad.yaml"), "{out:#?}");
    assert!(out.stderr.contains("line "), "{out:#?}");
    assert!(out.stderr.contains("column "), "{out:#?}");
}

#[test]
fn refuses_a_queue_without_online_agents_unless_asked_to_wait() {
    let env = TestEnv::start();
    let q = env.queue("noagent");
    env.write_work_file("job.yaml", &format!("job_queue: {q}\n"));

    // No agent lists the queue: the server's 404 message.
    let out = env.run(&["submit", "job.yaml"]);
    out.assert_one_line_failure();
    assert!(out.stderr.contains(&q), "{out:#?}");

    // Only an offline agent.
    env.register_agent(&format!("agent-{}", short_id()), &[&q], "offline");
    let out = env.run(&["submit", "job.yaml"]);
    out.assert_one_line_failure();
    assert!(out.stderr.contains("no online agents"), "{out:#?}");

    let out = env.run(&["submit", "-q", "--wait-for-available-agents", "job.yaml"]);
    out.assert_ok();
    assert_uuid(out.stdout.trim());
    assert!(out.stderr.contains("warning"), "{out:#?}");
}

#[test]
fn local_attachments_are_packed_and_uploaded() {
    let env = TestEnv::start();
    let q = env.queue("attach");
    env.register_agent(&format!("agent-{}", short_id()), &[&q], "waiting");
    env.write_work_file("jobdir/data/script.sh", "#!/bin/sh\necho attached\n");
    env.write_work_file(
        "jobdir/job.yaml",
        &format!(
            "job_queue: {q}\ntest_data:\n  test_cmds: sh attachments/test/data/script.sh\n  attachments:\n    - local: data/script.sh\n"
        ),
    );
    let out = env.run(&["submit", "-q", "jobdir/job.yaml"]);
    out.assert_ok();
    let id = out.stdout.trim().to_string();
    let job = env.get_json(&format!("/v1/job/{id}"));
    assert_eq!(
        job["test_data"]["attachments"],
        serde_json::json!([{"agent": "data/script.sh"}])
    );
    let resp = env.get(&format!("/v1/job/{id}/attachments"));
    assert_eq!(resp.status(), 200);
    let bytes = env
        .rt
        .block_on(async { resp.bytes().await })
        .expect("attachments");
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(&bytes[..]));
    let mut found = Vec::new();
    for entry in archive.entries().expect("tar") {
        let mut entry = entry.expect("entry");
        let mut body = String::new();
        entry.read_to_string(&mut body).expect("read");
        found.push((entry.path().expect("path").display().to_string(), body));
    }
    assert_eq!(
        found,
        vec![(
            "test/data/script.sh".to_string(),
            "#!/bin/sh\necho attached\n".to_string()
        )]
    );
}

#[test]
fn unreachable_server_is_one_line() {
    let env = TestEnv::start();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let mut cmd = env.cli_without_server();
    cmd.args([
        "--server",
        &format!("http://127.0.0.1:{port}"),
        "status",
        &uuid::Uuid::new_v4().to_string(),
    ]);
    let out = crate::helpers::run_cmd(cmd, None);
    out.assert_one_line_failure();
    assert!(out.stderr.contains("cannot reach the server"), "{out:#?}");
}

/// Issue 14.3: a wrong type says the field, what was given and what is accepted, once.
#[test]
fn wrong_types_name_the_field_the_value_and_what_is_accepted_once() {
    let env = TestEnv::start();
    let q = env.queue("types");
    env.register_agent(&format!("agent-{}", short_id()), &[&q], "waiting");
    let cases = [
        (
            format!("job_queue: {q}\ntest_data:\n  test_cmds: 5\n"),
            "test_data.test_cmds",
            "accepted: a string or a list of strings",
        ),
        (
            format!("job_queue: {q}\nglobal_timeout: \"2h\"\n"),
            "global_timeout",
            "accepted: a whole number (0 or more)",
        ),
        (
            format!("job_queue: {q}\nreserve_data:\n  timeout: soon\n"),
            "reserve_data.timeout",
            "accepted: a whole number of seconds",
        ),
    ];
    for (job, field, accepted) in cases {
        env.write_work_file("job.yaml", &job);
        let out = env.run(&["submit", "job.yaml"]);
        out.assert_one_line_failure();
        assert!(out.stderr.contains(field), "{out:#?}");
        assert!(out.stderr.contains(accepted), "{out:#?}");
        assert!(out.stderr.contains("got "), "{out:#?}");
        assert_eq!(
            out.stderr.matches(accepted).count(),
            1,
            "said more than once: {out:#?}"
        );
        assert!(!out.stderr.contains("untagged"), "{out:#?}");
    }
}
