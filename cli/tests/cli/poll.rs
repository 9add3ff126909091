//! `poll`: the queue position line, live output, `--oneshot`/`--json`, and the end on
//! `complete` or `cancelled`. The job's agent side is played over the real API the way an
//! upstream (token-less) agent writes: log fragments and results.

use crate::helpers::{TestEnv, short_id};
use serde_json::{Value, json};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(20);

#[test]
fn poll_shows_queue_position_with_estimate_and_stops_on_cancel() {
    let env = TestEnv::start();
    let q = env.queue("position");
    let agent = format!("agent-{}", short_id());
    env.register_agent(&agent, &[&q], "waiting");
    // One job started by an agent gives the queue a wait-time sample.
    let first = env.submit(&format!("job_queue: {q}\n"));
    assert_eq!(
        env.legacy_take(&agent, &q).map(|j| j["job_id"].clone()),
        Some(json!(first))
    );
    // The agent runs that job, as an upstream agent reports it.
    env.register_agent(&agent, &[&q], "test");
    let ahead = env.submit(&format!("job_queue: {q}\n"));
    let mine = env.submit(&format!("job_queue: {q}\n"));

    let mut poll = env.spawn(&["poll", &mine]);
    let line = poll.wait_line(WAIT, |l| l.contains("position"));
    assert!(
        line.contains(&format!("Waiting in queue '{q}': position 2 (1 job ahead)")),
        "{line}"
    );
    // The only agent is busy: no promise of a start time, the history only.
    assert!(line.contains("no estimate: 1 of 1 agent busy"), "{line}");
    assert!(line.contains("recent jobs waited ~"), "{line}");

    env.run(&["cancel", &ahead]).assert_ok();
    // Issue 14.4's case: next in line, the only agent busy.
    let line = poll.wait_line(WAIT, |l| l.contains("position 1"));
    assert!(
        line.contains("position 1 (0 jobs ahead), no estimate"),
        "{line}"
    );
    assert!(!line.contains("estimated start"), "{line}");

    // The agent finishes its job and is idle: the next job starts shortly.
    let (status, body) = env.post_json(
        &format!("/v1/agents/data/{agent}"),
        &json!({"state": "waiting", "job_id": ""}),
    );
    assert_eq!(status, 200, "{body}");
    let line = poll.wait_line(WAIT, |l| l.contains("starting shortly"));
    assert!(line.contains("(1 idle agent)"), "{line}");

    env.run(&["cancel", &mine]).assert_ok();
    let (status, _, stderr) = poll.finish(WAIT);
    assert_eq!(status.code(), Some(3), "cancelled: {stderr}");
}

#[test]
fn poll_estimates_follow_the_agents_and_say_when_there_is_no_data() {
    let env = TestEnv::start();
    let q = env.queue("noeta");
    let agent = format!("agent-{}", short_id());
    env.register_agent(&agent, &[&q], "waiting");
    let id = env.submit(&format!("job_queue: {q}\n"));
    let mut poll = env.spawn(&["poll", &id]);
    let line = poll.wait_line(WAIT, |l| l.contains("position"));
    assert!(
        line.contains("position 1 (0 jobs ahead), starting shortly (1 idle agent)"),
        "{line}"
    );
    // The agent turns busy and there is no history: it says so instead of guessing.
    env.register_agent(&agent, &[&q], "provision");
    let line = poll.wait_line(WAIT, |l| l.contains("no estimate"));
    assert!(
        line.contains("no estimate: 1 of 1 agent busy; no wait-time data yet"),
        "{line}"
    );
    // Stopped cleanly (offline): nobody can run it.
    env.register_agent(&agent, &[&q], "offline");
    let line = poll.wait_line(WAIT, |l| l.contains("no agent is available"));
    assert!(line.contains("(1 offline or in maintenance)"), "{line}");
    env.run(&["cancel", &id]).assert_ok();
    assert_eq!(poll.finish(WAIT).0.code(), Some(3));
}

#[test]
fn poll_prints_output_as_it_arrives_and_ends_on_complete() {
    let env = TestEnv::start();
    let q = env.queue("live");
    env.register_agent(&format!("agent-{}", short_id()), &[&q], "waiting");
    let id = env.submit(&format!("job_queue: {q}\ntest_data:\n  test_cmds: echo\n"));

    let mut poll = env.spawn(&["poll", &id]);
    env.post_result(&id, &json!({"job_state": "setup"}));
    env.post_fragment(&id, 0, "setup", "setting up\n");
    poll.wait_line(WAIT, |l| l == "setting up");
    env.post_result(&id, &json!({"job_state": "test"}));
    env.post_fragment(&id, 1, "test", "first line\n");
    poll.wait_line(WAIT, |l| l == "first line");
    env.post_fragment(&id, 2, "test", "second line\n");
    poll.wait_line(WAIT, |l| l == "second line");
    env.post_result(
        &id,
        &json!({"job_state": "complete", "status": {"setup": 0, "test": 0}}),
    );
    let (status, lines, stderr) = poll.finish(WAIT);
    assert_eq!(status.code(), Some(0), "{stderr}");
    let output: Vec<&String> = lines.iter().filter(|l| !l.contains("position")).collect();
    assert_eq!(output, ["setting up", "first line", "second line"]);
}

#[test]
fn poll_json_follows_by_fragment_polling_and_ends_on_complete() {
    let env = TestEnv::start();
    let q = env.queue("json");
    env.register_agent(&format!("agent-{}", short_id()), &[&q], "waiting");
    let id = env.submit(&format!("job_queue: {q}\n"));
    env.post_result(&id, &json!({"job_state": "test"}));

    let mut poll = env.spawn(&["poll", "--json", &id]);
    env.post_fragment(&id, 0, "test", "hello\n");
    let line = poll.wait_line(WAIT, |l| l.starts_with('{'));
    let v: Value = serde_json::from_str(&line).expect("json line");
    assert_eq!(v["output"]["test"]["log_data"], "hello\n");
    assert_eq!(v["output"]["test"]["last_fragment_number"], 0);
    env.post_result(&id, &json!({"job_state": "complete"}));
    assert_eq!(poll.finish(WAIT).0.code(), Some(0));
}

#[test]
fn oneshot_prints_once_with_fragment_filters() {
    let env = TestEnv::start();
    let q = env.queue("oneshot");
    env.register_agent(&format!("agent-{}", short_id()), &[&q], "waiting");
    let id = env.submit(&format!("job_queue: {q}\n"));
    env.post_fragment(&id, 0, "setup", "a\n");
    env.post_fragment(&id, 1, "test", "b\n");
    env.post_fragment(&id, 2, "test", "c\n");

    let out = env.run(&["poll", "--oneshot", &id]);
    out.assert_ok();
    assert_eq!(out.stdout, "a\nb\nc\nLast Fragment Number: 2\n");

    let out = env.run(&["poll", "-o", "--start_fragment", "2", &id]);
    out.assert_ok();
    assert_eq!(out.stdout, "c\nLast Fragment Number: 2\n");

    let out = env.run(&["poll", "-o", "--phase", "setup", &id]);
    out.assert_ok();
    assert_eq!(out.stdout, "a\nLast Fragment Number: 0\n");

    let out = env.run(&["poll", "-o", "--json", &id]);
    out.assert_ok();
    let v: Value = serde_json::from_str(&out.stdout).expect("json");
    assert_eq!(v["output"]["test"]["log_data"], "b\nc\n");

    let out = env.run(&["poll-serial", "--oneshot", &id]);
    out.assert_ok();
    assert_eq!(out.stdout, "Last Fragment Number: -1\n");
}

#[test]
fn poll_with_phase_stops_when_that_phase_has_a_status() {
    let env = TestEnv::start();
    let q = env.queue("phase");
    env.register_agent(&format!("agent-{}", short_id()), &[&q], "waiting");
    let id = env.submit(&format!("job_queue: {q}\n"));
    env.post_result(&id, &json!({"job_state": "setup"}));
    env.post_fragment(&id, 0, "setup", "in setup\n");

    let mut poll = env.spawn(&["poll", "--phase", "setup", &id]);
    poll.wait_line(WAIT, |l| l == "in setup");
    env.post_result(
        &id,
        &json!({"job_state": "provision", "status": {"setup": 0}}),
    );
    let (status, lines, stderr) = poll.finish(WAIT);
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert_eq!(lines, ["in setup"]);
    // The job itself goes on.
    assert_eq!(env.job_state(&id), "provision");
}

#[test]
fn ctrl_c_offers_to_cancel_the_job() {
    let env = TestEnv::start();
    let q = env.queue("ctrlc");
    env.register_agent(&format!("agent-{}", short_id()), &[&q], "waiting");
    let keep = env.submit(&format!("job_queue: {q}\n"));
    let drop = env.submit(&format!("job_queue: {q}\n"));

    // Answer "no": the job stays.
    let mut poll = env.spawn_with_stdin(&["poll", &keep], Some("n\n"));
    poll.wait_line(WAIT, |l| l.contains("position"));
    poll.interrupt();
    let (status, _, stderr) = poll.finish(WAIT);
    assert_eq!(status.code(), Some(130), "{stderr}");
    assert!(stderr.contains(&format!("Cancel job {keep}")), "{stderr}");
    assert_eq!(env.job_state(&keep), "waiting");

    // Answer "y": the job is cancelled.
    let mut poll = env.spawn_with_stdin(&["poll", &drop], Some("y\n"));
    poll.wait_line(WAIT, |l| l.contains("position"));
    poll.interrupt();
    let (status, _, stderr) = poll.finish(WAIT);
    assert_eq!(status.code(), Some(130), "{stderr}");
    assert_eq!(env.job_state(&drop), "cancelled");
}
