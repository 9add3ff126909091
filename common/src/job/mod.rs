//! The job definition: the body of `POST /v1/job`, the message on a job queue, and the
//! `testflinger.json` an agent writes for its phases.
//!
//! Parsing is strict like upstream Testflinger (unknown keys are rejected and named), with
//! two deliberate differences: `test_cmds` may be a list of strings, and `skip` is allowed
//! in `test_data` and `reserve_data` (the agent honours it everywhere).

mod bounds;
mod provision;
mod ssh;
mod validation;

pub use bounds::{JobBounds, check_bounds};
pub use provision::validate_provision_data;
pub use ssh::SshKey;
pub use validation::{ValidationError, describe_value, deserialize, kind_of};

use crate::duration::parse_duration;
use crate::queue::validate_queue_name;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use uuid::Uuid;

/// A job id: any UUID form Python's `uuid.UUID` takes (hyphens optional, braces, urn),
/// always written hyphenated in lower case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobId(pub Uuid);

impl JobId {
    pub fn new() -> Self {
        JobId(Uuid::new_v4())
    }
}

impl Default for JobId {
    fn default() -> Self {
        Self::new()
    }
}

impl FromStr for JobId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Uuid::parse_str(s.trim())
            .map(JobId)
            .map_err(|_| format!("'{s}' is not a valid job id (expected a UUID)"))
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.hyphenated())
    }
}

impl Serialize for JobId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for JobId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(|_| {
            serde::de::Error::custom(format!(
                "got {}; accepted: a job id (a UUID such as 00000000-0000-0000-0000-000000000000)",
                describe_value(&Value::String(s.clone()))
            ))
        })
    }
}

/// `test_cmds`: one shell script, or a list of commands run one after another.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum TestCmds {
    Script(String),
    List(Vec<String>),
}

impl<'de> Deserialize<'de> for TestCmds {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = TestCmds;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string or a list of strings")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<TestCmds, E> {
                Ok(TestCmds::Script(v.to_string()))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<TestCmds, A::Error> {
                let mut out = Vec::new();
                while let Some(item) = seq.next_element::<Value>()? {
                    match item {
                        Value::String(s) => out.push(s),
                        other => {
                            return Err(serde::de::Error::custom(format!(
                                "got {} in the list; accepted: a string or a list of strings",
                                describe_value(&other)
                            )));
                        }
                    }
                }
                Ok(TestCmds::List(out))
            }
        }
        d.deserialize_any(V)
    }
}

/// A file the agent fetches into `attachments/<phase>/` before the job runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Attachment {
    pub agent: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestData {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_cmds: Option<TestCmds>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attachments: Option<Vec<Attachment>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_password: Option<String>,
    /// Environment variable name -> secret path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secrets: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skip: Option<bool>,
}

/// Seconds, written either as an integer or as a duration string such as `2h30m`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Seconds(pub u64);

impl<'de> Deserialize<'de> for Seconds {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Str(String),
            Other(Value),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(Seconds(n)),
            Raw::Str(s) => parse_duration(&s).map(Seconds).map_err(|e| {
                serde::de::Error::custom(format!(
                    "got {} ({e}); accepted: a whole number of seconds or a duration such as '2h30m'",
                    describe_value(&Value::String(s.clone()))
                ))
            }),
            Raw::Other(v) => Err(serde::de::Error::custom(format!(
                "got {}; accepted: a whole number of seconds or a duration such as '2h30m'",
                describe_value(&v)
            ))),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReserveData {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_keys: Option<Vec<SshKey>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Seconds>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skip: Option<bool>,
}

impl ReserveData {
    /// Reservation length when the job gives none, as upstream.
    pub const DEFAULT_TIMEOUT: u64 = 3600;

    pub fn timeout_secs(&self) -> u64 {
        self.timeout.map_or(Self::DEFAULT_TIMEOUT, |s| s.0)
    }
}

/// A job definition, validated.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Job {
    pub job_queue: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<JobId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_job_id: Option<JobId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub global_timeout: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_timeout: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocation_timeout: Option<u64>,
    /// `null` (no provisioning) or an object whose shape depends on the device type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provision_data: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware_update_data: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_data: Option<TestData>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocate_data: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reserve_data: Option<ReserveData>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_status_webhook: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_priority: Option<i64>,
    #[serde(default)]
    pub exclude_agents: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub debug: Option<bool>,
}

/// Highest and lowest accepted `job_priority`.
pub const MAX_JOB_PRIORITY: i64 = 1 << 20;

impl Job {
    /// Parses and validates a job from JSON, naming the first offending field.
    pub fn from_value(value: Value) -> Result<Job, ValidationError> {
        if !value.is_object() {
            return Err(ValidationError::new(
                "",
                format!("a job must be a JSON object, got {}", kind_of(&value)),
            ));
        }
        // Sections read into structs must be objects (or null): serde would otherwise read
        // a struct from an array, field by field in order.
        let section = |v: Option<&Value>, field: &str| match v {
            None | Some(Value::Null) | Some(Value::Object(_)) => Ok(()),
            Some(other) => Err(ValidationError::new(
                field,
                format!("got {}; accepted: an object", kind_of(other)),
            )),
        };
        section(value.get("test_data"), "test_data")?;
        section(value.get("reserve_data"), "reserve_data")?;
        if let Some(Value::Array(items)) = value.pointer("/test_data/attachments") {
            for (i, item) in items.iter().enumerate() {
                section(Some(item), &format!("test_data.attachments[{i}]"))?;
            }
        }
        let job: Job = deserialize(value)?;
        job.validate()?;
        Ok(job)
    }

    /// Parses a job from JSON text.
    pub fn from_json(text: &[u8]) -> Result<Job, ValidationError> {
        let value: Value = serde_json::from_slice(text)
            .map_err(|e| ValidationError::new("", format!("invalid JSON: {e}")))?;
        Job::from_value(value)
    }

    fn validate(&self) -> Result<(), ValidationError> {
        validate_queue_name(&self.job_queue).map_err(|m| ValidationError::new("job_queue", m))?;
        if let Some(p) = &self.provision_data {
            validate_provision_data(p)?;
        }
        if let Some(p) = self.job_priority
            && !(0..=MAX_JOB_PRIORITY).contains(&p)
        {
            return Err(ValidationError::new(
                "job_priority",
                format!("must be between 0 and {MAX_JOB_PRIORITY}, got {p}"),
            ));
        }
        if let Some(tags) = &self.tags
            && let Some(i) = tags.iter().position(|t| t.is_empty())
        {
            return Err(ValidationError::new(
                format!("tags.{i}"),
                "tags must not be empty",
            ));
        }
        if let Some(secrets) = self.test_data.as_ref().and_then(|t| t.secrets.as_ref()) {
            for (name, path) in secrets {
                let name_ok = name
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                    && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                if !name_ok {
                    return Err(ValidationError::new(
                        format!("test_data.secrets.{name}"),
                        "not a valid environment variable name",
                    ));
                }
                if path.is_empty()
                    || !path
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "_/-".contains(c))
                {
                    return Err(ValidationError::new(
                        format!("test_data.secrets.{name}"),
                        format!("'{path}' is not a valid secret path"),
                    ));
                }
            }
        }
        if let Some(url) = &self.job_status_webhook
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(ValidationError::new(
                "job_status_webhook",
                "must be an http:// or https:// URL",
            ));
        }
        Ok(())
    }

    /// The job as JSON, normalised (durations in seconds, `exclude_agents` present).
    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }

    /// Whether any phase section lists attachments (then the job waits for an upload).
    pub fn has_attachments(&self) -> bool {
        let in_map = |m: Option<&Map<String, Value>>| {
            m.and_then(|m| m.get("attachments"))
                .is_some_and(|a| a.as_array().is_some_and(|a| !a.is_empty()))
        };
        self.test_data
            .as_ref()
            .and_then(|t| t.attachments.as_ref())
            .is_some_and(|a| !a.is_empty())
            || in_map(self.provision_data.as_ref().and_then(Value::as_object))
            || in_map(self.firmware_update_data.as_ref())
    }

    /// `job_priority`, 0 when absent.
    pub fn priority(&self) -> i64 {
        self.job_priority.unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn minimal_job() {
        let job = Job::from_value(json!({"job_queue": "q", "test_data": {"test_cmds": "echo hi"}}));
        let job = job.expect("valid");
        assert_eq!(job.job_queue, "q");
        assert_eq!(job.to_value()["exclude_agents"], json!([]));
    }
    #[test]
    fn unknown_fields_are_named() {
        let e = Job::from_value(json!({"job_queue": "q", "bogus": 1})).expect_err("invalid");
        assert_eq!(e.field, "bogus");
        let e = Job::from_value(json!({"job_queue": "q", "test_data": {"nope": 1}}))
            .expect_err("invalid");
        assert_eq!(e.field, "test_data.nope");
        assert_eq!(
            e.detail(),
            json!({"json": {"test_data": {"nope": [e.message.clone()]}}})
        );
        let e = Job::from_value(json!({"job_queue": "q", "reserve_data": {"x": 1}}))
            .expect_err("invalid");
        assert_eq!(e.field, "reserve_data.x");
    }
    #[test]
    fn test_cmds_list_and_string() {
        let j = Job::from_value(json!({"job_queue": "q", "test_data": {"test_cmds": ["a", "b"]}}))
            .expect("list");
        assert_eq!(
            j.test_data.and_then(|t| t.test_cmds),
            Some(TestCmds::List(vec!["a".into(), "b".into()]))
        );
        assert!(Job::from_value(json!({"job_queue": "q", "test_data": {"test_cmds": 5}})).is_err());
    }
    #[test]
    fn reserve_data() {
        let j = Job::from_value(json!({"job_queue": "q", "reserve_data": {
            "ssh_keys": ["lp:alice", "gh:bob", "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG9x me@host"],
            "timeout": "2h30m"}}))
        .expect("valid");
        let r = j.reserve_data.clone().expect("reserve");
        assert_eq!(r.timeout_secs(), 9000);
        assert_eq!(j.to_value()["reserve_data"]["timeout"], json!(9000));
        let e =
            Job::from_value(json!({"job_queue": "q", "reserve_data": {"ssh_keys": ["xx:bob"]}}))
                .expect_err("invalid");
        assert_eq!(e.field, "reserve_data.ssh_keys[0]");
        let e =
            Job::from_value(json!({"job_queue": "q", "reserve_data": {"timeout": "5 parsecs"}}))
                .expect_err("invalid");
        assert_eq!(e.field, "reserve_data.timeout");
    }
    #[test]
    fn queue_and_types() {
        assert_eq!(
            Job::from_value(json!({})).expect_err("invalid").field,
            "job_queue"
        );
        assert_eq!(
            Job::from_value(json!({"job_queue": ""}))
                .expect_err("invalid")
                .field,
            "job_queue"
        );
        assert_eq!(
            Job::from_value(json!({"job_queue": "amq.x"}))
                .expect_err("invalid")
                .field,
            "job_queue"
        );
        assert_eq!(
            Job::from_value(json!({"job_queue": "q", "global_timeout": "x"}))
                .expect_err("invalid")
                .field,
            "global_timeout"
        );
        assert!(Job::from_value(json!({"job_queue": "q", "provision_data": null})).is_ok());
        assert_eq!(
            Job::from_value(json!({"job_queue": "q", "provision_data": 3}))
                .expect_err("invalid")
                .field,
            "provision_data"
        );
        assert_eq!(
            Job::from_value(json!({"job_queue": "q", "job_id": "nope"}))
                .expect_err("invalid")
                .field,
            "job_id"
        );
        assert!(Job::from_value(json!([1])).is_err());
    }
    #[test]
    fn attachments_detected() {
        let j = Job::from_value(
            json!({"job_queue": "q", "test_data": {"attachments": [{"agent": "a.txt"}]}}),
        )
        .expect("valid");
        assert!(j.has_attachments());
        let j = Job::from_value(
            json!({"job_queue": "q", "provision_data": {"attachments": [{"agent": "x"}]}}),
        )
        .expect("valid");
        assert!(j.has_attachments());
    }
    #[test]
    fn job_ids() {
        let a: JobId = "6ba7b8109dad11d180b400c04fd430c8".parse().expect("simple");
        let b: JobId = "{6ba7b810-9dad-11d1-80b4-00c04fd430c8}"
            .parse()
            .expect("braced");
        assert_eq!(a, b);
        assert_eq!(a.to_string(), "6ba7b810-9dad-11d1-80b4-00c04fd430c8");
        assert!("zzz".parse::<JobId>().is_err());
    }
}
