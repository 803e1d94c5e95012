//! JSON text helpers for the row encoder.

/// Appends `bytes` (UTF-8; invalid sequences replaced) as a JSON string.
pub fn escape_into(out: &mut String, bytes: &[u8]) {
    let text = String::from_utf8_lossy(bytes);
    out.reserve(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
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
}
