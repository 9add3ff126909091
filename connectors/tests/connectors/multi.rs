//! `multi` against the real API server (RabbitMQ and Redis behind it). The test plays
//! the child devices' agents over HTTP, as real agents do.

use crate::api::ApiServer;
use crate::support::{Run, code, collect, stderr, stdout, wait_child, wait_until};
use serde_json::{Value, json};
use std::process::Stdio;
use std::time::Duration;

fn config(api: &ApiServer) -> String {
    format!(
        "agent_name: multi-agent\ntestflinger_server: {}\npoll_interval: 0.2\n",
        api.url
    )
}

fn child(queue: &str, name: &str) -> Value {
    json!({"job_queue": queue, "name": name, "test_data": {"test_cmds": "true"}})
}

/// Child ids as the connector records them while it waits.
fn child_ids(run: &Run, n: usize) -> Vec<String> {
    let path = run.path().join("job_list.json");
    let mut ids = Vec::new();
    wait_until(
        "the children to be submitted",
        Duration::from_secs(30),
        || {
            let Ok(text) = std::fs::read_to_string(&path) else {
                return false;
            };
            let Ok(Value::Array(list)) = serde_json::from_str::<Value>(&text) else {
                return false;
            };
            ids = list
                .iter()
                .filter_map(|e| e["job_id"].as_str().map(str::to_string))
                .collect();
            ids.len() == n
        },
    );
    ids
}

#[test]
fn children_are_allocated_tested_and_cancelled() {
    let mut api = ApiServer::start();
    let parent_queue = api.queue("conn-multi");
    let child_queue = api.queue("conn-multi-child");
    let parent_job = json!({
        "job_queue": parent_queue,
        "provision_data": {"jobs": [child(&child_queue, "one"), child(&child_queue, "two")]},
        "test_data": {"test_cmds": "echo \"ips=$DEVICE_IP_1,$DEVICE_IP_2\""},
    });
    let parent = api.submit(&parent_job);
    let mut job = parent_job.clone();
    job["job_id"] = json!(parent);
    let run = Run::new(&config(&api), &job);

    let mut provision = run
        .command("multi", "provision")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let out = collect(provision.stdout.take().expect("stdout"));
    let err = collect(provision.stderr.take().expect("stderr"));
    let ids = child_ids(&run, 2);

    // The children reached the server as the contract says.
    for id in &ids {
        let def = api.job(id);
        assert_eq!(def["allocate_data"], json!({"allocate": true}), "{def}");
        assert_eq!(def["parent_job_id"], json!(parent), "{def}");
        assert_eq!(def["job_queue"], json!(child_queue));
    }
    // Still waiting: only one child is allocated.
    api.post_result(
        &ids[0],
        &json!({"job_state": "allocated", "device_info": {"device_ip": "10.1.0.1", "agent_name": "a1"}}),
    );
    assert!(provision.try_wait().expect("try_wait").is_none());
    api.post_result(
        &ids[1],
        &json!({"job_state": "allocated", "device_info": {"device_ip": "10.1.0.2", "agent_name": "a2"}}),
    );
    let rc = wait_child(&mut provision, Duration::from_secs(30));
    assert_eq!(
        rc,
        0,
        "{}\n{}",
        out.lock().expect("lock"),
        err.lock().expect("lock")
    );

    let list = run.read_json("job_list.json");
    assert_eq!(
        list,
        json!([
            {"job_id": ids[0], "device_info": {"device_ip": "10.1.0.1", "agent_name": "a1"}},
            {"job_id": ids[1], "device_info": {"device_ip": "10.1.0.2", "agent_name": "a2"}},
        ])
    );

    let test = run.run("multi", "runtest");
    assert_eq!(code(&test), 0, "{}", stderr(&test));
    assert_eq!(stdout(&test).trim(), "ips=10.1.0.1,10.1.0.2");

    let cleanup = run.run("multi", "cleanup");
    assert_eq!(code(&cleanup), 0, "{}", stderr(&cleanup));
    for id in &ids {
        assert_eq!(api.state(id), "cancelled", "child {id}");
    }
}

#[test]
fn allocation_timeout_fails_and_cancels_the_children() {
    let mut api = ApiServer::start();
    let q = api.queue("conn-multi-child");
    let job = json!({
        "job_queue": "unused",
        "allocation_timeout": 1,
        "provision_data": {"jobs": [child(&q, "one"), child(&q, "two")]},
    });
    let run = Run::new(&config(&api), &job);
    let out = run.run("multi", "provision");
    assert_eq!(code(&out), 1, "{}", stdout(&out));
    assert!(
        stderr(&out).contains("not allocated within allocation_timeout (1 s)"),
        "{}",
        stderr(&out)
    );
    let ids: Vec<String> = run
        .read_json("job_list.json")
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|e| e["job_id"].as_str().map(str::to_string))
        .collect();
    assert_eq!(ids.len(), 2);
    for id in &ids {
        assert_eq!(api.state(id), "cancelled", "child {id}");
    }
    let errors = run.read_json("device-connector-error.json");
    assert_eq!(
        errors["provision_exception_info"]["exception_name"],
        "ProvisioningError"
    );
}

#[test]
fn a_child_ending_early_fails_provisioning() {
    let mut api = ApiServer::start();
    let q = api.queue("conn-multi-child");
    let job = json!({"job_queue": "unused", "provision_data": {"jobs": [child(&q, "one"), child(&q, "two")]}});
    let run = Run::new(&config(&api), &job);
    let mut provision = run
        .command("multi", "provision")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let err = collect(provision.stderr.take().expect("stderr"));
    let _out = collect(provision.stdout.take().expect("stdout"));
    let ids = child_ids(&run, 2);
    api.post_result(
        &ids[0],
        &json!({"job_state": "allocated", "device_info": {"device_ip": "10.2.0.1"}}),
    );
    // Someone cancels the second child: the whole allocation is off.
    api.cancel(&ids[1]);
    let rc = wait_child(&mut provision, Duration::from_secs(30));
    assert_eq!(rc, 1);
    let msg = err.lock().expect("lock").clone();
    assert!(
        msg.contains(&format!("child job {} ended (cancelled)", ids[1])),
        "{msg}"
    );
    assert_eq!(
        api.state(&ids[0]),
        "cancelled",
        "the allocated child is released"
    );
}

#[test]
fn missing_server_or_jobs_fail_clearly() {
    let run = Run::new(
        "agent_name: m\n",
        &json!({"job_queue": "q", "provision_data": {"jobs": [{"job_queue": "x"}]}}),
    );
    let out = run.run("multi", "provision");
    assert_eq!(code(&out), 1);
    assert!(
        stderr(&out).contains("no testflinger_server"),
        "{}",
        stderr(&out)
    );

    let run = Run::new(
        "testflinger_server: http://127.0.0.1:9\n",
        &json!({"job_queue": "q", "provision_data": {"jobs": []}}),
    );
    let out = run.run("multi", "provision");
    assert_eq!(code(&out), 1);
    assert!(
        stderr(&out).contains("provision_data.jobs"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn parent_cancelled_or_sigterm_stops_the_allocation_and_cancels_children() {
    let mut api = ApiServer::start();
    let q = api.queue("conn-multi-child");
    let parent_queue = api.queue("conn-multi");
    let base = json!({"job_queue": parent_queue, "provision_data": {"jobs": [child(&q, "one")]}});

    // The parent job is cancelled on the server while it waits.
    let parent = api.submit(&base);
    let mut job = base.clone();
    job["job_id"] = json!(parent);
    let run = Run::new(&config(&api), &job);
    let mut provision = run
        .command("multi", "provision")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let err = collect(provision.stderr.take().expect("stderr"));
    let ids = child_ids(&run, 1);
    api.cancel(&parent);
    assert_eq!(wait_child(&mut provision, Duration::from_secs(30)), 1);
    let stderr = err.finished();
    assert!(stderr.contains("is cancelled"), "{stderr}");
    assert_eq!(api.state(&ids[0]), "cancelled");

    // The agent stops the phase (SIGTERM): children are cancelled before exiting.
    let run = Run::new(&config(&api), &base);
    let mut provision = run
        .command("multi", "provision")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let ids = child_ids(&run, 1);
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &provision.id().to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    assert_eq!(wait_child(&mut provision, Duration::from_secs(30)), 1);
    assert_eq!(api.state(&ids[0]), "cancelled");
}
