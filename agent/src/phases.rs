//! The rules that differ per phase, in one `match`: whether the job asks for it, which
//! limits apply, whether a cancel interrupts it.

use crate::config::Config;
use serde_json::Value;
use testflinger_common::Phase;

/// Phases in the order they run; `cleanup` follows them always.
pub const ORDER: [Phase; 6] = [
    Phase::Setup,
    Phase::Provision,
    Phase::FirmwareUpdate,
    Phase::Test,
    Phase::Allocate,
    Phase::Reserve,
];

/// How a phase is run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rules {
    /// A cancel of the job kills it (upstream never interrupts provisioning).
    pub cancellable: bool,
    /// The per-phase global timeout applies (not to reserve: the connector enforces
    /// the reservation's own timeout).
    pub global_timeout: bool,
    /// The output timeout applies (test only).
    pub output_timeout: bool,
    /// A failure ends the job's phases (test failures do not).
    pub stops_on_failure: bool,
}

pub fn rules(phase: Phase) -> Rules {
    match phase {
        Phase::Setup | Phase::FirmwareUpdate | Phase::Allocate => Rules {
            cancellable: true,
            global_timeout: true,
            output_timeout: false,
            stops_on_failure: true,
        },
        Phase::Provision => Rules {
            cancellable: false,
            global_timeout: true,
            output_timeout: false,
            stops_on_failure: true,
        },
        Phase::Test => Rules {
            cancellable: true,
            global_timeout: true,
            output_timeout: true,
            stops_on_failure: false,
        },
        Phase::Reserve => Rules {
            cancellable: true,
            global_timeout: false,
            output_timeout: false,
            stops_on_failure: true,
        },
        Phase::Cleanup => Rules {
            cancellable: false,
            global_timeout: true,
            output_timeout: false,
            stops_on_failure: false,
        },
    }
}

/// Why a phase is skipped, or `None` when it runs.
pub fn skip_reason(cfg: &Config, job: &Value, phase: Phase) -> Option<&'static str> {
    if cfg.command(phase).trim().is_empty() {
        return Some("no command configured for this phase");
    }
    let key = phase.data_key()?;
    match job.get(key) {
        None | Some(Value::Null) => Some("the job has no data for this phase"),
        Some(Value::Object(m)) if m.is_empty() => Some("the job has no data for this phase"),
        Some(Value::Object(m)) if m.get("skip").and_then(Value::as_bool) == Some(true) => {
            Some("the job asks to skip this phase")
        }
        Some(Value::String(s)) if s.is_empty() => Some("the job has no data for this phase"),
        Some(Value::Array(a)) if a.is_empty() => Some("the job has no data for this phase"),
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::path::Path;

    fn cfg() -> Config {
        Config::from_yaml(
            "agent_id: a\nserver_address: s\njob_queues: [q]\nsetup_command: echo\ntest_command: run\n",
            Path::new("t.yaml"),
        )
        .expect("config")
    }

    #[test]
    fn skip_rules() {
        let c = cfg();
        let job = json!({"test_data": {"test_cmds": "x"}, "provision_data": {"skip": true}});
        assert_eq!(skip_reason(&c, &job, Phase::Setup), None);
        assert_eq!(skip_reason(&c, &job, Phase::Test), None);
        assert!(skip_reason(&c, &job, Phase::Cleanup).is_some());
        assert!(skip_reason(&c, &json!({}), Phase::Test).is_some());
        assert!(skip_reason(&c, &json!({"test_data": {"skip": true}}), Phase::Test).is_some());
    }

    #[test]
    fn only_test_stops_on_nothing() {
        assert!(!rules(Phase::Test).stops_on_failure);
        assert!(rules(Phase::Provision).stops_on_failure);
        assert!(!rules(Phase::Provision).cancellable);
        assert!(!rules(Phase::Reserve).global_timeout);
    }
}
