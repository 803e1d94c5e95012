//! Phoenix channel frames as realtime-js speaks them: the vsn 1.0.0 JSON
//! object serializer, the vsn 2.0.0 JSON array serializer, and the vsn 2.0.0
//! binary kinds (0 push and 3 user broadcast inbound, 4 user broadcast
//! outbound). See `docs/protocol.md`, "Frames". What a frame carries is
//! here; reading frames is `decode`'s, writing them `encode`'s.
//! Broadcast payloads pass through as the JSON text the client sent,
//! never parsed into a tree: exact, and a few bytes of memory per byte.

mod decode;
mod encode;

pub use decode::{decode_binary, decode_text};
pub use encode::encode;

use serde_json::value::RawValue;
use serde_json::{json, Map, Value};
use std::collections::hash_map::Entry;
use std::sync::{Arc, Weak};
use thiserror::Error;

/// What every channel topic starts with (`realtime:room`).
pub const TOPIC_PREFIX: &str = "realtime:";

/// The serializer a socket negotiated with its `vsn` query parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vsn {
    /// `1.0.0`: JSON objects, text frames only.
    V1,
    /// `2.0.0`: JSON arrays plus binary user broadcasts.
    V2,
}

impl Vsn {
    /// Parses the `vsn` query parameter; a missing one means 1.0.0, as in
    /// Phoenix. Only the major version matters.
    pub fn from_param(param: Option<&str>) -> Result<Vsn, ProtocolError> {
        match param {
            None => Ok(Vsn::V1),
            Some(v) => match v.split('.').next() {
                Some("1") => Ok(Vsn::V1),
                Some("2") => Ok(Vsn::V2),
                _ => Err(ProtocolError::UnsupportedVsn(v.to_owned())),
            },
        }
    }
}

/// A channel message after decoding, whatever serializer carried it.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    pub join_ref: Option<String>,
    pub msg_ref: Option<String>,
    pub topic: String,
    pub event: String,
    pub payload: Payload,
}

/// A frame's payload: JSON, JSON text passed through as sent (broadcast
/// payloads), or raw bytes (binary pushes and broadcasts).
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    Json(Value),
    Text(JsonText),
    Binary(Vec<u8>),
}

/// A JSON value as text, checked to be valid JSON once, never parsed
/// into a tree.
#[derive(Debug, Clone)]
pub struct JsonText(Box<RawValue>);

impl JsonText {
    /// The text, if it is one JSON value.
    pub fn parse(text: String) -> Result<JsonText, ProtocolError> {
        RawValue::from_string(text)
            .map(JsonText)
            .map_err(|e| ProtocolError::BadJson(e.to_string()))
    }

    pub fn from_raw(raw: Box<RawValue>) -> JsonText {
        JsonText(raw)
    }

    pub fn get(&self) -> &str {
        self.0.get()
    }
}

impl PartialEq for JsonText {
    fn eq(&self, other: &Self) -> bool {
        self.get() == other.get()
    }
}

impl Payload {
    /// The payload as a JSON object, if it is one.
    pub fn as_object(&self) -> Option<&Map<String, Value>> {
        match self {
            Payload::Json(Value::Object(map)) => Some(map),
            _ => None,
        }
    }
}

/// What a client sent, decoded.
#[derive(Debug, Clone, PartialEq)]
pub enum Inbound {
    /// An ordinary channel message (JSON text, or binary kind 0).
    Frame(Frame),
    /// A user broadcast sent as binary kind 3.
    Broadcast(UserBroadcast),
}

/// A user broadcast (`channel.send({type: 'broadcast', ...})`).
#[derive(Debug, Clone, PartialEq)]
pub struct UserBroadcast {
    pub join_ref: Option<String>,
    pub msg_ref: Option<String>,
    pub topic: String,
    /// The application's event name (`cur` in `send({event: 'cur'})`).
    pub event: String,
    /// Whitelisted outer keys (`{"persist": true}`), or `None`.
    pub metadata: Option<Value>,
    pub payload: Payload,
}

/// Why an inbound frame could not be used. Such frames are dropped and
/// counted; the socket stays open.
#[derive(Debug, Error, PartialEq)]
pub enum ProtocolError {
    #[error("frame is not valid JSON: {0}")]
    BadJson(String),
    #[error("frame does not have the {0} shape")]
    BadShape(&'static str),
    #[error("binary frame is truncated")]
    Truncated,
    #[error("binary frame of kind {0} is not accepted from clients")]
    BadKind(u8),
    #[error("binary frame field is not UTF-8")]
    BadUtf8,
    #[error("binary frames are not part of vsn 1.0.0")]
    BinaryOnV1,
    #[error("unsupported serializer version {0:?}")]
    UnsupportedVsn(String),
    #[error("a {0} payload of {1} bytes is more than a control message may have")]
    TooLarge(String, usize),
}

pub(crate) const KIND_PUSH: u8 = 0;
pub(crate) const KIND_USER_BROADCAST_PUSH: u8 = 3;
pub(crate) const KIND_USER_BROADCAST: u8 = 4;

#[derive(Debug, Clone, PartialEq)]
pub enum Outbound {
    Frame(Frame),
    /// A user broadcast fan-out; JSON payloads may go as text or kind 4,
    /// binary payloads only as kind 4 (never to vsn 1.0.0 sockets).
    Broadcast {
        topic: String,
        event: String,
        metadata: Option<Value>,
        payload: Payload,
        /// Its frames, built once for every socket of each serializer it
        /// is sent to (a broadcast to 10,000 members is encoded twice at
        /// most, not 10,000 times).
        encoded: Encoded,
    },
    /// A `postgres_changes` event: `data` is serialized once per change and
    /// shared by every channel it goes to; `ids` are this channel's bindings.
    /// Channels with the same topic and ids (one channel name and bindings
    /// on many sockets) share one message (`ChangeMessages`), encoded once
    /// per serializer.
    PostgresChanges {
        topic: String,
        ids: Vec<u32>,
        data: Arc<str>,
        encoded: Encoded,
    },
}

/// The postgres_changes messages of one matched row of a delivery pass,
/// one per frame, topic and binding ids. Held weakly: a message and its
/// encoded frames go as soon as every queue it went to has sent it (the
/// byte budget counts a frame's data once, not each channel's copy).
#[derive(Default)]
pub struct ChangeMessages {
    /// The row whose messages `built` holds.
    row: usize,
    built: std::collections::HashMap<(usize, String, Vec<u32>), Weak<Outbound>>,
    /// The last one asked for: a change's channels come one after another,
    /// and alike ones mostly in a row (no hashing for them).
    last: Option<(usize, Weak<Outbound>)>,
}

impl ChangeMessages {
    /// The message of frame `frame` (its `data`, of matched row `row`) for
    /// a channel of `topic` with bindings `ids`: the one built before for
    /// the same three, if it is still queued somewhere. Asking for another
    /// row forgets the last row's.
    pub fn get(&mut self, row: usize, frame: usize, topic: &str, ids: Vec<u32>, data: &Arc<str>) -> Arc<Outbound> {
        if row != self.row {
            self.row = row;
            self.built.clear();
        }
        if let Some(out) = self.last_if(frame, topic, &ids) {
            return out;
        }
        let out = match self.built.entry((frame, topic.to_owned(), ids)) {
            Entry::Occupied(mut slot) => match slot.get().upgrade() {
                Some(out) => out,
                None => {
                    let out = Self::message(topic, &slot.key().2, data);
                    slot.insert(Arc::downgrade(&out));
                    out
                }
            },
            Entry::Vacant(slot) => {
                let out = Self::message(topic, &slot.key().2, data);
                slot.insert(Arc::downgrade(&out));
                out
            }
        };
        self.last = Some((frame, Arc::downgrade(&out)));
        out
    }

    fn message(topic: &str, ids: &[u32], data: &Arc<str>) -> Arc<Outbound> {
        Arc::new(Outbound::PostgresChanges {
            topic: topic.to_owned(),
            ids: ids.to_vec(),
            data: data.clone(),
            encoded: Encoded::default(),
        })
    }

    /// The last message asked for, if it is for the same three and alive.
    fn last_if(&self, frame: usize, topic: &str, ids: &[u32]) -> Option<Arc<Outbound>> {
        let (f, out) = self.last.as_ref()?;
        let out = out.upgrade()?;
        match &*out {
            Outbound::PostgresChanges { topic: t, ids: i, .. } if *f == frame && t == topic && i == ids => Some(out),
            _ => None,
        }
    }
}

/// The frames of a message once built, per serializer (`None` inside: it
/// has no form for that serializer). Clones start empty; every two are
/// equal (it is a cache, not content).
#[derive(Default)]
pub struct Encoded([std::sync::OnceLock<Option<tokio_tungstenite::tungstenite::Message>>; 2]);

impl Encoded {
    pub fn get_or_build(
        &self,
        vsn: Vsn,
        build: impl FnOnce() -> Option<tokio_tungstenite::tungstenite::Message>,
    ) -> Option<tokio_tungstenite::tungstenite::Message> {
        let slot = match vsn {
            Vsn::V1 => &self.0[0],
            Vsn::V2 => &self.0[1],
        };
        slot.get_or_init(build).clone()
    }
}

impl Clone for Encoded {
    fn clone(&self) -> Self {
        Encoded::default()
    }
}

impl PartialEq for Encoded {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl std::fmt::Debug for Encoded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Encoded")
    }
}

impl Outbound {
    /// A reply to `request` with the given status and response object.
    pub fn reply(request: &Frame, status: &str, response: Value) -> Outbound {
        Outbound::Frame(Frame {
            join_ref: request.join_ref.clone(),
            msg_ref: request.msg_ref.clone(),
            topic: request.topic.clone(),
            event: "phx_reply".into(),
            payload: Payload::Json(json!({ "status": status, "response": response })),
        })
    }

    /// A push on a joined channel (`system`, `presence_state`, ...).
    pub fn push(join_ref: &str, topic: &str, event: &str, payload: Value) -> Outbound {
        Outbound::Frame(Frame {
            join_ref: Some(join_ref.to_owned()),
            msg_ref: None,
            topic: topic.to_owned(),
            event: event.to_owned(),
            payload: Payload::Json(payload),
        })
    }

    /// A push whose payload is JSON text already (`presence_state`).
    pub fn push_text(join_ref: &str, topic: &str, event: &str, payload: JsonText) -> Outbound {
        Outbound::Frame(Frame {
            join_ref: Some(join_ref.to_owned()),
            msg_ref: None,
            topic: topic.to_owned(),
            event: event.to_owned(),
            payload: Payload::Text(payload),
        })
    }

    /// A `system` message on a channel (`docs/protocol.md`, "System messages"):
    /// `extension` is `system` or `postgres_changes`, `status` `ok` or
    /// `error`. `join_ref` is the channel's, or `None` for fan-out.
    pub fn system(
        join_ref: Option<&str>,
        topic: &str,
        extension: &str,
        status: &str,
        message: &str,
        subtopic: &str,
    ) -> Outbound {
        Outbound::Frame(Frame {
            join_ref: join_ref.map(str::to_owned),
            msg_ref: None,
            topic: topic.to_owned(),
            event: "system".into(),
            payload: Payload::Json(
                json!({"extension": extension, "status": status, "message": message, "channel": subtopic}),
            ),
        })
    }

    /// `phx_close` for a channel: `ref = join_ref`, so realtime-js accepts it.
    pub fn close(join_ref: &str, topic: &str) -> Outbound {
        Outbound::Frame(Frame {
            join_ref: Some(join_ref.to_owned()),
            msg_ref: Some(join_ref.to_owned()),
            topic: topic.to_owned(),
            event: "phx_close".into(),
            payload: Payload::Json(json!({})),
        })
    }

    /// The channel topic it is sent on.
    pub fn topic(&self) -> &str {
        match self {
            Outbound::Frame(f) => &f.topic,
            Outbound::Broadcast { topic, .. } | Outbound::PostgresChanges { topic, .. } => topic,
        }
    }

    /// About how many bytes the message holds and costs to send: what
    /// outbound queues are bounded by (`server::fanout`).
    pub fn weight(&self) -> usize {
        const OVERHEAD: usize = 64;
        OVERHEAD
            + match self {
                Outbound::Frame(f) => {
                    f.topic.len()
                        + f.event.len()
                        + f.join_ref.as_ref().map_or(0, String::len)
                        + f.msg_ref.as_ref().map_or(0, String::len)
                        + payload_weight(&f.payload)
                }
                Outbound::Broadcast {
                    topic,
                    event,
                    metadata,
                    payload,
                    ..
                } => {
                    // (twice: its frame, once built, is held beside it)
                    2 * (topic.len() + event.len() + metadata.as_ref().map_or(0, json_len) + payload_weight(payload))
                }
                Outbound::PostgresChanges { topic, ids, data, .. } => topic.len() + ids.len() * 11 + data.len(),
            }
    }
}

fn payload_weight(payload: &Payload) -> usize {
    match payload {
        Payload::Json(v) => json_len(v),
        Payload::Text(t) => t.get().len(),
        Payload::Binary(b) => b.len(),
    }
}

/// The length of a value's JSON text, counted without building it.
fn json_len(value: &Value) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    let _ = serde_json::to_writer(&mut count, value);
    count.0
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A frame with a JSON payload (the decode and encode tests').
    pub fn frame(join_ref: Option<&str>, r: Option<&str>, topic: &str, event: &str, p: Value) -> Frame {
        Frame {
            join_ref: join_ref.map(Into::into),
            msg_ref: r.map(Into::into),
            topic: topic.into(),
            event: event.into(),
            payload: Payload::Json(p),
        }
    }

    #[test]
    fn vsn_param() {
        assert_eq!(Vsn::from_param(None), Ok(Vsn::V1));
        assert_eq!(Vsn::from_param(Some("1.0.0")), Ok(Vsn::V1));
        assert_eq!(Vsn::from_param(Some("2.0.0")), Ok(Vsn::V2));
        assert!(Vsn::from_param(Some("3.0.0")).is_err());
        assert!(Vsn::from_param(Some("")).is_err());
    }

    #[test]
    fn weights_follow_the_bytes() {
        let text = JsonText::parse(format!("[{}]", "1,".repeat(50_000) + "1")).unwrap();
        let big = Outbound::Broadcast {
            topic: "realtime:t".into(),
            event: "e".into(),
            metadata: None,
            payload: Payload::Text(text),
            encoded: Default::default(),
        };
        // (the payload, and the frame built from it)
        assert!((200_002..200_400).contains(&big.weight()), "{}", big.weight());
        let notice = Outbound::system(None, "realtime:t", "system", "error", "m", "t");
        assert!(notice.weight() < 256, "{}", notice.weight());
        assert!(JsonText::parse("{oops".into()).is_err());
    }
}
