//! Durations as Testflinger writes them: a plain number of seconds, or a concatenation of
//! `<n><unit>` with unit `s|sec(s)|second(s)`, `m|min(s)|minute(s)`, `h|hour(s)`,
//! `d|day(s)`; case-insensitive, whitespace ignored, no negatives.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DurationError(pub String);

impl fmt::Display for DurationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for DurationError {}

/// Parses a duration string into seconds.
///
/// Fails on an empty string, a unit without a number, an unknown unit, or overflow.
pub fn parse_duration(input: &str) -> Result<u64, DurationError> {
    let s: String = input
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect::<String>()
        .to_ascii_lowercase();
    if s.is_empty() {
        return Err(DurationError("duration is empty".into()));
    }
    if s.chars().all(|c| c.is_ascii_digit()) {
        return s
            .parse::<u64>()
            .map_err(|_| DurationError(format!("duration '{input}' is too large")));
    }
    let mut total: u64 = 0;
    let mut rest = s.as_str();
    while !rest.is_empty() {
        let digits = rest.chars().take_while(|c| c.is_ascii_digit()).count();
        if digits == 0 {
            return Err(DurationError(format!(
                "invalid duration '{input}': expected a number before '{rest}'"
            )));
        }
        let n: u64 = rest[..digits]
            .parse()
            .map_err(|_| DurationError(format!("duration '{input}' is too large")))?;
        rest = &rest[digits..];
        let unit_len = rest.chars().take_while(|c| c.is_ascii_alphabetic()).count();
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let mult = match unit {
            "s" | "sec" | "secs" | "second" | "seconds" => 1,
            "m" | "min" | "mins" | "minute" | "minutes" => 60,
            "h" | "hr" | "hrs" | "hour" | "hours" => 3600,
            "d" | "day" | "days" => 86400,
            "" => {
                return Err(DurationError(format!(
                    "invalid duration '{input}': missing unit after {n}"
                )));
            }
            other => {
                return Err(DurationError(format!(
                    "invalid duration '{input}': unknown unit '{other}' (use s, m, h or d)"
                )));
            }
        };
        total = n
            .checked_mul(mult)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(|| DurationError(format!("duration '{input}' is too large")))?;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_forms() {
        assert_eq!(parse_duration("90"), Ok(90));
        assert_eq!(parse_duration("2h30m"), Ok(9000));
        assert_eq!(parse_duration("1 Day 2 hours"), Ok(93600));
        assert_eq!(parse_duration("45sec"), Ok(45));
        assert_eq!(parse_duration("3mins"), Ok(180));
    }

    #[test]
    fn rejects_bad() {
        assert!(parse_duration("").is_err());
        assert!(parse_duration("-5").is_err());
        assert!(parse_duration("h").is_err());
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("5").is_ok());
        assert!(parse_duration("10 5m").is_err() || parse_duration("10 5m") == Ok(105 * 60));
        assert!(parse_duration("99999999999999999999").is_err());
    }
}
