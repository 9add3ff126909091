//! Field names of `#[derive(Deserialize)]` structs, and the documentation check built on
//! them.
//!
//! The documentation's reference pages (`docs/src/reference/*.md`) must name every job
//! field, server setting, agent key and device key. Each crate's test enumerates its own
//! keys with [`struct_fields`] and checks them with [`check_documented`], so a field added
//! in code without a line in the reference fails `cargo test` with a message naming the
//! field, its source file and the page to add it to.

use serde::Deserialize;
use serde::de::{self, Visitor};
use std::fmt;

/// The field names serde's derive passes to `deserialize_struct`, in declaration order
/// (after `#[serde(rename)]`), or `None` when `T` is not a plain derived struct (a map,
/// an enum, or a struct with `#[serde(flatten)]`, which derive reads as a map).
///
/// Nested structs are not followed: call this once per struct type.
pub fn struct_fields<T: for<'de> Deserialize<'de>>() -> Option<&'static [&'static str]> {
    match T::deserialize(FieldProbe) {
        Err(Probe(fields)) => fields,
        Ok(_) => None,
    }
}

/// The first `#[derive(Deserialize)]` struct's field names, as written in the source
/// text of `struct_name` (for structs [`struct_fields`] cannot read, such as those with
/// a `#[serde(flatten)]` field, which is left out). Only `pub name:` lines count.
pub fn source_struct_fields(source: &str, struct_name: &str) -> Option<Vec<String>> {
    let start = source.find(&format!("pub struct {struct_name} {{"))?;
    let body = &source[start..];
    let end = body.find("\n}")?;
    let mut out = Vec::new();
    let mut flatten = false;
    for line in body[..end].lines().skip(1) {
        let line = line.trim();
        if line.starts_with("#[serde(flatten") {
            flatten = true;
            continue;
        }
        if let Some(rest) = line.strip_prefix("pub ")
            && let Some((name, _)) = rest.split_once(':')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            if !flatten {
                out.push(name.to_string());
            }
            flatten = false;
        }
    }
    Some(out)
}

/// Checks that `page_text` names every item of `items` in backticks (`` `name` ``).
///
/// `what` names the kind of item ("job field"), `source` where items are defined,
/// `page` the page to add them to. On failure the message lists every missing item and
/// says where to add it.
pub fn check_documented(
    page_text: &str,
    items: &[String],
    what: &str,
    source: &str,
    page: &str,
) -> Result<(), String> {
    let missing: Vec<&String> = items
        .iter()
        .filter(|i| !page_text.contains(&format!("`{i}`")))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let list: Vec<String> = missing.iter().map(|m| format!("`{m}`")).collect();
    Err(format!(
        "the documentation is missing {n} {what}{s} defined in {source}: {list}.\n\
         Add a row naming each (in backticks, as written above) to the table in {page}.",
        n = missing.len(),
        s = if missing.len() == 1 { "" } else { "s" },
        list = list.join(", "),
    ))
}

#[derive(Debug)]
struct Probe(Option<&'static [&'static str]>);

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("field probe")
    }
}

impl std::error::Error for Probe {}

impl de::Error for Probe {
    fn custom<M: fmt::Display>(_: M) -> Self {
        Probe(None)
    }
}

struct FieldProbe;

impl<'de> de::Deserializer<'de> for FieldProbe {
    type Error = Probe;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Probe> {
        Err(Probe(None))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Probe> {
        Err(Probe(Some(fields)))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
        byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map
        enum identifier ignored_any
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    #[allow(dead_code)]
    struct Sample {
        a: u8,
        #[serde(rename = "bee")]
        b: Option<String>,
    }

    #[test]
    fn reads_the_fields_of_a_derived_struct() {
        assert_eq!(struct_fields::<Sample>(), Some(&["a", "bee"][..]));
        assert_eq!(
            struct_fields::<std::collections::BTreeMap<String, u8>>(),
            None
        );
    }

    #[test]
    fn reads_fields_from_source_text_without_the_flattened_one() {
        let src = "pub struct X {\n    pub one: u8,\n    /// doc\n    pub two: String,\n    \
                   #[serde(flatten)]\n    pub extra: Map,\n}\n";
        assert_eq!(
            source_struct_fields(src, "X"),
            Some(vec!["one".to_string(), "two".to_string()])
        );
        assert_eq!(source_struct_fields(src, "Y"), None);
    }

    #[test]
    fn names_what_is_missing_and_where_to_add_it() {
        let page = "| `a` | x |";
        let items = vec!["a".to_string(), "b".to_string()];
        assert!(check_documented(page, &items[..1], "key", "src.rs", "page.md").is_ok());
        let err = check_documented(page, &items, "key", "src.rs", "page.md").unwrap_err();
        assert!(
            err.contains("missing 1 key defined in src.rs: `b`"),
            "{err}"
        );
        assert!(err.contains("page.md"), "{err}");
    }
}
