//! The job file the agent hands to a stage (`testflinger.json`).
//!
//! Read leniently at the top level: the agent and server add keys of their own
//! (`started_at`, `attachments_status`, ...). The sections a stage uses are parsed with the
//! schema types of `testflinger-common`, so a malformed section is named precisely.

use crate::config::one_line;
use crate::error::{ConnectorError, Result};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::path::Path;
use testflinger_common::JobId;
use testflinger_common::job::{ReserveData, TestData};

#[derive(Debug, Clone, Default, Deserialize)]
pub struct JobFile {
    #[serde(default)]
    pub job_id: Option<JobId>,
    #[serde(default)]
    pub provision_data: Option<Value>,
    #[serde(default)]
    pub firmware_update_data: Option<Map<String, Value>>,
    #[serde(default)]
    pub test_data: Option<TestData>,
    #[serde(default)]
    pub allocate_data: Option<Map<String, Value>>,
    #[serde(default)]
    pub reserve_data: Option<ReserveData>,
    #[serde(default)]
    pub allocation_timeout: Option<u64>,
}

impl JobFile {
    /// Reads and parses the job file.
    ///
    /// Fails with a message naming the file (and the field) when it is missing,
    /// unreadable, not a JSON object, or a section the connector uses is malformed.
    pub fn load(path: &Path) -> Result<JobFile> {
        let err = |message: String| ConnectorError::Job {
            path: path.to_path_buf(),
            message,
        };
        let text = std::fs::read(path).map_err(|e| err(e.to_string()))?;
        let value: Value =
            serde_json::from_slice(&text).map_err(|e| err(format!("invalid JSON: {e}")))?;
        if !value.is_object() {
            return Err(err("a job must be a JSON object".into()));
        }
        serde_path_to_error::deserialize(value).map_err(|e| {
            let field = e.path().to_string();
            err(format!(
                "{field}: {}",
                one_line(&e.into_inner().to_string())
            ))
        })
    }

    pub fn test_data(&self) -> TestData {
        self.test_data.clone().unwrap_or_default()
    }

    pub fn reserve_data(&self) -> ReserveData {
        self.reserve_data.clone().unwrap_or_default()
    }
}
