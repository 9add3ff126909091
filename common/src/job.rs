//! The job definition: the body of `POST /v1/job`, the message on a job queue, and the
//! `testflinger.json` an agent writes for its phases.
//!
//! Parsing is strict like upstream Testflinger (unknown keys are rejected and named), with
//! two deliberate differences: `test_cmds` may be a list of strings, and `skip` is allowed
//! in `test_data` and `reserve_data` (the agent honours it everywhere).

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

/// A validation failure: which field, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidationError {
    /// Dotted path of the offending field (`""` for the whole document).
    pub field: String,
    pub message: String,
}

impl ValidationError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        ValidationError {
            field: field.into(),
            message: message.into(),
        }
    }

    /// Upstream's 422 `detail` shape: `{"json": {"a": {"b": ["msg"]}}}`.
    pub fn detail(&self) -> Value {
        let mut inner = Value::Array(vec![Value::String(self.message.clone())]);
        let path: Vec<&str> = if self.field.is_empty() {
            vec!["_schema"]
        } else {
            self.field.split('.').collect()
        };
        for part in path.iter().rev() {
            let mut m = Map::new();
            m.insert((*part).to_string(), inner);
            inner = Value::Object(m);
        }
        let mut top = Map::new();
        top.insert("json".into(), inner);
        Value::Object(top)
    }
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.field, self.message)
        }
    }
}

impl std::error::Error for ValidationError {}

/// Deserializes `T` from JSON, naming the offending field (dotted path) on failure.
pub fn deserialize<T: serde::de::DeserializeOwned>(value: Value) -> Result<T, ValidationError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." { String::new() } else { path };
        let message = plain_message(&e.into_inner().to_string());
        // serde names a missing field only in its message: put it in the path too.
        let field = match message
            .strip_prefix("missing field `")
            .and_then(|r| r.split('`').next())
        {
            Some(name) if field.is_empty() => name.to_string(),
            Some(name) => format!("{field}.{name}"),
            None => field,
        };
        ValidationError::new(field, message)
    })
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

/// How a JSON value is named in an error message: its kind and, when short, itself.
pub fn describe_value(v: &Value) -> String {
    let shown = v.to_string();
    let shown = if shown.chars().count() > 40 {
        format!("{}...", shown.chars().take(40).collect::<String>())
    } else {
        shown
    };
    match v {
        Value::Null => "null".into(),
        Value::Bool(_) => format!("the boolean {shown}"),
        Value::Number(_) => format!("the number {shown}"),
        Value::String(_) => format!("the string {shown}"),
        Value::Array(_) => format!("a list {shown}"),
        Value::Object(_) => format!("an object {shown}"),
    }
}

/// Rewrites serde's wording (`invalid type: string "2h", expected u64`) into what a user
/// reads: what was given and what is accepted (`got the string "2h"; accepted: a whole
/// number (0 or more)`). Other messages pass through.
fn plain_message(message: &str) -> String {
    let rest = message
        .strip_prefix("invalid type: ")
        .or_else(|| message.strip_prefix("invalid value: "))
        .or_else(|| message.strip_prefix("invalid length "));
    let Some(rest) = rest else {
        return message.to_string();
    };
    let Some((given, expected)) = rest.rsplit_once(", expected ") else {
        return message.to_string();
    };
    let given = match given.split_once(' ') {
        Some(("string", v)) => format!("the string {v}"),
        Some(("integer", v)) => format!("the number {}", v.trim_matches('`')),
        Some(("floating", v)) => format!(
            "the number {}",
            v.trim_start_matches("point ").trim_matches('`')
        ),
        Some(("boolean", v)) => format!("the boolean {}", v.trim_matches('`')),
        _ => match given {
            "sequence" => "a list".to_string(),
            "map" => "an object".to_string(),
            "null" | "unit value" => "null".to_string(),
            other => other.to_string(),
        },
    };
    let expected = match expected {
        "u64" | "u32" | "u16" | "u8" | "usize" => "a whole number (0 or more)".to_string(),
        "i64" | "i32" | "i16" | "i8" | "isize" => "a whole number".to_string(),
        "f64" | "f32" => "a number".to_string(),
        "a sequence" => "a list".to_string(),
        "a map" | "struct" => "an object".to_string(),
        other if other.starts_with("struct ") => "an object".to_string(),
        other => other.to_string(),
    };
    format!("got {given}; accepted: {expected}")
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

/// An SSH public key source for a reservation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SshKey {
    /// `lp:<user>`: the user's keys on Launchpad.
    Launchpad(String),
    /// `gh:<user>`: the user's keys on GitHub.
    GitHub(String),
    /// A literal OpenSSH public key line.
    Raw(String),
}

const RAW_KEY_TYPES: &[&str] = &[
    "ssh-ed25519",
    "ssh-rsa",
    "ssh-dss",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
];

impl FromStr for SshKey {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let user_ok = |u: &str| !u.is_empty() && !u.chars().any(char::is_whitespace);
        if let Some(u) = s.strip_prefix("lp:") {
            return if user_ok(u) {
                Ok(SshKey::Launchpad(u.into()))
            } else {
                Err(format!("'{s}' is not a valid key: 'lp:' needs a user name"))
            };
        }
        if let Some(u) = s.strip_prefix("gh:") {
            return if user_ok(u) {
                Ok(SshKey::GitHub(u.into()))
            } else {
                Err(format!("'{s}' is not a valid key: 'gh:' needs a user name"))
            };
        }
        let mut parts = s.split_whitespace();
        let kind = parts.next().unwrap_or_default();
        let blob = parts.next().unwrap_or_default();
        let b64 = |b: &str| {
            b.len() >= 16
                && b.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '+' || c == '/' || c == '=')
        };
        if RAW_KEY_TYPES.contains(&kind) && b64(blob) && !s.contains('\n') {
            Ok(SshKey::Raw(s.to_string()))
        } else {
            Err(format!(
                "'{}' is not a valid key: use lp:<user>, gh:<user> or an OpenSSH public key line",
                s.chars().take(40).collect::<String>()
            ))
        }
    }
}

impl fmt::Display for SshKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SshKey::Launchpad(u) => write!(f, "lp:{u}"),
            SshKey::GitHub(u) => write!(f, "gh:{u}"),
            SshKey::Raw(k) => f.write_str(k),
        }
    }
}

impl Serialize for SshKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SshKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
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

/// What a `provision_data` variant accepts: its keys (any other key rules the variant
/// out), the ones it requires, and a check of the values.
struct ProvisionVariant {
    name: &'static str,
    keys: &'static [&'static str],
    required: &'static [&'static str],
    check: fn(&Map<String, Value>) -> bool,
}

fn is_str(m: &Map<String, Value>, k: &str) -> bool {
    m.get(k).is_none_or(Value::is_string)
}

fn is_bool(m: &Map<String, Value>, k: &str) -> bool {
    m.get(k).is_none_or(Value::is_boolean)
}

fn objects(m: &Map<String, Value>, k: &str, min: usize) -> bool {
    m.get(k).is_none_or(|v| {
        v.as_array()
            .is_some_and(|a| a.len() >= min && a.iter().all(Value::is_object))
    })
}

/// The `provision_data` shapes of the device types, as upstream's server validates them
/// (reference section 2: "must fully validate against at least one variant"), with ours:
/// `qemu` takes `{url}` (cm3's shape) and `fake` prints whatever variant it gets.
const PROVISION_VARIANTS: &[ProvisionVariant] = &[
    ProvisionVariant {
        name: "cm3, qemu",
        keys: &["url"],
        required: &["url"],
        check: |m| is_str(m, "url"),
    },
    ProvisionVariant {
        name: "maas",
        keys: &["distro", "kernel", "user_data", "disks", "ephemeral"],
        required: &[],
        check: |m| {
            is_str(m, "distro")
                && is_str(m, "kernel")
                && is_str(m, "user_data")
                && objects(m, "disks", 0)
                && is_bool(m, "ephemeral")
        },
    },
    ProvisionVariant {
        name: "multi",
        keys: &["jobs"],
        required: &["jobs"],
        check: |m| objects(m, "jobs", 1),
    },
    ProvisionVariant {
        name: "muxpi",
        keys: &[
            "url",
            "use_attachment",
            "attachments",
            "create_user",
            "boot_check_url",
            "media",
        ],
        required: &[],
        check: |m| {
            (m.contains_key("url") || m.contains_key("use_attachment"))
                && is_str(m, "url")
                && objects(m, "attachments", 0)
                && m.get("media")
                    .is_none_or(|v| v.as_str().is_some_and(|s| s == "sd" || s == "usb"))
        },
    },
    ProvisionVariant {
        name: "noprovision",
        keys: &["skip"],
        required: &[],
        check: |m| is_bool(m, "skip"),
    },
    ProvisionVariant {
        name: "oem_autoinstall",
        keys: &[
            "url",
            "attachments",
            "token_file",
            "user_data",
            "redeploy_cfg",
            "authorized_keys",
            "control_host_iso_url",
            "control_host_iso_type",
            "update_user_data",
        ],
        required: &[],
        check: |m| is_str(m, "url") && objects(m, "attachments", 0),
    },
    ProvisionVariant {
        name: "oem_script",
        keys: &["url"],
        required: &["url"],
        check: |m| is_str(m, "url"),
    },
    ProvisionVariant {
        name: "control_host",
        keys: &[
            "provisioning_timeout",
            "url",
            "urls",
            "attachments",
            "use_attachment",
            "robot_tasks",
            "preset",
        ],
        required: &[],
        check: |m| {
            is_str(m, "url")
                && objects(m, "attachments", 0)
                && m.get("urls")
                    .is_none_or(|v| v.as_array().is_some_and(|a| a.iter().all(Value::is_string)))
        },
    },
];

/// `provision_data`: `null` (no provisioning) or an object that fully matches one of the
/// device types' shapes ([`PROVISION_VARIANTS`]); otherwise a 422 naming the field, what
/// was given and the accepted shapes.
pub fn validate_provision_data(p: &Value) -> Result<(), ValidationError> {
    let m = match p {
        Value::Null => return Ok(()),
        Value::Object(m) => m,
        other => {
            return Err(ValidationError::new(
                "provision_data",
                format!(
                    "got {}; accepted: null or an object of a device type's provision data",
                    describe_value(other)
                ),
            ));
        }
    };
    let fits = PROVISION_VARIANTS.iter().any(|v| {
        m.keys().all(|k| v.keys.contains(&k.as_str()))
            && v.required.iter().all(|r| m.contains_key(*r))
            && (v.check)(m)
    });
    if fits {
        return Ok(());
    }
    let shapes: Vec<String> = PROVISION_VARIANTS
        .iter()
        .map(|v| format!("{} {{{}}}", v.name, v.keys.join(", ")))
        .collect();
    Err(ValidationError::new(
        "provision_data",
        format!(
            "got {}, which matches no device type's provision data; accepted (all keys of one of): {}",
            describe_value(p),
            shapes.join("; ")
        ),
    ))
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

/// Bounds on a submitted job's size, so that what a client sends cannot grow the server
/// without bound (a job with 200 000 tags, each one a search index entry). The server
/// reads them from its settings; [`check_bounds`] applies them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobBounds {
    /// Most entries in `tags` (`TESTFLINGER_MAX_JOB_TAGS`).
    pub max_tags: usize,
    /// Most characters in one tag (`TESTFLINGER_MAX_JOB_TAG_CHARS`).
    pub max_tag_chars: usize,
    /// Most bytes of JSON in one top-level field, such as `test_data` or
    /// `provision_data` (`TESTFLINGER_MAX_JOB_FIELD_BYTES`).
    pub max_field_bytes: usize,
}

impl JobBounds {
    pub const DEFAULT_MAX_TAGS: usize = 100;
    pub const DEFAULT_MAX_TAG_CHARS: usize = 128;
    pub const DEFAULT_MAX_FIELD_BYTES: usize = 1 << 20;
}

impl Default for JobBounds {
    fn default() -> Self {
        JobBounds {
            max_tags: Self::DEFAULT_MAX_TAGS,
            max_tag_chars: Self::DEFAULT_MAX_TAG_CHARS,
            max_field_bytes: Self::DEFAULT_MAX_FIELD_BYTES,
        }
    }
}

/// Checks a job's JSON text against `bounds` without building the job: each top-level
/// field is only delimited (borrowed from `text`, not copied), so a refused body costs
/// no more memory than its bytes. The error names the field, what was given, the limit
/// and its server setting. A top-level key that is not a job field is refused here too
/// (with [`Job::from_value`]'s message), so a body of a million made-up keys is never
/// built into a map.
///
/// Text that is not a JSON object passes: [`Job::from_value`] names what is wrong with it.
pub fn check_bounds(text: &[u8], bounds: &JobBounds) -> Result<(), ValidationError> {
    let mut de = serde_json::Deserializer::from_slice(text);
    match serde::de::Deserializer::deserialize_map(&mut de, TopLevel(bounds)) {
        Ok(Some(e)) => Err(e),
        _ => Ok(()),
    }
}

/// Reads a job's top-level object for [`check_bounds`]: the first violation, if any.
struct TopLevel<'b>(&'b JobBounds);

impl<'de> serde::de::Visitor<'de> for TopLevel<'_> {
    type Value = Option<ValidationError>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(
        self,
        mut map: A,
    ) -> Result<Option<ValidationError>, A::Error> {
        let known = crate::introspect::struct_fields::<Job>().unwrap_or_default();
        let mut found = None;
        while let Some(key) = map.next_key::<Key<'de>>()? {
            let raw: &'de serde_json::value::RawValue = map.next_value()?;
            if found.is_none() {
                found = check_field(&key.0, raw, known, self.0);
            }
        }
        Ok(found)
    }
}

/// Counts a list's items without keeping them.
struct Count;

impl<'de> serde::de::Visitor<'de> for Count {
    type Value = usize;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a list")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<usize, A::Error> {
        let mut n = 0;
        while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {
            n += 1;
        }
        Ok(n)
    }
}

/// A key or a string, borrowed from the text when it holds no escapes.
#[derive(Deserialize)]
struct Key<'a>(#[serde(borrow)] std::borrow::Cow<'a, str>);

fn check_field(
    key: &str,
    raw: &serde_json::value::RawValue,
    known: &[&str],
    b: &JobBounds,
) -> Option<ValidationError> {
    if !known.contains(&key) {
        // The same message as a full parse gives for an unknown field.
        let mut one = Map::new();
        one.insert(key.to_string(), Value::Null);
        return deserialize::<Job>(Value::Object(one)).err();
    }
    if key == "tags"
        && let Some(e) = check_tags(raw.get(), b)
    {
        return Some(e);
    }
    let bytes = raw.get().len();
    (bytes > b.max_field_bytes).then(|| {
        ValidationError::new(
            key,
            format!(
                "got {bytes} bytes of JSON; accepted: at most {} bytes per top-level field (server setting TESTFLINGER_MAX_JOB_FIELD_BYTES)",
                b.max_field_bytes
            ),
        )
    })
}

/// `tags`: how many, then each one's length (only when the count is within bounds, so
/// 200 000 tags are counted, never read).
fn check_tags(raw: &str, b: &JobBounds) -> Option<ValidationError> {
    let mut de = serde_json::Deserializer::from_str(raw);
    let count = serde::de::Deserializer::deserialize_seq(&mut de, Count).ok()?;
    if count > b.max_tags {
        return Some(ValidationError::new(
            "tags",
            format!(
                "got {count} tags; accepted: at most {} tags (server setting TESTFLINGER_MAX_JOB_TAGS)",
                b.max_tags
            ),
        ));
    }
    let items: Vec<&serde_json::value::RawValue> = serde_json::from_str(raw).ok()?;
    items.iter().enumerate().find_map(|(i, item)| {
        let tag = serde_json::from_str::<Key<'_>>(item.get()).ok()?;
        let chars = tag.0.chars().count();
        (chars > b.max_tag_chars).then(|| {
            ValidationError::new(
                format!("tags.{i}"),
                format!(
                    "got a tag of {chars} characters; accepted: at most {} characters per tag (server setting TESTFLINGER_MAX_JOB_TAG_CHARS)",
                    b.max_tag_chars
                ),
            )
        })
    })
}

/// How a JSON value is named in error messages: "null", "a boolean", "an array", ...
pub fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
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
    fn every_field_names_what_was_given_and_what_is_accepted() {
        // (field path, a wrong value, what the message must say is accepted)
        let cases: &[(&str, Value, &str)] = &[
            ("job_queue", json!(5), "accepted: a string"),
            ("job_id", json!("nope"), "accepted: a job id"),
            ("job_id", json!(7), "accepted: a string"),
            ("parent_job_id", json!(true), "accepted: a string"),
            ("name", json!([1]), "accepted: a string"),
            ("tags", json!("x"), "accepted: a list"),
            ("tags", json!([1]), "accepted: a string"),
            (
                "global_timeout",
                json!("2h"),
                "accepted: a whole number (0 or more)",
            ),
            (
                "global_timeout",
                json!(-1),
                "accepted: a whole number (0 or more)",
            ),
            (
                "output_timeout",
                json!(1.5),
                "accepted: a whole number (0 or more)",
            ),
            (
                "allocation_timeout",
                json!({}),
                "accepted: a whole number (0 or more)",
            ),
            ("firmware_update_data", json!(5), "accepted: an object"),
            ("test_data", json!("x"), "accepted: an object"),
            (
                "test_data.test_cmds",
                json!(5),
                "accepted: a string or a list of strings",
            ),
            (
                "test_data.test_cmds",
                json!([1, 2]),
                "accepted: a string or a list of strings",
            ),
            ("test_data.attachments", json!({}), "accepted: a list"),
            ("test_data.test_username", json!(1), "accepted: a string"),
            ("test_data.test_password", json!(1), "accepted: a string"),
            ("test_data.secrets", json!([]), "accepted: an object"),
            ("test_data.skip", json!("yes"), "accepted: a boolean"),
            ("allocate_data", json!(1), "accepted: an object"),
            ("reserve_data", json!(1), "accepted: an object"),
            ("reserve_data.ssh_keys", json!("lp:x"), "accepted: a list"),
            (
                "reserve_data.timeout",
                json!(true),
                "accepted: a whole number of seconds",
            ),
            (
                "reserve_data.timeout",
                json!("soon"),
                "accepted: a whole number of seconds",
            ),
            ("reserve_data.skip", json!(1), "accepted: a boolean"),
            ("job_status_webhook", json!(1), "accepted: a string"),
            ("job_priority", json!("high"), "accepted: a whole number"),
            ("exclude_agents", json!("a"), "accepted: a list"),
            ("debug", json!("on"), "accepted: a boolean"),
        ];
        for (path, bad, accepted) in cases {
            let mut job = json!({"job_queue": "q"});
            let parts: Vec<&str> = path.split('.').collect();
            let mut at = &mut job;
            for p in &parts[..parts.len() - 1] {
                at = &mut at[*p];
                if at.is_null() {
                    *at = json!({});
                }
            }
            at[parts[parts.len() - 1]] = bad.clone();
            let err = Job::from_value(job).expect_err(path);
            assert!(err.field.starts_with(path), "{path}: field {err}");
            assert!(err.message.contains(accepted), "{path} = {bad}: {err}");
            assert!(err.message.contains("got "), "{path} = {bad}: {err}");
            assert!(!err.message.contains("untagged"), "{path}: {err}");
        }
    }

    #[test]
    fn provision_data_matches_a_device_types_shape() {
        for ok in [
            json!(null),
            json!({}),
            json!({"url": "http://x/img.qcow2"}),
            json!({"distro": "noble"}),
            json!({"distro": "noble", "ephemeral": true}),
            json!({"skip": true}),
            json!({"jobs": [{"job_queue": "a"}]}),
            json!({"use_attachment": "image.img", "media": "usb"}),
        ] {
            let job = json!({"job_queue": "q", "provision_data": ok});
            assert!(Job::from_value(job.clone()).is_ok(), "{job}");
        }
        for bad in [
            json!({"skip": true, "foo": 1}),
            json!({"jobs": []}),
            json!({"url": 5}),
            json!({"media": "floppy", "url": "x"}),
            json!("http://x"),
            json!({"distro": "noble", "ephemeral": "yes"}),
        ] {
            let job = json!({"job_queue": "q", "provision_data": bad});
            let e = Job::from_value(job.clone()).expect_err("refused");
            assert_eq!(e.field, "provision_data", "{job}");
            assert!(e.message.contains("accepted"), "{e}");
            assert!(e.message.contains("got "), "{e}");
        }
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

    fn bounds() -> JobBounds {
        JobBounds {
            max_tags: 3,
            max_tag_chars: 5,
            max_field_bytes: 64,
        }
    }

    fn bounded(v: &Value) -> Result<(), ValidationError> {
        check_bounds(v.to_string().as_bytes(), &bounds())
    }

    #[test]
    fn bounds_pass_what_fits() {
        assert!(bounded(&json!({"job_queue": "q", "tags": ["a", "b", "ccccc"]})).is_ok());
        let escaped = r#"{"job_queue": "q", "tags": ["\u00e9\u00e9\u00e9\u00e9\u00e9", "ééééé"]}"#;
        assert!(check_bounds(escaped.as_bytes(), &bounds()).is_ok());
        assert!(
            bounded(&json!({"job_queue": "q", "test_data": {"test_cmds": "x".repeat(40)}})).is_ok()
        );
        // Not a job object at all: left to the full parse, which names the problem.
        for text in ["[1]", "nope", "{\"tags\": 5}", "", "{\"tags\": [1, {}]}"] {
            assert!(check_bounds(text.as_bytes(), &bounds()).is_ok(), "{text}");
        }
        // The defaults let an ordinary job through.
        let tags: Vec<String> = (0..100).map(|i| format!("{i:0>128}")).collect();
        let job = json!({"job_queue": "q", "tags": tags, "test_data": {"test_cmds": "x".repeat(100_000)}});
        assert!(check_bounds(job.to_string().as_bytes(), &JobBounds::default()).is_ok());
    }

    #[test]
    fn bounds_name_the_field_what_was_given_the_limit_and_the_setting() {
        let e =
            bounded(&json!({"job_queue": "q", "tags": ["a", "b", "c", "d"]})).expect_err("tags");
        assert_eq!(e.field, "tags");
        assert!(e.message.contains("got 4 tags"), "{e}");
        assert!(e.message.contains("at most 3"), "{e}");
        assert!(e.message.contains("TESTFLINGER_MAX_JOB_TAGS"), "{e}");
        let e = bounded(&json!({"job_queue": "q", "tags": ["a", "toolong"]})).expect_err("tag");
        assert_eq!(e.field, "tags.1");
        assert!(e.message.contains("got a tag of 7 characters"), "{e}");
        assert!(e.message.contains("at most 5"), "{e}");
        assert!(e.message.contains("TESTFLINGER_MAX_JOB_TAG_CHARS"), "{e}");
        // Characters, not bytes; escapes count as the character they stand for.
        let escaped = r#"{"job_queue": "q", "tags": ["\u00e9\u00e9\u00e9\u00e9\u00e9\u00e9"]}"#;
        let e = check_bounds(escaped.as_bytes(), &bounds()).expect_err("tag");
        assert!(e.message.contains("6 characters"), "{e}");
        let e = bounded(&json!({"job_queue": "q", "test_data": {"test_cmds": "x".repeat(100)}}))
            .expect_err("size");
        assert_eq!(e.field, "test_data");
        assert!(e.message.contains("got 116 bytes"), "{e}");
        assert!(e.message.contains("at most 64 bytes"), "{e}");
        assert!(e.message.contains("TESTFLINGER_MAX_JOB_FIELD_BYTES"), "{e}");
        assert_eq!(
            e.detail(),
            json!({"json": {"test_data": [e.message.clone()]}})
        );
    }

    #[test]
    fn bounds_refuse_unknown_fields_as_the_full_parse_does() {
        let e = bounded(&json!({"job_queue": "q", "bogus": 1})).expect_err("unknown");
        let full = Job::from_value(json!({"job_queue": "q", "bogus": 1})).expect_err("unknown");
        assert_eq!(e, full);
    }

    #[test]
    fn bounds_count_many_tags_without_reading_them() {
        let tags: Vec<String> = (0..200_000).map(|i| format!("t{i}")).collect();
        let text = json!({"job_queue": "q", "tags": tags}).to_string();
        let e = check_bounds(text.as_bytes(), &JobBounds::default()).expect_err("too many");
        assert_eq!(e.field, "tags");
        assert!(e.message.contains("got 200000 tags"), "{e}");
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
