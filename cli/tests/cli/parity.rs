//! Issue 14.6: every verb and flag of upstream's CLI (reference section 6.3) is accepted
//! by ours: no invocation below may be a command-line error (exit 2, "unexpected
//! argument"). They run against a real server; failing at run time (an unknown job, a
//! dry run) is fine, refusing the flags is not.

use crate::helpers::TestEnv;

#[test]
fn upstream_verbs_and_flags_are_all_accepted() {
    let env = TestEnv::start();
    let q = env.queue("parity");
    // A real agent runs what is submitted, so `submit --poll` ends.
    env.spawn_agent(&q, "echo ok");
    env.write_work_file("job.yaml", &format!("job_queue: {q}\n"));
    env.write_work_file(
        "key.pub",
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIH1parityparityparityparityparitypar user@host\n",
    );
    let id = env.submit(&format!("job_queue: {q}\n"));
    let unknown = "00000000-0000-0000-0000-000000000000";
    let invocations: Vec<Vec<String>> = [
        // Global flags, before the command as upstream's argparse has them.
        vec!["-d", "status", &id],
        vec!["--debug", "status", &id],
        vec!["-c", "cli.conf", "status", &id],
        vec!["--configfile", "cli.conf", "status", &id],
        vec!["submit", "job.yaml"],
        vec!["submit", "--poll", "--quiet", "job.yaml"],
        vec![
            "submit",
            "-p",
            "-q",
            "--wait-for-available-agents",
            "job.yaml",
        ],
        vec!["submit", "--attachments-relative-to", ".", "job.yaml"],
        vec!["poll", "-o", &id],
        vec!["poll", "--oneshot", "--start_fragment", "0", &id],
        vec!["poll", "-o", "-f", "1", "-t", "2026-01-01T00:00:00", &id],
        vec![
            "poll",
            "-o",
            "--start_timestamp",
            "2026-01-01T00:00:00",
            &id,
        ],
        vec!["poll", "-o", "-p", "test", &id],
        vec!["poll", "-o", "--phase", "setup", "--json", &id],
        vec!["poll-serial", "-o", &id],
        vec![
            "poll-serial",
            "--oneshot",
            "-f",
            "0",
            "--phase",
            "test",
            &id,
        ],
        vec!["status", &id],
        vec!["results", &id],
        vec!["artifacts", unknown],
        vec!["artifacts", "--filename", "out.tgz", unknown],
        vec!["show", &id],
        vec!["show", "--yaml", &id],
        vec!["list-queues"],
        vec!["list-queues", "--json"],
        vec!["list-agents"],
        vec!["list-agents", "-1"],
        vec!["list-agents", "--summary"],
        vec!["list-agents", "--fields", "name,state,queues"],
        vec!["list-agents", "--filter-status", "waiting"],
        vec!["list-agents", "--filter-name", "^agent-"],
        vec!["list-agents", "--json"],
        vec!["agent-status", "no-such-agent"],
        vec!["agent-status", "--json", "no-such-agent"],
        vec!["queue-status", &q],
        vec!["queue-status", "-v", &q],
        vec!["queue-status", "--verbose", "--json", &q],
        vec!["reserve", "-q", &q, "-k", "lp:someone", "--dry-run"],
        vec!["reserve", "--queue", &q, "--key", "gh:someone", "-d"],
        vec![
            "reserve",
            "-q",
            &q,
            "-k",
            "key.pub",
            "--timeout",
            "7200",
            "-y",
            "-d",
        ],
        vec![
            "reserve",
            "-q",
            &q,
            "--distro",
            "noble",
            "--ephemeral",
            "-d",
        ],
        vec!["reserve", "-q", &q, "-i", "no-such-image", "-d"],
        vec!["reserve", "-q", &q, "--image", "no-such-image", "-y", "-d"],
        vec!["jobs"],
        vec!["jobs", "-s"],
        vec!["jobs", "--status"],
        vec!["config"],
        // Authentication and administration (this server runs without auth here: the
        // calls may be refused at run time, never as a command-line error).
        vec!["login"],
        vec![
            "login",
            "--client-id",
            "ci-bot",
            "--secret-key",
            "not-the-secret",
        ],
        vec![
            "login",
            "--client_id",
            "ci-bot",
            "--secret_key",
            "not-the-secret",
        ],
        vec![
            "submit",
            "--client-id",
            "ci-bot",
            "--secret-key",
            "x",
            "job.yaml",
        ],
        vec!["secret", "write", "team/token", "value"],
        vec![
            "secret",
            "write",
            "team/token",
            "value",
            "--expire-after",
            "60",
        ],
        vec!["secret", "write", "team/once", "value", "--single-use"],
        vec!["secret", "delete", "team/token"],
        vec![
            "admin",
            "set",
            "agent-status",
            "--status",
            "maintenance",
            "--agents",
            "no-such-agent",
            "--comment",
            "parity",
        ],
        vec!["admin", "get", "client-permissions"],
        vec!["admin", "get", "client-permissions", "ci-bot"],
        vec!["admin", "delete", "client-permissions", "ci-bot"],
        vec!["admin", "get", "restricted-queues"],
        vec!["cancel", &id],
    ]
    .into_iter()
    .map(|v| v.into_iter().map(str::to_string).collect())
    .collect();
    for args in &invocations {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = env.run(&args);
        assert_ne!(out.code(), Some(2), "refused {args:?}: {out:#?}");
        assert!(
            !out.stderr.contains("unexpected argument")
                && !out.stderr.contains("unrecognized subcommand"),
            "refused {args:?}: {out:#?}"
        );
    }
}

/// `reserve -k` takes raw keys and key files (checked), and `-d` is `--dry-run` there.
#[test]
fn reserve_keys_from_files_and_raw_lines() {
    let env = TestEnv::start();
    let q = env.queue("keys");
    let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIH1keysfilekeysfilekeysfilekeysfile me@host";
    env.write_work_file("id.pub", &format!("{key}\n"));
    let out = env.run(&["reserve", "-q", &q, "-k", "id.pub", "-k", "lp:me", "-d"]);
    out.assert_ok();
    assert!(out.stdout.contains(key), "{out:#?}");
    assert!(out.stdout.contains("lp:me"), "{out:#?}");
    let out = env.run(&["reserve", "-q", &q, "-k", key, "-d"]);
    out.assert_ok();
    assert!(out.stdout.contains(key), "{out:#?}");
    let out = env.run(&["reserve", "-q", &q, "-k", "missing/id.pub", "-d"]);
    out.assert_one_line_failure();
    assert!(out.stderr.contains("missing/id.pub"), "{out:#?}");
    env.write_work_file("id_ed25519", "-----BEGIN OPENSSH PRIVATE KEY-----\nx\n");
    let out = env.run(&["reserve", "-q", &q, "-k", "./id_ed25519", "-d"]);
    out.assert_one_line_failure();
    assert!(out.stderr.contains("private key"), "{out:#?}");
    // Without a terminal, a missing -q is a clear error, not a prompt that hangs.
    let out = env.run(&["reserve", "-k", "lp:me", "-d"]);
    out.assert_one_line_failure();
    assert!(out.stderr.contains("-q/--queue"), "{out:#?}");
}

/// `config` without a config file says where settings come from.
#[test]
fn config_without_a_file_says_so() {
    let env = TestEnv::start();
    let out = env.run(&["config"]);
    out.assert_ok();
    assert!(out.stdout.contains("does not exist"), "{out:#?}");
    assert!(out.stdout.contains("server = "), "{out:#?}");
}
