//! Writing what the server sends: text frames in the socket's serializer,
//! user broadcasts as vsn 2.0.0 binary kind 4 where the fields fit. JSON
//! payloads kept as text are spliced in as they are.

use super::*;
use tokio_tungstenite::tungstenite::{Bytes, Message as WsMessage, Utf8Bytes};

/// Serializes an outbound message for a socket. `None` means the message
/// cannot be expressed for this serializer (a binary broadcast to vsn 1.0.0)
/// and is skipped.
pub fn encode(vsn: Vsn, out: &Outbound) -> Option<WsMessage> {
    match out {
        Outbound::Frame(frame) => {
            let text = frame_text(
                vsn,
                frame.join_ref.as_deref(),
                frame.msg_ref.as_deref(),
                &frame.topic,
                &frame.event,
                &payload_text(&frame.payload)?,
            );
            Some(WsMessage::Text(Utf8Bytes::from(text)))
        }
        Outbound::PostgresChanges {
            topic,
            ids,
            data,
            encoded,
        } => encoded.get_or_build(vsn, || Some(encode_change(vsn, topic, ids, data))),
        Outbound::Broadcast {
            topic,
            event,
            metadata,
            payload,
            encoded,
        } => encoded.get_or_build(vsn, || encode_broadcast(vsn, topic, event, metadata.as_ref(), payload)),
    }
}

/// A postgres_changes event's frame for one serializer (one string built,
/// in one go: this is the path every delivered change takes).
fn encode_change(vsn: Vsn, topic: &str, ids: &[u32], data: &str) -> WsMessage {
    let topic = Value::String(topic.to_owned());
    let ids = json!(ids);
    let text = match vsn {
        Vsn::V2 => format!(r#"[null,null,{topic},"postgres_changes",{{"ids":{ids},"data":{data}}}]"#),
        Vsn::V1 => format!(
            r#"{{"topic":{topic},"event":"postgres_changes","payload":{{"ids":{ids},"data":{data}}},"ref":null}}"#
        ),
    };
    WsMessage::Text(Utf8Bytes::from(text))
}

/// A broadcast's frame for one serializer.
fn encode_broadcast(
    vsn: Vsn,
    topic: &str,
    event: &str,
    metadata: Option<&Value>,
    payload: &Payload,
) -> Option<WsMessage> {
    if vsn == Vsn::V2 {
        if let Some(bytes) = encode_user_broadcast(topic, event, metadata, payload) {
            return Some(WsMessage::Binary(Bytes::from(bytes)));
        }
    }
    // vsn 1.0.0, or a field too long for kind 4: JSON text, which
    // realtime-js decodes to the same message. Binary payloads have no
    // JSON form.
    let mut body = format!(
        r#"{{"type":"broadcast","event":{},"payload":{}"#,
        Value::from(event),
        payload_text(payload)?
    );
    if let Some(meta) = metadata {
        body.push_str(&format!(r#","meta":{meta}"#));
    }
    body.push('}');
    let text = frame_text(vsn, None, None, topic, "broadcast", &body);
    Some(WsMessage::Text(Utf8Bytes::from(text)))
}

/// A payload's JSON text. The server never pushes raw binary frames
/// (kinds 0-2 would crash realtime-js); binary only travels as kind 4.
fn payload_text(payload: &Payload) -> Option<std::borrow::Cow<'_, str>> {
    match payload {
        Payload::Json(v) => Some(v.to_string().into()),
        Payload::Text(t) => Some(t.get().into()),
        Payload::Binary(_) => None,
    }
}

/// A text frame: `[join_ref, ref, topic, event, payload]` (vsn 2.0.0) or
/// `{topic, event, payload, ref}` (vsn 1.0.0, which drops join_ref).
fn frame_text(
    vsn: Vsn,
    join_ref: Option<&str>,
    msg_ref: Option<&str>,
    topic: &str,
    event: &str,
    payload: &str,
) -> String {
    let (join_ref, msg_ref, topic, event) = (json!(join_ref), json!(msg_ref), json!(topic), json!(event));
    match vsn {
        Vsn::V2 => format!("[{join_ref},{msg_ref},{topic},{event},{payload}]"),
        Vsn::V1 => format!(r#"{{"topic":{topic},"event":{event},"payload":{payload},"ref":{msg_ref}}}"#),
    }
}

/// Kind 4: topic_len, event_len, metadata_len, encoding, then the fields.
/// Each length is one byte, so a field over 255 bytes cannot be sent.
fn encode_user_broadcast(topic: &str, event: &str, metadata: Option<&Value>, payload: &Payload) -> Option<Vec<u8>> {
    let meta = metadata.map(Value::to_string).unwrap_or_default();
    let topic_len = u8::try_from(topic.len()).ok()?;
    let event_len = u8::try_from(event.len()).ok()?;
    let meta_len = u8::try_from(meta.len()).ok()?;
    let (encoding, body): (u8, std::borrow::Cow<'_, [u8]>) = match payload {
        Payload::Json(v) => (1, v.to_string().into_bytes().into()),
        Payload::Text(t) => (1, t.get().as_bytes().into()),
        Payload::Binary(b) => (0, b.as_slice().into()),
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
    use super::super::tests::frame;
    use super::*;

    fn text(json: &str) -> Payload {
        Payload::Text(JsonText::parse(json.into()).unwrap())
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

    #[test]
    fn postgres_changes_frames() {
        let out = Outbound::PostgresChanges {
            topic: "realtime:t\"x".into(),
            ids: vec![3, 9],
            data: Arc::from(r#"{"type":"INSERT"}"#),
            encoded: Encoded::default(),
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
    fn channels_alike_share_one_change_message_encoded_once() {
        let data: Arc<str> = Arc::from(r#"{"type":"INSERT"}"#);
        let mut messages = ChangeMessages::default();
        let a = messages.get(0, 0, "realtime:t", vec![3], &data);
        let b = messages.get(0, 0, "realtime:t", vec![3], &data);
        assert!(Arc::ptr_eq(&a, &b), "same change, topic and ids: one message");
        for other in [
            messages.get(0, 1, "realtime:t", vec![3], &data),
            messages.get(0, 0, "realtime:u", vec![3], &data),
            messages.get(0, 0, "realtime:t", vec![3, 4], &data),
        ] {
            assert!(!Arc::ptr_eq(&a, &other));
        }
        let text = |out: &Outbound| match encode(Vsn::V1, out) {
            Some(WsMessage::Text(t)) => t,
            other => panic!("{other:?}"),
        };
        let (first, again) = (text(&a), text(&b));
        assert_eq!(
            first.as_str().as_ptr(),
            again.as_str().as_ptr(),
            "encoded once, the bytes shared"
        );
        assert!(first.as_str().contains(r#""ids":[3]"#));
    }

    #[test]
    fn a_change_message_goes_once_every_queue_has_sent_it() {
        // The byte budget counts a change's data once: what the pass keeps
        // of each channel's message (and its encoded frame) must not
        // outlive the queues holding it.
        let data: Arc<str> = Arc::from(r#"{"type":"INSERT"}"#);
        let mut messages = ChangeMessages::default();
        let a = messages.get(0, 0, "realtime:t", vec![3], &data);
        assert!(encode(Vsn::V1, &a).is_some());
        let gone = Arc::downgrade(&a);
        drop(a);
        assert!(gone.upgrade().is_none(), "sent everywhere: let go");
        let again = messages.get(0, 0, "realtime:t", vec![3], &data);
        assert!(matches!(&*again, Outbound::PostgresChanges { ids, .. } if *ids == [3]));
        // a later row forgets the earlier row's messages
        let kept = messages.get(0, 0, "realtime:u", vec![1], &data);
        let next = messages.get(1, 1, "realtime:u", vec![1], &data);
        assert!(!Arc::ptr_eq(&kept, &next));
        assert!(messages.built.len() == 1, "only row 1's message is known");
    }

    #[test]
    fn kind4_encodes_layout() {
        let out = Outbound::Broadcast {
            topic: "realtime:room1".into(),
            event: "cur".into(),
            metadata: Some(json!({"id": "x"})),
            payload: text(r#"{"x":1}"#),
            encoded: Default::default(),
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
            encoded: Default::default(),
        };
        assert!(encode(Vsn::V1, &out).is_none());
        let json_out = Outbound::Broadcast {
            topic: "realtime:r".into(),
            event: "e".into(),
            metadata: None,
            payload: text(r#"{"a":1}"#),
            encoded: Default::default(),
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
            payload: text(r#"{"a":1}"#),
            encoded: Default::default(),
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
            encoded: Default::default(),
        };
        assert!(encode(Vsn::V2, &binary).is_none());
    }

    #[test]
    fn text_payloads_go_out_exactly_as_they_came() {
        let exact = r#"{"n":12345678901234567890123456789,"f":1.10}"#;
        let out = Outbound::Broadcast {
            topic: "realtime:r".into(),
            event: "e\"q".into(),
            metadata: None,
            payload: text(exact),
            encoded: Default::default(),
        };
        let WsMessage::Text(t) = encode(Vsn::V1, &out).unwrap() else {
            panic!()
        };
        assert!(t.as_str().contains(exact), "{}", t.as_str());
        let v: Value = serde_json::from_str(&t).unwrap();
        assert_eq!(v["payload"]["event"], "e\"q");
        let WsMessage::Binary(b) = encode(Vsn::V2, &out).unwrap() else {
            panic!()
        };
        assert!(b.ends_with(exact.as_bytes()));
    }
}
