//! The library's error type and how each kind maps to an exit code and to the
//! `device-connector-error.json` entry the agent reports.

use std::path::PathBuf;

/// Exit code for "the device could not be recovered": the agent takes itself offline.
pub const EXIT_RECOVERY_FAILED: i32 = 46;

/// Everything a stage can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ConnectorError {
    /// The command line names an unknown device type or stage, or is malformed.
    #[error("{0}")]
    Usage(String),
    /// The device config file is missing or malformed.
    #[error("device config {}: {message}", path.display())]
    Config { path: PathBuf, message: String },
    /// The job file is missing or malformed.
    #[error("job file {}: {message}", path.display())]
    Job { path: PathBuf, message: String },
    /// The stage could not do its work; the device is still usable.
    #[error("{0}")]
    Provisioning(String),
    /// The device is in a state automation cannot fix (exit 46).
    #[error("{0}")]
    Recovery(String),
    /// SSH public keys could not be fetched from the key service.
    #[error("{0}")]
    KeyFetch(String),
    /// Talking to the Testflinger server failed.
    #[error("{0}")]
    Api(String),
    /// A local file or process operation failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl ConnectorError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        ConnectorError::Io {
            context: context.into(),
            source,
        }
    }

    /// The process exit code for this failure.
    pub fn exit_code(&self) -> i32 {
        match self {
            ConnectorError::Recovery(_) => EXIT_RECOVERY_FAILED,
            _ => 1,
        }
    }

    /// Upstream's exception class name, as written to `device-connector-error.json`.
    pub fn exception_name(&self) -> &'static str {
        match self {
            ConnectorError::Usage(_) => "UsageError",
            ConnectorError::Config { .. } => "ConfigError",
            ConnectorError::Job { .. } => "JobDataError",
            ConnectorError::Provisioning(_) => "ProvisioningError",
            ConnectorError::Recovery(_) => "RecoveryError",
            ConnectorError::KeyFetch(_) => "KeyFetchError",
            ConnectorError::Api(_) => "ServerError",
            ConnectorError::Io { .. } => "OSError",
        }
    }

    /// The underlying cause, when there is one.
    pub fn cause(&self) -> Option<String> {
        use std::error::Error;
        self.source().map(ToString::to_string)
    }
}

pub type Result<T, E = ConnectorError> = std::result::Result<T, E>;
