//! The IO-free core shared by every Testflinger component.
//!
//! Layout:
//! - [`job`]: the job definition schema (`POST /v1/job` body) and its validation.
//! - [`duration`]: `2h30m`-style durations.
//! - [`queue`]: queue-name rules.
//! - [`introspect`]: field names of config and schema structs, for the documentation check.
//! - [`state`]: `JobState`, `Phase`, `AgentState`, `LogType`.
//! - [`text`]: log text cut into fragments at character boundaries.
//! - [`protocol`]: bodies of our additions to the v1 API (claim, heartbeat, release) and
//!   the job event published on `testflinger.events`.
//!
//! Serializable types here are wire formats: change them as you would change a protocol.

pub mod duration;
pub mod introspect;
pub mod job;
pub mod protocol;
pub mod queue;
pub mod state;
pub mod text;

pub use job::{Job, JobId, ValidationError};
pub use state::{AgentState, JobState, LogType, Phase};
