//! Keeping secret settings out of the server log. Postgres itself logs a
//! changed setting's new value on reload (`parameter "x" changed to "..."`)
//! and statements such as `ALTER SYSTEM SET x = '...'`; the extension's log
//! hook cuts such messages short right after the setting's name.

/// Settings whose values must never be logged.
pub const SECRET_SETTINGS: [&str; 2] = ["pg_realtime.jwt_secret", "pg_realtime.jwks"];

/// Where to cut `message` so that nothing after a secret setting's name
/// (its value, in every message Postgres writes about it) is kept; `None`
/// when the message names no secret setting. Setting names are
/// case-insensitive in Postgres, so the search is too.
pub fn cut_point(message: &[u8]) -> Option<usize> {
    SECRET_SETTINGS
        .iter()
        .filter_map(|name| {
            message
                .windows(name.len())
                .position(|w| w.eq_ignore_ascii_case(name.as_bytes()))
                .map(|at| at + name.len())
        })
        .min()
        .map(|end| {
            // keep `parameter "name" changed` of Postgres's reload message
            const CHANGED: &[u8] = b"\" changed";
            if message[end..].starts_with(CHANGED) {
                end + CHANGED.len()
            } else {
                end
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redacted(message: &str) -> String {
        match cut_point(message.as_bytes()) {
            Some(at) => message[..at].to_owned(),
            None => message.to_owned(),
        }
    }

    #[test]
    fn reload_message_loses_the_value() {
        assert_eq!(
            redacted(r#"parameter "pg_realtime.jwt_secret" changed to "s3cret""#),
            r#"parameter "pg_realtime.jwt_secret" changed"#
        );
        assert_eq!(
            redacted(r#"parameter "pg_realtime.jwks" changed to "{\"keys\":[]}""#),
            r#"parameter "pg_realtime.jwks" changed"#
        );
    }

    #[test]
    fn statements_are_cut_case_insensitively() {
        assert_eq!(
            redacted("statement: ALTER SYSTEM SET PG_REALTIME.JWT_SECRET = 'abc'"),
            "statement: ALTER SYSTEM SET PG_REALTIME.JWT_SECRET"
        );
        assert_eq!(
            redacted("statement: select set_config('pg_realtime.jwks', 'x', false), 'pg_realtime.jwt_secret'"),
            "statement: select set_config('pg_realtime.jwks"
        );
    }

    #[test]
    fn other_messages_are_untouched() {
        for m in [
            "parameter \"pg_realtime.port\" changed to \"4001\"",
            "",
            "pg_realtime.jwt",
        ] {
            assert_eq!(cut_point(m.as_bytes()), None, "{m}");
        }
    }
}
