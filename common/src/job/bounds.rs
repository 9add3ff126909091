//! Bounds on a submitted job's size, checked on its JSON text before it is parsed.

use super::Job;
use super::validation::{ValidationError, deserialize};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::fmt;

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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
}
