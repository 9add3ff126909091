//! The CLI with a real `testflinger-agent` running the job.

use crate::helpers::TestEnv;
use serde_json::Value;
use std::io::Read;

#[test]
fn submit_poll_prints_the_agents_output_and_ends_when_the_job_completes() {
    let env = TestEnv::start();
    let q = env.queue("agent");
    env.spawn_agent(
        &q,
        "echo 'hello from the test phase'; mkdir -p artifacts; printf 'artifact bytes' > artifacts/out.txt",
    );
    env.write_work_file(
        "job.yaml",
        &format!("job_queue: {q}\ntest_data:\n  test_cmds: echo unused\n"),
    );
    let out = env.run(&["submit", "--poll", "job.yaml"]);
    out.assert_ok();
    let id = out
        .stdout
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("job_id: "))
        .unwrap_or_else(|| panic!("{out:#?}"))
        .to_string();
    assert!(out.stdout.contains("setting up the device"), "{out:#?}");
    assert!(out.stdout.contains("hello from the test phase"), "{out:#?}");
    assert_eq!(env.job_state(&id), "complete");

    let out = env.run(&["status", &id]);
    out.assert_ok();
    assert_eq!(out.stdout, "complete\n");

    let results: Value = serde_json::from_str(&env.run(&["results", &id]).stdout).expect("json");
    assert_eq!(results["test_status"], 0);
    assert!(
        results["test_output"]
            .as_str()
            .is_some_and(|o| o.contains("hello from the test phase")),
        "{results}"
    );

    // The archive the agent uploaded, byte for byte.
    env.run(&["artifacts", "--filename", "a.tgz", &id])
        .assert_ok();
    let saved = crate::helpers::read_file(&env.work().join("a.tgz"));
    let resp = env.get(&format!("/v1/result/{id}/artifact"));
    assert_eq!(resp.status(), 200);
    let uploaded = env
        .rt
        .block_on(async { resp.bytes().await })
        .expect("artifact");
    assert!(
        saved == uploaded.as_ref(),
        "saved bytes differ from the stored archive"
    );
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(&saved[..]));
    let mut found = None;
    for entry in archive.entries().expect("tar") {
        let mut entry = entry.expect("entry");
        if entry.path().expect("path").ends_with("out.txt") {
            let mut body = String::new();
            entry.read_to_string(&mut body).expect("read");
            found = Some(body);
        }
    }
    assert_eq!(found.as_deref(), Some("artifact bytes"));

    // A finished job's output can be read again, at once.
    let out = env.run(&["poll", &id]);
    out.assert_ok();
    assert!(out.stdout.contains("hello from the test phase"), "{out:#?}");
}

#[test]
fn cancel_stops_a_running_job_and_poll_ends() {
    let env = TestEnv::start();
    let q = env.queue("agentcancel");
    env.spawn_agent(&q, "echo started; sleep 60; echo not reached");
    let id = env.submit(&format!("job_queue: {q}\ntest_data:\n  test_cmds: x\n"));
    let mut poll = env.spawn(&["poll", &id]);
    poll.wait_line(std::time::Duration::from_secs(30), |l| l == "started");
    env.run(&["cancel", &id]).assert_ok();
    let (status, lines, stderr) = poll.finish(std::time::Duration::from_secs(30));
    assert_eq!(status.code(), Some(3), "cancelled: {stderr}");
    assert!(!lines.iter().any(|l| l == "not reached"), "{lines:?}");
    assert_eq!(env.run(&["status", &id]).stdout, "cancelled\n");
}

/// Issue 14.5: `submit --poll` and `poll` exit non-zero when the job did not succeed,
/// print each phase's exit code as upstream does, and explain signal-style codes.
#[test]
fn poll_exit_status_says_how_the_job_ended() {
    let env = TestEnv::start();
    let q = env.queue("exitcodes");
    env.spawn_agent(&q, "echo failing on purpose; exit 7");
    env.write_work_file(
        "job.yaml",
        &format!("job_queue: {q}\ntest_data:\n  test_cmds: echo unused\n"),
    );
    let out = env.run(&["submit", "--poll", "job.yaml"]);
    assert_eq!(out.code(), Some(4), "{out:#?}");
    assert!(
        out.stderr
            .contains("Phase 'test' completed with exit code: 7"),
        "{out:#?}"
    );
    assert!(out.stdout.contains("failing on purpose"), "{out:#?}");
    let id = out
        .stdout
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("job_id: "))
        .unwrap_or_else(|| panic!("{out:#?}"))
        .to_string();
    // `poll` of the finished job says the same.
    let again = env.run(&["poll", &id]);
    assert_eq!(again.code(), Some(4), "{again:#?}");

    // A cancelled job: exit 3.
    let idle = env.queue("exitcodes-idle");
    let (status, body) = env.post_json("/v1/job", &serde_json::json!({"job_queue": idle}));
    assert_eq!(status, 200, "{body}");
    let cancelled = serde_json::from_str::<Value>(&body).expect("json")["job_id"]
        .as_str()
        .expect("job_id")
        .to_string();
    env.run(&["cancel", &cancelled]).assert_ok();
    let out = env.run(&["poll", &cancelled]);
    assert_eq!(out.code(), Some(3), "{out:#?}");
    assert!(out.stderr.contains("Job cancelled"), "{out:#?}");
}
