//! The stages of the connector command line.

use std::fmt;
use std::str::FromStr;

/// A connector stage. `runtest` is the agent's `test` phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Provision,
    FirmwareUpdate,
    RunTest,
    Allocate,
    Reserve,
    Cleanup,
}

impl Stage {
    pub const ALL: &'static [Stage] = &[
        Stage::Provision,
        Stage::FirmwareUpdate,
        Stage::RunTest,
        Stage::Allocate,
        Stage::Reserve,
        Stage::Cleanup,
    ];

    /// The name on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Provision => "provision",
            Stage::FirmwareUpdate => "firmware_update",
            Stage::RunTest => "runtest",
            Stage::Allocate => "allocate",
            Stage::Reserve => "reserve",
            Stage::Cleanup => "cleanup",
        }
    }

    /// The agent's phase name: prefix of `<phase>-serial.log` and of
    /// `<phase>_exception_info` (the agent reads both by phase name).
    pub fn phase(self) -> &'static str {
        match self {
            Stage::RunTest => "test",
            other => other.as_str(),
        }
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Stage {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Stage::ALL
            .iter()
            .copied()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Stage::ALL.iter().map(|s| s.as_str()).collect();
                format!("unknown stage '{s}'; expected one of: {}", names.join(", "))
            })
    }
}
