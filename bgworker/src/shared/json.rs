//! JSON text helpers for the row encoder, which writes rows as UTF-8 bytes
//! straight into a transaction's buffer.

/// Appends `bytes` (UTF-8; invalid sequences replaced) as a JSON string.
pub fn escape_into(out: &mut Vec<u8>, bytes: &[u8]) {
    match std::str::from_utf8(bytes) {
        Ok(text) => escape_str(out, text),
        Err(_) => escape_str(out, &String::from_utf8_lossy(bytes)),
    }
}

/// Appends `text` as a JSON string: as it is when nothing in it needs
/// escaping (the usual case, checked in one pass that does not stop
/// early, which the compiler vectorises), else run by run.
fn escape_str(out: &mut Vec<u8>, text: &str) {
    let bytes = text.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    let plain = !bytes
        .iter()
        .fold(false, |any, &b| any | (b < 0x20) | (b == b'"') | (b == b'\\'));
    if plain {
        out.extend_from_slice(bytes);
        out.push(b'"');
        return;
    }
    let mut run = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escaped: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&bytes[run..i]);
        if escaped.is_empty() {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.extend_from_slice(b"\\u00");
            out.push(HEX[usize::from(b >> 4)]);
            out.push(HEX[usize::from(b & 15)]);
        } else {
            out.extend_from_slice(escaped);
        }
        run = i + 1;
    }
    out.extend_from_slice(&bytes[run..]);
    out.push(b'"');
}

/// Appends an integer in decimal, without going through `fmt`.
pub fn push_int(out: &mut Vec<u8>, n: i64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut rest = n.unsigned_abs();
    loop {
        at -= 1;
        digits[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    if n < 0 {
        out.push(b'-');
    }
    out.extend_from_slice(&digits[at..]);
}

/// A date/time column's type, for [`push_datetime`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DateTimeKind {
    /// `date`: days since 2000-01-01.
    Date,
    /// `timestamp`: microseconds since 2000-01-01 00:00.
    Timestamp,
    /// `timestamptz`: microseconds since 2000-01-01 00:00 UTC, written in UTC.
    TimestampTzUtc,
}

const USECS_PER_DAY: i64 = 86_400_000_000;
/// Days from 1970-01-01 to 2000-01-01, Postgres's epoch.
const PG_EPOCH_DAYS: i64 = 10_957;

/// Appends a date or timestamp as a JSON string, exactly as Postgres's
/// JSON functions write it (`2025-03-04`, `2025-03-04T10:11:12.345`,
/// `2025-03-04T10:11:12.345+00:00`: ISO 8601, fractional seconds without
/// trailing zeros), for the years 1 to 9999. Outside them (infinities,
/// BC dates, five-digit years) it writes nothing and returns false: the
/// caller has Postgres write those.
pub fn push_datetime(out: &mut Vec<u8>, kind: DateTimeKind, value: i64) -> bool {
    let (days, micros) = match kind {
        DateTimeKind::Date => (value, None),
        _ => (value.div_euclid(USECS_PER_DAY), Some(value.rem_euclid(USECS_PER_DAY))),
    };
    // (days stays within +-2^31 + 10,957 for dates and +-1.1e8 for
    // timestamps: no overflow in the conversion)
    let (year, month, day) = super::keys::civil_from_days(days + PG_EPOCH_DAYS);
    if !(1..=9999).contains(&year) {
        return false;
    }
    // Written at fixed places into a buffer on the stack, then appended in
    // one copy.
    let mut buf = *b"\"0000-00-00T00:00:00.000000";
    let (year, month, day) = (year as usize, month as usize, day as usize);
    put_pair(&mut buf, 1, year / 100);
    put_pair(&mut buf, 3, year % 100);
    put_pair(&mut buf, 6, month);
    put_pair(&mut buf, 9, day);
    let Some(micros) = micros else {
        buf[11] = b'"';
        out.extend_from_slice(&buf[..12]);
        return true;
    };
    let (seconds, fraction) = ((micros / 1_000_000) as usize, (micros % 1_000_000) as usize);
    put_pair(&mut buf, 12, seconds / 3600);
    put_pair(&mut buf, 15, seconds / 60 % 60);
    put_pair(&mut buf, 18, seconds % 60);
    let mut len = 20;
    if fraction != 0 {
        put_pair(&mut buf, 21, fraction / 10_000);
        put_pair(&mut buf, 23, fraction / 100 % 100);
        put_pair(&mut buf, 25, fraction % 100);
        // without trailing zeros
        let (mut rest, mut width) = (fraction, 6);
        while rest % 10 == 0 {
            rest /= 10;
            width -= 1;
        }
        len = 21 + width;
    }
    let end: &[u8] = match kind {
        DateTimeKind::TimestampTzUtc => b"+00:00\"",
        _ => b"\"",
    };
    out.extend_from_slice(&buf[..len]);
    out.extend_from_slice(end);
    true
}

/// Writes `n` (< 100) as two digits at `at`.
fn put_pair(buf: &mut [u8; 27], at: usize, n: usize) {
    const PAIRS: &[u8; 200] = b"\
        00010203040506070809101112131415161718192021222324252627282930313233343536373839\
        40414243444546474849505152535455565758596061626364656667686970717273747576777879\
        8081828384858687888990919293949596979899";
    buf[at] = PAIRS[2 * n];
    buf[at + 1] = PAIRS[2 * n + 1];
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_round_trip_through_a_json_parser() {
        for s in [
            "plain",
            "quote \" and \\ backslash",
            "tab\tnew\nline\r",
            "\u{1}\u{1f}",
            "é ☃ 😀",
            "",
        ] {
            let mut out = Vec::new();
            escape_into(&mut out, s.as_bytes());
            assert_eq!(serde_json::from_slice::<String>(&out).unwrap(), s, "{out:?}");
        }
        let mut out = Vec::new();
        escape_into(&mut out, &[0x66, 0xff, 0x6f]);
        assert_eq!(serde_json::from_slice::<String>(&out).unwrap(), "f\u{fffd}o");
    }

    fn datetime(kind: DateTimeKind, value: i64) -> Option<String> {
        let mut out = Vec::new();
        push_datetime(&mut out, kind, value).then(|| String::from_utf8(out).unwrap())
    }

    #[test]
    fn datetimes_as_postgres_writes_them_in_json() {
        use DateTimeKind::*;
        const DAY: i64 = USECS_PER_DAY;
        // 2025-03-04 10:11:12.345 is 9194 days and 36,672.345 s after 2000-01-01
        let t = 9194 * DAY + 36_672_345_000;
        assert_eq!(datetime(Date, 9194).unwrap(), "\"2025-03-04\"");
        assert_eq!(datetime(Timestamp, t).unwrap(), "\"2025-03-04T10:11:12.345\"");
        assert_eq!(
            datetime(TimestampTzUtc, t).unwrap(),
            "\"2025-03-04T10:11:12.345+00:00\""
        );
        assert_eq!(datetime(Timestamp, 0).unwrap(), "\"2000-01-01T00:00:00\"");
        assert_eq!(datetime(Timestamp, 1).unwrap(), "\"2000-01-01T00:00:00.000001\"");
        assert_eq!(datetime(Timestamp, -1).unwrap(), "\"1999-12-31T23:59:59.999999\"");
        assert_eq!(
            datetime(Timestamp, 59 * DAY + 120_000_000).unwrap(),
            "\"2000-02-29T00:02:00\""
        );
        assert_eq!(datetime(Date, -10_957).unwrap(), "\"1970-01-01\"");
        assert_eq!(datetime(Date, -730_119).unwrap(), "\"0001-01-01\"");
        assert_eq!(datetime(Date, 2_921_939).unwrap(), "\"9999-12-31\"");
        // left to Postgres: BC, five-digit years, infinities
        assert_eq!(datetime(Date, -730_120), None);
        assert_eq!(datetime(Date, 2_921_940), None);
        assert_eq!(datetime(Date, i64::from(i32::MIN)), None);
        assert_eq!(datetime(Date, i64::from(i32::MAX)), None);
        assert_eq!(datetime(TimestampTzUtc, i64::MIN), None);
        assert_eq!(datetime(TimestampTzUtc, i64::MAX), None);
    }

    #[test]
    fn integers_print_as_rust_does() {
        for n in [0, 7, -7, 10, 1_234_567, i64::MAX, i64::MIN, i64::from(i32::MIN), -100] {
            let mut out = b"x".to_vec();
            push_int(&mut out, n);
            assert_eq!(out, format!("x{n}").into_bytes());
        }
    }
}
