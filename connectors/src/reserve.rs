//! `reserve` for every type: install the job's public keys for the test user on the
//! device, say how to connect and until when, wait for the timeout, a SIGTERM/SIGINT
//! (the agent cancelling the phase) or the job turning `cancelled` on the server, then
//! remove exactly the keys this reservation added.
//!
//! The keys added are recorded in the run directory ([`KEYS_RECORD`]) as soon as they
//! are installed; the `cleanup` stage of every device type removes whatever a record
//! still lists, so a reservation cut short (the agent killing the phase, a crash) leaves
//! no key behind once cleanup has run.

use crate::api::Api;
use crate::context::Ctx;
use crate::error::{ConnectorError, Result};
use crate::keys;
use crate::ssh::{Ssh, remote_path};
use std::time::Duration;
use tokio::signal::unix::{SignalKind, signal};

const DEFAULT_AUTHORIZED_KEYS: &str = "~/.ssh/authorized_keys";

/// The run directory's record of the keys a reservation added:
/// `{"destination": "user@host", "file": "<authorized_keys>", "keys": ["ssh-ed25519 ..."]}`.
pub const KEYS_RECORD: &str = "reservation-keys.json";

fn write_record(ctx: &Ctx, destination: &str, file: &str, keys: &[String]) -> Result<()> {
    let body = serde_json::json!({"destination": destination, "file": file, "keys": keys});
    let path = ctx.dir.join(KEYS_RECORD);
    std::fs::write(&path, body.to_string())
        .map_err(|e| ConnectorError::io(format!("writing {}", path.display()), e))
}

/// Removes `keys` from `file` on the device over SSH.
async fn remove_keys(ssh: &Ssh, file: &str, keys: &[String]) -> Result<()> {
    let input = keys.join("\n") + "\n";
    let out = ssh.run(&remove_script(file), input.as_bytes()).await?;
    if out.code != 0 {
        return Err(ConnectorError::Provisioning(format!(
            "removing reservation SSH keys for {} failed (exit {}): {}",
            ssh.destination(),
            out.code,
            out.stderr.trim()
        )));
    }
    Ok(())
}

/// The cleanup part of every device type: removes the keys a reservation recorded and
/// did not remove itself (it was cut short), then drops the record. Nothing to do
/// without a record.
pub async fn remove_recorded_keys(ctx: &Ctx) -> Result<()> {
    let path = ctx.dir.join(KEYS_RECORD);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(ConnectorError::io(format!("reading {}", path.display()), e)),
    };
    let rec: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
        ConnectorError::Provisioning(format!("{} is not valid JSON: {e}", path.display()))
    })?;
    let keys: Vec<String> = rec["keys"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|k| k.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let file = rec["file"]
        .as_str()
        .unwrap_or(DEFAULT_AUTHORIZED_KEYS)
        .to_string();
    if !keys.is_empty() {
        let user = ctx.test_username()?;
        let ssh = Ssh::new(&ctx.cfg, &user)?;
        remove_keys(&ssh, &file, &keys).await?;
        println!(
            "Removed {} SSH key(s) a reservation left on {}.",
            keys.len(),
            ssh.destination()
        );
    }
    let _ = std::fs::remove_file(&path);
    Ok(())
}

/// Appends each stdin line missing from the file and echoes the ones it added.
fn install_script(file: &str) -> String {
    format!(
        "umask 077; f={file}; mkdir -p \"$(dirname \"$f\")\" && touch \"$f\" || exit 1; \
         if [ -s \"$f\" ] && [ -n \"$(tail -c1 \"$f\")\" ]; then echo >> \"$f\"; fi; \
         while IFS= read -r k; do [ -n \"$k\" ] || continue; \
         if ! grep -qxF -- \"$k\" \"$f\"; then printf '%s\\n' \"$k\" >> \"$f\" || exit 1; \
         printf '%s\\n' \"$k\"; fi; done"
    )
}

/// Removes every line equal to a stdin line, keeping the file's inode and mode.
fn remove_script(file: &str) -> String {
    format!(
        "f={file}; [ -f \"$f\" ] || exit 0; t=\"$f.tf-$$\"; \
         grep -vxF -f - -- \"$f\" > \"$t\"; rc=$?; \
         if [ $rc -gt 1 ]; then rm -f \"$t\"; exit $rc; fi; \
         cat \"$t\" > \"$f\"; rc=$?; rm -f \"$t\"; exit $rc"
    )
}

/// Why the reservation ended.
enum End {
    Timeout,
    Signal(&'static str),
    Cancelled,
}

pub async fn reserve(ctx: &Ctx) -> Result<i32> {
    // Handlers first: a cancel arriving while keys are installed must still remove them.
    let mut term = signal(SignalKind::terminate())
        .map_err(|e| ConnectorError::io("installing the SIGTERM handler", e))?;
    let mut int = signal(SignalKind::interrupt())
        .map_err(|e| ConnectorError::io("installing the SIGINT handler", e))?;

    let data = ctx.job.reserve_data();
    let timeout = data.timeout_secs();
    let sources = data.ssh_keys.clone().unwrap_or_default();
    let user = ctx.test_username()?;
    let ssh = Ssh::new(&ctx.cfg, &user)?;
    let file = remote_path(
        ctx.cfg
            .ssh_authorized_keys
            .as_deref()
            .unwrap_or(DEFAULT_AUTHORIZED_KEYS),
    );

    let wanted = keys::resolve(&sources, ctx.cfg.ssh_key_service.as_deref()).await?;
    let mut added: Vec<String> = Vec::new();
    if !wanted.is_empty() {
        let input = wanted.join("\n") + "\n";
        let out = ssh.run(&install_script(&file), input.as_bytes()).await?;
        if out.code != 0 {
            return Err(ConnectorError::Provisioning(format!(
                "installing SSH keys for {} failed (exit {}): {}",
                ssh.destination(),
                out.code,
                out.stderr.trim()
            )));
        }
        added = out
            .stdout
            .lines()
            .filter(|l| wanted.iter().any(|w| w == l))
            .map(str::to_string)
            .collect();
        // Recorded at once: whatever ends this reservation, cleanup removes them.
        write_record(ctx, &ssh.destination(), &file, &added)?;
        println!(
            "Installed {} SSH key(s) for {} ({} already present).",
            added.len(),
            ssh.destination(),
            wanted.len() - added.len()
        );
    }

    let now = chrono::Utc::now();
    let ends = now + chrono::Duration::seconds(i64::try_from(timeout).unwrap_or(i64::MAX / 2));
    println!("*** TESTFLINGER SYSTEM RESERVED ***");
    println!("You can now connect to {}", ssh.destination());
    println!("  {}", ssh.connect_hint());
    println!("Current time:           [{}]", now.to_rfc3339());
    println!("Reservation expires at: [{}]", ends.to_rfc3339());
    println!("Reservation will automatically time out in {timeout} seconds");
    if let Some(id) = &ctx.job.job_id {
        println!("To end the reservation sooner use: testflinger cancel {id}");
    }

    let poll = cancel_poll(ctx);
    let end = tokio::select! {
        _ = tokio::time::sleep(Duration::from_secs(timeout)) => End::Timeout,
        _ = term.recv() => End::Signal("SIGTERM"),
        _ = int.recv() => End::Signal("SIGINT"),
        () = poll => End::Cancelled,
    };
    match end {
        End::Timeout => println!("Reservation timed out after {timeout} seconds."),
        End::Signal(s) => println!("Reservation ended by {s}."),
        End::Cancelled => println!("Job cancelled: ending the reservation."),
    }

    if !added.is_empty() {
        remove_keys(&ssh, &file, &added).await?;
        println!("Removed {} reservation SSH key(s).", added.len());
    }
    let _ = std::fs::remove_file(ctx.dir.join(KEYS_RECORD));
    Ok(0)
}

/// Resolves when the server says the job is cancelled; never, without a server and id.
async fn cancel_poll(ctx: &Ctx) {
    let (Some(server), Some(id)) = (&ctx.cfg.testflinger_server, &ctx.job.job_id) else {
        return std::future::pending().await;
    };
    let Ok(api) = Api::new(server) else {
        return std::future::pending().await;
    };
    let every = ctx.cfg.poll_interval(5.0);
    let id = id.to_string();
    loop {
        // A server that is briefly unreachable must not end a reservation.
        if let Ok(Some(state)) = api.job_state(&id).await
            && state == "cancelled"
        {
            return;
        }
        tokio::time::sleep(every).await;
    }
}
