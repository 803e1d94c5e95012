//! The ceiling for the broadcast benchmark: a minimal broadcast relay on
//! tokio-tungstenite (the crate pg_realtime serves with), run as its own
//! process. It answers joins and heartbeats and sends each broadcast's
//! text, built once, to every other member of the topic; nothing else
//! (no tokens, limits or checks). Its sockets read with the buffer size
//! pg_realtime's do.

use futures_util::{SinkExt, StreamExt};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

type Members = Arc<RwLock<HashMap<u64, mpsc::UnboundedSender<Message>>>>;

/// Starts `--relay <port>` and waits for it to say READY.
pub fn spawn(port: u16) -> std::process::Child {
    pg_realtime_e2e::load::spawn_helper("--relay", port)
}

/// Serves until stdin closes (the benchmark ended or died).
pub fn serve(port: u16) {
    let members: Members = Arc::default();
    let ids = Arc::new(AtomicU64::new(1));
    pg_realtime_e2e::load::serve_helper(port, move |stream| {
        connection(stream, members.clone(), ids.fetch_add(1, Ordering::Relaxed))
    });
}

async fn connection(stream: tokio::net::TcpStream, members: Members, id: u64) {
    // (the read buffer pg_realtime uses: tungstenite zero-fills it before
    // each read, so the default 128 kB would make this ceiling too low)
    let config = WebSocketConfig::default().read_buffer_size(2 * 1024);
    let Ok(ws) = tokio_tungstenite::accept_async_with_config(stream, Some(config)).await else {
        return;
    };
    let (mut sink, mut source) = ws.split();
    let (tx, mut rx) = mpsc::unbounded_channel::<Message>();
    let writer = tokio::spawn(async move {
        while let Some(message) = rx.recv().await {
            if sink.feed(message).await.is_err() {
                return;
            }
            while let Ok(more) = rx.try_recv() {
                if sink.feed(more).await.is_err() {
                    return;
                }
            }
            if sink.flush().await.is_err() {
                return;
            }
        }
    });
    while let Some(Ok(Message::Text(text))) = source.next().await {
        let Ok(frame) = serde_json::from_str::<serde_json::Value>(&text) else {
            continue;
        };
        let (topic, event) = (
            frame["topic"].as_str().unwrap_or(""),
            frame["event"].as_str().unwrap_or(""),
        );
        match event {
            "phx_join" | "heartbeat" => {
                if event == "phx_join" {
                    members.write().unwrap().insert(id, tx.clone());
                }
                let reply = serde_json::json!({"topic": topic, "event": "phx_reply", "ref": frame["ref"],
                    "payload": {"status": "ok", "response": {"postgres_changes": []}}});
                let _ = tx.send(Message::Text(reply.to_string().into()));
            }
            "broadcast" => {
                let out =
                    serde_json::json!({"topic": topic, "event": "broadcast", "payload": frame["payload"], "ref": null});
                let out = Message::Text(out.to_string().into());
                for (member, member_tx) in members.read().unwrap().iter() {
                    if *member != id {
                        let _ = member_tx.send(out.clone());
                    }
                }
            }
            _ => {}
        }
    }
    members.write().unwrap().remove(&id);
    writer.abort();
}
