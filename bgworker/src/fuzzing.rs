//! What each fuzz target runs (`fuzz/`, `cargo +nightly fuzz run <target>`):
//! arbitrary bytes into one of the parsers that take what a client, a
//! token issuer or shared memory hands the worker. None may panic, hang or
//! allocate without bound. Stable tests replay every saved input of every
//! target through these same functions (`bgworker/tests/fuzz_replay.rs`),
//! so CI keeps what fuzzing found without a nightly toolchain.

use crate::changes::{filter, value};
use crate::server::join::parse_join;
use crate::server::jwt::Verifier;
use crate::server::protocol::{decode_binary, decode_text, Vsn};
use crate::server::query_param;
use crate::shared::keys::{json_key, Kind};
use crate::shared::wire::Transaction;

/// A target: its name (`fuzz/fuzz_targets/<name>.rs`) and body.
pub type Target = (&'static str, fn(&[u8]));

/// The targets.
pub const TARGETS: [Target; 6] = [
    ("frame", frame),
    ("join_config", join_config),
    ("filter", filter_and_values),
    ("jwt", jwt),
    ("record", record),
    ("handshake_query", handshake_query),
];

/// A client frame, as text (vsn 1.0.0 objects, 2.0.0 arrays) and as a
/// binary frame (2.0.0 kinds).
pub fn frame(data: &[u8]) {
    for vsn in [Vsn::V1, Vsn::V2] {
        if let Ok(text) = std::str::from_utf8(data) {
            let _ = decode_text(vsn, text);
        }
        let _ = decode_binary(vsn, data);
    }
}

/// A join's payload (`config`, `access_token`), as JSON.
pub fn join_config(data: &[u8]) {
    if let Ok(payload) = serde_json::from_slice::<serde_json::Value>(data) {
        let _ = parse_join(&payload);
    }
}

/// A `filter` string, then each of its values as every kind of column
/// compares and keys it (the worker's cast gives JSON text; here the value
/// itself and as a JSON string stand in for it).
pub fn filter_and_values(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(conditions) = filter::parse(text) else {
        return;
    };
    let kinds = [
        Kind::Number,
        Kind::Text,
        Kind::Uuid,
        Kind::Bool,
        Kind::Date,
        Kind::Timestamp,
        Kind::Timestamptz,
        Kind::Other,
    ];
    for condition in conditions {
        for raw in &condition.values {
            let quoted = serde_json::Value::from(raw.as_str()).to_string();
            for json in [raw.as_str(), quoted.as_str()] {
                for kind in kinds {
                    let _ = json_key(kind, json);
                    let _ = value::compare(kind, json, "0");
                    let _ = value::compare(kind, json, json);
                }
                let _ = value::timestamptz_to_utc(json);
            }
        }
    }
}

/// A token, verified against an HS256 secret; the same bytes as a JSON
/// Web Key Set; and, as JSON claims, signed with the secret and verified
/// (so the claims' checks are reached, past the signature).
pub fn jwt(data: &[u8]) {
    const SECRET: &str = "fuzzing-secret-of-at-least-32-bytes!";
    const NOW: i64 = 1_700_000_000;
    let text = String::from_utf8_lossy(data);
    let Ok(verifier) = Verifier::new(Some(SECRET), None) else {
        return;
    };
    let _ = verifier.verify(&text, NOW);
    if let Ok(claims) = serde_json::from_slice::<serde_json::Value>(data) {
        let key = jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes());
        if let Ok(token) = jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key) {
            let _ = verifier.verify(&token, NOW);
            let _ = verifier.with_audience(Some("authenticated")).verify(&token, NOW);
        }
    }
    if let Ok(from_jwks) = Verifier::new(None, Some(&text)) {
        let _ = from_jwks.verify("eyJhbGciOiJSUzI1NiIsImtpZCI6ImsifQ.e30.c2ln", NOW);
    }
}

/// A change-ring record, as the worker decodes what backends published.
pub fn record(data: &[u8]) {
    let _ = Transaction::decode(data);
}

/// A WebSocket upgrade's query string: the parameters the handshake reads.
pub fn handshake_query(data: &[u8]) {
    let Ok(query) = std::str::from_utf8(data) else {
        return;
    };
    for name in ["apikey", "vsn", "log_level"] {
        let value = query_param(query, name);
        if name == "vsn" {
            let _ = Vsn::from_param(value.as_deref());
        }
    }
}
