//! `multi` end to end: a parent agent whose phases run the multi connector, and two real
//! child agents on `fake` devices, all against the real API, RabbitMQ and Redis.

use crate::api::ApiServer;
use crate::support::{BIN, wait_until};
use serde_json::json;
use std::path::Path;
use std::time::Duration;
use testflinger_testing::Agent;

fn start_agent(
    dir: &Path,
    name: &str,
    url: &str,
    queue: &str,
    device_type: &str,
    extra_device: &str,
) -> Agent {
    let home = dir.join(name);
    std::fs::create_dir_all(&home).expect("agent dir");
    let device = home.join("device.yaml");
    std::fs::write(
        &device,
        format!("agent_name: {name}\ndevice_ip: 10.0.0.{}\ntestflinger_server: {url}\npoll_interval: 0.2\n{extra_device}", name.len()),
    )
    .expect("device config");
    let cmd = |stage: &str| {
        format!(
            "{BIN} {device_type} {stage} -c {} testflinger.json",
            device.display()
        )
    };
    let config = format!(
        "agent_id: {name}\nserver_address: {url}\njob_queues: [{queue}]\npolling_interval: 0.2\n\
         execution_basedir: {d}/run\nlogging_basedir: {d}/logs\nresults_basedir: {d}/results\n\
         provision_command: {p}\nallocate_command: {a}\ntest_command: {t}\ncleanup_command: {c}\n",
        d = home.display(),
        p = cmd("provision"),
        a = cmd("allocate"),
        t = cmd("runtest"),
        c = cmd("cleanup"),
    );
    let path = home.join("agent.yaml");
    std::fs::write(&path, config).expect("agent config");
    Agent::start(name, &path, &home.join("agent.log"))
}

#[test]
fn multi_allocates_two_children_on_real_agents_and_cancels_them_in_cleanup() {
    let mut api = ApiServer::start();
    let parent_queue = api.queue("e2e-multi");
    let child_queue = api.queue("e2e-multi-child");
    let dir = tempfile::tempdir().expect("tempdir");
    let _children = [
        start_agent(dir.path(), "child-a", &api.url, &child_queue, "fake", ""),
        start_agent(dir.path(), "child-bb", &api.url, &child_queue, "fake", ""),
    ];
    let _parent = start_agent(
        dir.path(),
        "parent-ccc",
        &api.url,
        &parent_queue,
        "multi",
        "",
    );
    let child =
        |n: &str| json!({"job_queue": child_queue, "name": n, "test_data": {"test_cmds": "true"}});
    let parent = api.submit(&json!({
        "job_queue": parent_queue,
        "provision_data": {"jobs": [child("one"), child("two")]},
        "test_data": {"test_cmds": "echo \"devices=$DEVICE_IP_1+$DEVICE_IP_2\""},
    }));
    wait_until(
        "the parent job to complete",
        Duration::from_secs(90),
        || api.state(&parent) == "complete",
    );
    let result = api.result(&parent);
    let out = result["test_output"].as_str().unwrap_or_default();
    // The two children ran on the two child agents: their device IPs reached the test.
    let mut ips: Vec<&str> = out
        .lines()
        .filter_map(|l| l.strip_prefix("devices="))
        .flat_map(|l| l.split('+'))
        .collect();
    ips.sort_unstable();
    assert_eq!(ips, ["10.0.0.7", "10.0.0.8"], "parent test output: {out}");
    assert_eq!(result["provision_status"], 0, "{result}");
    assert_eq!(result["test_status"], 0, "{result}");
    // Cleanup cancelled the children, which released their agents.
    let children: Vec<String> = api.children_of(&child_queue);
    assert_eq!(children.len(), 2);
    for c in &children {
        wait_until("the child to be cancelled", Duration::from_secs(30), || {
            api.state(c) == "cancelled"
        });
    }
    wait_until(
        "the child agents to be free again",
        Duration::from_secs(30),
        || {
            ["child-a", "child-bb"]
                .iter()
                .all(|a| api.agent_state(a) == "waiting")
        },
    );
}
