//! `TestEnv`: one server process with its own Redis prefix, data dir and config home,
//! plus one method per API call a test needs to make as an agent or an operator.

use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::sync::mpsc;
use std::time::{Duration, Instant};
use testflinger_testing::{Agent, Holder, Server, http_client, runtime, write_agent_config};

/// Upper bound for any one CLI run in a test.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(60);

pub use testflinger_testing::short_id;

/// What a CLI run printed and how it ended.
#[derive(Debug)]
pub struct Out {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    #[track_caller]
    pub fn assert_ok(&self) -> &Self {
        assert_eq!(self.code(), Some(0), "expected success: {self:#?}");
        self
    }

    /// Failure: exit 1 with exactly one `error: ...` line and nothing that looks like a
    /// panic or backtrace.
    #[track_caller]
    pub fn assert_one_line_failure(&self) -> &Self {
        assert_eq!(self.code(), Some(1), "expected exit 1: {self:#?}");
        let lines: Vec<&str> = self.stderr.lines().filter(|l| !l.is_empty()).collect();
        assert_eq!(lines.len(), 1, "expected one error line: {self:#?}");
        assert!(lines[0].starts_with("error: "), "{self:#?}");
        assert!(!self.stderr.contains("panicked"), "{self:#?}");
        self
    }
}

pub struct TestEnv {
    pub rt: tokio::runtime::Runtime,
    pub http: reqwest::Client,
    pub url: String,
    /// The CLI's home: its config (`xdg/`), its working dir (`work/`), agents' files.
    pub dir: tempfile::TempDir,
    /// The jobs this test holds as their agent.
    holder: Holder,
    // Dropped in this order: the agents, then the server (which removes its Redis keys,
    // queues and temp dir).
    agents: Mutex<Vec<Agent>>,
    server: Server,
}

impl TestEnv {
    /// Starts a server on a free port and waits (bounded) until it answers.
    pub fn start() -> TestEnv {
        TestEnv::start_with_env(&[])
    }

    /// Like [`TestEnv::start`], with extra server environment (e.g. `JWT_SIGNING_KEY`).
    pub fn start_with_env(extra: &[(&str, &str)]) -> TestEnv {
        let dir = tempfile::tempdir().expect("tempdir");
        for sub in ["xdg", "work"] {
            std::fs::create_dir_all(dir.path().join(sub)).expect("mkdir");
        }
        let server = Server::start(&format!("tfclitest-{}", short_id()), extra.iter().copied());
        TestEnv {
            rt: runtime(),
            http: http_client(Duration::from_secs(20)),
            url: server.url.clone(),
            dir,
            holder: Holder::new("cli-test-agent"),
            agents: Mutex::new(Vec::new()),
            server,
        }
    }

    pub fn xdg(&self) -> PathBuf {
        self.dir.path().join("xdg")
    }

    pub fn work(&self) -> PathBuf {
        self.dir.path().join("work")
    }

    /// A queue name no other test uses; deleted from RabbitMQ when the env drops.
    pub fn queue(&self, tag: &str) -> String {
        let q = format!("tfcli-{tag}-{}", short_id());
        self.server.own_queue(&q);
        q
    }

    /// The CLI with a private config home, run in the env's work dir, pointed at the
    /// server with `--server`.
    pub fn cli(&self) -> Command {
        let mut cmd = self.cli_without_server();
        cmd.arg("--server").arg(&self.url);
        cmd
    }

    pub fn cli_without_server(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_testflinger"));
        cmd.current_dir(self.work())
            .env("XDG_CONFIG_HOME", self.xdg())
            .env("HOME", self.dir.path())
            .env_remove("TESTFLINGER_SERVER")
            .env_remove("TESTFLINGER_CLIENT_ID")
            .env_remove("TESTFLINGER_SECRET_KEY")
            .env_remove("TESTFLINGER_ERROR_THRESHOLD")
            .env_remove("RUST_BACKTRACE");
        cmd
    }

    /// Runs the CLI with `args` to completion (bounded by [`CLI_TIMEOUT`]).
    pub fn run(&self, args: &[&str]) -> Out {
        let mut cmd = self.cli();
        cmd.args(args);
        run_cmd(cmd, None)
    }

    pub fn run_stdin(&self, args: &[&str], stdin: &str) -> Out {
        let mut cmd = self.cli();
        cmd.args(args);
        run_cmd(cmd, Some(stdin))
    }

    /// Starts the CLI in the background, its stdout delivered line by line.
    pub fn spawn(&self, args: &[&str]) -> Background {
        self.spawn_with_stdin(args, None)
    }

    /// Like [`TestEnv::spawn`], with `stdin` waiting in its standard input.
    pub fn spawn_with_stdin(&self, args: &[&str], stdin: Option<&str>) -> Background {
        let mut cmd = self.cli();
        cmd.args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn testflinger");
        if let Some(text) = stdin {
            let mut pipe = child.stdin.take().expect("stdin");
            pipe.write_all(text.as_bytes()).expect("write stdin");
        }
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                match line {
                    Ok(l) => {
                        if tx.send(l).is_err() {
                            break;
                        }
                    }
                    Err(_) => break,
                }
            }
        });
        let mut stderr = child.stderr.take().expect("stderr");
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        Background {
            child,
            lines,
            seen: Vec::new(),
            stderr: Some(stderr),
        }
    }

    pub fn write_work_file(&self, name: &str, text: &str) -> PathBuf {
        let path = self.work().join(name);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("mkdir");
        }
        std::fs::write(&path, text).expect("write");
        path
    }

    // ---- the API, as an agent or an operator would call it ----

    pub fn get(&self, path: &str) -> reqwest::Response {
        self.rt
            .block_on(async { self.http.get(format!("{}{path}", self.url)).send().await })
            .expect("GET")
    }

    pub fn get_json(&self, path: &str) -> Value {
        let resp = self.get(path);
        assert_eq!(resp.status(), 200, "GET {path}");
        self.rt.block_on(async { resp.json().await }).expect("json")
    }

    pub fn post_json(&self, path: &str, body: &Value) -> (u16, String) {
        self.post(path, None, body)
    }

    /// POSTs JSON, with the fencing token `token` if given.
    fn post(&self, path: &str, token: Option<&str>, body: &Value) -> (u16, String) {
        let mut req = self.http.post(format!("{}{path}", self.url)).json(body);
        if let Some(token) = token {
            req = req.header("X-Testflinger-Token", token);
        }
        self.rt.block_on(async {
            let resp = req.send().await.expect("POST");
            let status = resp.status().as_u16();
            (status, resp.text().await.unwrap_or_default())
        })
    }

    /// Registers an agent the way an agent does (`POST /v1/agents/data/<name>`).
    pub fn register_agent(&self, name: &str, queues: &[&str], state: &str) {
        let (status, body) = self.post_json(
            &format!("/v1/agents/data/{name}"),
            &json!({"queues": queues, "state": state}),
        );
        assert_eq!(status, 200, "register agent: {body}");
    }

    /// Advertises queues with descriptions (`POST /v1/agents/queues`).
    pub fn advertise_queues(&self, queues: &[(&str, &str)]) {
        let body: serde_json::Map<String, Value> = queues
            .iter()
            .map(|(q, d)| ((*q).to_string(), json!(d)))
            .collect();
        let (status, text) = self.post_json("/v1/agents/queues", &Value::Object(body));
        assert_eq!(status, 200, "advertise queues: {text}");
    }

    /// Takes `job_id` as a test agent would (claim; idempotent for the same agent) and
    /// returns the fencing token its writes carry: the server accepts writes about a
    /// job from its holder only.
    pub fn hold(&self, job_id: &str) -> String {
        self.rt
            .block_on(self.holder.token(&self.http, &self.url, job_id))
    }

    /// POSTs JSON as the holder of `job_id`.
    fn post_as_holder(&self, job_id: &str, path: &str, body: &Value) -> (u16, String) {
        self.post(path, Some(&self.hold(job_id)), body)
    }

    /// Posts one output fragment as the job's (test) agent does.
    pub fn post_fragment(&self, job_id: &str, n: u64, phase: &str, data: &str) {
        let (status, body) = self.post_as_holder(
            job_id,
            &format!("/v1/result/{job_id}/log/output"),
            &json!({
                "fragment_number": n,
                "timestamp": chrono::Utc::now().to_rfc3339(),
                "phase": phase,
                "log_data": data,
            }),
        );
        assert_eq!(status, 200, "post fragment: {body}");
    }

    pub fn post_result(&self, job_id: &str, body: &Value) {
        let (status, text) = self.post_as_holder(job_id, &format!("/v1/result/{job_id}"), body);
        assert_eq!(status, 200, "post result: {text}");
    }

    pub fn upload_artifact(&self, job_id: &str, bytes: Vec<u8>) {
        let token = self.hold(job_id);
        self.rt.block_on(async {
            let part = reqwest::multipart::Part::bytes(bytes)
                .file_name("file")
                .mime_str("application/x-gzip")
                .expect("mime");
            let form = reqwest::multipart::Form::new().part("file", part);
            let resp = self
                .http
                .post(format!("{}/v1/result/{job_id}/artifact", self.url))
                .header("X-Testflinger-Token", token)
                .multipart(form)
                .send()
                .await
                .expect("upload artifact");
            assert_eq!(resp.status(), 200, "upload artifact");
        });
    }

    pub fn job_state(&self, job_id: &str) -> String {
        self.get_json(&format!("/v1/result/{job_id}"))["job_state"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// Submits with the CLI (`-q`) and returns the id.
    pub fn submit(&self, job: &str) -> String {
        let name = format!("job-{}.yaml", short_id());
        self.write_work_file(&name, job);
        let out = self.run(&["submit", "-q", &name]);
        out.assert_ok();
        out.stdout.trim().to_string()
    }
}

/// Runs a command to completion, killing it after [`CLI_TIMEOUT`].
pub fn run_cmd(mut cmd: Command, stdin: Option<&str>) -> Out {
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn testflinger");
    if let Some(text) = stdin {
        let mut pipe = child.stdin.take().expect("stdin");
        pipe.write_all(text.as_bytes()).expect("write stdin");
    }
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + CLI_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "testflinger {:?} did not finish within {CLI_TIMEOUT:?}; stdout: {}",
                cmd.get_args().collect::<Vec<_>>(),
                out_t.join().unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Out {
        status,
        stdout: out_t.join().unwrap_or_default(),
        stderr: err_t.join().unwrap_or_default(),
    }
}

/// A CLI process running in the background.
pub struct Background {
    child: Child,
    lines: mpsc::Receiver<String>,
    pub seen: Vec<String>,
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl Background {
    /// Waits (bounded) for a stdout line satisfying `pred` and returns it.
    #[track_caller]
    pub fn wait_line(&mut self, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if pred(&line) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no matching line within {timeout:?}; seen: {:#?}",
                    self.seen
                ),
            }
        }
    }

    /// Waits (bounded) for the process to end; returns its status, all of its stdout
    /// lines and its stderr.
    #[track_caller]
    pub fn finish(mut self, timeout: Duration) -> (ExitStatus, Vec<String>, String) {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                break s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "process did not end within {timeout:?}; seen: {:#?}",
                    self.seen
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
            self.seen.push(line);
        }
        let stderr = self
            .stderr
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default();
        (status, std::mem::take(&mut self.seen), stderr)
    }
}

impl Background {
    /// Sends SIGINT, as Ctrl-C in a terminal does.
    pub fn interrupt(&self) {
        let status = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status()
            .expect("kill -INT");
        assert!(status.success());
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn assert_uuid(text: &str) {
    assert!(
        uuid::Uuid::parse_str(text).is_ok(),
        "expected a job id, got {text:?}"
    );
}

pub fn read_file(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

impl TestEnv {
    /// Takes the next job of `queue` as an upstream HTTP-polling agent does
    /// (`GET /v1/job?queue=` with the `agent_name` cookie); records a wait-time sample.
    pub fn legacy_take(&self, agent: &str, queue: &str) -> Option<Value> {
        self.rt.block_on(async {
            let resp = self
                .http
                .get(format!("{}/v1/job", self.url))
                .query(&[("queue", queue)])
                .header("Cookie", format!("agent_name={agent}"))
                .send()
                .await
                .expect("GET /v1/job");
            match resp.status().as_u16() {
                200 => Some(resp.json().await.expect("job json")),
                204 => None,
                other => panic!("GET /v1/job: {other}: {:?}", resp.text().await),
            }
        })
    }
}

impl TestEnv {
    /// Starts a real `testflinger-agent` serving `queue` whose test phase runs
    /// `test_command` (`/bin/sh -c`, in the job's run directory), and waits (bounded)
    /// until the server lists it on the queue. Killed when the env drops.
    pub fn spawn_agent(&self, queue: &str, test_command: &str) -> String {
        let name = format!("agent-{}", short_id());
        let base = self.dir.path().join(&name);
        std::fs::create_dir_all(&base).expect("agent dir");
        let config = json!({
            "agent_id": name,
            "server_address": self.url,
            "job_queues": [queue],
            "execution_basedir": base.join("run"),
            "logging_basedir": base.join("logs"),
            "results_basedir": base.join("results"),
            "polling_interval": 1,
            "setup_command": "echo setting up the device",
            "test_command": test_command,
        });
        let path = base.join("agent.yaml");
        write_agent_config(&path, &config);
        let agent = Agent::start(&name, &path, &base.join("agent.log"));
        self.agents.lock().expect("lock").push(agent);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let resp = self.get(&format!("/v1/queues/{queue}/agents"));
            if resp.status() == 200 {
                let agents: Value = self
                    .rt
                    .block_on(async { resp.json().await })
                    .expect("agents");
                if agents
                    .as_array()
                    .is_some_and(|a| a.iter().any(|x| x["name"] == name.as_str()))
                {
                    return name;
                }
            }
            assert!(
                Instant::now() < deadline,
                "agent {name} did not register within 30 s: {}",
                std::fs::read_to_string(base.join("agent.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
