//! Phoenix channel frames as realtime-js speaks them: the vsn 1.0.0 JSON
//! object serializer, the vsn 2.0.0 JSON array serializer, and the vsn 2.0.0
//! binary kinds (0 push and 3 user broadcast inbound, 4 user broadcast
//! outbound). See `realtime-protocol.md` §1.3.

use serde_json::{json, Map, Value};
use std::sync::Arc;
use thiserror::Error;
use tokio_tungstenite::tungstenite::{Bytes, Message as WsMessage, Utf8Bytes};

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

/// A frame's payload: JSON, or raw bytes (binary pushes and broadcasts).
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    Json(Value),
    Binary(Vec<u8>),
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
}

const KIND_PUSH: u8 = 0;
const KIND_USER_BROADCAST_PUSH: u8 = 3;
const KIND_USER_BROADCAST: u8 = 4;

/// Decodes a text frame with the socket's serializer.
pub fn decode_text(vsn: Vsn, text: &str) -> Result<Inbound, ProtocolError> {
    let value: Value = serde_json::from_str(text).map_err(|e| ProtocolError::BadJson(e.to_string()))?;
    let frame = match vsn {
        Vsn::V1 => decode_object(value)?,
        Vsn::V2 => decode_array(value)?,
    };
    Ok(Inbound::Frame(frame))
}

fn decode_object(value: Value) -> Result<Frame, ProtocolError> {
    const SHAPE: &str = "{topic, event, payload, ref}";
    let Value::Object(mut map) = value else {
        return Err(ProtocolError::BadShape(SHAPE));
    };
    Ok(Frame {
        join_ref: opt_ref(map.remove("join_ref"), SHAPE)?,
        msg_ref: opt_ref(map.remove("ref"), SHAPE)?,
        topic: string(map.remove("topic"), SHAPE)?,
        event: string(map.remove("event"), SHAPE)?,
        payload: Payload::Json(map.remove("payload").unwrap_or(Value::Null)),
    })
}

fn decode_array(value: Value) -> Result<Frame, ProtocolError> {
    const SHAPE: &str = "[join_ref, ref, topic, event, payload]";
    let Value::Array(items) = value else {
        return Err(ProtocolError::BadShape(SHAPE));
    };
    if items.len() < 5 {
        return Err(ProtocolError::BadShape(SHAPE));
    }
    let mut items = items.into_iter();
    let mut next = || items.next();
    Ok(Frame {
        join_ref: opt_ref(next(), SHAPE)?,
        msg_ref: opt_ref(next(), SHAPE)?,
        topic: string(next(), SHAPE)?,
        event: string(next(), SHAPE)?,
        payload: Payload::Json(next().unwrap_or(Value::Null)),
    })
}

/// refs are strings or null; a number is accepted and rendered as a string
/// because some hand-written clients send them that way.
fn opt_ref(value: Option<Value>, shape: &'static str) -> Result<Option<String>, ProtocolError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(Value::Number(n)) => Ok(Some(n.to_string())),
        Some(_) => Err(ProtocolError::BadShape(shape)),
    }
}

fn string(value: Option<Value>, shape: &'static str) -> Result<String, ProtocolError> {
    match value {
        Some(Value::String(s)) => Ok(s),
        _ => Err(ProtocolError::BadShape(shape)),
    }
}

/// Decodes a binary frame (vsn 2.0.0 only): kind 0 push or kind 3 user
/// broadcast push. Kinds 1, 2 and 4 are server-to-client only.
pub fn decode_binary(vsn: Vsn, bytes: &[u8]) -> Result<Inbound, ProtocolError> {
    if vsn == Vsn::V1 {
        return Err(ProtocolError::BinaryOnV1);
    }
    let mut reader = Reader { bytes, pos: 0 };
    match reader.byte()? {
        KIND_PUSH => {
            let (join_ref_len, ref_len, topic_len, event_len) =
                (reader.byte()?, reader.byte()?, reader.byte()?, reader.byte()?);
            let join_ref = reader.text(join_ref_len)?;
            let msg_ref = reader.text(ref_len)?;
            let topic = reader.text(topic_len)?.to_owned();
            let event = reader.text(event_len)?.to_owned();
            Ok(Inbound::Frame(Frame {
                join_ref: non_empty(join_ref),
                msg_ref: non_empty(msg_ref),
                topic,
                event,
                payload: Payload::Binary(reader.rest().to_vec()),
            }))
        }
        KIND_USER_BROADCAST_PUSH => {
            let (join_ref_len, ref_len, topic_len, event_len, meta_len, encoding) = (
                reader.byte()?,
                reader.byte()?,
                reader.byte()?,
                reader.byte()?,
                reader.byte()?,
                reader.byte()?,
            );
            let join_ref = reader.text(join_ref_len)?;
            let msg_ref = reader.text(ref_len)?;
            let topic = reader.text(topic_len)?.to_owned();
            let event = reader.text(event_len)?.to_owned();
            let metadata = match reader.text(meta_len)? {
                "" => None,
                meta => Some(serde_json::from_str(meta).map_err(|e| ProtocolError::BadJson(e.to_string()))?),
            };
            let rest = reader.rest();
            let payload = if encoding == 1 {
                Payload::Json(serde_json::from_slice(rest).map_err(|e| ProtocolError::BadJson(e.to_string()))?)
            } else {
                Payload::Binary(rest.to_vec())
            };
            Ok(Inbound::Broadcast(UserBroadcast {
                join_ref: non_empty(join_ref),
                msg_ref: non_empty(msg_ref),
                topic,
                event,
                metadata,
                payload,
            }))
        }
        kind => Err(ProtocolError::BadKind(kind)),
    }
}

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_owned())
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn byte(&mut self) -> Result<u8, ProtocolError> {
        let b = *self.bytes.get(self.pos).ok_or(ProtocolError::Truncated)?;
        self.pos += 1;
        Ok(b)
    }

    fn text(&mut self, len: u8) -> Result<&'a str, ProtocolError> {
        let end = self.pos + len as usize;
        let slice = self.bytes.get(self.pos..end).ok_or(ProtocolError::Truncated)?;
        self.pos = end;
        std::str::from_utf8(slice).map_err(|_| ProtocolError::BadUtf8)
    }

    fn rest(&mut self) -> &'a [u8] {
        let rest = &self.bytes[self.pos..];
        self.pos = self.bytes.len();
        rest
    }
}

/// What the server sends, before serialization.
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
    },
    /// A `postgres_changes` event: `data` is serialized once per change and
    /// shared by every channel it goes to; `ids` are this channel's bindings.
    PostgresChanges {
        topic: String,
        ids: Vec<u32>,
        data: Arc<str>,
    },
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

    /// A `system` message on a channel (`realtime-protocol.md` §2.5):
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
}

/// Serializes an outbound message for a socket. `None` means the message
/// cannot be expressed for this serializer (a binary broadcast to vsn 1.0.0)
/// and is skipped.
pub fn encode(vsn: Vsn, out: &Outbound) -> Option<WsMessage> {
    match out {
        Outbound::Frame(frame) => {
            let payload = match &frame.payload {
                Payload::Json(v) => v.clone(),
                // The server never pushes raw binary frames (kinds 0-2 would
                // crash realtime-js); binary only travels as kind 4.
                Payload::Binary(_) => return None,
            };
            let text = match vsn {
                Vsn::V1 => json!({
                    "topic": frame.topic,
                    "event": frame.event,
                    "payload": payload,
                    "ref": frame.msg_ref,
                }),
                Vsn::V2 => json!([frame.join_ref, frame.msg_ref, frame.topic, frame.event, payload]),
            };
            Some(WsMessage::Text(Utf8Bytes::from(text.to_string())))
        }
        Outbound::PostgresChanges { topic, ids, data } => {
            let topic = Value::String(topic.clone());
            let ids = json!(ids);
            let text = match vsn {
                Vsn::V2 => format!(r#"[null,null,{topic},"postgres_changes",{{"ids":{ids},"data":{data}}}]"#),
                Vsn::V1 => format!(
                    r#"{{"topic":{topic},"event":"postgres_changes","payload":{{"ids":{ids},"data":{data}}},"ref":null}}"#
                ),
            };
            Some(WsMessage::Text(Utf8Bytes::from(text)))
        }
        Outbound::Broadcast {
            topic,
            event,
            metadata,
            payload,
        } => {
            if vsn == Vsn::V2 {
                if let Some(bytes) = encode_user_broadcast(topic, event, metadata.as_ref(), payload) {
                    return Some(WsMessage::Binary(Bytes::from(bytes)));
                }
            }
            // vsn 1.0.0, or a field too long for kind 4: JSON text, which
            // realtime-js decodes to the same message. Binary payloads have
            // no JSON form.
            let Payload::Json(p) = payload else {
                return None;
            };
            let mut body = json!({"type": "broadcast", "event": event, "payload": p});
            if let Some(meta) = metadata {
                body["meta"] = meta.clone();
            }
            encode(
                vsn,
                &Outbound::Frame(Frame {
                    join_ref: None,
                    msg_ref: None,
                    topic: topic.clone(),
                    event: "broadcast".into(),
                    payload: Payload::Json(body),
                }),
            )
        }
    }
}

/// Kind 4: topic_len, event_len, metadata_len, encoding, then the fields.
/// Each length is one byte, so a field over 255 bytes cannot be sent.
fn encode_user_broadcast(topic: &str, event: &str, metadata: Option<&Value>, payload: &Payload) -> Option<Vec<u8>> {
    let meta = metadata.map(Value::to_string).unwrap_or_default();
    let topic_len = u8::try_from(topic.len()).ok()?;
    let event_len = u8::try_from(event.len()).ok()?;
    let meta_len = u8::try_from(meta.len()).ok()?;
    let (encoding, body) = match payload {
        Payload::Json(v) => (1u8, v.to_string().into_bytes()),
        Payload::Binary(b) => (0u8, b.clone()),
    };
    let mut out = Vec::with_capacity(5 + topic.len() + event.len() + meta.len() + body.len());
    out.extend_from_slice(&[KIND_USER_BROADCAST, topic_len, event_len, meta_len, encoding]);
    out.extend_from_slice(topic.as_bytes());
    out.extend_from_slice(event.as_bytes());
    out.extend_from_slice(meta.as_bytes());
    out.extend_from_slice(&body);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(join_ref: Option<&str>, r: Option<&str>, topic: &str, event: &str, p: Value) -> Frame {
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
    fn v2_text_join_decodes() {
        let text = r#"["6","6","realtime:room1","phx_join",{"config":{"private":true}},"extra"]"#;
        let Inbound::Frame(f) = decode_text(Vsn::V2, text).unwrap() else {
            panic!()
        };
        assert_eq!(
            f,
            frame(
                Some("6"),
                Some("6"),
                "realtime:room1",
                "phx_join",
                json!({"config":{"private":true}})
            )
        );
    }

    #[test]
    fn v2_heartbeat_with_null_join_ref() {
        let Inbound::Frame(f) = decode_text(Vsn::V2, r#"[null,"9","phoenix","heartbeat",{}]"#).unwrap() else {
            panic!()
        };
        assert_eq!(f.join_ref, None);
        assert_eq!(f.msg_ref.as_deref(), Some("9"));
    }

    #[test]
    fn v1_object_decodes_without_join_ref() {
        let text = r#"{"topic":"phoenix","event":"heartbeat","payload":{},"ref":"9"}"#;
        let Inbound::Frame(f) = decode_text(Vsn::V1, text).unwrap() else {
            panic!()
        };
        assert_eq!(f, frame(None, Some("9"), "phoenix", "heartbeat", json!({})));
    }

    #[test]
    fn malformed_text_frames_are_errors() {
        for (vsn, text) in [
            (Vsn::V2, "not json"),
            (Vsn::V2, r#"["1","1","t","e"]"#),
            (Vsn::V2, r#"{"topic":"t","event":"e"}"#),
            (Vsn::V2, r#"[null,null,5,"e",{}]"#),
            (Vsn::V2, r#"[{},null,"t","e",{}]"#),
            (Vsn::V1, r#"["1","1","t","e",{}]"#),
            (Vsn::V1, r#"{"event":"e","payload":{}}"#),
            (Vsn::V1, r#"{"topic":"t","event":null}"#),
            (Vsn::V2, ""),
        ] {
            assert!(decode_text(vsn, text).is_err(), "{text} should not decode");
        }
    }

    #[test]
    fn v2_encode_reply() {
        let req = frame(Some("6"), Some("7"), "realtime:r", "phx_join", json!({}));
        let out = Outbound::reply(&req, "ok", json!({"postgres_changes": []}));
        let WsMessage::Text(t) = encode(Vsn::V2, &out).unwrap() else {
            panic!()
        };
        let v: Value = serde_json::from_str(&t).unwrap();
        assert_eq!(
            v,
            json!(["6","7","realtime:r","phx_reply",{"status":"ok","response":{"postgres_changes":[]}}])
        );
    }

    #[test]
    fn v1_encode_drops_join_ref() {
        let req = frame(Some("6"), Some("7"), "realtime:r", "phx_join", json!({}));
        let WsMessage::Text(t) = encode(Vsn::V1, &Outbound::reply(&req, "ok", json!({}))).unwrap() else {
            panic!()
        };
        let v: Value = serde_json::from_str(&t).unwrap();
        assert_eq!(
            v,
            json!({"topic":"realtime:r","event":"phx_reply","payload":{"status":"ok","response":{}},"ref":"7"})
        );
    }

    #[test]
    fn close_uses_join_ref_as_ref() {
        let WsMessage::Text(t) = encode(Vsn::V2, &Outbound::close("6", "realtime:r")).unwrap() else {
            panic!()
        };
        assert_eq!(t.as_str(), r#"["6","6","realtime:r","phx_close",{}]"#);
    }

    /// The capture of `send({type:'broadcast', event:'cur', payload:{x:1}})`
    /// from the protocol reference.
    #[test]
    fn kind3_capture_decodes() {
        let mut bytes = vec![3, 1, 1, 14, 3, 0, 1];
        bytes.extend_from_slice(b"67realtime:room1cur{\"x\":1}");
        let Inbound::Broadcast(b) = decode_binary(Vsn::V2, &bytes).unwrap() else {
            panic!()
        };
        assert_eq!(b.join_ref.as_deref(), Some("6"));
        assert_eq!(b.msg_ref.as_deref(), Some("7"));
        assert_eq!(b.topic, "realtime:room1");
        assert_eq!(b.event, "cur");
        assert_eq!(b.metadata, None);
        assert_eq!(b.payload, Payload::Json(json!({"x": 1})));
    }

    #[test]
    fn kind3_with_metadata_and_binary_payload() {
        let meta = br#"{"persist":true}"#;
        let mut bytes = vec![3, 0, 0, 3, 2, meta.len() as u8, 0];
        bytes.extend_from_slice(b"r:aev");
        bytes.extend_from_slice(meta);
        bytes.extend_from_slice(&[0xff, 0x00, 0x10]);
        let Inbound::Broadcast(b) = decode_binary(Vsn::V2, &bytes).unwrap() else {
            panic!()
        };
        assert_eq!(b.join_ref, None);
        assert_eq!(b.metadata, Some(json!({"persist": true})));
        assert_eq!(b.payload, Payload::Binary(vec![0xff, 0x00, 0x10]));
    }

    #[test]
    fn kind0_push_decodes() {
        let mut bytes = vec![0, 1, 1, 3, 5];
        bytes.extend_from_slice(b"12r:aevent");
        bytes.extend_from_slice(&[1, 2, 3]);
        let Inbound::Frame(f) = decode_binary(Vsn::V2, &bytes).unwrap() else {
            panic!()
        };
        assert_eq!(f.topic, "r:a");
        assert_eq!(f.event, "event");
        assert_eq!(f.payload, Payload::Binary(vec![1, 2, 3]));
    }

    #[test]
    fn bad_binary_frames_are_errors() {
        assert_eq!(decode_binary(Vsn::V2, &[]), Err(ProtocolError::Truncated));
        assert_eq!(decode_binary(Vsn::V2, &[4, 0, 0, 0, 1]), Err(ProtocolError::BadKind(4)));
        assert_eq!(decode_binary(Vsn::V2, &[1]), Err(ProtocolError::BadKind(1)));
        assert_eq!(
            decode_binary(Vsn::V2, &[3, 1, 1, 200, 3, 0, 1, b'6']),
            Err(ProtocolError::Truncated)
        );
        assert_eq!(
            decode_binary(Vsn::V2, &[0, 1, 0, 0, 0, 0xff]),
            Err(ProtocolError::BadUtf8)
        );
        assert_eq!(
            decode_binary(Vsn::V1, &[3, 0, 0, 0, 0, 0, 1]),
            Err(ProtocolError::BinaryOnV1)
        );
        // encoding 1 promises JSON
        let mut bytes = vec![3, 0, 0, 1, 1, 0, 1];
        bytes.extend_from_slice(b"te{oops");
        assert!(matches!(decode_binary(Vsn::V2, &bytes), Err(ProtocolError::BadJson(_))));
    }

    #[test]
    fn postgres_changes_frames() {
        let out = Outbound::PostgresChanges {
            topic: "realtime:t\"x".into(),
            ids: vec![3, 9],
            data: Arc::from(r#"{"type":"INSERT"}"#),
        };
        let WsMessage::Text(t) = encode(Vsn::V2, &out).unwrap() else {
            panic!()
        };
        let v: Value = serde_json::from_str(&t).unwrap();
        assert_eq!(
            v,
            json!([null, null, "realtime:t\"x", "postgres_changes", {"ids": [3, 9], "data": {"type": "INSERT"}}])
        );
        let WsMessage::Text(t) = encode(Vsn::V1, &out).unwrap() else {
            panic!()
        };
        let v: Value = serde_json::from_str(&t).unwrap();
        assert_eq!(v["payload"]["ids"], json!([3, 9]));
        assert_eq!(v["event"], "postgres_changes");
    }

    #[test]
    fn kind4_encodes_layout() {
        let out = Outbound::Broadcast {
            topic: "realtime:room1".into(),
            event: "cur".into(),
            metadata: Some(json!({"id": "x"})),
            payload: Payload::Json(json!({"x": 1})),
        };
        let WsMessage::Binary(b) = encode(Vsn::V2, &out).unwrap() else {
            panic!()
        };
        let meta = br#"{"id":"x"}"#;
        let mut expected = vec![4, 14, 3, meta.len() as u8, 1];
        expected.extend_from_slice(b"realtime:room1cur");
        expected.extend_from_slice(meta);
        expected.extend_from_slice(br#"{"x":1}"#);
        assert_eq!(&b[..], &expected[..]);
    }

    #[test]
    fn binary_broadcast_is_not_sent_to_v1() {
        let out = Outbound::Broadcast {
            topic: "realtime:r".into(),
            event: "e".into(),
            metadata: None,
            payload: Payload::Binary(vec![1]),
        };
        assert!(encode(Vsn::V1, &out).is_none());
        let json_out = Outbound::Broadcast {
            topic: "realtime:r".into(),
            event: "e".into(),
            metadata: None,
            payload: Payload::Json(json!({"a": 1})),
        };
        let WsMessage::Text(t) = encode(Vsn::V1, &json_out).unwrap() else {
            panic!()
        };
        let v: Value = serde_json::from_str(&t).unwrap();
        assert_eq!(v["payload"], json!({"type":"broadcast","event":"e","payload":{"a":1}}));
    }

    #[test]
    fn kind4_falls_back_to_text_for_fields_over_255_bytes() {
        let topic = "realtime:".to_owned() + &"x".repeat(300);
        let out = Outbound::Broadcast {
            topic: topic.clone(),
            event: "e".into(),
            metadata: None,
            payload: Payload::Json(json!({"a": 1})),
        };
        let WsMessage::Text(t) = encode(Vsn::V2, &out).unwrap() else {
            panic!()
        };
        let v: Value = serde_json::from_str(&t).unwrap();
        assert_eq!(
            v,
            json!([null, null, topic, "broadcast", {"type":"broadcast","event":"e","payload":{"a":1}}])
        );
        let binary = Outbound::Broadcast {
            topic,
            event: "e".into(),
            metadata: None,
            payload: Payload::Binary(vec![1]),
        };
        assert!(encode(Vsn::V2, &binary).is_none());
    }
}
