//! Before the first phase: the run directory with the files the connectors read, the
//! job's secrets and their masks, the timeouts that apply, the spool and the task that
//! delivers it, the attachments.

use super::{ClaimedJob, JobSignals, Run};
use crate::archive;
use crate::client::ApiClient;
use crate::config::Config;
use crate::process::Watchdog;
use crate::spool::{self, Delivered, Meta, Spool};
use anyhow::Context;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;
use tracing::Instrument;

/// Upstream's defaults for the two timeouts, in seconds.
const DEFAULT_GLOBAL_TIMEOUT: u64 = 4 * 3600;
const DEFAULT_OUTPUT_TIMEOUT: u64 = 900;
/// Look-ups between phases (cancel, agent state): short, so an unreachable API cannot
/// hold the job longer than the lease clock allows.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

impl Run {
    pub(super) async fn prepare(
        cfg: Arc<Config>,
        client: ApiClient,
        watchdog: Watchdog,
        job: ClaimedJob,
        signals: JobSignals,
    ) -> anyhow::Result<Run> {
        let rundir = cfg.execution_basedir.join(&job.id);
        make_rundir(&rundir, &job.def).await?;
        let secrets = secrets_of(&job.def);
        let masks = masks_of(&secrets);
        let (global_timeout, output_timeout) = timeouts(&cfg, &job.def);
        let (spool, shipper) = start_spool(&cfg, &client, &job, &signals)?;
        Ok(Run {
            quick: client.quick(2, LOOKUP_TIMEOUT),
            env: cfg.string_values.clone(),
            cfg,
            client,
            job,
            signals,
            rundir,
            secrets,
            masks: Arc::new(masks),
            status: BTreeMap::new(),
            output_counter: Arc::new(AtomicU64::new(0)),
            serial_counter: 0,
            spool,
            shipper: Some(shipper),
            watchdog,
            hold: None,
            global_timeout,
            output_timeout,
            device_info_sent: None,
            started: false,
        })
    }

    pub(super) async fn fetch_attachments(&mut self) -> anyhow::Result<()> {
        if self
            .job
            .def
            .get("attachments_status")
            .and_then(Value::as_str)
            != Some("complete")
        {
            return Ok(());
        }
        // Downloaded to disk, then unpacked from disk: never whole in memory.
        let download = self.rundir.join("attachments.tar.gz");
        match self
            .client
            .get_attachments_to(&self.job.id, &download)
            .await
        {
            Ok(true) => self.unpack_attachments(&download).await?,
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "could not download the attachments"),
        }
        let _ = tokio::fs::remove_file(&download).await;
        // The phases see the job without the `attachments` keys (upstream).
        strip_attachments(&mut self.job.def);
        Ok(())
    }

    async fn unpack_attachments(&self, download: &Path) -> anyhow::Result<()> {
        let dest = self.rundir.join("attachments");
        let limits = self.cfg.archive_limits();
        let archive = download.to_path_buf();
        let r = tokio::task::spawn_blocking(move || {
            archive::unpack_attachments(&archive, &dest, limits)
        })
        .await
        .context("attachment extraction panicked")?;
        match r {
            Ok(s) => {
                tracing::info!(
                    files = s.files,
                    bytes = s.file_bytes,
                    "attachments unpacked"
                )
            }
            Err(e) => tracing::warn!(
                error = %e,
                "attachments refused; the job runs without them"
            ),
        }
        Ok(())
    }
}

/// A fresh run directory for the job (an old one of the same job is cleared) with the
/// job, an empty outcome and an empty connector error file.
async fn make_rundir(rundir: &Path, def: &Value) -> anyhow::Result<()> {
    if rundir.exists() {
        tokio::fs::remove_dir_all(rundir)
            .await
            .with_context(|| format!("cannot clear old run directory {}", rundir.display()))?;
    }
    tokio::fs::create_dir_all(rundir)
        .await
        .with_context(|| format!("cannot create run directory {}", rundir.display()))?;
    let pretty = serde_json::to_vec_pretty(def)?;
    tokio::fs::write(rundir.join("testflinger.json"), pretty).await?;
    tokio::fs::write(rundir.join("testflinger-outcome.json"), b"{}").await?;
    tokio::fs::write(rundir.join("device-connector-error.json"), b"").await?;
    Ok(())
}

/// The job's `test_data.secrets` that are strings.
fn secrets_of(def: &Value) -> BTreeMap<String, String> {
    def.pointer("/test_data/secrets")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

/// Each non-empty secret and what replaces it in the output: `**` and the first six
/// hex digits of its SHA-256, `**` again.
fn masks_of(secrets: &BTreeMap<String, String>) -> Vec<(String, String)> {
    secrets
        .values()
        .filter(|v| !v.is_empty())
        .map(|v| {
            let digest = hex::encode(Sha256::digest(v.as_bytes()));
            (v.clone(), format!("**{}**", &digest[..6]))
        })
        .collect()
}

/// The global and output timeouts, in seconds: the job's, capped by the agent's.
fn timeouts(cfg: &Config, def: &Value) -> (u64, u64) {
    let pick = |key: &str, cap: Option<u64>, default: u64| {
        let from_job = def
            .get(key)
            .and_then(Value::as_u64)
            .filter(|v| *v > 0)
            .unwrap_or(default);
        from_job.min(cap.filter(|v| *v > 0).unwrap_or(default))
    };
    let global_timeout = pick("global_timeout", cfg.global_timeout, DEFAULT_GLOBAL_TIMEOUT);
    let output_timeout = pick("output_timeout", cfg.output_timeout, DEFAULT_OUTPUT_TIMEOUT);
    (global_timeout, output_timeout)
}

/// Creates the job's spool and starts delivering it.
fn start_spool(
    cfg: &Config,
    client: &ApiClient,
    job: &ClaimedJob,
    signals: &JobSignals,
) -> anyhow::Result<(Spool, tokio::task::JoinHandle<Delivered>)> {
    let meta = Meta {
        job_id: job.id.clone(),
        token: job.token,
        attempt: job.attempt,
        lease_ttl: job.lease_ttl,
    };
    let dir = Spool::dir_for(&cfg.results_dir(), &cfg.agent_id, &job.id);
    let (spool, pending) = Spool::create(dir.clone(), &meta)
        .with_context(|| format!("cannot create the spool {}", dir.display()))?;
    let shipper = tokio::spawn(
        spool::deliver(
            client.clone(),
            meta,
            spool.clone(),
            pending,
            signals.lost.clone(),
        )
        .in_current_span(),
    );
    Ok((spool, shipper))
}

/// Removes the `attachments` keys the phases must not see, and a section left empty.
fn strip_attachments(def: &mut Value) {
    if let Some(o) = def.as_object_mut() {
        for key in ["provision_data", "firmware_update_data", "test_data"] {
            if let Some(Value::Object(section)) = o.get_mut(key) {
                section.remove("attachments");
                if section.is_empty() {
                    o.remove(key);
                }
            }
        }
    }
}
