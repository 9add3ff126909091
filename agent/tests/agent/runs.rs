//! Jobs that run: phase order, streaming, failure rules, artifacts, attachments.

use crate::lab::TestLab;
use flate2::Compression;
use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use serde_json::json;
use std::io::Read;
use std::time::{Duration, Instant};
use testflinger_testing::peak_rss_kib;

const LONG: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_job_runs_all_phases_in_order() {
    let mut lab = TestLab::start("order").await;
    let order = lab.path("order.txt");
    let logs = lab.path("phase-logs");
    std::fs::create_dir_all(&logs).expect("dir");
    let step = |p: &str| format!("echo {p} >> {}; echo {p}-ran", order.display());
    lab.spawn_agent(
        "dev-order",
        json!({
            "setup_command": format!("{}; echo agent=$agent_id type=$provision_type", step("setup")),
            "provision_command": format!("{}; echo serial-data > provision-serial.log", step("provision")),
            "firmware_update_command": step("firmware_update"),
            "test_command": format!("{}; test -f testflinger.json && echo has-job-file; echo to-stderr >&2", step("test")),
            "allocate_command": step("allocate"),
            "reserve_command": step("reserve"),
            "cleanup_command": format!("{}; cp *.log {}/", step("cleanup"), logs.display()),
        }),
    );
    let id = lab
        .submit(json!({
            "provision_data": {"url": "http://example.invalid/image"},
            "firmware_update_data": {"version": "latest"},
            "test_data": {"test_cmds": "run"},
            "reserve_data": {"ssh_keys": ["lp:someone"], "timeout": 60},
        }))
        .await;
    let r = lab.wait_complete(&id, LONG).await;
    let ran = std::fs::read_to_string(&order).expect("order file");
    assert_eq!(
        ran.lines().collect::<Vec<_>>(),
        [
            "setup",
            "provision",
            "firmware_update",
            "test",
            "reserve",
            "cleanup"
        ],
        "allocate has no data and is skipped; the rest run in order"
    );
    for p in [
        "setup",
        "provision",
        "firmware_update",
        "test",
        "reserve",
        "cleanup",
    ] {
        assert_eq!(r[format!("{p}_status")], 0, "{p}: {r}");
        let out = r[format!("{p}_output")].as_str().unwrap_or_default();
        assert!(out.contains(&format!("{p}-ran")), "{p} output: {out}");
        assert!(out.contains(&format!("Starting testflinger {p} phase on dev-order")));
    }
    assert!(r.get("allocate_status").is_none(), "{r}");
    let serial = r["provision_serial"].as_str().unwrap_or_default();
    assert!(serial.contains("serial-data"), "serial log: {r}");
    let setup = r["setup_output"].as_str().unwrap_or_default();
    assert!(
        setup.contains("agent=dev-order type=fake"),
        "config values in env: {setup}"
    );
    let test = r["test_output"].as_str().unwrap_or_default();
    assert!(
        test.contains("has-job-file") && test.contains("to-stderr"),
        "{test}"
    );
    let test_log = std::fs::read_to_string(logs.join("test.log")).expect("test.log");
    assert!(test_log.contains("test-ran"), "{test_log}");
    let a = lab.wait_agent_idle("dev-order", LONG).await;
    assert_eq!(a["state"], "waiting", "{a}");
    assert_eq!(a["queues"], json!([lab.queue]), "{a}");
    assert_eq!(a["location"], "lab");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_streams_while_the_test_phase_runs() {
    let mut lab = TestLab::start("stream").await;
    let gate = lab.path("gate");
    lab.spawn_agent(
        "dev-stream",
        json!({
            "test_command": format!(
                "echo first-line; while [ ! -f {} ]; do sleep 0.05; done; echo last-line",
                gate.display()
            ),
        }),
    );
    let id = lab.submit(json!({"test_data": {"test_cmds": "x"}})).await;
    lab.wait_result(&id, "test phase running", LONG, |r| {
        r["job_state"] == "test"
    })
    .await;
    let t0 = Instant::now();
    let r = lab
        .wait_result(&id, "first line streamed", Duration::from_secs(3), |r| {
            r["test_output"]
                .as_str()
                .is_some_and(|o| o.contains("first-line"))
        })
        .await;
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    assert_eq!(r["job_state"], "test", "still running: {r}");
    assert!(
        !r["test_output"]
            .as_str()
            .unwrap_or_default()
            .contains("last-line")
    );
    std::fs::write(&gate, b"").expect("gate");
    let r = lab.wait_complete(&id, LONG).await;
    assert!(
        r["test_output"]
            .as_str()
            .unwrap_or_default()
            .contains("last-line")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_failure_goes_on_but_provision_failure_skips_to_cleanup() {
    let mut lab = TestLab::start("fail").await;
    lab.spawn_agent(
        "dev-fail",
        json!({
            "provision_command": "if grep -q fail-provision testflinger.json; then echo prov-broken; exit 3; fi; echo prov-ok",
            "test_command": "echo tests-failing; exit 1",
            "reserve_command": "echo reserved",
            "cleanup_command": "echo cleaned",
        }),
    );
    let job = |marker: &str| {
        json!({
            "provision_data": {"url": marker},
            "test_data": {"test_cmds": "x"},
            "reserve_data": {"timeout": 60},
        })
    };
    let a = lab.submit(job("fine")).await;
    let r = lab.wait_complete(&a, LONG).await;
    assert_eq!(r["provision_status"], 0, "{r}");
    assert_eq!(r["test_status"], 1, "{r}");
    assert_eq!(
        r["reserve_status"], 0,
        "a test failure does not stop the job: {r}"
    );
    assert_eq!(r["cleanup_status"], 0, "{r}");

    let b = lab.submit(job("fail-provision")).await;
    let r = lab.wait_complete(&b, LONG).await;
    assert_eq!(r["provision_status"], 3, "{r}");
    assert!(r.get("test_status").is_none(), "test must be skipped: {r}");
    assert!(
        r.get("reserve_status").is_none(),
        "reserve must be skipped: {r}"
    );
    assert_eq!(r["cleanup_status"], 0, "cleanup always runs: {r}");
    assert!(
        r["cleanup_output"]
            .as_str()
            .unwrap_or_default()
            .contains("cleaned")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn artifacts_round_trip() {
    let mut lab = TestLab::start("artifacts").await;
    lab.spawn_agent(
        "dev-art",
        json!({
            "test_command": "mkdir -p artifacts/sub && echo payload > artifacts/result.txt && echo deep > artifacts/sub/x.txt && printf '#!/bin/sh\\n' > artifacts/run.sh && chmod 750 artifacts/run.sh && chmod 600 artifacts/sub/x.txt && ln -s /etc/passwd artifacts/link",
        }),
    );
    let id = lab.submit(json!({"test_data": {"test_cmds": "x"}})).await;
    lab.wait_complete(&id, LONG).await;
    let gz = lab.artifact(&id).await.expect("artifact uploaded");
    let mut archive = tar::Archive::new(GzDecoder::new(&gz[..]));
    let mut files = std::collections::BTreeMap::new();
    let mut modes = std::collections::BTreeMap::new();
    for e in archive.entries().expect("entries") {
        let mut e = e.expect("entry");
        let name = e.path().expect("path").display().to_string();
        assert!(
            name.starts_with("artifacts"),
            "top entry must be artifacts/: {name}"
        );
        assert!(
            e.header().entry_type().is_file() || e.header().entry_type().is_dir(),
            "only files and folders (the server refuses links): {name}"
        );
        modes.insert(name.clone(), e.header().mode().expect("mode") & 0o7777);
        let mut s = String::new();
        if e.header().entry_type().is_file() {
            e.read_to_string(&mut s).expect("read");
            files.insert(name, s);
        }
    }
    // Modes are kept (issue 13.2); the symbolic link was left out.
    assert_eq!(modes.get("artifacts/run.sh"), Some(&0o750), "{modes:?}");
    assert_eq!(modes.get("artifacts/sub/x.txt"), Some(&0o600), "{modes:?}");
    assert!(!modes.contains_key("artifacts/link"), "{modes:?}");
    assert_eq!(
        files.get("artifacts/result.txt").map(String::as_str),
        Some("payload\n")
    );
    assert_eq!(
        files.get("artifacts/sub/x.txt").map(String::as_str),
        Some("deep\n")
    );
}

fn attachments_tarball(entries: &[(&str, &[u8], u32)]) -> Vec<u8> {
    let enc = GzEncoder::new(Vec::new(), Compression::default());
    let mut b = tar::Builder::new(enc);
    for (name, data, mode) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(*mode);
        b.append_data(&mut h, name, *data).expect("append");
    }
    b.into_inner().expect("tar").finish().expect("gz")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attachments_are_fetched_and_extracted() {
    let mut lab = TestLab::start("attach").await;
    lab.spawn_agent(
        "dev-attach",
        json!({
            "test_command": "cat attachments/test/data/input.txt; grep -c attachments testflinger.json || true; ./attachments/test/run.sh; stat -c 'mode=%a' attachments/test/run.sh",
        }),
    );
    let id = lab
        .submit(
            json!({"test_data": {"test_cmds": "x", "attachments": [{"agent": "data/input.txt"}]}}),
        )
        .await;
    let gz = attachments_tarball(&[
        ("test/data/input.txt", b"attached-content\n", 0o644),
        // setuid is dropped, the rest of the mode kept.
        ("test/run.sh", b"#!/bin/sh\necho script-ran\n", 0o4750),
    ]);
    let form = reqwest::multipart::Form::new().part(
        "file",
        reqwest::multipart::Part::bytes(gz).file_name("attachments.tar.gz"),
    );
    let r = lab
        .http
        .post(format!("{}/v1/job/{id}/attachments", lab.base))
        .multipart(form)
        .send()
        .await
        .expect("upload");
    assert!(r.status().is_success(), "upload: {}", r.status());
    let r = lab.wait_complete(&id, LONG).await;
    let out = r["test_output"].as_str().unwrap_or_default();
    assert!(out.contains("attached-content"), "{out}");
    assert!(out.contains("script-ran"), "{out}");
    assert!(out.contains("mode=750"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocate_publishes_the_device_and_holds_it_until_the_job_ends() {
    let mut lab = TestLab::start("allocate").await;
    lab.spawn_agent(
        "dev-alloc",
        json!({
            "allocate_command": "echo '{\"device_info\": {\"device_ip\": \"10.1.2.3\"}}' > device-info.json; echo allocating",
            "cleanup_command": "echo released-device",
        }),
    );
    let id = lab
        .submit(json!({"allocate_data": {"allocate": true}}))
        .await;
    let r = lab
        .wait_result(&id, "allocated", LONG, |r| r["job_state"] == "allocated")
        .await;
    assert_eq!(r["device_info"]["device_ip"], "10.1.2.3", "{r}");
    assert_eq!(r["allocate_status"], 0, "{r}");
    assert_eq!(lab.get_agent("dev-alloc").await["job_id"], id.as_str());
    // The parent (here: the user) ends it; the agent lets go and cleans up.
    lab.cancel(&id).await;
    lab.wait_agent_idle("dev-alloc", LONG).await;
    let r = lab.result(&id).await;
    assert_eq!(r["job_state"], "cancelled", "{r}");
    assert!(
        r["cleanup_output"]
            .as_str()
            .unwrap_or_default()
            .contains("released-device")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_secrets_reach_the_test_phase_and_are_masked_in_its_output() {
    let mut lab = TestLab::start("secrets").await;
    let logs = lab.path("secret-logs");
    std::fs::create_dir_all(&logs).expect("dir");
    lab.spawn_agent(
        "dev-secret",
        json!({
            "setup_command": "echo setup-sees:${API_TOKEN:-nothing}",
            "test_command": "echo token=$API_TOKEN; test \"$API_TOKEN\" = s3cr3t-value && echo env-ok",
            "cleanup_command": format!("cp test.log {}/", logs.display()),
        }),
    );
    let path = format!("agent/{}", lab.queue);
    let r = lab
        .http
        .put(format!("{}/v1/secrets/anonymous/{path}", lab.base))
        .json(&json!({"value": "s3cr3t-value"}))
        .send()
        .await
        .expect("put secret");
    assert!(r.status().is_success(), "put secret: {}", r.status());
    let id = lab
        .submit(json!({"test_data": {"test_cmds": "x", "secrets": {"API_TOKEN": path}}}))
        .await;
    let r = lab.wait_complete(&id, LONG).await;
    let out = r["test_output"].as_str().unwrap_or_default();
    assert!(
        out.contains("env-ok"),
        "the secret is in the test env: {out}"
    );
    assert!(!out.contains("s3cr3t-value"), "masked: {out}");
    assert!(out.contains("token=**"), "{out}");
    let setup = r["setup_output"].as_str().unwrap_or_default();
    assert!(
        setup.contains("setup-sees:nothing"),
        "only the test phase: {setup}"
    );
    let log = std::fs::read_to_string(logs.join("test.log")).expect("test.log");
    assert!(
        !log.contains("s3cr3t-value") && log.contains("env-ok"),
        "{log}"
    );
}

/// Issue 14.2: a 2 MiB serial log with `é` and `😀` across the 1 MiB and 2 MiB byte
/// boundaries comes back whole (fragments are cut at character boundaries).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_logs_keep_characters_across_fragment_boundaries() {
    let mut lab = TestLab::start("serialutf8").await;
    let mut data = vec![b'a'; (1 << 20) - 1];
    data.extend_from_slice("é".as_bytes());
    data.extend(std::iter::repeat_n(b'b', (1 << 20) - 4));
    data.extend_from_slice("😀".as_bytes());
    data.extend_from_slice(b"end\n");
    let source = lab.path("serial-source.log");
    std::fs::write(&source, &data).expect("write");
    lab.spawn_agent(
        "dev-serialutf8",
        json!({
            "test_command": format!("cp {} test-serial.log; echo copied", source.display()),
        }),
    );
    let id = lab.submit(json!({"test_data": {"test_cmds": "run"}})).await;
    let r = lab.wait_complete(&id, LONG).await;
    let serial = r["test_serial"].as_str().unwrap_or_default();
    assert!(!serial.contains('\u{FFFD}'), "U+FFFD in the serial log");
    assert_eq!(serial.len(), data.len());
    assert_eq!(serial.as_bytes(), &data[..]);
    // Issue 14.8: logs redirected to a file carry no colour escape codes (agent, server).
    let agent_log = lab.agent_log(0);
    assert!(agent_log.contains("registered"), "{agent_log}");
    assert!(!agent_log.contains('\x1b'), "escape codes in the agent log");
    let server_log = lab.server_log();
    assert!(!server_log.is_empty());
    assert!(
        !server_log.contains('\x1b'),
        "escape codes in the server log"
    );
}

/// Submits a job with attachments, uploads a harmless archive, then puts `stored` in
/// its place in the server's store: the agent gets an archive the server did not check
/// (a server with looser limits, or one stored before the check existed).
async fn job_with_stored_attachments(lab: &TestLab, stored: &[u8]) -> String {
    use testflinger_archive::hostile;
    let id = lab
        .submit(json!({"test_data": {"test_cmds": "x", "attachments": [{"agent": "ok"}]}}))
        .await;
    let harmless = hostile::targz(&[hostile::file("test/ok", b"ok\n", 0o644)]);
    let form = reqwest::multipart::Form::new().part(
        "file",
        reqwest::multipart::Part::bytes(harmless).file_name("attachments.tar.gz"),
    );
    let r = lab
        .http
        .post(format!("{}/v1/job/{id}/attachments", lab.base))
        .multipart(form)
        .send()
        .await
        .expect("upload");
    assert!(r.status().is_success(), "upload: {}", r.status());
    let path = lab.path(&format!("data/attachments/{id}.tar.gz"));
    assert!(path.exists(), "{}", path.display());
    std::fs::write(&path, stored).expect("replace the stored archive");
    id
}

/// Issue 13.2: the agent unpacks with the server's checker: a second gzip member holding
/// `../x` and a gzip bomb (10 GiB of zeros) are refused with a message naming the member
/// and the limit; the agent's memory stays small; the job runs without attachments.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_attachments_are_refused_by_the_agent_with_bounded_memory() {
    use testflinger_archive::hostile;
    let mut lab = TestLab::start("attach-hostile").await;
    let two = hostile::two_members(
        &[hostile::file("test/ok", b"ok\n", 0o644)],
        &[hostile::file("../x", b"evil\n", 0o644)],
    );
    let bomb = hostile::bomb("test/zeros", 10 << 30);
    let a = job_with_stored_attachments(&lab, &two).await;
    let b = job_with_stored_attachments(&lab, &bomb).await;
    let agent = lab.spawn_agent(
        "dev-hostile",
        json!({"test_command": "ls -R attachments 2>&1 || echo no-attachments; ls .. ; du -sk ."}),
    );
    for id in [&a, &b] {
        let r = lab.wait_complete(id, Duration::from_secs(60)).await;
        let out = r["test_output"].as_str().unwrap_or_default();
        assert!(out.contains("no-attachments"), "{id}: {out}");
        assert!(!out.contains("zeros"), "{id}: {out}");
    }
    let log = lab.agent_log(agent);
    assert!(log.contains("attachments refused"), "{log}");
    assert!(log.contains("member '../x' contains '..'"), "{log}");
    assert!(
        log.contains("member 'test/zeros' (10737418240 bytes) takes the archive past the limit of 8589934592 unpacked bytes"),
        "{log}"
    );
    assert!(log.contains("archive_max_unpacked_bytes"), "{log}");
    let pid = lab.agent(agent).pid();
    let peak = peak_rss_kib(pid);
    println!("agent peak RSS (VmHWM) after both refusals: {peak} KiB");
    assert!(peak > 0 && peak < 64 * 1024, "agent peak RSS {peak} KiB");
    // Nothing escaped the run directory.
    let run = lab.path("run-dev-hostile");
    assert!(!run.join("x").exists());
    assert!(!lab.path("x").exists());
}
