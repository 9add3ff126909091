//! The local job history: `$XDG_CONFIG_HOME/testflinger-cli-history.json`, the last 10
//! jobs submitted from this machine, in upstream's shape
//! `{"<job_id>": {"queue", "submission_time", "job_state"}}`.

use anyhow::Context;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

const KEEP: usize = 10;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Entry {
    pub queue: String,
    /// Seconds since the epoch.
    pub submission_time: f64,
    pub job_state: String,
}

pub struct History {
    path: PathBuf,
    /// Oldest first.
    pub jobs: Vec<(String, Entry)>,
}

impl History {
    pub fn path() -> PathBuf {
        crate::config::config_home().join("testflinger-cli-history.json")
    }

    /// Loads the history; a missing or unreadable file is an empty history (it is a
    /// convenience, never a reason to fail a submission).
    pub fn load() -> History {
        let path = Self::path();
        let mut jobs: Vec<(String, Entry)> = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Map<_, _>>(&b).ok())
            .map(|m| {
                m.into_iter()
                    .filter_map(|(k, v)| serde_json::from_value(v).ok().map(|e| (k, e)))
                    .collect()
            })
            .unwrap_or_default();
        jobs.sort_by(|a, b| a.1.submission_time.total_cmp(&b.1.submission_time));
        History { path, jobs }
    }

    pub fn add(&mut self, job_id: &str, queue: &str) {
        let now = chrono::Utc::now();
        let secs = now.timestamp() as f64 + f64::from(now.timestamp_subsec_millis()) / 1000.0;
        self.jobs.retain(|(id, _)| id != job_id);
        self.jobs.push((
            job_id.to_string(),
            Entry {
                queue: queue.to_string(),
                submission_time: secs,
                job_state: "waiting".to_string(),
            },
        ));
    }

    pub fn set_state(&mut self, job_id: &str, state: &str) {
        if let Some((_, e)) = self.jobs.iter_mut().find(|(id, _)| id == job_id) {
            e.job_state = state.to_string();
        }
    }

    pub fn save(&mut self) -> anyhow::Result<()> {
        if self.jobs.len() > KEEP {
            let extra = self.jobs.len() - KEEP;
            self.jobs.drain(..extra);
        }
        let map: serde_json::Map<String, serde_json::Value> = self
            .jobs
            .iter()
            .map(|(k, e)| Ok((k.clone(), serde_json::to_value(e)?)))
            .collect::<Result<_, serde_json::Error>>()?;
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let text = serde_json::to_string_pretty(&map)?;
        std::fs::write(&self.path, text)
            .with_context(|| format!("cannot write {}", self.path.display()))
    }
}
