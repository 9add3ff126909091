//! What a stage gets to work with.

use crate::config::{DeviceConfig, validate_username};
use crate::error::{ConnectorError, Result};
use crate::jobfile::JobFile;
use crate::stage::Stage;
use std::path::PathBuf;

/// The inputs of one stage run.
#[derive(Debug)]
pub struct Ctx {
    pub cfg: DeviceConfig,
    pub job: JobFile,
    /// The working directory: outputs (`device-info.json`, `job_list.json`, serial logs,
    /// `tf_cmd_script`) go here. The agent runs stages in the job's rundir.
    pub dir: PathBuf,
    pub device_type: &'static str,
    pub stage: Stage,
}

impl Ctx {
    /// The user on the device: the job's `test_data.test_username`, else the device
    /// config's `test_username`, else `ubuntu` (as upstream).
    pub fn test_username(&self) -> Result<String> {
        let user = self
            .job
            .test_data
            .as_ref()
            .and_then(|t| t.test_username.clone())
            .or_else(|| self.cfg.test_username.clone())
            .unwrap_or_else(|| "ubuntu".into());
        validate_username(&user).map_err(ConnectorError::Provisioning)?;
        Ok(user)
    }
}
