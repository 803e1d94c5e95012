//! JSON text helpers for the row encoder.

/// Appends `bytes` (UTF-8; invalid sequences replaced) as a JSON string.
pub fn escape_into(out: &mut String, bytes: &[u8]) {
    match std::str::from_utf8(bytes) {
        Ok(text) => escape_str(out, text),
        Err(_) => escape_str(out, &String::from_utf8_lossy(bytes)),
    }
}

/// Appends `text` as a JSON string: runs of characters that need no
/// escaping are copied whole.
fn escape_str(out: &mut String, text: &str) {
    out.reserve(text.len() + 2);
    out.push('"');
    let mut run = 0;
    for (i, b) in text.bytes().enumerate() {
        let escaped = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0..=0x1f => "",
            _ => continue,
        };
        out.push_str(&text[run..i]);
        if escaped.is_empty() {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.push_str("\\u00");
            out.push(HEX[usize::from(b >> 4)] as char);
            out.push(HEX[usize::from(b & 15)] as char);
        } else {
            out.push_str(escaped);
        }
        run = i + 1;
    }
    out.push_str(&text[run..]);
    out.push('"');
}

/// Appends an integer in decimal, without going through `fmt`.
pub fn push_int(out: &mut String, n: i64) {
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
        out.push('-');
    }
    for d in &digits[at..] {
        out.push(*d as char);
    }
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
            let mut out = String::new();
            escape_into(&mut out, s.as_bytes());
            assert_eq!(serde_json::from_str::<String>(&out).unwrap(), s, "{out}");
        }
        let mut out = String::new();
        escape_into(&mut out, &[0x66, 0xff, 0x6f]);
        assert_eq!(serde_json::from_str::<String>(&out).unwrap(), "f\u{fffd}o");
    }

    #[test]
    fn integers_print_as_rust_does() {
        for n in [0, 7, -7, 10, 1_234_567, i64::MAX, i64::MIN, i64::from(i32::MIN), -100] {
            let mut out = String::from("x");
            push_int(&mut out, n);
            assert_eq!(out, format!("x{n}"));
        }
    }
}
