//! Closed sets of the job life cycle.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

macro_rules! string_enum {
    ($(#[$m:meta])* $name:ident { $($variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        pub enum $name {
            $(#[serde(rename = $text)] $variant),+
        }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($text => Ok($name::$variant),)+
                    other => Err(format!(
                        "'{other}' is not a valid {}; expected one of: {}",
                        stringify!($name),
                        [$($text),+].join(", ")
                    )),
                }
            }
        }
    };
}

string_enum!(
    /// The `job_state` of a job.
    JobState {
        Waiting = "waiting",
        Running = "running",
        Setup = "setup",
        Provision = "provision",
        FirmwareUpdate = "firmware_update",
        Test = "test",
        Allocate = "allocate",
        Allocated = "allocated",
        Reserve = "reserve",
        Cleanup = "cleanup",
        Cancelled = "cancelled",
        Complete = "complete",
    }
);

impl JobState {
    /// The states a writer (an agent) may report, comma-separated, for error messages:
    /// every state after `waiting` and `running` (those the server sets itself).
    pub fn reportable() -> String {
        JobState::ALL
            .iter()
            .filter(|s| s.rank() > 1)
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// `complete` and `cancelled` end a job; upstream also writes `completed`.
    pub fn is_terminal(self) -> bool {
        matches!(self, JobState::Cancelled | JobState::Complete)
    }

    /// Place in the life cycle: `waiting` < `running` < the phase states in phase order
    /// < `complete` = `cancelled`. States only move forward.
    pub fn rank(self) -> u8 {
        match self {
            JobState::Waiting => 0,
            JobState::Running => 1,
            JobState::Setup => 2,
            JobState::Provision => 3,
            JobState::FirmwareUpdate => 4,
            JobState::Test => 5,
            JobState::Allocate => 6,
            JobState::Allocated => 7,
            JobState::Reserve => 8,
            JobState::Cleanup => 9,
            JobState::Cancelled | JobState::Complete => 10,
        }
    }

    /// The state machine for writers (agents reporting `job_state`): the states from which
    /// a job may move to `self`. `waiting` and `running` are set by the server only (submit,
    /// claim, reaper), so a writer asking for them gets an error naming what is accepted.
    /// A job moves forward only, and never out of `complete` or `cancelled`.
    pub fn reported_from(self) -> Result<Vec<JobState>, String> {
        if matches!(self, JobState::Waiting | JobState::Running) {
            return Err(format!(
                "'{self}' is set by the server only; an agent may report one of: {}",
                JobState::reportable()
            ));
        }
        Ok(JobState::ALL
            .iter()
            .copied()
            .filter(|from| from.rank() >= 1 && !from.is_terminal() && (from.rank() < self.rank()))
            .collect())
    }

    /// Parses a state as agents and old servers write it (`completed` = `complete`).
    pub fn parse_lenient(s: &str) -> Option<JobState> {
        if s == "completed" {
            return Some(JobState::Complete);
        }
        s.parse().ok()
    }
}

string_enum!(
    /// A phase of a job as the agent runs it, in order.
    Phase {
        Setup = "setup",
        Provision = "provision",
        FirmwareUpdate = "firmware_update",
        Test = "test",
        Allocate = "allocate",
        Reserve = "reserve",
        Cleanup = "cleanup",
    }
);

impl Phase {
    /// The job section that drives this phase, if any (`setup` and `cleanup` have none).
    pub fn data_key(self) -> Option<&'static str> {
        match self {
            Phase::Provision => Some("provision_data"),
            Phase::FirmwareUpdate => Some("firmware_update_data"),
            Phase::Test => Some("test_data"),
            Phase::Allocate => Some("allocate_data"),
            Phase::Reserve => Some("reserve_data"),
            Phase::Setup | Phase::Cleanup => None,
        }
    }

    /// The job state posted when this phase starts.
    pub fn job_state(self) -> JobState {
        match self {
            Phase::Setup => JobState::Setup,
            Phase::Provision => JobState::Provision,
            Phase::FirmwareUpdate => JobState::FirmwareUpdate,
            Phase::Test => JobState::Test,
            Phase::Allocate => JobState::Allocate,
            Phase::Reserve => JobState::Reserve,
            Phase::Cleanup => JobState::Cleanup,
        }
    }
}

string_enum!(
    /// The state of an agent as the server records it.
    AgentState {
        Waiting = "waiting",
        Setup = "setup",
        Provision = "provision",
        FirmwareUpdate = "firmware_update",
        Test = "test",
        Allocate = "allocate",
        Allocated = "allocated",
        Reserve = "reserve",
        Cleanup = "cleanup",
        Offline = "offline",
        Maintenance = "maintenance",
        Restart = "restart",
        Lost = "lost",
        Unknown = "unknown",
    }
);

impl AgentState {
    /// The one availability rule, for everything that counts agents (the server's
    /// estimates and views, the CLI's queue status and submit check, the web UI): an
    /// agent in this state takes new jobs, now (`waiting`) or once its job ends (a
    /// phase state). `offline`, `maintenance` and `restart` (an operator's), `lost` (the
    /// server's: its lease expired) and `unknown` take none.
    pub fn takes_jobs(self) -> bool {
        !matches!(
            self,
            AgentState::Offline
                | AgentState::Maintenance
                | AgentState::Restart
                | AgentState::Lost
                | AgentState::Unknown
        )
    }

    /// [`AgentState::takes_jobs`] for a state as stored in an agent record; a missing,
    /// empty or unknown one takes no job.
    pub fn record_takes_jobs(raw: Option<&str>) -> bool {
        raw.and_then(|s| s.parse::<AgentState>().ok())
            .is_some_and(AgentState::takes_jobs)
    }

    /// The part of the rule an agent applies to itself: an operator holds it (`offline`,
    /// `maintenance`), so it takes no job until released. (`restart` makes it restart
    /// once idle, and `lost` is the server's guess about it: a live agent that reads
    /// either goes on.)
    pub fn blocks_jobs(self) -> bool {
        matches!(self, AgentState::Offline | AgentState::Maintenance)
    }
}

string_enum!(
    /// The two log streams of a job.
    LogType {
        Output = "output",
        Serial = "serial",
    }
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writers_move_states_forward_only() {
        assert!(JobState::Waiting.reported_from().is_err());
        assert!(JobState::Running.reported_from().is_err());
        let to_test = JobState::Test.reported_from().unwrap_or_default();
        assert!(to_test.contains(&JobState::Running));
        assert!(to_test.contains(&JobState::Provision));
        assert!(!to_test.contains(&JobState::Cleanup));
        assert!(!to_test.contains(&JobState::Waiting));
        let to_complete = JobState::Complete.reported_from().unwrap_or_default();
        assert!(to_complete.contains(&JobState::Cleanup));
        assert!(!to_complete.contains(&JobState::Cancelled));
        assert!(
            JobState::Setup
                .reported_from()
                .unwrap_or_default()
                .iter()
                .all(|s| *s == JobState::Running)
        );
    }

    #[test]
    fn one_availability_rule() {
        let takes: Vec<&str> = AgentState::ALL
            .iter()
            .filter(|s| s.takes_jobs())
            .map(|s| s.as_str())
            .collect();
        assert_eq!(
            takes,
            [
                "waiting",
                "setup",
                "provision",
                "firmware_update",
                "test",
                "allocate",
                "allocated",
                "reserve",
                "cleanup"
            ]
        );
        assert!(!AgentState::record_takes_jobs(None));
        assert!(!AgentState::record_takes_jobs(Some("")));
        assert!(!AgentState::record_takes_jobs(Some("bogus")));
        assert!(AgentState::record_takes_jobs(Some("test")));
        assert!(
            AgentState::ALL
                .iter()
                .all(|s| !s.blocks_jobs() || !s.takes_jobs())
        );
    }

    #[test]
    fn round_trip() {
        for s in JobState::ALL {
            assert_eq!(s.as_str().parse::<JobState>(), Ok(*s));
        }
        assert_eq!(
            JobState::parse_lenient("completed"),
            Some(JobState::Complete)
        );
        assert!("bogus".parse::<Phase>().is_err());
        assert_eq!(
            serde_json::to_string(&Phase::FirmwareUpdate)
                .ok()
                .as_deref(),
            Some("\"firmware_update\"")
        );
    }
}
