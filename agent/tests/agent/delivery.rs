//! Delivery guarantees: a dead agent's job is reaped and rerun, shutdown releases the
//! running job, raw-published jobs are registered and run.

use crate::lab::{ServerOpts, TestLab, amqp_uri};
use serde_json::json;
use std::time::Duration;
use testflinger_broker::{Broker, BrokerConfig, OutgoingMessage};

const LONG: Duration = Duration::from_secs(30);

/// Long unless the `fast` file exists in the lab dir.
fn slow_unless_fast(lab: &TestLab) -> String {
    format!(
        "echo attempt-start; if [ -f {} ]; then echo fast-run; exit 0; fi; i=0; while [ $i -lt 600 ]; do echo tick; sleep 0.1; i=$((i+1)); done",
        lab.path("fast").display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_agents_job_is_reaped_and_run_again_by_another() {
    let mut lab = TestLab::start_with(
        "reap",
        ServerOpts {
            lease_ttl: 3,
            reaper_ms: 200,
            ..ServerOpts::default()
        },
    )
    .await;
    let cmd = slow_unless_fast(&lab);
    let first = lab.spawn_agent("dev-a", json!({"test_command": cmd}));
    let id = lab.submit(json!({"test_data": {"test_cmds": "x"}})).await;
    let r = lab
        .wait_result(&id, "test running on dev-a", LONG, |r| {
            r["test_output"]
                .as_str()
                .is_some_and(|o| o.contains("tick"))
        })
        .await;
    assert_eq!(r["job_attempt"], 1, "{r}");
    lab.kill_agent(first);
    std::fs::write(lab.path("fast"), b"").expect("fast");
    lab.spawn_agent("dev-b", json!({"test_command": slow_unless_fast(&lab)}));
    let r = lab.wait_complete(&id, LONG).await;
    assert_eq!(r["job_attempt"], 2, "{r}");
    let out = r["test_output"].as_str().unwrap_or_default();
    assert!(out.contains("fast-run"), "second run's output: {out}");
    assert!(out.contains("on dev-b"), "{out}");

    // A token other than the current holder's (such as the first agent's) is stale now:
    // every write with it is refused.
    for (path, body) in [
        (format!("/v1/result/{id}"), json!({"job_state": "test"})),
        (
            format!("/v1/result/{id}/log/output"),
            json!({"fragment_number": 99, "timestamp": "2026-01-01T00:00:00Z", "phase": "test", "log_data": "zombie"}),
        ),
    ] {
        let resp = lab
            .http
            .post(format!("{}{path}", lab.base))
            .header("X-Testflinger-Token", "00000000000000000000000000000001")
            .json(&body)
            .send()
            .await
            .expect("post");
        assert_eq!(resp.status(), reqwest::StatusCode::CONFLICT, "{path}");
    }
    assert_eq!(lab.state(&id).await, "complete");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_grace_run_out_then_releases_the_job() {
    let mut lab = TestLab::start("sigterm").await;
    let cmd = slow_unless_fast(&lab);
    let first = lab.spawn_agent("dev-t1", json!({"test_command": cmd, "shutdown_grace": 1}));
    let id = lab.submit(json!({"test_data": {"test_cmds": "x"}})).await;
    lab.wait_result(&id, "test running", LONG, |r| {
        r["test_output"]
            .as_str()
            .is_some_and(|o| o.contains("tick"))
    })
    .await;
    let status = lab.terminate_agent(first, Duration::from_secs(15)).await;
    assert!(status.success(), "clean exit after releasing: {status}");
    let r = lab.result(&id).await;
    assert_eq!(r["job_state"], "waiting", "released back to the queue: {r}");

    std::fs::write(lab.path("fast"), b"").expect("fast");
    lab.spawn_agent("dev-t2", json!({"test_command": slow_unless_fast(&lab)}));
    let r = lab.wait_complete(&id, LONG).await;
    assert_eq!(r["job_attempt"], 2, "{r}");
    assert!(
        r["test_output"]
            .as_str()
            .unwrap_or_default()
            .contains("fast-run")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_running_job_finish_within_the_grace() {
    let mut lab = TestLab::start("grace").await;
    let gate = lab.path("gate");
    let a = lab.spawn_agent(
        "dev-g",
        json!({
            "test_command": format!("echo waiting-gate; while [ ! -f {} ]; do sleep 0.05; done; echo finished", gate.display()),
            "shutdown_grace": 20,
        }),
    );
    let id = lab.submit(json!({"test_data": {"test_cmds": "x"}})).await;
    lab.wait_result(&id, "test running", LONG, |r| {
        r["test_output"]
            .as_str()
            .is_some_and(|o| o.contains("waiting-gate"))
    })
    .await;
    let pid = lab.agent(a).pid();
    let _ = std::process::Command::new("kill")
        .args(["-s", "TERM", &pid.to_string()])
        .status();
    lab.wait_for("shutdown noticed", LONG, || async {
        lab.agent_log(a)
            .contains("shutdown requested")
            .then_some(())
    })
    .await;
    std::fs::write(&gate, b"").expect("gate");
    let status = lab.terminate_agent(a, LONG).await;
    assert!(status.success(), "{status}");
    let r = lab.result(&id).await;
    assert_eq!(r["job_state"], "complete", "finished within the grace: {r}");
    assert!(
        r["test_output"]
            .as_str()
            .unwrap_or_default()
            .contains("finished")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_published_job_is_registered_and_run() {
    let mut lab = TestLab::start("raw").await;
    lab.spawn_agent("dev-raw", json!({"test_command": "echo raw-ran"}));
    let broker = Broker::new(BrokerConfig::new(amqp_uri())).expect("broker");
    broker.ensure_job_queue(&lab.queue).await.expect("declare");
    let body = serde_json::to_vec(&json!({
        "job_queue": lab.queue,
        "test_data": {"test_cmds": "x"},
        "tags": [format!("raw-{}", lab.prefix)],
    }))
    .expect("body");
    broker
        .publish(OutgoingMessage {
            exchange: "",
            routing_key: &lab.queue,
            body: &body,
            persistent: true,
            ..OutgoingMessage::default()
        })
        .await
        .expect("publish");
    let id = testflinger_agent::lifecycle::job_id_from(None, &body).expect("a raw job id");
    let r = lab.wait_complete(&id, LONG).await;
    assert!(
        r["test_output"]
            .as_str()
            .unwrap_or_default()
            .contains("raw-ran"),
        "{r}"
    );

    // An invalid raw job goes to testflinger.dead with the API's reason.
    let marker = uuid::Uuid::new_v4().to_string();
    let bad = serde_json::to_vec(&json!({"job_queue": lab.queue, "no_such_key": 1})).expect("bad");
    broker
        .publish(OutgoingMessage {
            exchange: "",
            routing_key: &lab.queue,
            body: &bad,
            message_id: Some(&marker),
            persistent: true,
            ..OutgoingMessage::default()
        })
        .await
        .expect("publish bad");
    let reason = lab
        .wait_for("dead-lettered copy", LONG, || async {
            take_dead(&broker, &marker).await
        })
        .await;
    assert!(reason.contains("no_such_key"), "{reason}");
    lab.wait_for("original acked", LONG, || async {
        (broker.message_count(&lab.queue).await.ok()? == 0).then_some(())
    })
    .await;
}

/// Finds our message in the shared dead queue by `message_id`, acks it and gives every
/// other message back untouched. Returns its rejection reason.
pub(crate) async fn take_dead(broker: &Broker, message_id: &str) -> Option<String> {
    let mut c = broker
        .consume_shared(
            testflinger_broker::topology::DEAD_QUEUE,
            100,
            "agent-test-dead",
        )
        .await
        .ok()?;
    let mut held = Vec::new();
    let mut found = None;
    while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_millis(300), c.next()).await {
        if m.message_id.as_deref() == Some(message_id) {
            found = Some(
                m.headers
                    .get("x-rejection-reason")
                    .cloned()
                    .unwrap_or_default(),
            );
            let _ = m.ack().await;
            break;
        }
        held.push(m);
    }
    for m in held {
        let _ = m.requeue().await;
    }
    c.close().await;
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_excluded_agent_gives_the_job_back_to_another() {
    let mut lab = TestLab::start("exclude").await;
    lab.spawn_agent("dev-x", json!({"test_command": "echo ran-on-$agent_id"}));
    lab.spawn_agent("dev-y", json!({"test_command": "echo ran-on-$agent_id"}));
    for name in ["dev-x", "dev-y"] {
        lab.wait_for("agent registered", LONG, || async {
            (lab.get_agent(name).await["state"] == "waiting").then_some(())
        })
        .await;
    }
    for _ in 0..3 {
        let id = lab
            .submit(json!({"exclude_agents": ["dev-x"], "test_data": {"test_cmds": "x"}}))
            .await;
        let r = lab.wait_complete(&id, LONG).await;
        let out = r["test_output"].as_str().unwrap_or_default();
        assert!(out.contains("ran-on-dev-y"), "{out}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_agent_loses_its_lease_and_its_late_writes_are_refused() {
    let mut lab = TestLab::start_with(
        "zombie",
        ServerOpts {
            lease_ttl: 3,
            reaper_ms: 200,
            ..ServerOpts::default()
        },
    )
    .await;
    let cmd = slow_unless_fast(&lab);
    let zombie = lab.spawn_agent("dev-z", json!({"test_command": cmd}));
    let id = lab.submit(json!({"test_data": {"test_cmds": "x"}})).await;
    lab.wait_result(&id, "test running on dev-z", LONG, |r| {
        r["test_output"]
            .as_str()
            .is_some_and(|o| o.contains("tick"))
    })
    .await;
    let pid = lab.agent(zombie).pid().to_string();
    let signal = |sig: &str| {
        std::process::Command::new("kill")
            .args(["-s", sig, &pid])
            .status()
            .expect("kill")
    };
    signal("STOP");
    // The lease runs out; the reaper requeues the job; another agent runs it.
    lab.wait_result(&id, "job requeued", LONG, |r| r["job_state"] == "waiting")
        .await;
    std::fs::write(lab.path("fast"), b"").expect("fast");
    lab.spawn_agent("dev-w", json!({"test_command": slow_unless_fast(&lab)}));
    let r = lab.wait_complete(&id, LONG).await;
    assert_eq!(r["job_attempt"], 2, "{r}");
    // The zombie wakes up: its next write gets 409 and it stops the job.
    signal("CONT");
    lab.wait_for("zombie notices the lost lease", LONG, || async {
        lab.agent_log(zombie).contains("lease lost").then_some(())
    })
    .await;
    lab.wait_agent_idle("dev-z", LONG).await;
    let after = lab.result(&id).await;
    assert_eq!(after["job_state"], "complete", "{after}");
    assert_eq!(
        after["test_status"], 0,
        "the zombie did not overwrite it: {after}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_removed_from_the_server_mid_run_is_stopped_and_its_spool_dropped() {
    // The server forgets a running job (its record removed, as after the retention):
    // every write about it answers 404. The agent stops the job, drops its spool with a
    // log line (no endless retry) and takes the next job.
    let mut lab = TestLab::start_with(
        "gone",
        ServerOpts {
            lease_ttl: 3,
            reaper_ms: 200,
            ..ServerOpts::default()
        },
    )
    .await;
    let agent = lab.spawn_agent("dev-g", json!({"test_command": slow_unless_fast(&lab)}));
    let id = lab.submit(json!({"test_data": {"test_cmds": "x"}})).await;
    lab.wait_result(&id, "test running on dev-g", LONG, |r| {
        r["test_output"]
            .as_str()
            .is_some_and(|o| o.contains("tick"))
    })
    .await;
    let client = redis::Client::open(crate::lab::redis_url()).expect("redis url");
    let mut con = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let _: () = redis::cmd("DEL")
        .arg(format!("{}:job:{id}", lab.prefix))
        .query_async(&mut con)
        .await
        .expect("DEL");
    lab.wait_for("the agent to drop the gone job", LONG, || async {
        lab.agent_log(agent)
            .contains("no such job any more")
            .then_some(())
    })
    .await;
    lab.wait_agent_idle("dev-g", LONG).await;
    let spool = lab.path("results").join("dev-g").join(&id);
    lab.wait_for("the spool to be removed", LONG, || async {
        (!spool.exists()).then_some(())
    })
    .await;
    // Not stuck on it: the next job runs to the end.
    std::fs::write(lab.path("fast"), b"").expect("fast");
    let next = lab.submit(json!({"test_data": {"test_cmds": "x"}})).await;
    let r = lab.wait_complete(&next, LONG).await;
    assert_eq!(r["test_status"], 0, "{r}");
    let log = lab.agent_log(agent);
    let drops = log.matches("no such job any more").count();
    assert!(
        drops <= 3,
        "the agent kept retrying the gone job ({drops} lines):\n{log}"
    );
}
