//! Stopping things: cancel, timeouts, exit 46, operator offline.

use crate::lab::{TestLab, wait_pid_gone};
use serde_json::json;
use std::time::{Duration, Instant};

const LONG: Duration = Duration::from_secs(30);

async fn read_pid(lab: &TestLab, file: &str) -> String {
    let path = lab.path(file);
    lab.wait_for(file, LONG, || {
        let path = path.clone();
        async move {
            let s = std::fs::read_to_string(&path).ok()?;
            let s = s.trim().to_string();
            (!s.is_empty()).then_some(s)
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_kills_the_whole_process_tree_quickly() {
    let mut lab = TestLab::start("cancel").await;
    let dir = lab.dir().display().to_string();
    lab.spawn_agent(
        "dev-cancel",
        json!({
            "test_command": format!(
                "sleep 600 & echo $! > {dir}/grandchild.pid; sh -c 'sleep 600' & echo $! > {dir}/child.pid; echo $$ > {dir}/shell.pid; echo started; wait"
            ),
            "cleanup_command": "echo cleanup-ran",
        }),
    );
    let id = lab.submit(json!({"test_data": {"test_cmds": "x"}})).await;
    lab.wait_result(&id, "test started", LONG, |r| {
        r["test_output"]
            .as_str()
            .is_some_and(|o| o.contains("started"))
    })
    .await;
    let pids = [
        read_pid(&lab, "shell.pid").await,
        read_pid(&lab, "child.pid").await,
        read_pid(&lab, "grandchild.pid").await,
    ];
    let t0 = Instant::now();
    lab.cancel(&id).await;
    for pid in &pids {
        assert!(
            wait_pid_gone(pid, Duration::from_secs(5)).await,
            "process {pid} survived the cancel"
        );
    }
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    lab.wait_agent_idle("dev-cancel", LONG).await;
    let r = lab.result(&id).await;
    assert_eq!(
        r["job_state"], "cancelled",
        "a cancelled job stays cancelled: {r}"
    );
    let out = r["test_output"].as_str().unwrap_or_default();
    assert!(out.contains("Job cancellation was requested"), "{out}");
    assert!(
        r["cleanup_output"]
            .as_str()
            .unwrap_or_default()
            .contains("cleanup-ran"),
        "cleanup runs after a cancel: {r}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_and_output_timeouts_stop_the_phase() {
    let mut lab = TestLab::start("timeouts").await;
    lab.spawn_agent(
        "dev-timeouts",
        json!({
            "global_timeout": 2,
            "test_command": "if grep -q chatty testflinger.json; then while true; do echo tick; sleep 0.2; done; fi; echo quiet; sleep 600",
            "cleanup_command": "echo cleaned",
        }),
    );
    // Output keeps coming: the agent's global timeout (2 s) ends it.
    let a = lab
        .submit(json!({"test_data": {"test_cmds": "chatty"}}))
        .await;
    let t0 = Instant::now();
    let r = lab.wait_complete(&a, LONG).await;
    assert!(t0.elapsed() < Duration::from_secs(15), "{:?}", t0.elapsed());
    let out = r["test_output"].as_str().unwrap_or_default();
    assert!(out.contains("ERROR: Global timeout reached! (2s)"), "{out}");
    assert_ne!(r["test_status"], 0, "{r}");
    assert_eq!(r["cleanup_status"], 0, "{r}");

    // Silence: the job's output timeout (1 s) fires first.
    let b = lab
        .submit(json!({"output_timeout": 1, "test_data": {"test_cmds": "quiet"}}))
        .await;
    let r = lab.wait_complete(&b, LONG).await;
    let out = r["test_output"].as_str().unwrap_or_default();
    assert!(out.contains("ERROR: Output timeout reached! (1s)"), "{out}");
    assert!(!out.contains("Global timeout"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_46_sets_the_agent_offline_and_a_restart_keeps_it() {
    let mut lab = TestLab::start("recovery").await;
    let cfg = json!({
        "provision_command": "if grep -q break-device testflinger.json; then echo recovery failed; exit 46; fi; echo provisioned",
        "test_command": "echo tested",
    });
    let first = lab.spawn_agent("dev-46", cfg.clone());
    let bad = lab
        .submit(json!({"provision_data": {"url": "break-device"}, "test_data": {"test_cmds": "x"}}))
        .await;
    let r = lab.wait_complete(&bad, LONG).await;
    assert_eq!(r["provision_status"], 46, "{r}");
    assert!(r.get("test_status").is_none(), "{r}");
    let agent = lab
        .wait_for("agent offline after its job", LONG, || async {
            let a = lab.get_agent("dev-46").await;
            (a["state"] == "offline" && a["job_id"] == "").then_some(a)
        })
        .await;
    let comment = agent["comment"].as_str().unwrap_or_default();
    assert!(
        comment.contains(&format!("Recovery failed during job '{bad}'")),
        "{comment}"
    );

    let next = lab
        .submit(json!({"provision_data": {"url": "fine"}, "test_data": {"test_cmds": "x"}}))
        .await;
    lab.assert_stays_waiting(&next, Duration::from_secs(2))
        .await;

    // A restart must not clear the offline state.
    let status = lab.terminate_agent(first, LONG).await;
    assert!(status.success(), "{status}");
    let second = lab.spawn_agent("dev-46", cfg);
    lab.wait_for("restarted agent registered", LONG, || async {
        lab.agent_log(second)
            .contains("held by an operator")
            .then_some(())
    })
    .await;
    lab.assert_stays_waiting(&next, Duration::from_secs(2))
        .await;
    assert_eq!(lab.get_agent("dev-46").await["state"], "offline");

    // The operator puts it back: it takes the waiting job.
    lab.set_agent_state("dev-46", "waiting", "").await;
    let r = lab.wait_complete(&next, LONG).await;
    assert_eq!(r["provision_status"], 0, "{r}");
    assert_eq!(r["test_status"], 0, "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_offline_stops_consumption_and_waiting_resumes_it() {
    let mut lab = TestLab::start("offline").await;
    lab.spawn_agent("dev-off", json!({"test_command": "echo ran"}));
    let warm = lab.submit(json!({"test_data": {"test_cmds": "x"}})).await;
    lab.wait_complete(&warm, LONG).await;
    lab.wait_agent_idle("dev-off", LONG).await;

    lab.set_agent_state("dev-off", "maintenance", "bench work")
        .await;
    let id = lab.submit(json!({"test_data": {"test_cmds": "x"}})).await;
    lab.assert_stays_waiting(&id, Duration::from_secs(2)).await;
    let a = lab.get_agent("dev-off").await;
    assert_eq!(a["state"], "maintenance", "{a}");

    lab.set_agent_state("dev-off", "offline", "unplugged").await;
    lab.assert_stays_waiting(&id, Duration::from_secs(1)).await;

    lab.set_agent_state("dev-off", "waiting", "").await;
    let r = lab.wait_complete(&id, LONG).await;
    assert!(
        r["test_output"]
            .as_str()
            .unwrap_or_default()
            .contains("ran")
    );
}
