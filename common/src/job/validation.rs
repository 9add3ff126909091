//! Validation errors, and how a JSON value and serde's messages are put to a user.

use serde_json::{Map, Value};
use std::fmt;

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
    use super::super::Job;
    use serde_json::{Value, json};

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
}
