//! Reading what clients send: JSON text frames (vsn 1.0.0 objects, vsn
//! 2.0.0 arrays) and vsn 2.0.0 binary kinds 0 and 3. A broadcast's payload
//! is kept as the JSON text it arrived as (`Payload::Text`), however it
//! arrived: a JSON `broadcast` event or a binary kind 3.

use super::*;
use serde::Deserialize;

/// The largest payload of a frame other than a broadcast (a join, a
/// leave, a token, a heartbeat): it is parsed into a tree, so it is kept
/// far below the 5 MB a broadcast may have.
pub const MAX_CONTROL_PAYLOAD: usize = 1 << 20;

/// A text frame's parts, borrowed from its text; only the payload may be
/// large, and it is parsed (or not) by what the event needs.
struct Parts<'a> {
    join_ref: Option<&'a RawValue>,
    msg_ref: Option<&'a RawValue>,
    topic: Option<&'a RawValue>,
    event: Option<&'a RawValue>,
    payload: Option<&'a RawValue>,
}

/// Decodes a text frame with the socket's serializer.
pub fn decode_text(vsn: Vsn, text: &str) -> Result<Inbound, ProtocolError> {
    // Valid JSON first, then the shape.
    let _: &RawValue = serde_json::from_str(text).map_err(|e| ProtocolError::BadJson(e.to_string()))?;
    let (parts, shape) = match vsn {
        Vsn::V1 => (object_parts(text), "{topic, event, payload, ref}"),
        Vsn::V2 => (array_parts(text), "[join_ref, ref, topic, event, payload]"),
    };
    let parts = parts.ok_or(ProtocolError::BadShape(shape))?;
    let join_ref = opt_ref(parts.join_ref, shape)?;
    let msg_ref = opt_ref(parts.msg_ref, shape)?;
    let topic = string(parts.topic, shape)?;
    let event = string(parts.event, shape)?;
    if event == "broadcast" {
        return broadcast(join_ref, msg_ref, topic, parts.payload);
    }
    let payload = match parts.payload {
        Some(raw) if raw.get().len() > MAX_CONTROL_PAYLOAD => {
            return Err(ProtocolError::TooLarge(event, raw.get().len()));
        }
        Some(raw) => serde_json::from_str(raw.get()).map_err(|e| ProtocolError::BadJson(e.to_string()))?,
        None => Value::Null,
    };
    Ok(Inbound::Frame(Frame {
        join_ref,
        msg_ref,
        topic,
        event,
        payload: Payload::Json(payload),
    }))
}

fn object_parts(text: &str) -> Option<Parts<'_>> {
    #[derive(Deserialize)]
    struct Object<'a> {
        #[serde(borrow)]
        join_ref: Option<&'a RawValue>,
        #[serde(borrow, rename = "ref")]
        msg_ref: Option<&'a RawValue>,
        #[serde(borrow)]
        topic: Option<&'a RawValue>,
        #[serde(borrow)]
        event: Option<&'a RawValue>,
        #[serde(borrow)]
        payload: Option<&'a RawValue>,
    }
    // (a derived struct would also take an array)
    if !text.trim_start().starts_with('{') {
        return None;
    }
    let o: Object<'_> = serde_json::from_str(text).ok()?;
    Some(Parts {
        join_ref: o.join_ref,
        msg_ref: o.msg_ref,
        topic: o.topic,
        event: o.event,
        payload: o.payload,
    })
}

/// `[join_ref, ref, topic, event, payload, ...]`: extra elements ignored.
fn array_parts(text: &str) -> Option<Parts<'_>> {
    let items: Vec<&RawValue> = serde_json::from_str(text).ok()?;
    if items.len() < 5 {
        return None;
    }
    Some(Parts {
        join_ref: Some(items[0]),
        msg_ref: Some(items[1]),
        topic: Some(items[2]),
        event: Some(items[3]),
        payload: Some(items[4]),
    })
}

/// A broadcast in its JSON form: `{"type":"broadcast","event":..,"payload":..}`,
/// its payload kept as text.
fn broadcast(
    join_ref: Option<String>,
    msg_ref: Option<String>,
    topic: String,
    body: Option<&RawValue>,
) -> Result<Inbound, ProtocolError> {
    #[derive(Deserialize)]
    struct Body {
        event: Option<Value>,
        payload: Option<Box<RawValue>>,
        meta: Option<Value>,
    }
    const SHAPE: &str = r#"{"type": "broadcast", "event": .., "payload": ..}"#;
    let body: Body = body
        .and_then(|raw| serde_json::from_str(raw.get()).ok())
        .ok_or(ProtocolError::BadShape(SHAPE))?;
    Ok(Inbound::Broadcast(UserBroadcast {
        join_ref,
        msg_ref,
        topic,
        event: body.event.as_ref().and_then(Value::as_str).unwrap_or("").to_owned(),
        metadata: body.meta,
        payload: body
            .payload
            .map_or(Payload::Json(Value::Null), |raw| Payload::Text(JsonText::from_raw(raw))),
    }))
}

/// refs are strings or null; a number is accepted and rendered as a string
/// because some hand-written clients send them that way.
fn opt_ref(value: Option<&RawValue>, shape: &'static str) -> Result<Option<String>, ProtocolError> {
    let Some(raw) = value else { return Ok(None) };
    match serde_json::from_str::<Value>(raw.get()) {
        Ok(Value::Null) => Ok(None),
        Ok(Value::String(s)) => Ok(Some(s)),
        Ok(Value::Number(n)) => Ok(Some(n.to_string())),
        _ => Err(ProtocolError::BadShape(shape)),
    }
}

fn string(value: Option<&RawValue>, shape: &'static str) -> Result<String, ProtocolError> {
    value
        .and_then(|raw| serde_json::from_str::<String>(raw.get()).ok())
        .ok_or(ProtocolError::BadShape(shape))
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
                let text = String::from_utf8(rest.to_vec()).map_err(|_| ProtocolError::BadUtf8)?;
                Payload::Text(JsonText::parse(text)?)
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

#[cfg(test)]
mod tests {
    use super::super::tests::frame;
    use super::*;

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
        assert_eq!(b.payload, Payload::Text(JsonText::parse(r#"{"x":1}"#.into()).unwrap()));
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
    fn control_payloads_are_bounded_broadcasts_are_not() {
        let big = "0,".repeat(MAX_CONTROL_PAYLOAD / 2 + 8) + "0";
        let join = format!(r#"["1","1","realtime:r","phx_join",{{"n":[{big}]}}]"#);
        assert!(matches!(decode_text(Vsn::V2, &join), Err(ProtocolError::TooLarge(..))));
        let broadcast =
            format!(r#"["1","1","realtime:r","broadcast",{{"type":"broadcast","event":"e","payload":[{big}]}}]"#);
        assert!(matches!(decode_text(Vsn::V2, &broadcast), Ok(Inbound::Broadcast(_))));
    }

    #[test]
    fn json_broadcasts_keep_their_payload_as_sent() {
        let text = r#"["1","2","realtime:r","broadcast",{"type":"broadcast","event":"cur","payload":{"n":12345678901234567890123456789,"f":1.10},"meta":{"a":1}}]"#;
        let Inbound::Broadcast(b) = decode_text(Vsn::V2, text).unwrap() else {
            panic!()
        };
        assert_eq!(b.event, "cur");
        assert_eq!(b.metadata, Some(json!({"a": 1})));
        let Payload::Text(t) = &b.payload else {
            panic!("{:?}", b.payload)
        };
        assert_eq!(t.get(), r#"{"n":12345678901234567890123456789,"f":1.10}"#);
        let v1 = r#"{"topic":"realtime:r","event":"broadcast","payload":{"type":"broadcast","event":"e"},"ref":"3"}"#;
        let Inbound::Broadcast(b) = decode_text(Vsn::V1, v1).unwrap() else {
            panic!()
        };
        assert_eq!(b.payload, Payload::Json(Value::Null));
        // a broadcast whose body is not an object is malformed
        assert!(decode_text(Vsn::V2, r#"["1","2","realtime:r","broadcast",[1]]"#).is_err());
    }
}
