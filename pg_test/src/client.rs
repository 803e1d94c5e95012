//! A raw WebSocket client speaking vsn 2.0.0, for exact protocol checks.

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const WAIT: Duration = Duration::from_secs(15);

pub struct Client {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    next_ref: u64,
    /// The text of the last frame received, as it came (exact numbers,
    /// key order; a binary frame's bytes as text).
    pub last_text: String,
}

/// A joined channel's reply and the ids of its bindings, in order.
pub struct Joined {
    pub reply: Value,
    pub ids: Vec<Value>,
    /// The `system` message that followed (for postgres_changes joins).
    pub system: Option<Value>,
}

impl Client {
    /// Connects, or says with which HTTP status the upgrade was refused
    /// (0: it failed otherwise).
    pub async fn try_connect(ws_port: u16, token: &str) -> Result<Client, u16> {
        let url = format!("ws://127.0.0.1:{ws_port}/realtime/v1/websocket?apikey={token}&vsn=2.0.0");
        match tokio_tungstenite::connect_async(url).await {
            Ok((ws, _)) => Ok(Client {
                ws,
                next_ref: 1,
                last_text: String::new(),
            }),
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => Err(response.status().as_u16()),
            Err(_) => Err(0),
        }
    }

    pub async fn connect(ws_port: u16, token: &str) -> Client {
        let url = format!("ws://127.0.0.1:{ws_port}/realtime/v1/websocket?apikey={token}&vsn=2.0.0");
        let (ws, _) = tokio_tungstenite::connect_async(url).await.expect("upgrade");
        Client {
            ws,
            next_ref: 1,
            last_text: String::new(),
        }
    }

    pub async fn send(&mut self, frame: Value) {
        self.ws.send(Message::Text(frame.to_string().into())).await.unwrap();
    }

    /// Sends a text frame as it is.
    pub async fn send_text(&mut self, text: String) {
        self.ws.send(Message::Text(text.into())).await.unwrap();
    }

    /// Every text frame until the server closes the socket, and the
    /// close code (None: the socket ended without one).
    pub async fn frames_until_close(&mut self) -> (Vec<String>, Option<u16>) {
        let mut texts = Vec::new();
        loop {
            match tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("frames in time")
            {
                Some(Ok(Message::Text(t))) => texts.push(t.to_string()),
                Some(Ok(Message::Close(frame))) => return (texts, frame.map(|f| u16::from(f.code))),
                Some(Ok(_)) => continue,
                _ => return (texts, None),
            }
        }
    }

    /// The next text frame as it came, unparsed (for readers that must
    /// keep up with a burst in a debug build).
    pub async fn recv_text(&mut self) -> String {
        loop {
            match tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("a frame in time")
            {
                Some(Ok(Message::Text(t))) => return t.to_string(),
                Some(Ok(Message::Binary(_))) | Some(Ok(Message::Ping(_))) | Some(Ok(Message::Pong(_))) => continue,
                other => panic!("socket ended: {other:?}"),
            }
        }
    }

    /// The next text frame within `wait` (None: none came), or why the
    /// socket ended; never panics (for the soak, where servers may close).
    pub async fn recv_or_end(&mut self, wait: Duration) -> Result<Option<Value>, String> {
        loop {
            let Ok(next) = tokio::time::timeout(wait, self.ws.next()).await else {
                return Ok(None);
            };
            match next {
                Some(Ok(Message::Text(t))) => return serde_json::from_str(&t).map(Some).map_err(|e| e.to_string()),
                Some(Ok(Message::Binary(_))) | Some(Ok(Message::Ping(_))) | Some(Ok(Message::Pong(_))) => continue,
                other => return Err(format!("{other:?}")),
            }
        }
    }

    /// The next text frame, skipping nothing.
    pub async fn recv(&mut self) -> Value {
        self.recv_within(WAIT).await.expect("a frame in time")
    }

    pub async fn recv_within(&mut self, wait: Duration) -> Option<Value> {
        loop {
            match tokio::time::timeout(wait, self.ws.next()).await.ok()? {
                Some(Ok(Message::Text(t))) => {
                    self.last_text = t.to_string();
                    return Some(serde_json::from_str(&t).unwrap());
                }
                Some(Ok(Message::Binary(b))) => {
                    self.last_text = String::from_utf8_lossy(&b).into_owned();
                    return Some(kind4_as_json(&b));
                }
                Some(Ok(Message::Ping(_))) | Some(Ok(Message::Pong(_))) => continue,
                other => panic!("socket ended: {other:?}"),
            }
        }
    }

    /// Joins `topic` with these postgres_changes bindings; waits for the
    /// reply and, with bindings, the system message after it.
    pub async fn join(&mut self, topic: &str, bindings: Value, token: &str) -> Joined {
        let r = self.next_ref.to_string();
        self.next_ref += 1;
        let topic = format!("realtime:{topic}");
        let has_bindings = bindings.as_array().is_some_and(|b| !b.is_empty());
        self.send(json!([r, r, topic, "phx_join", {"config": {"postgres_changes": bindings}, "access_token": token}]))
            .await;
        let reply = self.recv().await;
        assert_eq!(reply[3], "phx_reply", "{reply}");
        let ids = reply[4]["response"]["postgres_changes"]
            .as_array()
            .map(|a| a.iter().map(|e| e["id"].clone()).collect())
            .unwrap_or_default();
        let system = if has_bindings && reply[4]["status"] == "ok" {
            Some(self.recv().await)
        } else {
            None
        };
        Joined { reply, ids, system }
    }

    /// Joins `topic` with this `config` as `token`; returns the reply.
    pub async fn join_with(&mut self, topic: &str, config: Value, token: &str) -> Value {
        let r = self.next_ref.to_string();
        self.next_ref += 1;
        let topic = format!("realtime:{topic}");
        self.send(json!([r, r, topic, "phx_join", {"config": config, "access_token": token}]))
            .await;
        self.recv().await
    }

    /// The next broadcast's message, `{type, event, payload, meta?}`
    /// (other frames are skipped).
    pub async fn broadcast(&mut self) -> Value {
        loop {
            let frame = self.recv().await;
            if frame[3] == "broadcast" {
                return frame[4].clone();
            }
        }
    }

    /// The next postgres_changes event (other frames are skipped).
    pub async fn event(&mut self) -> Value {
        loop {
            let frame = self.recv().await;
            if frame[3] == "postgres_changes" {
                return frame;
            }
        }
    }

    /// What the channel hears next, as a line: `event <record id>` for
    /// a postgres_changes event, `notice <message>` for a system message.
    pub async fn heard(&mut self) -> String {
        loop {
            let frame = self.recv().await;
            match frame[3].as_str() {
                Some("postgres_changes") => return format!("event {}", frame[4]["data"]["record"]["id"]),
                Some("system") => return format!("notice {}", frame[4]["message"].as_str().unwrap_or("?")),
                Some("broadcast") => return format!("broadcast {} {}", frame[4]["event"], frame[4]["payload"]),
                _ => continue,
            }
        }
    }

    /// The next `n` events.
    pub async fn events(&mut self, n: usize) -> Vec<Value> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(self.event().await);
        }
        out
    }

    /// Waits for `n` postgres_changes frames without parsing them (for
    /// benchmarks); false if the socket went quiet for `WAIT` first.
    pub async fn count_events(&mut self, n: usize) -> bool {
        let mut seen = 0;
        while seen < n {
            match tokio::time::timeout(WAIT, self.ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => {
                    if t.contains("\"postgres_changes\"") {
                        seen += 1;
                    }
                }
                Ok(Some(Ok(_))) => continue,
                _ => return false,
            }
        }
        true
    }

    pub async fn heartbeat(&mut self) {
        self.send(json!([null, "hb", "phoenix", "heartbeat", {}])).await;
        loop {
            let f = self.recv().await;
            if f[2] == "phoenix" {
                assert_eq!(f[4]["status"], "ok");
                return;
            }
        }
    }
}

/// A binary kind-4 broadcast as the JSON array form of the same message
/// (`[null, null, topic, "broadcast", {type, event, payload, meta?}]`); a
/// binary payload is `{"bytes": [..]}`.
pub fn kind4_as_json(frame: &[u8]) -> Value {
    assert!(frame.len() >= 5 && frame[0] == 4, "not a kind-4 frame: {frame:?}");
    let (topic_len, event_len, meta_len) = (frame[1] as usize, frame[2] as usize, frame[3] as usize);
    let text = |from: usize, len: usize| String::from_utf8(frame[from..from + len].to_vec()).unwrap();
    let topic = text(5, topic_len);
    let event = text(5 + topic_len, event_len);
    let meta_at = 5 + topic_len + event_len;
    let body = &frame[meta_at + meta_len..];
    let payload = if frame[4] == 1 {
        // (a number past f64 stays as its text: see `last_text`)
        serde_json::from_slice(body).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into_owned()))
    } else {
        json!({ "bytes": body })
    };
    let mut message = json!({"type": "broadcast", "event": event, "payload": payload});
    if meta_len > 0 {
        message["meta"] = serde_json::from_str(&text(meta_at, meta_len)).unwrap();
    }
    json!([null, null, topic, "broadcast", message])
}
