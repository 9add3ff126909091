//! Least privilege on the real broker: a throwaway vhost with one user per role, made
//! with `rabbitmqctl` (needs root, as in CI) from the regexes of
//! `testflinger_broker::permissions`, removed at the end.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use testflinger_broker::permissions::{self, Permissions};
use testflinger_broker::{Broker, BrokerConfig, OutgoingMessage, is_access_refused};

fn ctl(args: &[&str]) {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("rabbitmqctl {args:?} cannot run ({e}); these tests need rabbitmqctl as root")
        });
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The vhost and users of one test; deleted on drop.
struct Sandbox {
    vhost: String,
    users: Vec<String>,
}

impl Sandbox {
    fn new() -> Sandbox {
        let vhost = format!(
            "tf-perm-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..10]
        );
        ctl(&["add_vhost", &vhost]);
        Sandbox {
            vhost,
            users: Vec::new(),
        }
    }

    /// Adds a user with these permissions; returns its AMQP URI.
    fn user(&mut self, role: &str, p: &Permissions) -> String {
        let name = format!("{}-{role}", self.vhost);
        let password = uuid::Uuid::new_v4().simple().to_string();
        ctl(&["add_user", &name, &password]);
        self.users.push(name.clone());
        ctl(&[
            "set_permissions",
            "-p",
            &self.vhost,
            &name,
            &p.configure,
            &p.write,
            &p.read,
        ]);
        format!("amqp://{name}:{password}@127.0.0.1:5672/{}", self.vhost)
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        for u in &self.users {
            let _ = Command::new("rabbitmqctl")
                .args(["delete_user", u])
                .output();
        }
        let _ = Command::new("rabbitmqctl")
            .args(["delete_vhost", &self.vhost])
            .output();
    }
}

/// A directory of its own under the temporary directory; removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        let path = std::env::temp_dir().join(format!("tf-perm-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir(&path).expect("create a temporary directory");
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const USERS_SH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/rabbitmq/users.sh");

/// Runs `deploy/rabbitmq/users.sh` against the local node with only these variables of
/// its own (none inherited from the test's environment, so no stray `AGENT_PASSWORD*`).
fn users_sh(env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new("bash");
    cmd.arg(USERS_SH).env_clear();
    for keep in ["PATH", "HOME", "LANG"] {
        if let Some(v) = std::env::var_os(keep) {
            cmd.env(keep, v);
        }
    }
    cmd.env("RABBITMQ_NODE", "");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run users.sh")
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\n{}{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn broker(uri: &str) -> Broker {
    let mut cfg = BrokerConfig::new(uri.to_string());
    cfg.connections = 1;
    Broker::new(cfg).expect("broker")
}

fn to_queue<'a>(queue: &'a str, body: &'a [u8]) -> OutgoingMessage<'a> {
    OutgoingMessage {
        exchange: "",
        routing_key: queue,
        body,
        persistent: true,
        ..OutgoingMessage::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn each_role_gets_only_what_it_needs() {
    let mut sb = Sandbox::new();
    let api_uri = sb.user("api", &permissions::api());
    let queue_a = "lab-a".to_string();
    let queue_b = "lab-b".to_string();
    // A queue of agent A that nobody declared before the agent consumes it.
    let queue_a_new = "lab-a-new".to_string();
    let agent_a = sb.user(
        "agent-a",
        &permissions::agent("agent-a", &[queue_a.clone(), queue_a_new.clone()]),
    );
    let agent_b_perm = permissions::agent("agent-b", std::slice::from_ref(&queue_b));
    let _agent_b = sb.user("agent-b", &agent_b_perm);
    let submitter = sb.user("submitter", &permissions::submitter());

    // The API declares the topology, both job queues and both control queues.
    let api = broker(&api_uri);
    api.ready()
        .await
        .expect("api connects and declares the topology");
    for q in [&queue_a, &queue_b] {
        api.ensure_job_queue(q)
            .await
            .expect("api declares job queues");
    }
    for a in ["agent-a", "agent-b"] {
        api.ensure_control_queue(a)
            .await
            .expect("api declares control queues");
    }

    // Agent A consumes its job queue (declaring it again is allowed) and its control
    // queue, and receives a job the API publishes and a command for it.
    let a = broker(&agent_a);
    let mut jobs = a
        .consume(std::slice::from_ref(&queue_a), 1, "agent-a")
        .await
        .expect("agent consumes its job queue");
    // It declares a job queue of its own the API has not declared yet (with the
    // dead-letter exchange its declaration names).
    let _fresh = a
        .consume(std::slice::from_ref(&queue_a_new), 1, "agent-a-new")
        .await
        .expect("agent declares and consumes its own new job queue");
    let mut control = a
        .consume_control("agent-a")
        .await
        .expect("own control queue");
    api.publish_job(&queue_a, "job-1", 0, b"{}")
        .await
        .expect("api publishes a job");
    let m = tokio::time::timeout(std::time::Duration::from_secs(10), jobs.next())
        .await
        .expect("job in time")
        .expect("open")
        .expect("message");
    m.ack().await.expect("ack");
    api.send_control("agent-a", br#"{"command":"set_state","state":"offline"}"#)
        .await
        .expect("api sends a command");
    let c = tokio::time::timeout(std::time::Duration::from_secs(10), control.next())
        .await
        .expect("command in time")
        .expect("open")
        .expect("message");
    assert!(String::from_utf8_lossy(&c.body).contains("offline"));

    // Agent A may not publish to a job queue (its own or another), nor to the control
    // exchange, nor read agent B's control queue or job queue: the broker refuses.
    for q in [&queue_a, &queue_b] {
        let e = a
            .publish(to_queue(q, b"{}"))
            .await
            .expect_err("publish refused");
        assert!(is_access_refused(&e), "publish to {q}: {e}");
    }
    let e = a
        .send_control("agent-b", b"{}")
        .await
        .expect_err("control publish refused");
    assert!(is_access_refused(&e), "{e}");
    let e = a
        .consume_control("agent-b")
        .await
        .err()
        .expect("another agent's control queue is refused");
    assert!(is_access_refused(&e), "{e}");
    let e = a
        .consume(std::slice::from_ref(&queue_b), 1, "steal")
        .await
        .err()
        .expect("another agent's job queue is refused");
    assert!(is_access_refused(&e), "{e}");
    // Nor may it subscribe to the control exchange under another agent's id.
    let e = a
        .subscribe(testflinger_broker::topology::CONTROL_EXCHANGE, "agent-b")
        .await
        .err()
        .expect("binding to the control exchange is refused");
    assert!(is_access_refused(&e), "{e}");

    // Another system publishes to the submit exchange only (it reaches the submit
    // queue), and may not publish straight to a job queue.
    let s = broker(&submitter);
    s.publish(OutgoingMessage {
        exchange: testflinger_broker::topology::SUBMIT_EXCHANGE,
        routing_key: "anything",
        body: br#"{"job_queue":"lab-a"}"#,
        persistent: true,
        ..OutgoingMessage::default()
    })
    .await
    .expect("submitter publishes to the submit exchange");
    assert_eq!(
        api.message_count(testflinger_broker::topology::SUBMIT_QUEUE)
            .await
            .expect("count"),
        1
    );
    let e = s
        .publish(to_queue(&queue_a, b"{}"))
        .await
        .expect_err("raw publish refused");
    assert!(is_access_refused(&e), "{e}");
    let (_reply_to, _replies) = s.reply_queue().await.expect("a private reply queue");
}

/// `deploy/rabbitmq/users.sh` (used by docker-compose) grants exactly the permissions of
/// `testflinger_broker::permissions`.
#[test]
fn the_deployment_script_grants_the_same_permissions() {
    let mut sb = Sandbox::new();
    let api = format!("{}-api", sb.vhost);
    let submit = format!("{}-submit", sb.vhost);
    let agent_id = format!("{}-a", sb.vhost);
    let agent_user = format!("agent-{agent_id}");
    sb.users
        .extend([api.clone(), submit.clone(), agent_user.clone()]);
    let secrets = TempDir::new();
    let out = users_sh(&[
        ("RABBITMQ_VHOST", &sb.vhost),
        ("API_USER", &api),
        ("API_PASSWORD", "api-password"),
        ("SUBMIT_USER", &submit),
        ("SUBMIT_PASSWORD", "submit-password"),
        ("AGENTS", &format!("{agent_id}:lab.a,lab-b")),
        ("AGENT_SECRETS_DIR", &secrets.0.to_string_lossy()),
    ]);
    assert!(out.status.success(), "users.sh: {}", text(&out));
    let granted = |user: &str| -> Permissions {
        let out = Command::new("rabbitmqctl")
            .args(["-q", "list_user_permissions", user])
            .output()
            .expect("rabbitmqctl");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("{}\t", sb.vhost)))
            .unwrap_or_else(|| panic!("no permissions of {user}: {text}"));
        let f: Vec<&str> = line.split('\t').collect();
        Permissions {
            configure: f[1].to_string(),
            write: f[2].to_string(),
            read: f[3].to_string(),
        }
    };
    assert_eq!(granted(&api), permissions::api());
    assert_eq!(granted(&submit), permissions::submitter());
    assert_eq!(
        granted(&agent_user),
        permissions::agent(&agent_id, &["lab.a".to_string(), "lab-b".to_string()])
    );
}

/// Opens (and closes) an AMQP connection as `user` with `password` to `vhost`.
async fn login(vhost: &str, user: &str, password: &str) -> Result<(), lapin::Error> {
    let uri = format!("amqp://{user}:{password}@127.0.0.1:5672/{vhost}");
    let conn = lapin::Connection::connect(&uri, lapin::ConnectionProperties::default()).await?;
    conn.close(200, "bye".into()).await
}

fn read_password(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("users.sh wrote no password to {}: {e}", path.display()))
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// `users.sh` gives each agent user a password of its own (one agent host cannot log in
/// as another), keeps it across runs, takes `AGENT_PASSWORD_<ID>` over the kept file, and
/// refuses the old shared `AGENT_PASSWORD`.
#[tokio::test(flavor = "multi_thread")]
async fn each_agent_user_has_its_own_password() {
    let mut sb = Sandbox::new();
    let api = format!("{}-api", sb.vhost);
    let (a, b) = (format!("{}-a", sb.vhost), format!("{}-b", sb.vhost));
    let (user_a, user_b) = (format!("agent-{a}"), format!("agent-{b}"));
    sb.users
        .extend([api.clone(), user_a.clone(), user_b.clone()]);
    let tmp = TempDir::new();
    // Not there yet: the script creates it.
    let dir = tmp.0.join("agent-broker-secrets");
    let dir_s = dir.to_string_lossy().to_string();
    let agents = format!("{a}:{a}-jobs {b}:{b}-jobs,{b}-more");
    let base = [
        ("RABBITMQ_VHOST", sb.vhost.as_str()),
        ("API_USER", api.as_str()),
        ("API_PASSWORD", "api-password"),
        ("AGENTS", agents.as_str()),
        ("AGENT_SECRETS_DIR", dir_s.as_str()),
    ];
    let run = |extra: &[(&str, &str)]| {
        let env: Vec<(&str, &str)> = base.iter().chain(extra).copied().collect();
        users_sh(&env)
    };

    let out = run(&[]);
    assert!(out.status.success(), "users.sh: {}", text(&out));
    let (file_a, file_b) = (dir.join(&a), dir.join(&b));
    let (pass_a, pass_b) = (read_password(&file_a), read_password(&file_b));
    for p in [&pass_a, &pass_b] {
        assert!(
            p.len() == 32 && p.bytes().all(|c| c.is_ascii_hexdigit()),
            "a generated password is 32 hex digits, not {p:?}"
        );
    }
    assert_ne!(pass_a, pass_b, "two agents got the same broker password");
    assert_eq!(mode(&dir), 0o700, "{}", dir.display());
    assert_eq!(mode(&file_a), 0o600, "{}", file_a.display());
    assert_eq!(mode(&file_b), 0o600, "{}", file_b.display());
    // It says where each password is, and never prints one.
    let printed = text(&out);
    for (user, file) in [(&user_a, &file_a), (&user_b, &file_b)] {
        assert!(
            printed
                .lines()
                .any(|l| l.contains(user.as_str()) && l.contains(&*file.to_string_lossy())),
            "users.sh does not say where {user}'s password is: {printed}"
        );
    }
    assert!(
        !printed.contains(&pass_a) && !printed.contains(&pass_b),
        "users.sh printed a password: {printed}"
    );

    // Each password opens its own user only: agent A's host cannot log in as agent B.
    login(&sb.vhost, &user_b, &pass_b)
        .await
        .expect("agent B logs in with its own password");
    login(&sb.vhost, &user_a, &pass_a)
        .await
        .expect("agent A logs in with its own password");
    let e = login(&sb.vhost, &user_b, &pass_a)
        .await
        .expect_err("agent A's password must not open agent B's user");
    assert!(e.to_string().contains("ACCESS_REFUSED"), "{e}");
    let e = login(&sb.vhost, &user_a, &pass_b)
        .await
        .expect_err("agent B's password must not open agent A's user");
    assert!(e.to_string().contains("ACCESS_REFUSED"), "{e}");

    // Run again: both passwords are kept (files and broker alike).
    let out = run(&[]);
    assert!(out.status.success(), "users.sh again: {}", text(&out));
    assert_eq!(read_password(&file_a), pass_a);
    assert_eq!(read_password(&file_b), pass_b);
    login(&sb.vhost, &user_a, &pass_a)
        .await
        .expect("agent A's password still works after a second run");
    login(&sb.vhost, &user_b, &pass_b)
        .await
        .expect("agent B's password still works after a second run");

    // AGENT_PASSWORD_<ID> (upper-cased, '-' as '_') sets agent A's password; B keeps its own.
    let var_a = format!("AGENT_PASSWORD_{}", a.to_uppercase().replace('-', "_"));
    let out = run(&[(var_a.as_str(), "given-password-a")]);
    assert!(
        out.status.success(),
        "users.sh with {var_a}: {}",
        text(&out)
    );
    assert!(text(&out).contains(&var_a), "{}", text(&out));
    login(&sb.vhost, &user_a, "given-password-a")
        .await
        .expect("agent A logs in with the password of its variable");
    let e = login(&sb.vhost, &user_a, &pass_a)
        .await
        .expect_err("the variable replaced agent A's password");
    assert!(e.to_string().contains("ACCESS_REFUSED"), "{e}");
    login(&sb.vhost, &user_b, &pass_b)
        .await
        .expect("agent B keeps its own password");

    // The shared password of earlier versions is refused, naming what replaces it, and
    // changes nothing.
    let out = run(&[("AGENT_PASSWORD", "shared")]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let msg = String::from_utf8_lossy(&out.stderr);
    assert!(
        msg.contains("AGENT_PASSWORD_<ID>") && msg.contains("AGENT_SECRETS_DIR"),
        "{msg}"
    );
    let e = login(&sb.vhost, &user_b, "shared")
        .await
        .expect_err("the refused shared password opens nothing");
    assert!(e.to_string().contains("ACCESS_REFUSED"), "{e}");
    login(&sb.vhost, &user_b, &pass_b)
        .await
        .expect("agent B's password is untouched by the refused run");
}
