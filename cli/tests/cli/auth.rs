//! The CLI against a server with auth on: login, stored login, credentials from flags
//! and environment, secrets and the admin verbs.

use crate::helpers::{TestEnv, run_cmd};
use serde_json::{Value, json};

const ADMIN: &str = "cli-admin";
const ADMIN_SECRET: &str = "cli-admin-secret-000";
const ALICE_SECRET: &str = "alice-secret-0000000";

fn auth_env() -> TestEnv {
    TestEnv::start_with_env(&[
        ("JWT_SIGNING_KEY", "cli-test-signing-key"),
        ("TESTFLINGER_ADMIN_ID", ADMIN),
        ("TESTFLINGER_ADMIN_SECRET", ADMIN_SECRET),
    ])
}

fn as_admin<'a>(args: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["--client-id", ADMIN, "--secret-key", ADMIN_SECRET];
    v.extend_from_slice(args);
    v
}

#[test]
fn login_secrets_and_admin_verbs() {
    let env = auth_env();
    // The admin creates a client with a priority allowance.
    env.run(&as_admin(&[
        "admin",
        "set",
        "client-permissions",
        "alice",
        "--client-secret",
        ALICE_SECRET,
        "--max-priority",
        "*=5",
    ]))
    .assert_ok();
    let out = env.run(&as_admin(&["admin", "get", "client-permissions", "alice"]));
    out.assert_ok();
    let v: Value = serde_json::from_str(&out.stdout).expect("json");
    assert_eq!(v["max_priority"], json!({"*": 5}), "{}", out.stdout);
    assert_eq!(v["role"], "contributor");
    // A bad pair is refused locally, in one line.
    env.run(&as_admin(&[
        "admin",
        "set",
        "client-permissions",
        "alice",
        "--max-priority",
        "five",
    ]))
    .assert_one_line_failure();

    // Login stores the refresh token; later commands use it without credentials.
    let out = env.run(&[
        "login",
        "--client-id",
        "alice",
        "--secret-key",
        ALICE_SECRET,
    ]);
    out.assert_ok();
    assert!(
        out.stdout.contains("Logged in as 'alice'"),
        "{}",
        out.stdout
    );
    let auth_conf = std::fs::read_to_string(
        env.xdg()
            .join("testflinger-cli")
            .join(env.url.trim_start_matches("http://").replace(':', "_"))
            .join("auth.conf"),
    )
    .expect("auth.conf");
    assert!(auth_conf.contains("[AUTH]") && auth_conf.contains("client_id = alice"));
    let q = env.queue("auth");
    let job = env.work().join("prio.yaml");
    std::fs::write(&job, format!("job_queue: {q}\njob_priority: 3\n")).expect("job");
    let job_path = job.display().to_string();
    env.run(&["submit", &job_path, "--wait-for-available-agents", "-q"])
        .assert_ok();
    env.run(&["secret", "write", "db/pw", "hunter2-value"])
        .assert_ok();
    env.run(&["secret", "delete", "db/pw"]).assert_ok();

    // Anonymous (another config home, no credentials): the priority needs a client.
    let other = tempfile::tempdir().expect("tempdir");
    let mut cmd = env.cli();
    cmd.env("XDG_CONFIG_HOME", other.path()).args([
        "submit",
        &job_path,
        "--wait-for-available-agents",
    ]);
    let out = run_cmd(cmd, None);
    assert_eq!(out.code(), Some(1), "{out:#?}");
    assert!(
        out.stderr
            .contains("error: the server requires authentication: job_priority 3"),
        "{out:#?}"
    );
    // Credentials from the environment work like the flags.
    let mut cmd = env.cli();
    cmd.env("XDG_CONFIG_HOME", other.path())
        .env("TESTFLINGER_CLIENT_ID", "alice")
        .env("TESTFLINGER_SECRET_KEY", ALICE_SECRET)
        .args(["submit", &job_path, "--wait-for-available-agents", "-q"]);
    run_cmd(cmd, None).assert_ok();
    // A wrong secret is one clear line.
    let out = env.run(&[
        "--client-id",
        "alice",
        "--secret-key",
        "wrong-secret-00000",
        "list-queues",
    ]);
    out.assert_one_line_failure();
    assert!(
        out.stderr.contains("authentication as 'alice' failed"),
        "{}",
        out.stderr
    );

    // Agent status, as an admin: the agent must exist.
    let admin_token: String = env.rt.block_on(async {
        let r = env
            .http
            .post(format!("{}/v1/oauth2/token", env.url))
            .basic_auth(ADMIN, Some(ADMIN_SECRET))
            .send()
            .await
            .expect("token");
        let v: Value = r.json().await.expect("json");
        v["access_token"].as_str().expect("access").to_string()
    });
    let agent = format!("cli-agent-{}", crate::helpers::short_id());
    env.rt.block_on(async {
        let r = env
            .http
            .post(format!("{}/v1/agents/data/{agent}", env.url))
            .bearer_auth(&admin_token)
            .json(&json!({"state": "waiting"}))
            .send()
            .await
            .expect("register");
        assert_eq!(r.status(), 200);
    });
    env.run(&as_admin(&[
        "admin",
        "set",
        "agent-status",
        "--status",
        "maintenance",
        "--agents",
        &agent,
        "--comment",
        "new cable",
    ]))
    .assert_ok();
    let out = env.run(&["agent-status", &agent, "--json"]);
    let v: Value = serde_json::from_str(&out.stdout).expect("json");
    assert_eq!(v["state"], "maintenance", "{}", out.stdout);
    assert_eq!(v["comment"], "new cable");
    // Alice is no admin: the server refuses, in one line.
    env.run(&[
        "--client-id",
        "alice",
        "--secret-key",
        ALICE_SECRET,
        "admin",
        "set",
        "agent-status",
        "--status",
        "offline",
        "--agents",
        &agent,
    ])
    .assert_one_line_failure();
    env.run(&as_admin(&[
        "admin",
        "delete",
        "client-permissions",
        "alice",
    ]))
    .assert_ok();
}
