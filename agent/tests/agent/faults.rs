//! Faults: the agent killed, frozen, cut off from the API; the API down mid-phase;
//! SIGTERM; quorum queues; a poisonous raw message.

use crate::delivery::take_dead;
use crate::lab::{Proxy, ServerOpts, TestLab, amqp_uri, group_members, wait_group_gone};
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use testflinger_broker::{Broker, BrokerConfig, OutgoingMessage};

const LONG: Duration = Duration::from_secs(30);

fn short_lease(secs: u64) -> ServerOpts {
    ServerOpts {
        lease_ttl: secs,
        reaper_ms: 200,
        ..ServerOpts::default()
    }
}

/// A test phase that leaves a background child and waits; its shell's pid is the
/// phase's process group id.
fn phase_with_child(lab: &TestLab, name: &str) -> String {
    let dir = lab.dir().display();
    format!(
        "sleep 600 & echo $! > {dir}/{name}-child.pid; echo $$ > {dir}/{name}-shell.pid; echo started; wait"
    )
}

async fn read_file(lab: &TestLab, file: &str) -> String {
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

/// Submits a job and waits until its test phase printed `started`; returns the job id
/// and the phase's process group id.
async fn start_phase(lab: &TestLab, name: &str) -> (String, String) {
    let id = lab.submit(json!({"test_data": {"test_cmds": "x"}})).await;
    lab.wait_result(&id, "test phase started", LONG, |r| {
        r["test_output"]
            .as_str()
            .is_some_and(|o| o.contains("started"))
    })
    .await;
    let pgid = read_file(lab, &format!("{name}-shell.pid")).await;
    assert!(!group_members(&pgid).is_empty(), "phase group {pgid} runs");
    (id, pgid)
}

fn signal(pid: &str, sig: &str) {
    let _ = std::process::Command::new("kill")
        .args(["-s", sig, pid])
        .status();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_agent_leaves_no_phase_process_within_a_second() {
    let mut lab = TestLab::start("kill9").await;
    let cmd = phase_with_child(&lab, "k");
    let a = lab.spawn_agent("dev-k", json!({"test_command": cmd}));
    let (_, pgid) = start_phase(&lab, "k").await;
    let child = read_file(&lab, "k-child.pid").await;
    lab.kill_agent(a);
    let t0 = Instant::now();
    assert!(
        wait_group_gone(&pgid, Duration::from_secs(1)).await,
        "phase group {pgid} still runs {:?} after SIGKILL of the agent: {:?}",
        t0.elapsed(),
        group_members(&pgid)
    );
    eprintln!(
        "kill -9: the phase group was gone {:?} after the agent died",
        t0.elapsed()
    );
    assert!(crate::lab::wait_pid_gone(&child, Duration::from_millis(10)).await);
}

/// The watchdog of the agent `agent_pid` (its child running `watchdog`).
fn watchdog_of(agent_pid: u32) -> Option<String> {
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let stat = std::fs::read_to_string(format!("/proc/{name}/stat")).unwrap_or_default();
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let ppid = rest.split_whitespace().nth(1).unwrap_or_default();
        let cmdline = std::fs::read(format!("/proc/{name}/cmdline")).unwrap_or_default();
        if ppid == agent_pid.to_string() && String::from_utf8_lossy(&cmdline).contains("watchdog") {
            return Some(name);
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_sweeps_the_phase_a_previous_run_left_and_releases_the_job() {
    let mut lab = TestLab::start("sweep").await;
    let fast = lab.path("fast");
    let cmd = format!(
        "if [ -f {} ]; then echo second-run; exit 0; fi; {}",
        fast.display(),
        phase_with_child(&lab, "s")
    );
    let a = lab.spawn_agent("dev-s", json!({"test_command": cmd.clone()}));
    let (id, pgid) = start_phase(&lab, "s").await;
    // Take the watchdog away first: only the start-up sweep can end the phase now.
    let agent_pid = lab.agent(a).pid();
    let watchdog = watchdog_of(agent_pid).expect("the agent runs a watchdog for its phase");
    signal(&watchdog, "KILL");
    lab.kill_agent(a);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !group_members(&pgid).is_empty(),
        "the orphaned phase survives without its watchdog"
    );
    std::fs::write(&fast, b"").expect("fast");
    let t0 = Instant::now();
    lab.spawn_agent("dev-s", json!({"test_command": cmd}));
    assert!(
        wait_group_gone(&pgid, Duration::from_secs(10)).await,
        "the restarted agent left group {pgid}: {:?}",
        group_members(&pgid)
    );
    eprintln!(
        "sweep: the orphaned phase group was gone {:?} after the restart",
        t0.elapsed()
    );
    // Its spool ended with a release: the job runs again at once (the 30 s lease has
    // not run out, so this is not the reaper's doing).
    let r = lab.wait_complete(&id, Duration::from_secs(20)).await;
    assert_eq!(r["job_attempt"], 2, "{r}");
    assert!(t0.elapsed() < Duration::from_secs(25), "{:?}", t0.elapsed());
    let out = r["test_output"].as_str().unwrap_or_default();
    assert!(out.contains("second-run"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_delivers_the_outcome_its_spool_holds() {
    let mut lab = TestLab::start_with(
        "respool",
        ServerOpts {
            lease_ttl: 60,
            ..ServerOpts::default()
        },
    )
    .await;
    let gate = lab.path("gate");
    let cmd = format!(
        "echo before; while [ ! -f {} ]; do sleep 0.05; done; i=0; while [ $i -lt 20 ]; do i=$((i+1)); echo after-$i; done",
        gate.display()
    );
    let a = lab.spawn_agent("dev-r", json!({"test_command": cmd.clone()}));
    let id = lab.submit(json!({"test_data": {"test_cmds": "x"}})).await;
    lab.wait_result(&id, "test phase started", LONG, |r| {
        r["test_output"]
            .as_str()
            .is_some_and(|o| o.contains("before"))
    })
    .await;
    lab.stop_server();
    std::fs::write(&gate, b"").expect("gate");
    // The job ends while the API is down: its outcome waits in the spool.
    let spool = lab.path("results").join("dev-r").join(&id);
    lab.wait_for("final outcome spooled", LONG, || async {
        let entries = std::fs::read_dir(&spool).ok()?;
        entries
            .flatten()
            .any(|e| std::fs::read_to_string(e.path()).is_ok_and(|t| t.contains("\"last\":true")))
            .then_some(())
    })
    .await;
    lab.kill_agent(a);
    lab.restart_server().await;
    lab.spawn_agent("dev-r", json!({"test_command": cmd}));
    let r = lab.wait_complete(&id, LONG).await;
    assert_eq!(r["job_attempt"], 1, "nothing re-ran: {r}");
    assert_eq!(r["test_status"], 0, "{r}");
    let out = r["test_output"].as_str().unwrap_or_default();
    for i in 1..=20 {
        let line = format!("after-{i}");
        assert_eq!(
            out.lines().filter(|l| *l == line).count(),
            1,
            "{line}: {out}"
        );
    }
    lab.wait_for("spool removed", LONG, || async {
        (!spool.exists()).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_agents_phase_dies_before_its_lease_ends() {
    let lease = 6;
    let mut lab = TestLab::start_with("sigstop", short_lease(lease)).await;
    let cmd = phase_with_child(&lab, "f");
    let a = lab.spawn_agent("dev-f", json!({"test_command": cmd}));
    let (_, pgid) = start_phase(&lab, "f").await;
    let pid = lab.agent(a).pid().to_string();
    signal(&pid, "STOP");
    let t0 = Instant::now();
    // The last renewal came before the freeze: the lease ends within `lease` seconds.
    let gone = wait_group_gone(&pgid, Duration::from_secs(lease)).await;
    let took = t0.elapsed();
    eprintln!("SIGSTOP: the phase group was gone {took:?} after the freeze (lease {lease} s)");
    signal(&pid, "CONT");
    assert!(
        gone,
        "phase group {pgid} of a frozen agent still ran {took:?} after SIGSTOP (lease {lease} s)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_cut_off_from_the_api_stops_its_phase_before_its_lease_ends() {
    let lease = 6;
    let mut lab = TestLab::start_with("partition", short_lease(lease)).await;
    let proxy = Proxy::start(&lab.base).await;
    let cmd = phase_with_child(&lab, "p");
    let a = lab.spawn_agent(
        "dev-p",
        json!({"test_command": cmd, "server_address": proxy.url()}),
    );
    let (_, pgid) = start_phase(&lab, "p").await;
    proxy.cut();
    let t0 = Instant::now();
    let gone = wait_group_gone(&pgid, Duration::from_secs(lease)).await;
    assert!(
        gone,
        "phase group {pgid} still ran {:?} after the cut (lease {lease} s); log:\n{}",
        t0.elapsed(),
        lab.agent_log(a)
    );
    eprintln!(
        "cut: the phase group was gone {:?} after the cut (lease {lease} s)",
        t0.elapsed()
    );
    assert!(
        lab.agent_log(a).contains("lease lost"),
        "{}",
        lab.agent_log(a)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_down_for_20_s_mid_phase_loses_no_line_and_reruns_nothing() {
    let mut lab = TestLab::start_with(
        "apidown",
        ServerOpts {
            lease_ttl: 60,
            ..ServerOpts::default()
        },
    )
    .await;
    let lines = 300;
    lab.spawn_agent(
        "dev-d",
        json!({"test_command": format!("i=0; while [ $i -lt {lines} ]; do i=$((i+1)); echo line-$i; sleep 0.1; done")}),
    );
    let id = lab.submit(json!({"test_data": {"test_cmds": "x"}})).await;
    lab.wait_result(&id, "output flows", LONG, |r| {
        r["test_output"]
            .as_str()
            .is_some_and(|o| o.contains("line-5\n"))
    })
    .await;
    lab.stop_server();
    tokio::time::sleep(Duration::from_secs(20)).await;
    lab.restart_server().await;
    let r = lab.wait_complete(&id, Duration::from_secs(90)).await;
    assert_eq!(r["job_attempt"], 1, "nothing re-ran: {r}");
    assert_eq!(r["test_status"], 0, "{r}");
    let out = r["test_output"].as_str().unwrap_or_default();
    let mut missing = Vec::new();
    let mut doubled = Vec::new();
    for i in 1..=lines {
        let n = out.lines().filter(|l| *l == format!("line-{i}")).count();
        if n == 0 {
            missing.push(i);
        } else if n > 1 {
            doubled.push(i);
        }
    }
    assert!(
        missing.is_empty() && doubled.is_empty(),
        "missing lines {missing:?}, doubled lines {doubled:?}"
    );
    assert_eq!(
        out.matches("Starting testflinger test phase").count(),
        1,
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_marks_the_agent_offline_and_a_restart_brings_it_back() {
    let mut lab = TestLab::start("offline").await;
    let a = lab.spawn_agent("dev-o", json!({"test_command": "true"}));
    lab.wait_for("agent registered", LONG, || async {
        (lab.get_agent("dev-o").await["state"] == "waiting").then_some(())
    })
    .await;
    let status = lab.terminate_agent(a, LONG).await;
    assert!(status.success(), "{status}");
    let rec = lab.get_agent("dev-o").await;
    assert_eq!(rec["state"], "offline", "{rec}");
    lab.spawn_agent("dev-o", json!({"test_command": "true"}));
    lab.wait_for("agent back to waiting", LONG, || async {
        (lab.get_agent("dev-o").await["state"] == "waiting").then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_queues_run_jobs_end_to_end() {
    let mut lab = TestLab::start_with(
        "quorum",
        ServerOpts {
            queue_type: "quorum",
            ..ServerOpts::default()
        },
    )
    .await;
    let second = lab.extra_queue("b");
    let queues = json!([lab.queue, second]);
    let agent = lab.spawn_agent(
        "dev-q",
        json!({"queue_type": "quorum", "job_queues": queues, "test_command": "echo quorum-ran"}),
    );
    let mut ids = Vec::new();
    for q in [lab.queue.clone(), second.clone()] {
        for _ in 0..2 {
            ids.push(
                lab.submit(json!({"job_queue": q, "test_data": {"test_cmds": "x"}}))
                    .await,
            );
        }
    }
    // They really are quorum queues: declaring one as classic is refused.
    let classic = Broker::new(BrokerConfig::new(amqp_uri())).expect("broker");
    assert!(
        classic.ensure_job_queue(&second).await.is_err(),
        "{second} accepted a classic declaration"
    );
    for id in &ids {
        let r = lab.wait_complete(id, LONG).await;
        assert_eq!(r["job_attempt"], 1, "{r}");
        assert!(
            r["test_output"]
                .as_str()
                .unwrap_or_default()
                .contains("quorum-ran"),
            "{r}"
        );
    }
    // One watchdog serves every phase: four jobs leave one child, and no zombies.
    let pid = lab.agent(agent).pid();
    let children = children_of(pid);
    assert_eq!(children.len(), 1, "{children:?}");
    assert!(children[0].1.contains("watchdog"), "{children:?}");
    assert!(!children[0].0.contains(" Z "), "{children:?}");
}

/// The children of `pid`: (stat after the command name, command line).
fn children_of(pid: u32) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let stat = std::fs::read_to_string(format!("/proc/{name}/stat")).unwrap_or_default();
        if let Some((_, rest)) = stat.rsplit_once(')')
            && rest.split_whitespace().nth(1) == Some(pid.to_string().as_str())
        {
            let cmd = std::fs::read(format!("/proc/{name}/cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            out.push((rest.to_string(), cmd));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_job_with_a_bad_job_id_is_dead_lettered_and_the_next_job_runs() {
    let mut lab = TestLab::start("poison").await;
    lab.spawn_agent("dev-poison", json!({"test_command": "echo next-ran"}));
    let broker = Broker::new(BrokerConfig::new(amqp_uri())).expect("broker");
    broker.ensure_job_queue(&lab.queue).await.expect("declare");
    let marker = format!("poison-{}", uuid::Uuid::new_v4());
    let bad: Vec<(Vec<u8>, String)> = vec![
        (
            serde_json::to_vec(&json!({"job_id": "not-a-uuid", "job_queue": lab.queue, "test_data": {"test_cmds": "x"}}))
                .expect("body"),
            format!("{marker}-id"),
        ),
        (b"{not json".to_vec(), format!("{marker}-json")),
    ];
    for (body, mid) in &bad {
        broker
            .publish(OutgoingMessage {
                exchange: "",
                routing_key: &lab.queue,
                body,
                message_id: Some(mid),
                persistent: true,
                ..OutgoingMessage::default()
            })
            .await
            .expect("publish");
    }
    let id = lab.submit(json!({"test_data": {"test_cmds": "x"}})).await;
    let r: Value = lab.wait_complete(&id, LONG).await;
    assert!(
        r["test_output"]
            .as_str()
            .unwrap_or_default()
            .contains("next-ran")
    );
    for (_, mid) in &bad {
        lab.wait_for("dead-lettered", LONG, || async {
            take_dead(&broker, mid).await
        })
        .await;
    }
}

/// Issue 17: a message the API published (marked) whose job the API no longer knows is
/// dropped, never registered again as a raw-published job and run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_marked_message_is_dropped_not_run() {
    let mut lab = TestLab::start("stale").await;
    let ran = lab.path("ran.txt");
    lab.spawn_agent(
        "dev-stale",
        json!({"test_command": format!("echo $(cat testflinger.json | head -c 0)ran >> {}", ran.display())}),
    );
    let broker = Broker::new(BrokerConfig::new(amqp_uri())).expect("broker");
    broker.ensure_job_queue(&lab.queue).await.expect("declare");
    let ghost = uuid::Uuid::new_v4().to_string();
    let body = serde_json::to_vec(
        &json!({"job_id": ghost, "job_queue": lab.queue, "test_data": {"test_cmds": "x"}}),
    )
    .expect("body");
    broker
        .publish(OutgoingMessage {
            exchange: "",
            routing_key: &lab.queue,
            body: &body,
            message_id: Some(&ghost),
            persistent: true,
            headers: vec![(
                testflinger_broker::topology::PUBLISHED_BY_HEADER,
                "api".to_string(),
            )],
            ..OutgoingMessage::default()
        })
        .await
        .expect("publish");
    // A real job behind it runs; the ghost never becomes a job.
    let id = lab.submit(json!({"test_data": {"test_cmds": "x"}})).await;
    lab.wait_complete(&id, LONG).await;
    let r = lab
        .http
        .get(format!("{}/v1/job/{ghost}", lab.base))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 204, "the stale message was registered as a job");
    let runs = std::fs::read_to_string(&ran).unwrap_or_default();
    assert_eq!(runs.lines().count(), 1, "{runs}");
}

/// Issue 17: an agent excluded from a job does not starve: it takes the next job while
/// the excluded one waits for another agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_excluded_agent_takes_the_next_job_instead_of_starving() {
    let mut lab = TestLab::start("excluded").await;
    let busy = lab.path("busy");
    lab.spawn_agent(
        "dev-excl-b",
        json!({"test_command": format!("touch {}; sleep 12", busy.display())}),
    );
    lab.spawn_agent("dev-excl-a", json!({"test_command": "echo a-ran"}));
    lab.wait_agent_idle("dev-excl-a", LONG).await;
    lab.wait_agent_idle("dev-excl-b", LONG).await;
    // B is busy with a long job (A may not take it).
    let long = lab
        .submit(json!({"exclude_agents": ["dev-excl-a"], "test_data": {"test_cmds": "x"}}))
        .await;
    lab.wait_for("B to start the long job", LONG, || async {
        busy.exists().then_some(())
    })
    .await;
    // Next in line: a job A may not run, then one it may.
    let excluded = lab
        .submit(json!({"exclude_agents": ["dev-excl-a"], "test_data": {"test_cmds": "x"}}))
        .await;
    let free = lab.submit(json!({"test_data": {"test_cmds": "x"}})).await;
    let r = lab.wait_complete(&free, Duration::from_secs(10)).await;
    assert!(
        r["test_output"]
            .as_str()
            .unwrap_or_default()
            .contains("a-ran"),
        "{r}"
    );
    assert_ne!(
        lab.state(&long).await,
        "complete",
        "the free job had to wait for the busy agent: A starved"
    );
    // The excluded job still runs, on B, afterwards.
    lab.wait_complete(&excluded, Duration::from_secs(60)).await;
    lab.wait_complete(&long, Duration::from_secs(60)).await;
}

/// Output a phase wrote is kept even when the agent is not scheduled until after its
/// drain second ran out (a loaded machine): the phase's command exits, a background
/// child keeps the pipe open and prints more than a pipe holds while the agent is
/// stopped (SIGSTOP, by the phase itself) past that second. Before the fix the read loop
/// could pick the elapsed deadline over the waiting output and drop it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_written_while_the_agent_was_not_scheduled_is_kept() {
    let mut lab = TestLab::start_with("drainstall", ServerOpts::default()).await;
    let lines = 3000;
    let dir = lab.dir().display().to_string();
    let cmd = format!(
        "A=$PPID; echo $A > {dir}/parent.pid; \
         ( sleep 0.3; kill -STOP $A; sleep 2.2; kill -CONT $A ) & \
         ( sleep 0.6; i=0; while [ $i -lt {lines} ]; do i=$((i+1)); echo tail-line-$i-of-the-background-child; done; sleep 3 ) & \
         echo main-done"
    );
    let a = lab.spawn_agent("dev-stall", json!({"test_command": cmd}));
    for round in 1..=3 {
        let id = lab.submit(json!({"test_data": {"test_cmds": "x"}})).await;
        let r = lab.wait_complete(&id, LONG).await;
        let parent = read_file(&lab, "parent.pid").await;
        assert_eq!(
            parent,
            lab.agent(a).pid().to_string(),
            "the phase's shell must be the agent's child for this test"
        );
        let out = r["test_output"].as_str().unwrap_or_default();
        let missing: Vec<usize> = (1..=lines)
            .filter(|i| !out.contains(&format!("tail-line-{i}-of-the-background-child\n")))
            .collect();
        assert!(
            missing.is_empty(),
            "round {round}: {} of {lines} lines lost (first {:?})",
            missing.len(),
            missing.first()
        );
        let _ = std::fs::remove_file(lab.path("parent.pid"));
    }
}

/// Issue 13.5: the spool is bounded with backpressure. While the API is away, a phase
/// writing more than `spool_max_bytes` is held on its pipe (the spool stays near the
/// limit); when the API returns, everything is delivered: nothing dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_phase_outpacing_the_api_waits_on_its_pipe_and_nothing_is_dropped() {
    let mut lab = TestLab::start_with(
        "backpressure",
        ServerOpts {
            lease_ttl: 60,
            ..ServerOpts::default()
        },
    )
    .await;
    let gate = lab.path("gate");
    let done = lab.path("done");
    // 64 lines of 64 KiB each (4 MiB) after the gate opens, then a marker.
    let cmd = format!(
        "echo before; while [ ! -e {gate} ]; do sleep 0.1; done; i=0; while [ $i -lt 64 ]; do head -c 65536 /dev/zero | tr '\\0' a; echo \" line-$i\"; i=$((i+1)); done; touch {done}; echo finished",
        gate = gate.display(),
        done = done.display(),
    );
    lab.spawn_agent(
        "dev-bp",
        json!({"test_command": cmd, "spool_max_bytes": 1 << 20}),
    );
    let id = lab.submit(json!({"test_data": {"test_cmds": "x"}})).await;
    lab.wait_result(&id, "test phase started", LONG, |r| {
        r["test_output"]
            .as_str()
            .is_some_and(|o| o.contains("before"))
    })
    .await;
    lab.stop_server();
    std::fs::write(&gate, b"").expect("gate");
    tokio::time::sleep(Duration::from_secs(4)).await;
    let spool = lab.path("results").join("dev-bp").join(&id);
    let spooled: u64 = std::fs::read_dir(&spool)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0);
    println!("spooled while the API was away: {spooled} bytes (limit 1048576)");
    assert!(
        !done.exists(),
        "the phase wrote its 4 MiB although the API was away and the spool limit is 1 MiB"
    );
    assert!(spooled < 3 << 20, "spool grew to {spooled} bytes");
    lab.restart_server().await;
    let r = lab.wait_complete(&id, LONG).await;
    assert!(done.exists(), "the phase went on once the API was back");
    assert_eq!(r["test_status"], 0, "{r}");
    let out = r["test_output"].as_str().unwrap_or_default();
    for i in 0..64 {
        assert!(out.contains(&format!(" line-{i}\n")), "line {i} missing");
    }
    assert!(out.contains("finished"), "the end of the output is there");
    let log = lab.agent_log(0);
    assert!(log.contains("the phase's output waits"), "{log}");
}
