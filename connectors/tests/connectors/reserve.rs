//! `reserve` against a real sshd: keys installed for the reservation, removed after.

use crate::support::{
    HttpServer, Run, Sshd, code, collect, free_port, keygen, stderr, wait_child, wait_until,
};
use serde_json::json;
use std::process::Stdio;
use std::time::Duration;
use testflinger_testing::Agent;

#[test]
fn raw_keys_are_installed_until_sigterm_then_removed() {
    let sshd = Sshd::start();
    let (user_key, user_pub) = keygen(sshd.dir.path(), "user_key", "user@laptop");
    // A comment full of shell syntax: keys travel as data, never as code.
    let marker = sshd.dir.path().join("pwned");
    let hostile = format!(
        "{user_pub} $(touch {}) `touch {}`",
        marker.display(),
        marker.display()
    );
    let job = json!({
        "job_queue": "q",
        "job_id": "6ba7b810-9dad-11d1-80b4-00c04fd430c8",
        // Also already present: must survive the reservation.
        "reserve_data": {"ssh_keys": [hostile, sshd.agent_pub], "timeout": "1h"}
    });
    let before = sshd.authorized_keys();
    let run = Run::new(&sshd.device_config(""), &job);
    assert!(!sshd.can_login(&user_key), "user key must not work before");

    let mut child = run
        .command("noprovision", "reserve")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let out = collect(child.stdout.take().expect("stdout"));
    let err = collect(child.stderr.take().expect("stderr"));
    wait_until("the reservation banner", Duration::from_secs(30), || {
        out.lock()
            .expect("lock")
            .contains("TESTFLINGER SYSTEM RESERVED")
    });
    {
        let text = out.lock().expect("lock").clone();
        assert!(
            text.contains(&format!("ssh -p {} ", sshd.port)),
            "connect hint: {text}"
        );
        assert!(text.contains("Reservation expires at"), "{text}");
        assert!(text.contains("3600 seconds"), "{text}");
        assert!(text.contains("Installed 1 SSH key(s)"), "{text}");
    }
    assert!(
        sshd.can_login(&user_key),
        "user key works during the reservation"
    );

    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let rc = wait_child(&mut child, Duration::from_secs(30));
    assert_eq!(rc, 0, "stderr: {}", err.finished());
    let stdout = out.finished();
    assert!(stdout.contains("ended by SIGTERM"), "{stdout}");
    assert_eq!(
        sshd.authorized_keys(),
        before,
        "exactly the added key is removed"
    );
    assert!(!sshd.can_login(&user_key), "user key no longer works");
    assert!(sshd.can_login(&sshd.agent_key), "agent key still works");
    assert!(!marker.exists(), "key text reached a shell");
}

#[test]
fn launchpad_keys_come_from_the_key_service_and_expire_with_the_timeout() {
    let sshd = Sshd::start();
    let (_, user_pub) = keygen(sshd.dir.path(), "user_key", "alice@lp");
    let body = format!("{user_pub}\n");
    let service = HttpServer::start(move |path| {
        if path == "/lp/alice" {
            (200, body.clone())
        } else {
            (404, "no such user".into())
        }
    });
    let job = json!({"job_queue": "q", "reserve_data": {"ssh_keys": ["lp:alice"], "timeout": 1}});
    let before = sshd.authorized_keys();
    let run = Run::new(
        &sshd.device_config(&format!(
            "ssh_key_service: http://127.0.0.1:{}/{{provider}}/{{user}}\n",
            service.port
        )),
        &job,
    );
    let out = run.run("noprovision", "reserve");
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Installed 1 SSH key(s)"), "{text}");
    assert!(text.contains("timed out after 1 seconds"), "{text}");
    assert_eq!(*service.paths.lock().expect("lock"), ["/lp/alice"]);
    assert_eq!(sshd.authorized_keys(), before);

    // An unknown user: the service's answer is named.
    let job = json!({"job_queue": "q", "reserve_data": {"ssh_keys": ["gh:nobody"], "timeout": 1}});
    std::fs::write(run.path().join("job.json"), job.to_string()).expect("write");
    let out = run.run("noprovision", "reserve");
    assert_eq!(code(&out), 1);
    assert!(stderr(&out).contains("404"), "{}", stderr(&out));
}

#[test]
fn unreachable_key_service_is_a_clear_error() {
    let port = free_port();
    let job = json!({"job_queue": "q", "reserve_data": {"ssh_keys": ["gh:bob"], "timeout": 60}});
    let run = Run::new(
        &format!(
            "device_ip: 127.0.0.1\nssh_key_service: http://127.0.0.1:{port}/{{provider}}/{{user}}\n"
        ),
        &job,
    );
    let out = run.run("fake", "reserve");
    assert_eq!(code(&out), 1);
    let err = stderr(&out);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains(&format!(
            "cannot fetch SSH keys for gh:bob from http://127.0.0.1:{port}/gh/bob"
        )),
        "{err}"
    );
    let errors = run.read_json("device-connector-error.json");
    assert_eq!(
        errors["reserve_exception_info"]["exception_name"],
        "KeyFetchError"
    );
}

#[test]
fn cancelling_the_job_on_the_server_ends_the_reservation() {
    let sshd = Sshd::start();
    let mut api = crate::api::ApiServer::start();
    let queue = api.queue("conn-reserve");
    let (user_key, user_pub) = keygen(sshd.dir.path(), "user_key", "user@laptop");
    let mut job =
        json!({"job_queue": queue, "reserve_data": {"ssh_keys": [user_pub], "timeout": 3600}});
    let id = api.submit(&job);
    job["job_id"] = json!(id);
    let before = sshd.authorized_keys();
    let run = Run::new(
        &sshd.device_config(&format!(
            "testflinger_server: {}\npoll_interval: 0.2\n",
            api.url
        )),
        &job,
    );
    let mut child = run
        .command("noprovision", "reserve")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let out = collect(child.stdout.take().expect("stdout"));
    let err = collect(child.stderr.take().expect("stderr"));
    wait_until("the reservation banner", Duration::from_secs(30), || {
        out.lock()
            .expect("lock")
            .contains("TESTFLINGER SYSTEM RESERVED")
    });
    assert!(sshd.can_login(&user_key));
    assert!(
        out.lock()
            .expect("lock")
            .contains(&format!("testflinger cancel {id}"))
    );

    api.cancel(&id);
    let rc = wait_child(&mut child, Duration::from_secs(30));
    assert_eq!(rc, 0, "stderr: {}", err.finished());
    let stdout = out.finished();
    assert!(stdout.contains("Job cancelled"), "{stdout}");
    assert_eq!(sshd.authorized_keys(), before);
    assert!(!sshd.can_login(&user_key));
}

/// A real agent whose device is a real sshd (`noprovision`), for issue 14.1.
fn reserve_agent(
    sshd: &Sshd,
    api: &crate::api::ApiServer,
    queue: &str,
) -> (Agent, std::path::PathBuf) {
    use crate::support::BIN;
    let home = sshd.dir.path().join("agent");
    std::fs::create_dir_all(&home).expect("agent dir");
    let device = home.join("device.yaml");
    std::fs::write(
        &device,
        sshd.device_config(&format!(
            "testflinger_server: {}\npoll_interval: 0.2\n",
            api.url
        )),
    )
    .expect("device config");
    let cmd = |stage: &str| {
        format!(
            "{BIN} noprovision {stage} -c {} testflinger.json",
            device.display()
        )
    };
    let name = crate::api::unique("keys");
    let config = format!(
        "agent_id: {name}\nserver_address: {}\njob_queues: [{queue}]\npolling_interval: 0.2\n\
         shutdown_grace: 1\n\
         execution_basedir: {d}/run\nlogging_basedir: {d}/logs\nresults_basedir: {d}/results\n\
         reserve_command: {r}\ncleanup_command: {c}\n",
        api.url,
        d = home.display(),
        r = cmd("reserve"),
        c = cmd("cleanup"),
    );
    let path = home.join("agent.yaml");
    std::fs::write(&path, config).expect("agent config");
    let log = home.join("agent.log");
    (Agent::start(&name, &path, &log), log)
}

/// Issue 14.1: whatever ends a reservation run by a real agent (a cancel, its timeout,
/// the agent stopping with SIGTERM, the agent crashing and starting again), the device's
/// `authorized_keys` is as it was.
#[test]
fn every_end_of_a_reservation_leaves_authorized_keys_as_it_was() {
    let sshd = Sshd::start();
    let mut api = crate::api::ApiServer::start();
    let before = sshd.authorized_keys();
    let (user_key, user_pub) = keygen(sshd.dir.path(), "user_key", "user@laptop");
    for how in ["cancel", "timeout", "sigterm", "crash"] {
        eprintln!("reservation ended by: {how}");
        let queue = api.queue(&format!("keys-{how}"));
        let (mut agent, log) = reserve_agent(&sshd, &api, &queue);
        let timeout = if how == "timeout" { 3 } else { 3600 };
        let id = api.submit(
            &json!({"job_queue": queue, "reserve_data": {"ssh_keys": [user_pub], "timeout": timeout}}),
        );
        wait_until(
            &format!("{how}: the key installed"),
            Duration::from_secs(60),
            || sshd.authorized_keys().contains(&user_pub),
        );
        assert!(sshd.can_login(&user_key), "{how}: the user cannot log in");
        match how {
            "cancel" => api.cancel(&id),
            "timeout" => {}
            "crash" => {
                let _ = std::process::Command::new("kill")
                    .args(["-KILL", &agent.child.id().to_string()])
                    .status();
                wait_child(&mut agent.child, Duration::from_secs(10));
                // The user gives up on it meanwhile (so it is not reserved again).
                api.cancel(&id);
                // The same agent starts again (same id, same run directories).
                let config = log.with_file_name("agent.yaml");
                agent = Agent::start(&agent.name, &config, &log);
            }
            _ => {
                let _ = std::process::Command::new("kill")
                    .args(["-TERM", &agent.child.id().to_string()])
                    .status();
                wait_child(&mut agent.child, Duration::from_secs(60));
            }
        }
        wait_until(
            &format!("{how}: the key removed"),
            Duration::from_secs(60),
            || sshd.authorized_keys() == before,
        );
        assert!(
            !sshd.can_login(&user_key),
            "{how}: the key still logs in; agent log: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        drop(agent);
    }
}
