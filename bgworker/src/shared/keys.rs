//! What a committing backend and the worker must agree on about a value:
//! the kind of its column (by type OID), and the canonical key of a value
//! given as JSON text (`json_key`), which the capture trigger's key filter
//! and the worker's equality index both use. Numbers are read from their
//! text, exactly; timestamps as instants whatever their offset.

use serde_json::Value;
use std::borrow::Cow;
use std::cmp::Ordering;

/// How values of a column compare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Number,
    Text,
    Uuid,
    Bool,
    Date,
    Timestamp,
    Timestamptz,
    /// Anything else: equality of the JSON value only.
    Other,
}

/// OIDs of the built-in types whose values pg_realtime treats by type
/// (fixed in PostgreSQL's catalog, `pg_type.dat`). A type is known by its
/// OID, never by its name: anyone may create a type named `timestamptz`
/// in another schema.
pub mod type_oid {
    pub const BOOL: u32 = 16;
    pub const BYTEA: u32 = 17;
    pub const CHAR: u32 = 18;
    pub const NAME: u32 = 19;
    pub const INT8: u32 = 20;
    pub const INT2: u32 = 21;
    pub const INT4: u32 = 23;
    pub const TEXT: u32 = 25;
    pub const OID: u32 = 26;
    pub const FLOAT4: u32 = 700;
    pub const FLOAT8: u32 = 701;
    pub const BPCHAR: u32 = 1042;
    pub const VARCHAR: u32 = 1043;
    pub const DATE: u32 = 1082;
    pub const TIMESTAMP: u32 = 1114;
    pub const TIMESTAMPTZ: u32 = 1184;
    pub const TIMESTAMPTZ_ARRAY: u32 = 1185;
    pub const NUMERIC: u32 = 1700;
    pub const UUID: u32 = 2950;
}

impl Kind {
    /// The kind of a column of the type with this OID.
    pub fn of_type_oid(oid: u32) -> Kind {
        use type_oid::*;
        match oid {
            INT2 | INT4 | INT8 | FLOAT4 | FLOAT8 | NUMERIC | OID => Kind::Number,
            TEXT | VARCHAR | BPCHAR | NAME | CHAR => Kind::Text,
            UUID => Kind::Uuid,
            BOOL => Kind::Bool,
            DATE => Kind::Date,
            TIMESTAMP => Kind::Timestamp,
            TIMESTAMPTZ => Kind::Timestamptz,
            _ => Kind::Other,
        }
    }

    /// Whether `lt`/`gt`/... make sense for this kind.
    pub fn is_ordered(self) -> bool {
        self != Kind::Other
    }
}

/// A value's canonical form for the equality index, owned: two values
/// have the same key exactly when [`crate::changes::value::compare`] finds them
/// equal ([`json_key`]).
pub fn index_key(kind: Kind, json: &str) -> Option<String> {
    json_key(kind, json).map(Cow::into_owned)
}

/// The equality-index key of a value given as JSON text (`42`, `"a\"b"`,
/// `true`, as a captured row has it); None for `null` and for text that is
/// not a value of the kind. Borrowed from `json` for plain integers and
/// for strings without escapes, the usual filtered values, so matching a
/// row costs no allocation.
pub fn json_key(kind: Kind, json: &str) -> Option<Cow<'_, str>> {
    let json = json.trim();
    if json == "null" {
        return None;
    }
    match kind {
        // NaN and the infinities are JSON strings
        Kind::Number => match json_string(json) {
            Some(Cow::Borrowed(text)) => decimal_key(text),
            Some(Cow::Owned(text)) => decimal_key(&text).map(|k| Cow::Owned(k.into_owned())),
            None => decimal_key(json),
        },
        Kind::Text | Kind::Date => json_string(json),
        Kind::Uuid => json_string(json).map(|s| match s {
            s if s.bytes().any(|b| b.is_ascii_uppercase()) => Cow::Owned(s.to_ascii_lowercase()),
            s => s,
        }),
        Kind::Bool => match json {
            "true" | "false" => Some(Cow::Borrowed(json)),
            _ => None,
        },
        Kind::Timestamp | Kind::Timestamptz => json_string(json)
            .and_then(|s| instant(&s))
            .map(|i| Cow::Owned(i.to_string())),
        Kind::Other => serde_json::from_str::<Value>(json)
            .ok()
            .map(|v| Cow::Owned(v.to_string())),
    }
}

/// What a JSON string literal says: borrowed when it has no escapes; None
/// for any other JSON.
pub fn json_string(json: &str) -> Option<Cow<'_, str>> {
    let inner = json.trim().strip_prefix('"')?.strip_suffix('"')?;
    if inner.contains('\\') {
        serde_json::from_str::<String>(json.trim()).ok().map(Cow::Owned)
    } else {
        Some(Cow::Borrowed(inner))
    }
}

/// A decimal number, exactly: `0.digits × 10^exp`, with Postgres's order
/// for the special values (-Infinity < finite < Infinity < NaN).
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Decimal {
    NegInfinity,
    Finite { negative: bool, digits: Vec<u8>, exp: i64 },
    Infinity,
    NaN,
}

impl Decimal {
    pub(crate) fn parse(text: &str) -> Option<Decimal> {
        let text = text.trim();
        match text {
            "NaN" => return Some(Decimal::NaN),
            "Infinity" | "+Infinity" => return Some(Decimal::Infinity),
            "-Infinity" => return Some(Decimal::NegInfinity),
            _ => {}
        }
        let (negative, rest) = match text.as_bytes().first()? {
            b'-' => (true, &text[1..]),
            b'+' => (false, &text[1..]),
            _ => (false, text),
        };
        let (mantissa, exponent) = match rest.find(['e', 'E']) {
            Some(i) => (&rest[..i], rest[i + 1..].parse::<i64>().ok()?),
            None => (rest, 0),
        };
        let (int_part, frac_part) = mantissa.split_once('.').unwrap_or((mantissa, ""));
        if int_part.is_empty() && frac_part.is_empty() {
            return None;
        }
        if !int_part.bytes().chain(frac_part.bytes()).all(|b| b.is_ascii_digit()) {
            return None;
        }
        let mut digits: Vec<u8> = int_part.bytes().chain(frac_part.bytes()).map(|b| b - b'0').collect();
        // (leading zeros cut in one pass: a value may have thousands)
        let leading = digits.iter().take_while(|d| **d == 0).count();
        digits.drain(..leading);
        let trailing = digits.iter().rev().take_while(|d| **d == 0).count();
        digits.truncate(digits.len() - trailing);
        if digits.is_empty() {
            return Some(Decimal::Finite {
                negative: false,
                digits,
                exp: 0,
            });
        }
        // An exponent near i64's range is a malformed value, not an overflow.
        let exp = i64::try_from(int_part.len())
            .ok()?
            .checked_add(exponent)?
            .checked_sub(i64::try_from(leading).ok()?)?;
        Some(Decimal::Finite { negative, digits, exp })
    }
}

impl Ord for Decimal {
    fn cmp(&self, other: &Self) -> Ordering {
        use Decimal::*;
        let rank = |d: &Decimal| match d {
            NegInfinity => 0,
            Finite { .. } => 1,
            Infinity => 2,
            NaN => 3,
        };
        match (self, other) {
            (
                Finite {
                    negative: an,
                    digits: ad,
                    exp: ae,
                },
                Finite {
                    negative: bn,
                    digits: bd,
                    exp: be,
                },
            ) => {
                let sign = |neg: bool, digits: &Vec<u8>| {
                    if digits.is_empty() {
                        0
                    } else if neg {
                        -1
                    } else {
                        1
                    }
                };
                let (sa, sb) = (sign(*an, ad), sign(*bn, bd));
                if sa != sb || sa == 0 {
                    return sa.cmp(&sb);
                }
                let magnitude = ae.cmp(be).then_with(|| ad.cmp(bd));
                if sa > 0 {
                    magnitude
                } else {
                    magnitude.reverse()
                }
            }
            _ => rank(self).cmp(&rank(other)),
        }
    }
}

impl PartialOrd for Decimal {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Integers with up to this many digits are keyed as their own digits.
const INTEGER_KEY_DIGITS: i64 = 40;

/// A canonical text for a number: equal exactly when the numbers are equal
/// (`10`, `10.0` and `1e1` share one key). An integer of up to
/// [`INTEGER_KEY_DIGITS`] digits is its digits (`-100`), so a plain
/// integer, the usual filter value and row value, is its own key and is
/// borrowed; any other number is `digits e exponent` (`0.5` is `5e0`).
pub fn decimal_key(text: &str) -> Option<Cow<'_, str>> {
    let (negative, magnitude) = text.strip_prefix('-').map_or((false, text), |m| (true, m));
    if !magnitude.is_empty()
        && magnitude.len() <= INTEGER_KEY_DIGITS as usize
        && magnitude.bytes().all(|b| b.is_ascii_digit())
    {
        let significant = magnitude.trim_start_matches('0');
        return Some(if significant.is_empty() {
            Cow::Borrowed("0")
        } else if significant.len() == magnitude.len() {
            Cow::Borrowed(text)
        } else {
            Cow::Owned(format!("{}{significant}", if negative { "-" } else { "" }))
        });
    }
    Some(Cow::Owned(match Decimal::parse(text)? {
        Decimal::NaN => "NaN".into(),
        Decimal::Infinity => "Infinity".into(),
        Decimal::NegInfinity => "-Infinity".into(),
        Decimal::Finite { digits, .. } if digits.is_empty() => "0".into(),
        Decimal::Finite { negative, digits, exp } => {
            let sign = if negative { "-" } else { "" };
            let len = digits.len() as i64;
            let digits: String = digits.iter().map(|d| char::from(b'0' + d)).collect();
            if (len..=INTEGER_KEY_DIGITS).contains(&exp) {
                format!("{sign}{digits}{}", "0".repeat((exp - len) as usize))
            } else {
                format!("{sign}{digits}e{exp}")
            }
        }
    }))
}

/// Microseconds since 1970-01-01 UTC of an ISO-8601 timestamp as Postgres's
/// JSON output writes it (`2025-03-04T10:11:12.345+01:00`; no offset means
/// UTC, for `timestamp`). `infinity`/`-infinity` sort last/first.
pub fn instant(text: &str) -> Option<i128> {
    match text {
        "infinity" => return Some(i128::MAX),
        "-infinity" => return Some(i128::MIN),
        _ => {}
    }
    let b = text.as_bytes();
    let num = |range: std::ops::Range<usize>| -> Option<i64> { text.get(range)?.parse().ok() };
    if b.len() < 19 || b[4] != b'-' || b[7] != b'-' || !(b[10] == b'T' || b[10] == b' ') || b[13] != b':' {
        return None;
    }
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let mut pos = 19;
    let mut micros: i64 = 0;
    if b.get(pos) == Some(&b'.') {
        let start = pos + 1;
        let mut end = start;
        while end < b.len() && b[end].is_ascii_digit() {
            end += 1;
        }
        let frac = &text[start..end];
        let padded = format!("{:0<6}", &frac[..frac.len().min(6)]);
        micros = padded.parse().ok()?;
        pos = end;
    }
    let offset_secs: i64 = match text.get(pos..) {
        None | Some("") | Some("Z") => 0,
        Some(tz) => utc_offset_secs(tz)?,
    };
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second - offset_secs;
    Some(secs as i128 * 1_000_000 + micros as i128)
}

/// Seconds east of UTC of an offset as Postgres writes it: `+01`,
/// `-04:30`, `+05:30:15`. Anything else (a user type's text that merely
/// looks like a timestamp) is None.
fn utc_offset_secs(tz: &str) -> Option<i64> {
    let (sign, rest) = match tz.as_bytes().first()? {
        b'+' => (1, &tz[1..]),
        b'-' => (-1, &tz[1..]),
        _ => return None,
    };
    let mut parts = rest.split(':');
    let mut secs = 0;
    for scale in [3600, 60, 1] {
        match parts.next() {
            Some(p) if (1..=2).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()) => {
                secs += p.parse::<i64>().ok()? * scale;
            }
            Some(_) => return None,
            None => break,
        }
    }
    if parts.next().is_some() {
        return None;
    }
    Some(sign * secs)
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The proleptic Gregorian (year, month, day) of a day count since
/// 1970-01-01 (H. Hinnant's `civil_from_days`).
pub fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn num(a: &str, b: &str) -> Ordering {
        Decimal::parse(a).unwrap().cmp(&Decimal::parse(b).unwrap())
    }

    #[test]
    fn integer_keys_match_the_general_form() {
        // "N.0" goes through the full decimal parse; "N" through the
        // integer shortcut: the keys must agree.
        for n in [
            "0",
            "-0",
            "000",
            "7",
            "0042",
            "-100",
            "10",
            "120034000",
            "-9223372036854775808",
            "123456789012345678901234567890",
        ] {
            assert_eq!(decimal_key(n), decimal_key(&format!("{n}.0")), "{n}");
        }
        assert_eq!(decimal_key("-100").unwrap(), "-100");
        assert!(matches!(decimal_key("-100"), Some(Cow::Borrowed(_))));
        assert_eq!(decimal_key("-0042").unwrap(), "-42");
        assert_eq!(decimal_key("1e1"), decimal_key("10"));
        assert_eq!(decimal_key("1.5e1").unwrap(), "15");
        assert_eq!(decimal_key("0.5").unwrap(), "5e0");
        assert_eq!(decimal_key("-0.05").unwrap(), "-5e-1");
        // integers longer than the limit take the exponent form, however
        // they are written
        let big = format!("1{}", "0".repeat(45));
        assert_eq!(decimal_key(&big).unwrap(), "1e46");
        assert_eq!(decimal_key(&big), decimal_key(&format!("{big}.000")));
        assert_eq!(decimal_key(&big), decimal_key("1e45"));
        let limit = "9".repeat(40);
        assert_eq!(decimal_key(&limit).unwrap(), limit);
        assert_eq!(decimal_key(&format!("{limit}.0")).unwrap(), limit);
        assert_eq!(decimal_key(&format!("00{limit}")).unwrap(), limit);
        assert_ne!(decimal_key("5"), decimal_key("0.5"));
        assert_eq!(decimal_key("-"), None);
    }

    #[test]
    fn decimals_compare_exactly() {
        assert_eq!(num("10", "9"), Ordering::Greater);
        assert_eq!(num("10.0", "10"), Ordering::Equal);
        assert_eq!(num("0.1", "0.10000"), Ordering::Equal);
        assert_eq!(num("-5", "3"), Ordering::Less);
        assert_eq!(num("-5", "-30"), Ordering::Greater);
        assert_eq!(num("0", "-0.0"), Ordering::Equal);
        assert_eq!(
            num("12345678901234567890.000000000000000001", "12345678901234567890"),
            Ordering::Greater
        );
        assert_eq!(num("1e+20", "100000000000000000000"), Ordering::Equal);
        assert_eq!(num("1.5e-3", "0.0015"), Ordering::Equal);
        assert_eq!(num("NaN", "Infinity"), Ordering::Greater);
        assert_eq!(num("-Infinity", "-1e300"), Ordering::Less);
        assert_eq!(num("Infinity", "1e300"), Ordering::Greater);
        assert!(Decimal::parse("abc").is_none());
        assert!(Decimal::parse(".").is_none());
        assert!(Decimal::parse("1.2.3").is_none());
    }

    #[test]
    fn kinds_of_types() {
        assert_eq!(Kind::of_type_oid(type_oid::INT8), Kind::Number);
        assert_eq!(Kind::of_type_oid(type_oid::VARCHAR), Kind::Text);
        assert_eq!(Kind::of_type_oid(type_oid::TIMESTAMPTZ), Kind::Timestamptz);
        // jsonb, and a user's type (an enum named timestamptz, say)
        assert_eq!(Kind::of_type_oid(3802), Kind::Other);
        assert_eq!(Kind::of_type_oid(16_384), Kind::Other);
        assert!(!Kind::Other.is_ordered());
    }

    #[test]
    fn instants() {
        let utc = instant("2025-03-04T10:00:00+00:00").unwrap();
        assert_eq!(instant("2025-03-04T11:00:00+01:00"), Some(utc));
        assert_eq!(instant("2025-03-04T05:30:00-04:30"), Some(utc));
        assert_eq!(instant("2025-03-04T10:00:00Z"), Some(utc));
        assert_eq!(instant("2025-03-04 10:00:00+00"), Some(utc));
        assert_eq!(instant("2025-03-04T10:00:00.25+00:00"), Some(utc + 250_000));
        assert_eq!(instant("1970-01-01T00:00:00"), Some(0));
        assert!(instant("infinity").unwrap() > utc);
        assert!(instant("yesterday").is_none());
    }

    #[test]
    fn huge_numbers_are_linear_and_never_overflow() {
        // 16,000 leading zeros: cut in one pass (was quadratic)
        let zeros = format!("{}1", "0".repeat(16_000));
        let started = std::time::Instant::now();
        for _ in 0..100 {
            assert_eq!(decimal_key(&format!("{zeros}.5")).unwrap(), "15e1");
        }
        // quadratic work took seconds here; linear takes milliseconds
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
        assert_eq!(Decimal::parse(&format!("1e{}", i64::MAX)), None);
        assert_eq!(Decimal::parse(&format!("0.001e{}", i64::MIN)), None);
        assert_eq!(num("1e-9223372036854775807", "0"), Ordering::Greater);
    }

    #[test]
    fn json_keys_are_the_keys_of_the_parsed_values() {
        let cases: &[(Kind, &[&str])] = &[
            (
                Kind::Number,
                &[
                    "0",
                    "-0",
                    "7",
                    "-100",
                    "10.0",
                    "1e1",
                    "0.5",
                    "-5e-1",
                    "1e60",
                    "\"NaN\"",
                    "\"-Infinity\"",
                ],
            ),
            (
                Kind::Text,
                &[r#""plain""#, r#""a\"b""#, r#""tab\u0009 and \b""#, r#""é""#, "7"],
            ),
            (Kind::Uuid, &[r#""AbC-1""#, r#""abc-1""#]),
            (Kind::Bool, &["true", "false", r#""true""#]),
            (Kind::Date, &[r#""2025-03-04""#]),
            (
                Kind::Timestamptz,
                &[r#""2025-01-01T01:00:00+01:00""#, r#""2025-01-01T00:00:00+00:00""#],
            ),
            (Kind::Other, &[r#"{"b":1, "a":[true]}"#, "[1,2]", r#""x""#]),
        ];
        for (kind, texts) in cases {
            for text in *texts {
                let parsed: Value = serde_json::from_str(text).unwrap();
                assert_eq!(
                    json_key(*kind, text).map(Cow::into_owned),
                    index_key(*kind, &parsed.to_string()),
                    "{kind:?} {text}"
                );
            }
        }
        assert!(matches!(json_key(Kind::Number, "42"), Some(Cow::Borrowed("42"))));
        assert!(matches!(json_key(Kind::Text, r#""u42""#), Some(Cow::Borrowed("u42"))));
        assert_eq!(json_key(Kind::Number, "10.0"), json_key(Kind::Number, "10"));
        assert_eq!(json_key(Kind::Uuid, r#""AB""#), json_key(Kind::Uuid, r#""ab""#));
        assert_eq!(json_key(Kind::Text, "null"), None);
        assert_eq!(json_key(Kind::Bool, "1"), None);
    }

    #[test]
    fn index_keys_follow_comparison() {
        assert_eq!(
            index_key(Kind::Number, &json!(10).to_string()),
            index_key(Kind::Number, &json!(10.0).to_string())
        );
        assert_ne!(
            index_key(Kind::Number, &json!(10).to_string()),
            index_key(Kind::Number, &json!(100).to_string())
        );
        assert_eq!(
            index_key(Kind::Uuid, &json!("AB").to_string()),
            index_key(Kind::Uuid, &json!("ab").to_string())
        );
        assert_eq!(
            index_key(Kind::Timestamptz, &json!("2025-01-01T01:00:00+01:00").to_string()),
            index_key(Kind::Timestamptz, &json!("2025-01-01T00:00:00+00:00").to_string())
        );
    }
}
