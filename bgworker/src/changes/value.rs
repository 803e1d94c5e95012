//! Typed JSON values compared with their column type's semantics: numbers
//! in numeric order (exactly, however long), text by bytes, uuids
//! case-insensitively, booleans, dates, and timestamps as instants whatever
//! their UTC offset; and timestamps rewritten in UTC for clients.

use crate::shared::keys::{civil_from_days, instant, json_string, Decimal, Kind};
use serde_json::Value;
use std::borrow::Cow;
use std::cmp::Ordering;

/// Compares two non-null values of one kind, each given as its JSON text
/// (as a captured row or a cast filter value has it); `None` when they
/// cannot be compared (malformed input), which filters treat as unknown.
/// Numbers are read from their text, so however long they compare exactly.
pub fn compare(kind: Kind, a: &str, b: &str) -> Option<Ordering> {
    match kind {
        Kind::Number => Some(Decimal::parse(&number_text(a)?)?.cmp(&Decimal::parse(&number_text(b)?)?)),
        Kind::Text | Kind::Date => Some(json_string(a)?.cmp(&json_string(b)?)),
        Kind::Uuid => Some(
            json_string(a)?
                .to_ascii_lowercase()
                .cmp(&json_string(b)?.to_ascii_lowercase()),
        ),
        Kind::Bool => Some(json_bool(a)?.cmp(&json_bool(b)?)),
        Kind::Timestamp | Kind::Timestamptz => Some(instant(&json_string(a)?)?.cmp(&instant(&json_string(b)?)?)),
        Kind::Other => Some(if same_json(a, b) {
            Ordering::Equal
        } else {
            Ordering::Less
        }),
    }
}

/// A number's text: the JSON number itself, or the string NaN and the
/// infinities arrive as.
fn number_text(json: &str) -> Option<Cow<'_, str>> {
    let json = json.trim();
    if json.starts_with('"') {
        json_string(json)
    } else {
        Some(Cow::Borrowed(json))
    }
}

fn json_bool(json: &str) -> Option<bool> {
    match json.trim() {
        "true" => Some(true),
        "false" => Some(false),
        _ => None,
    }
}

/// Whether two JSON texts are the same value (objects whatever their key
/// order). Numbers nested in them compare as f64: exact comparison is for
/// the number kinds.
fn same_json(a: &str, b: &str) -> bool {
    let (a, b) = (a.trim(), b.trim());
    a == b
        || matches!(
            (serde_json::from_str::<Value>(a), serde_json::from_str::<Value>(b)),
            (Ok(x), Ok(y)) if x == y
        )
}

/// Rewrites a `timestamptz` as UTC (`...+00:00`), so every event carries the
/// same offset whatever the writing session's TimeZone was. Other text is
/// returned unchanged.
pub fn timestamptz_to_utc(text: &str) -> String {
    match instant(text) {
        Some(i) if i != i128::MAX && i != i128::MIN => format_utc(i),
        _ => text.to_owned(),
    }
}

/// `YYYY-MM-DDTHH:MM:SS[.ffffff]+00:00` for microseconds since the epoch.
pub fn format_utc(micros: i128) -> String {
    let secs = micros.div_euclid(1_000_000) as i64;
    let frac = micros.rem_euclid(1_000_000) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    let mut out = format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    );
    if frac != 0 {
        let digits = format!("{frac:06}");
        out.push('.');
        out.push_str(digits.trim_end_matches('0'));
    }
    out.push_str("+00:00");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_that_only_looks_like_a_timestamp_is_not_one() {
        // labels of a user's enum named timestamptz, say: never a panic
        for text in [
            "2025-03-04T10:00:00+xé",
            "2025-03-04T10:00:00+é",
            "2025-03-04T10:00:00é",
            "2025-03-04T10:00:00.5€",
            "2025-03-04T10:00:00+1:2:3:4",
            "2025-03-04T10:00:00+123",
            "éé25-03-04T10:00:00+00",
            "2025-03-04T10:00:00-",
        ] {
            assert_eq!(instant(text), None, "{text}");
            assert_eq!(timestamptz_to_utc(text), text);
        }
        assert_eq!(
            instant("2025-03-04T10:00:00+05:30:15"),
            instant("2025-03-04T04:29:45+00:00")
        );
    }

    #[test]
    fn utc_normalisation_round_trips() {
        assert_eq!(
            timestamptz_to_utc("2025-03-04T11:11:12.345+01:00"),
            "2025-03-04T10:11:12.345+00:00"
        );
        // across midnight, a month and a year
        assert_eq!(
            timestamptz_to_utc("2025-01-01T00:30:00+02:00"),
            "2024-12-31T22:30:00+00:00"
        );
        assert_eq!(
            timestamptz_to_utc("2024-02-28T23:00:00-02:00"),
            "2024-02-29T01:00:00+00:00"
        );
        assert_eq!(
            timestamptz_to_utc("1969-12-31T23:59:59.999999-00:00"),
            "1969-12-31T23:59:59.999999+00:00"
        );
        assert_eq!(timestamptz_to_utc("infinity"), "infinity");
        assert_eq!(format_utc(0), "1970-01-01T00:00:00+00:00");
    }

    #[test]
    fn compare_by_kind() {
        assert_eq!(compare(Kind::Uuid, r#""ABC""#, r#""abc""#), Some(Ordering::Equal));
        assert_eq!(compare(Kind::Bool, "false", "true"), Some(Ordering::Less));
        assert_eq!(
            compare(Kind::Other, r#"{"a": 1, "b": 2}"#, r#"{"b":2,"a":1}"#),
            Some(Ordering::Equal)
        );
        assert_eq!(compare(Kind::Number, r#""x""#, "1"), None);
        assert_eq!(compare(Kind::Text, "1", r#""1""#), None);
        assert_eq!(compare(Kind::Text, r#""a\"b""#, r#""a\u0022b""#), Some(Ordering::Equal));
        // numbers from their text, exactly, however long
        let long = "12345678901234567890.000000000000000001";
        assert_eq!(
            compare(Kind::Number, long, "12345678901234567890"),
            Some(Ordering::Greater)
        );
        assert_eq!(compare(Kind::Number, r#""NaN""#, "1e300"), Some(Ordering::Greater));
        assert_eq!(
            compare(
                Kind::Timestamptz,
                r#""2025-01-01T01:00:00+01:00""#,
                r#""2025-01-01T00:00:00Z""#
            ),
            Some(Ordering::Equal)
        );
    }
}
