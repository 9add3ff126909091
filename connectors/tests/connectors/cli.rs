//! Command line, bad input, `fake`, and the default `runtest`.

use crate::support::{BIN, Run, code, run_bounded, stderr, stdout};
use serde_json::json;
use std::process::Command;
use std::time::Duration;

const CONFIG: &str = "agent_name: dev1\nmaas_user: lab\nnode_id: 3\nextra: {a: [1, {b: c}]}\ndevice_ip: 10.0.0.5\nreboot_script:\n  - echo one\n  - echo two\nenv:\n  GREETING: hello world\n  PORT: 22\n";

fn one_line_error(out: &std::process::Output) -> String {
    let err = stderr(out);
    assert_eq!(err.trim().lines().count(), 1, "not one line: {err:?}");
    err.trim().to_string()
}

#[test]
fn unknown_type_and_stage_fail_with_one_line() {
    let run = Run::new(CONFIG, &json!({"job_queue": "q"}));
    let out = run.run("toaster", "provision");
    assert_eq!(code(&out), 1);
    let msg = one_line_error(&out);
    assert!(msg.contains("unknown device type 'toaster'"), "{msg}");
    assert!(msg.contains("noprovision"), "lists the known types: {msg}");

    let out = run.run("fake", "test");
    assert_eq!(code(&out), 1);
    let msg = one_line_error(&out);
    assert!(
        msg.contains("unknown stage 'test'") && msg.contains("runtest"),
        "{msg}"
    );

    let out = run_bounded(
        {
            let mut c = Command::new(BIN);
            c.args(["fake", "provision"]).current_dir(run.path());
            c
        },
        Duration::from_secs(30),
    );
    assert_eq!(code(&out), 1);
    let msg = one_line_error(&out);
    assert!(msg.contains("required"), "{msg}");
}

#[test]
fn missing_or_malformed_config_names_the_file() {
    let run = Run::new(CONFIG, &json!({"job_queue": "q"}));
    std::fs::remove_file(run.path().join("device.yaml")).expect("rm");
    let out = run.run("fake", "provision");
    assert_eq!(code(&out), 1);
    let msg = one_line_error(&out);
    assert!(
        msg.contains("device config device.yaml") && msg.contains("No such file"),
        "{msg}"
    );

    for (yaml, expect) in [
        ("device_ip: [1, 2\n", "device.yaml"),
        ("env: [1, 2]\n", "device.yaml"),
        ("serial_port: not-a-port\n", "device.yaml"),
        ("device_ip: -oProxyCommand=x\n", "device_ip"),
        ("", "empty"),
    ] {
        std::fs::write(run.path().join("device.yaml"), yaml).expect("write");
        let out = run.run("fake", "runtest");
        assert_eq!(code(&out), 1, "{yaml:?}");
        let msg = one_line_error(&out);
        assert!(
            msg.contains("device config device.yaml") && msg.contains(expect),
            "{yaml:?}: {msg}"
        );
    }
    // The failure is recorded for the agent, under the agent's phase name.
    let errors = run.read_json("device-connector-error.json");
    assert_eq!(
        errors["test_exception_info"]["exception_name"],
        "ConfigError"
    );
}

#[test]
fn missing_or_malformed_job_names_the_file_and_field() {
    let run = Run::new(CONFIG, &json!({"job_queue": "q"}));
    std::fs::write(run.path().join("job.json"), "{not json").expect("write");
    let out = run.run("fake", "provision");
    assert_eq!(code(&out), 1);
    let msg = one_line_error(&out);
    assert!(msg.contains("job file job.json: invalid JSON"), "{msg}");
    // device-info.json is written on start, before the job is read.
    assert_eq!(
        run.read_json("device-info.json"),
        json!({"device_info": {"device_ip": "10.0.0.5", "agent_name": "dev1"}})
    );

    std::fs::write(
        run.path().join("job.json"),
        r#"{"job_queue": "q", "test_data": {"test_cmds": 5}}"#,
    )
    .expect("write");
    let out = run.run("fake", "runtest");
    assert_eq!(code(&out), 1);
    let msg = one_line_error(&out);
    assert!(
        msg.contains("job file job.json: test_data.test_cmds"),
        "{msg}"
    );

    std::fs::write(run.path().join("job.json"), "[1]").expect("write");
    let out = run.run("fake", "provision");
    assert_eq!(code(&out), 1);
    assert!(one_line_error(&out).contains("must be a JSON object"));

    // Both failures are kept, one entry per phase.
    let errors = run.read_json("device-connector-error.json");
    let names: Vec<&String> = errors.as_object().expect("object").keys().collect();
    assert_eq!(names, ["provision_exception_info", "test_exception_info"]);
    assert_eq!(
        errors["provision_exception_info"]["exception_name"],
        "JobDataError"
    );
    assert!(
        errors["provision_exception_info"]["exception_message"]
            .as_str()
            .is_some_and(|m| m.contains("job.json"))
    );
}

#[test]
fn fake_provision_prints_the_data_and_provisions_nothing() {
    let marker = "pwned-by-provision-data";
    let job = json!({
        "job_queue": "q",
        "job_id": "6ba7b810-9dad-11d1-80b4-00c04fd430c8",
        "started_at": "2024-01-01T00:00:00+00:00Z",
        "provision_data": {"url": "http://example/image.img.xz",
                           "note": format!("$(touch {marker}); `touch {marker}`")}
    });
    let run = Run::new(CONFIG, &job);
    for name in ["fake", "fake_connector"] {
        let out = run.run(name, "provision");
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        let text = stdout(&out);
        assert!(text.contains("http://example/image.img.xz"), "{text}");
        assert!(text.contains("nothing is provisioned"), "{text}");
    }
    assert!(
        !run.path().join(marker).exists(),
        "job data reached a shell"
    );
    assert_eq!(
        run.read_json("device-info.json")["device_info"]["agent_name"],
        "dev1"
    );
    for stage in ["allocate", "cleanup", "firmware_update"] {
        let out = run.run("fake", stage);
        assert_eq!(code(&out), 0, "{stage}: {}", stderr(&out));
    }
}

#[test]
fn runtest_runs_the_script_with_env_and_secrets() {
    let job = json!({
        "job_queue": "q",
        "test_data": {
            "test_cmds": "echo \"G=$GREETING P=$PORT IP=$DEVICE_IP A=$AGENT_NAME R=$REBOOT_SCRIPT S=$MY_TOKEN\"\nmkdir -p artifacts && echo done > artifacts/x\nexit 7",
            "secrets": {"MY_TOKEN": "s3cret"}
        }
    });
    let run = Run::new(CONFIG, &job);
    let out = run.run("fake", "runtest");
    assert_eq!(code(&out), 7, "the tests' exit code: {}", stderr(&out));
    assert_eq!(
        stdout(&out).trim(),
        "G=hello world P=22 IP=10.0.0.5 A=dev1 R=echo one;echo two S=s3cret"
    );
    // The script ran in the run directory, as a bash script.
    assert_eq!(run.read("artifacts/x").trim(), "done");
    assert!(run.read("tf_cmd_script").starts_with("#!/bin/bash\n"));
    // A failing test is the test's result, not a connector failure.
    assert!(!run.path().join("device-connector-error.json").exists());
}

#[test]
fn runtest_list_runs_each_command_and_returns_the_last_code() {
    let job = json!({
        "job_queue": "q",
        "test_data": {"test_cmds": ["echo first > order", "false", "echo second >> order; exit 3"]}
    });
    let run = Run::new(CONFIG, &job);
    let out = run.run("noprovision", "runtest");
    assert_eq!(code(&out), 3);
    assert_eq!(run.read("order"), "first\nsecond\n");

    let job = json!({"job_queue": "q", "test_data": {"test_cmds": "#!/bin/sh\necho from-sh"}});
    let run = Run::new(CONFIG, &job);
    let out = run.run("fake", "runtest");
    assert_eq!(code(&out), 0);
    assert_eq!(stdout(&out).trim(), "from-sh");
}
