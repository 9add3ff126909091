//! `list-queues`, `queue-status`, `list-agents`, `agent-status`, `completions`.

use crate::helpers::{TestEnv, short_id};
use serde_json::{Value, json};

#[test]
fn list_queues_shows_advertised_queues() {
    let env = TestEnv::start();
    let a = env.queue("lqa");
    let b = env.queue("lqb");
    env.advertise_queues(&[(&a, "first queue"), (&b, "")]);

    let out = env.run(&["list-queues"]);
    out.assert_ok();
    let line_a = out
        .stdout
        .lines()
        .find(|l| l.contains(&a))
        .unwrap_or_else(|| panic!("{out:#?}"));
    assert!(line_a.contains("first queue"), "{out:#?}");
    assert!(out.stdout.lines().any(|l| l.trim() == b), "{out:#?}");

    let out = env.run(&["list-queues", "--json"]);
    out.assert_ok();
    let v: Value = serde_json::from_str(&out.stdout).expect("json");
    assert_eq!(v[&a], "first queue");
    assert_eq!(v[&b], "");
}

#[test]
fn queue_status_counts_agents_and_jobs() {
    let env = TestEnv::start();
    let q = env.queue("qstatus");
    let idle = format!("idle-{}", short_id());
    env.register_agent(&idle, &[&q], "waiting");
    env.register_agent(&format!("off-{}", short_id()), &[&q], "offline");
    env.register_agent(&format!("busy-{}", short_id()), &[&q], "test");
    let a = env.submit(&format!("job_queue: {q}\n"));
    let _b = env.submit(&format!("job_queue: {q}\n"));
    let _c = env.submit(&format!("job_queue: {q}\n"));
    env.run(&["cancel", &a]).assert_ok();
    let third = env.submit(&format!("job_queue: {q}\n"));
    let out = env.run(&["queue-status", &q, "--json"]);
    out.assert_ok();
    let v: Value = serde_json::from_str(&out.stdout).expect("json");
    assert_eq!(
        v["agents"],
        json!({"total": 3, "available": 1, "busy": 1, "offline": 1})
    );
    assert_eq!(v["jobs_waiting"], json!([_b, _c, third]), "{v}");

    // One job taken by the idle agent: the agent is busy now (its record names the job),
    // and the job runs.
    assert!(env.legacy_take(&idle, &q).is_some());
    let out = env.run(&["queue-status", &q, "--json"]);
    out.assert_ok();
    let v: Value = serde_json::from_str(&out.stdout).expect("json");
    assert_eq!(
        v,
        json!({
            "queue": q,
            "agents": {"total": 3, "available": 0, "busy": 2, "offline": 1},
            "jobs": {"waiting": 2, "running": 1, "completed": 0, "cancelled": 1},
            "jobs_waiting": [_c, third],
        })
    );

    let out = env.run(&["queue-status", &q, "--verbose"]);
    out.assert_ok();
    for expected in [
        "Agents in queue: 3",
        "Available: 0",
        "Busy:      2",
        "Offline:   1",
        "Waiting:   2",
        "Running:   1",
        "Cancelled: 1",
        "Waiting jobs (in order):",
        &format!("  {_c}"),
        &format!("  {third}"),
        &format!("{idle}  waiting  job {_b}"),
    ] {
        assert!(out.stdout.contains(expected), "{expected}: {out:#?}");
    }
    assert!(
        out.stdout.find(_c.as_str()) < out.stdout.rfind(third.as_str()),
        "waiting jobs in order: {out:#?}"
    );
    env.run(&["queue-status", "-v", &q]).assert_ok();

    let out = env.run(&["queue-status", &env.queue("nothing")]);
    out.assert_one_line_failure();
}

#[test]
fn agents_are_listed_and_shown() {
    let env = TestEnv::start();
    let q = env.queue("agents");
    let name = format!("agent-{}", short_id());
    env.register_agent(&name, &[&q], "waiting");

    let out = env.run(&["list-agents"]);
    out.assert_ok();
    let line = out
        .stdout
        .lines()
        .find(|l| l.starts_with(&name))
        .unwrap_or_else(|| panic!("{out:#?}"));
    assert!(line.contains("waiting") && line.contains(&q), "{out:#?}");

    let out = env.run(&["agent-status", &name]);
    out.assert_ok();
    assert!(
        out.stdout.contains("State:") && out.stdout.contains("waiting"),
        "{out:#?}"
    );
    let out = env.run(&["agent-status", &name, "--json"]);
    out.assert_ok();
    let v: Value = serde_json::from_str(&out.stdout).expect("json");
    assert_eq!(v["state"], "waiting");

    let out = env.run(&["agent-status", &format!("ghost-{}", short_id())]);
    out.assert_one_line_failure();
    assert!(out.stderr.contains("does not exist"), "{out:#?}");
}

#[test]
fn completions_for_each_shell() {
    let env = TestEnv::start();
    for shell in ["bash", "zsh", "fish"] {
        let out = env.run(&["completions", shell]);
        out.assert_ok();
        assert!(out.stdout.contains("testflinger"), "{shell}");
        assert!(out.stdout.contains("queue-status"), "{shell}");
    }
}

#[test]
fn reserve_dry_run_builds_the_job_and_submit_sends_it() {
    let env = TestEnv::start();
    let q = env.queue("reserve");
    env.register_agent(&format!("agent-{}", short_id()), &[&q], "waiting");
    let out = env.run(&[
        "reserve",
        "-q",
        &q,
        "--distro",
        "noble",
        "-k",
        "lp:someone",
        "--timeout",
        "2h",
        "--dry-run",
    ]);
    out.assert_ok();
    assert!(out.stdout.contains(&format!("job_queue: {q}")), "{out:#?}");
    assert!(out.stdout.contains("distro: noble"), "{out:#?}");
    assert!(out.stdout.contains("lp:someone"), "{out:#?}");
    assert!(out.stdout.contains("timeout: 2h"), "{out:#?}");
    // Nothing was submitted.
    assert_eq!(env.get(&format!("/v1/queues/{q}/jobs")).status(), 204);
}
