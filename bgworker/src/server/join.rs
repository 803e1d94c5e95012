//! The `phx_join` payload: channel config and token (`docs/protocol.md`,
//! "Joining"). Like Supabase, an invalid config does not fail the join: the bad
//! part falls back to its default and a warning says what was ignored.

use serde_json::{Map, Value};

/// A parsed `phx_join` payload.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct JoinRequest {
    pub config: JoinConfig,
    /// `access_token` (or legacy `user_token`), unless absent, null or an
    /// opaque `sb_...` key; then the connect-time token applies.
    pub access_token: Option<String>,
    /// Parts of the config that were ignored, for the log.
    pub warnings: Vec<String>,
}

/// `config` of a join.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct JoinConfig {
    pub broadcast: BroadcastConfig,
    pub presence: PresenceConfig,
    /// The entries exactly as the client sent them (the join reply echoes
    /// them in order), parsed alongside.
    pub postgres_changes: Vec<PostgresChangesBinding>,
    pub private: bool,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct BroadcastConfig {
    /// Reply `ok` to each broadcast.
    pub ack: bool,
    /// Deliver a channel's own broadcasts back to it.
    pub self_: bool,
    pub replay: Option<Replay>,
    pub replication_ready: bool,
}

/// `broadcast.replay`: private channels only.
#[derive(Debug, Clone, PartialEq)]
pub struct Replay {
    pub since_ms: i64,
    pub limit: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct PresenceConfig {
    /// Empty means the server picks a key.
    pub key: String,
    pub enabled: bool,
}

/// One `postgres_changes` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct PostgresChangesBinding {
    /// The entry verbatim, for the join reply.
    pub raw: Map<String, Value>,
    pub event: String,
    pub schema: Option<String>,
    pub table: Option<String>,
    pub filter: Option<String>,
    pub select: Option<Value>,
}

/// Parses a join payload. Never fails: what cannot be used is reported in
/// `warnings` and replaced by its default.
pub fn parse_join(payload: &Value) -> JoinRequest {
    let mut req = JoinRequest::default();
    let Some(payload) = payload.as_object() else {
        if !payload.is_null() {
            req.warnings.push("join payload is not an object".into());
        }
        return req;
    };

    req.access_token = ["access_token", "user_token"]
        .iter()
        .find_map(|k| payload.get(*k).and_then(Value::as_str))
        .filter(|t| !t.starts_with("sb_") && !t.is_empty())
        .map(str::to_owned);

    let config = match payload.get("config") {
        None | Some(Value::Null) => return req,
        Some(Value::Object(c)) => c,
        Some(_) => {
            req.warnings.push("config is not an object".into());
            return req;
        }
    };
    let warnings = &mut req.warnings;
    let cfg = &mut req.config;

    if let Some(b) = section(config, "broadcast", warnings) {
        cfg.broadcast.ack = flag(b, "ack", "broadcast.ack", warnings);
        cfg.broadcast.self_ = flag(b, "self", "broadcast.self", warnings);
        cfg.broadcast.replication_ready = flag(b, "replication_ready", "broadcast.replication_ready", warnings);
        cfg.broadcast.replay = match b.get("replay") {
            None | Some(Value::Null) => None,
            Some(Value::Object(r)) => match r.get("since").and_then(as_integer) {
                Some(since_ms) => Some(Replay {
                    since_ms,
                    limit: r.get("limit").and_then(as_integer),
                }),
                None => {
                    warnings.push("broadcast.replay.since is not a number".into());
                    None
                }
            },
            Some(_) => {
                warnings.push("broadcast.replay is not an object".into());
                None
            }
        };
    }

    if let Some(p) = section(config, "presence", warnings) {
        cfg.presence.enabled = flag(p, "enabled", "presence.enabled", warnings);
        cfg.presence.key = match p.get("key") {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            // Phoenix presence keys are strings; a number is kept as text.
            Some(Value::Number(n)) => n.to_string(),
            Some(_) => {
                warnings.push("presence.key is not a string".into());
                String::new()
            }
        };
    }

    match config.get("postgres_changes") {
        None | Some(Value::Null) => {}
        Some(Value::Array(entries)) => {
            for entry in entries {
                match binding(entry) {
                    Some(b) => cfg.postgres_changes.push(b),
                    None => warnings.push(format!("postgres_changes entry {entry} is not an object")),
                }
            }
        }
        Some(_) => warnings.push("postgres_changes is not an array".into()),
    }

    cfg.private = flag(config, "private", "private", warnings);
    req
}

fn section<'a>(
    config: &'a Map<String, Value>,
    key: &str,
    warnings: &mut Vec<String>,
) -> Option<&'a Map<String, Value>> {
    match config.get(key) {
        None | Some(Value::Null) => None,
        Some(Value::Object(m)) => Some(m),
        Some(_) => {
            warnings.push(format!("{key} is not an object"));
            None
        }
    }
}

/// Booleans, also as the strings `"true"`/`"false"` (the server accepts both).
fn flag(map: &Map<String, Value>, key: &str, path: &str, warnings: &mut Vec<String>) -> bool {
    match map.get(key) {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) if s == "true" => true,
        Some(Value::String(s)) if s == "false" => false,
        Some(other) => {
            warnings.push(format!("{path} is not a boolean: {other}"));
            false
        }
    }
}

fn as_integer(v: &Value) -> Option<i64> {
    v.as_i64().or_else(|| v.as_f64().map(|f| f.round() as i64))
}

/// The keys of a binding the join reply echoes: what realtime-js compares
/// with its own bindings. Nothing else a client sends is kept.
const ECHOED: [&str; 4] = ["event", "schema", "table", "filter"];

fn binding(entry: &Value) -> Option<PostgresChangesBinding> {
    let entry = entry.as_object()?;
    let raw: Map<String, Value> = ECHOED
        .iter()
        .filter_map(|k| Some((k.to_string(), entry.get(*k)?.clone())))
        .collect();
    let text = |k: &str| raw.get(k).and_then(Value::as_str).map(str::to_owned);
    Some(PostgresChangesBinding {
        event: text("event").unwrap_or_else(|| "*".into()),
        schema: text("schema"),
        table: text("table"),
        filter: text("filter"),
        // (kept only as a short string: it is not acted on)
        select: entry
            .get("select")
            .filter(|v| v.as_str().is_some_and(|s| s.len() <= 1024))
            .cloned(),
        raw,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn full_capture_parses() {
        let req = parse_join(&json!({
            "config": {
                "broadcast": {"self": true, "ack": true},
                "presence": {"key": "u1", "enabled": true},
                "postgres_changes": [{"event": "UPDATE", "schema": "public", "table": "t", "filter": "id=eq.1"}],
                "private": true
            },
            "access_token": "eyJhbGciOi.x.y",
            "version": "realtime-js/2.119.1"
        }));
        assert!(req.warnings.is_empty(), "{:?}", req.warnings);
        assert_eq!(req.access_token.as_deref(), Some("eyJhbGciOi.x.y"));
        let c = &req.config;
        assert!(c.broadcast.ack && c.broadcast.self_ && c.private);
        assert_eq!(
            c.presence,
            PresenceConfig {
                key: "u1".into(),
                enabled: true
            }
        );
        assert_eq!(c.postgres_changes.len(), 1);
        let b = &c.postgres_changes[0];
        assert_eq!(b.event, "UPDATE");
        assert_eq!(b.schema.as_deref(), Some("public"));
        assert_eq!(b.table.as_deref(), Some("t"));
        assert_eq!(b.filter.as_deref(), Some("id=eq.1"));
        assert_eq!(
            Value::Object(b.raw.clone()),
            json!({"event": "UPDATE", "schema": "public", "table": "t", "filter": "id=eq.1"})
        );
    }

    #[test]
    fn only_the_echoed_keys_of_a_binding_are_kept() {
        let junk = vec![0; 10_000];
        let req = parse_join(&json!({"config": {"postgres_changes": [
            {"event": "*", "schema": "public", "table": "t", "junk": junk, "select": [1, 2]}
        ]}}));
        let b = &req.config.postgres_changes[0];
        assert_eq!(
            Value::Object(b.raw.clone()),
            json!({"event": "*", "schema": "public", "table": "t"})
        );
        assert_eq!(b.select, None);
    }

    #[test]
    fn defaults_when_config_missing() {
        let req = parse_join(&json!({}));
        assert_eq!(req.config, JoinConfig::default());
        assert_eq!(req.access_token, None);
        assert!(req.warnings.is_empty());
        assert_eq!(parse_join(&Value::Null).config, JoinConfig::default());
    }

    #[test]
    fn string_booleans_are_accepted() {
        let req = parse_join(&json!({"config": {"broadcast": {"self": "true", "ack": "false"}, "private": "true"}}));
        assert!(req.config.broadcast.self_);
        assert!(!req.config.broadcast.ack);
        assert!(req.config.private);
        assert!(req.warnings.is_empty());
    }

    #[test]
    fn malformed_parts_fall_back_with_warnings() {
        let req = parse_join(&json!({
            "config": {
                "broadcast": "yes",
                "presence": {"key": ["x"], "enabled": 3},
                "postgres_changes": {"event": "*"},
                "private": "maybe"
            }
        }));
        assert_eq!(req.config, JoinConfig::default());
        assert_eq!(req.warnings.len(), 5, "{:?}", req.warnings);
        assert!(req.warnings.iter().any(|w| w.contains("private")));
        assert!(req
            .warnings
            .iter()
            .any(|w| w.contains("postgres_changes is not an array")));
    }

    #[test]
    fn non_object_payload_and_config() {
        let req = parse_join(&json!("join me"));
        assert_eq!(req.config, JoinConfig::default());
        assert_eq!(req.warnings, vec!["join payload is not an object".to_string()]);
        let req = parse_join(&json!({"config": [1, 2]}));
        assert_eq!(req.warnings, vec!["config is not an object".to_string()]);
    }

    #[test]
    fn non_object_binding_is_skipped() {
        let req = parse_join(&json!({"config": {"postgres_changes": [42, {"event": "*", "schema": "public"}]}}));
        assert_eq!(req.config.postgres_changes.len(), 1);
        assert_eq!(req.config.postgres_changes[0].table, None);
        assert_eq!(req.warnings.len(), 1);
    }

    #[test]
    fn opaque_and_empty_tokens_fall_back_to_connect_token() {
        assert_eq!(
            parse_join(&json!({"access_token": "sb_publishable_abc"})).access_token,
            None
        );
        assert_eq!(parse_join(&json!({"access_token": null})).access_token, None);
        assert_eq!(parse_join(&json!({"access_token": ""})).access_token, None);
        assert_eq!(
            parse_join(&json!({"user_token": "a.b.c"})).access_token.as_deref(),
            Some("a.b.c")
        );
    }

    #[test]
    fn replay_parses() {
        let req = parse_join(&json!({"config": {"broadcast": {"replay": {"since": 1700000000000i64, "limit": 5}}}}));
        assert_eq!(
            req.config.broadcast.replay,
            Some(Replay {
                since_ms: 1700000000000,
                limit: Some(5)
            })
        );
        let bad = parse_join(&json!({"config": {"broadcast": {"replay": {"since": "yesterday"}}}}));
        assert_eq!(bad.config.broadcast.replay, None);
        assert_eq!(bad.warnings.len(), 1);
    }
}
