//! Files a stage leaves in its working directory for the agent.

use crate::config::DeviceConfig;
use crate::error::{ConnectorError, Result};
use crate::stage::Stage;
use serde_json::{Value, json};
use std::path::Path;

pub const DEVICE_INFO_FILE: &str = "device-info.json";
pub const ERROR_FILE: &str = "device-connector-error.json";

/// Writes `device-info.json` = `{"device_info": {"device_ip", "agent_name"}}`.
pub fn write_device_info(dir: &Path, cfg: &DeviceConfig) -> Result<()> {
    let info = json!({"device_info": {
        "device_ip": cfg.device_ip,
        "agent_name": cfg.agent_name,
    }});
    write_json(&dir.join(DEVICE_INFO_FILE), &info)
}

/// Adds `<phase>_exception_info` to `device-connector-error.json`.
///
/// Upstream appends one JSON document per failure, which leaves an unreadable file after
/// the second one; we merge into the existing object instead, so the file stays one JSON
/// object with one entry per failed phase (a later failure of the same phase wins).
pub fn record_error(dir: &Path, stage: Stage, err: &ConnectorError) -> Result<()> {
    let path = dir.join(ERROR_FILE);
    let mut doc = std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .and_then(|v| match v {
            Value::Object(m) => Some(m),
            _ => None,
        })
        .unwrap_or_default();
    doc.insert(
        format!("{}_exception_info", stage.phase()),
        json!({
            "exception_name": err.exception_name(),
            "exception_message": err.to_string(),
            "exception_cause": err.cause(),
        }),
    );
    write_json(&path, &Value::Object(doc))
}

pub fn write_json(path: &Path, value: &Value) -> Result<()> {
    let text = serde_json::to_vec_pretty(value)
        .map_err(|e| ConnectorError::io(format!("encoding {}", path.display()), e.into()))?;
    std::fs::write(path, text)
        .map_err(|e| ConnectorError::io(format!("writing {}", path.display()), e))
}
