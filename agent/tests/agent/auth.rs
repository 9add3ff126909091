//! The agent with auth on: it authenticates with upstream's token file, refreshes its
//! access token on 401, and its phases never see its credentials.

use crate::lab::{ServerOpts, TestLab};
use base64::Engine;
use serde_json::{Value, json};
use std::time::Duration;

const LONG: Duration = Duration::from_secs(40);
const ADMIN_SECRET: &str = "lab-admin-secret-0001";
const AGENT_SECRET: &str = "lab-agent-secret-0001";

/// A server with auth on whose access tokens live 2 seconds.
async fn auth_lab(name: &str) -> TestLab {
    let env = vec![
        ("JWT_SIGNING_KEY".into(), "agent-test-signing-key".into()),
        ("JWT_LEEWAY".into(), "0".into()),
        ("TESTFLINGER_ACCESS_TTL".into(), "2".into()),
        ("TESTFLINGER_ADMIN_ID".into(), "lab-admin".into()),
        ("TESTFLINGER_ADMIN_SECRET".into(), ADMIN_SECRET.into()),
    ];
    TestLab::start_with(
        name,
        ServerOpts {
            env,
            ..ServerOpts::default()
        },
    )
    .await
}

async fn basic_token(lab: &TestLab, id: &str, secret: &str) -> Value {
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}"));
    let r = lab
        .http
        .post(format!("{}/v1/oauth2/token", lab.base))
        .header("Authorization", format!("Basic {basic}"))
        .send()
        .await
        .expect("token");
    assert_eq!(r.status(), 200, "token for {id}");
    r.json().await.expect("json")
}

/// Creates an agent client standing for agent `agent_id` (recorded by the admin) and
/// writes its token file; returns the file's path and the refresh token in it.
async fn agent_token_file(
    lab: &TestLab,
    agent_client: &str,
    agent_id: &str,
) -> (std::path::PathBuf, String) {
    let admin = basic_token(lab, "lab-admin", ADMIN_SECRET).await["access_token"]
        .as_str()
        .expect("admin token")
        .to_string();
    let r = lab
        .http
        .put(format!("{}/v1/client-permissions/{agent_client}", lab.base))
        .bearer_auth(&admin)
        .json(&json!({"client_secret": AGENT_SECRET, "role": "agent", "agent_id": agent_id}))
        .send()
        .await
        .expect("create agent client");
    assert_eq!(r.status(), 200);
    let refresh = basic_token(lab, agent_client, AGENT_SECRET).await["refresh_token"]
        .as_str()
        .expect("refresh")
        .to_string();
    let path = lab.path(&format!("{agent_client}.token"));
    std::fs::write(&path, json!({"refresh_token": refresh}).to_string()).expect("token file");
    (path, refresh)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authenticated_agent_runs_jobs_and_its_phases_see_no_credentials() {
    let mut lab = auth_lab("auth-env").await;
    let agent = format!("dev-auth-{}", &lab.prefix[lab.prefix.len() - 10..]);
    let (token_file, refresh) = agent_token_file(&lab, "dev-auth-client", &agent).await;
    // The agent's environment holds its broker URI (with the password, as `AMQP_URI`
    // from the lab) and other credentials.
    let agent_env = vec![
        (
            "RABBITMQ_PASSWORD".to_string(),
            "amqp-password-not-for-phases".to_string(),
        ),
        (
            "TESTFLINGER_SECRET_KEY".to_string(),
            "client-secret-not-for-phases".to_string(),
        ),
        ("LC_TESTFLINGER_PROBE".to_string(), "allowed".to_string()),
    ];
    let i = lab.spawn_agent_with(
        &agent,
        json!({"test_command": "env; echo END-OF-ENV"}),
        &["--token-file".to_string(), token_file.display().to_string()],
        &agent_env,
    );
    let id = lab.submit(json!({"test_data": {"test_cmds": "x"}})).await;
    let r = lab.wait_complete(&id, LONG).await;
    assert_eq!(r["test_status"], 0, "{r}");
    let out = r["test_output"].as_str().unwrap_or_default().to_string();
    assert!(out.contains("END-OF-ENV"), "{out}");
    assert!(
        out.contains("LC_TESTFLINGER_PROBE=allowed"),
        "allow-list passes LC_*: {out}"
    );
    for (what, needle) in [
        ("AMQP_URI", "AMQP_URI"),
        ("the broker password", "amqp-password-not-for-phases"),
        ("the client secret", "client-secret-not-for-phases"),
        ("the refresh token", refresh.as_str()),
        ("a bearer token", "eyJ"),
        ("the token file", "dev-auth-client.token"),
        ("the agent's guest password", "guest:guest"),
    ] {
        assert!(!out.contains(needle), "{what} leaked into the phase: {out}");
    }
    // Access tokens live 2 s: a job after 3 s needs the agent to refresh on 401.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let id2 = lab.submit(json!({"test_data": {"test_cmds": "x"}})).await;
    let r2 = lab.wait_complete(&id2, LONG).await;
    assert_eq!(r2["test_status"], 0, "{r2}");
    assert!(lab.agent_log(i).contains(&agent), "agent ran");
    // The API declared the agent's control queue when it registered: remove it.
    let broker = testflinger_broker::Broker::new(testflinger_broker::BrokerConfig::new(
        crate::lab::amqp_uri(),
    ))
    .expect("broker");
    broker
        .delete_queue(&testflinger_broker::topology::control_queue(&agent))
        .await
        .expect("delete the control queue");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_without_a_token_is_refused_by_the_api() {
    let mut lab = auth_lab("auth-none").await;
    let i = lab.spawn_agent_with(
        "dev-noauth",
        json!({"test_command": "echo ran"}),
        &[
            "--token-file".to_string(),
            lab.path("missing.token").display().to_string(),
        ],
        &[],
    );
    let id = lab.submit(json!({"test_data": {"test_cmds": "x"}})).await;
    // The claim is refused (401), so the job never runs.
    lab.assert_stays_waiting(&id, Duration::from_secs(4)).await;
    let log = lab.agent_log(i);
    assert!(
        log.contains("401") || log.contains("Authentication required"),
        "{log}"
    );
    lab.cancel(&id).await;
}
