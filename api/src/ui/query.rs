//! The pages' query strings and path ids: parsing (by `serde_html_form`, which takes
//! repeated keys, `?state=a&state=b`, into lists) and the checks that answer a 400
//! page naming the field, what was given and what is accepted.

use super::UiError;
use actix_web::HttpRequest;
use serde::{Deserialize, Deserializer, de::DeserializeOwned};
use testflinger_common::JobId;

/// Parses the request's query string into `T`; 400 page naming the problem (an unknown
/// key). List fields (`Vec<String>`) take every value of a repeated key; single-valued
/// fields are read with [`last`].
pub fn query<T: DeserializeOwned>(req: &HttpRequest) -> Result<T, UiError> {
    serde_html_form::from_str(req.query_string())
        .map_err(|e| UiError::BadRequest(format!("invalid query: {e}")))
}

/// A single-valued field (`#[serde(default, deserialize_with = "last")]`): when its key
/// is repeated, the last value counts.
pub fn last<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(Vec::<String>::deserialize(d)?.pop())
}

/// Non-empty values, a comma-separated value split into its items.
pub fn items(v: &[String]) -> Vec<String> {
    v.iter()
        .flat_map(|s| s.split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// At most one value (after [`items`]); 400 when more are given.
pub fn one(field: &str, v: &[String]) -> Result<Option<String>, UiError> {
    let v = items(v);
    match v.as_slice() {
        [] => Ok(None),
        [x] => Ok(Some(x.clone())),
        _ => Err(UiError::BadRequest(format!(
            "{field}: give one value, not {} ({})",
            v.len(),
            v.join(", ")
        ))),
    }
}

/// A whole number from 0 to `max`; `default` when absent or empty.
pub fn number(field: &str, v: Option<&str>, default: usize, max: usize) -> Result<usize, UiError> {
    match v.map(str::trim).filter(|s| !s.is_empty()) {
        None => Ok(default),
        Some(s) => s
            .parse::<usize>()
            .ok()
            .filter(|n| *n <= max)
            .ok_or_else(|| {
                UiError::BadRequest(format!(
                    "{field}: '{s}' is not accepted; expected a whole number from 0 to {max}"
                ))
            }),
    }
}

pub fn valid_queue(field: &str, q: &str) -> Result<(), UiError> {
    testflinger_common::queue::validate_queue_name(q)
        .map_err(|e| UiError::BadRequest(format!("{field}: '{q}' is not a valid queue name: {e}")))
}

pub fn parse_job_id(raw: &str) -> Result<String, UiError> {
    raw.parse::<JobId>()
        .map(|id| id.to_string())
        .map_err(|_| UiError::BadRequest(format!("Invalid job id '{raw}': expected a UUID")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::test::TestRequest;

    #[derive(serde::Deserialize, Debug, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Q {
        #[serde(default)]
        state: Vec<String>,
        #[serde(default, deserialize_with = "last")]
        limit: Option<String>,
    }

    fn parse(qs: &str) -> Result<Q, UiError> {
        query(&TestRequest::with_uri(&format!("/jobs?{qs}")).to_http_request())
    }

    #[test]
    fn repeated_keys_lists_and_last_value() {
        let q = parse("state=a&state=b%2Cc&limit=1&limit=2&&").expect("parses");
        assert_eq!(q.state, ["a", "b,c"]);
        assert_eq!(q.limit.as_deref(), Some("2"));
        let q = parse("state&limit=").expect("parses");
        assert_eq!(q.state, [""]);
        assert_eq!(q.limit.as_deref(), Some(""));
        let q = parse("").expect("parses");
        assert_eq!(
            q,
            Q {
                state: vec![],
                limit: None
            }
        );
    }

    #[test]
    fn decodes_plus_percent_and_keeps_bad_escapes() {
        let q = parse("st%61te=a+b%20c&state=100%&state=%zz%C3%A9").expect("parses");
        assert_eq!(q.state, ["a b c", "100%", "%zzé"]);
    }

    #[test]
    fn unknown_key_is_a_400_naming_it() {
        let e = parse("colour=red").expect_err("unknown key");
        assert!(
            matches!(&e, UiError::BadRequest(m) if m.contains("colour")),
            "{e}"
        );
    }
}
