//! The floor for the connections benchmark: a minimal WebSocket server on
//! tokio-tungstenite with pg_realtime's buffer settings (an 8 kB read
//! buffer), run as its own process, that answers joins and heartbeats and
//! keeps each connection in one task. What an idle joined connection must
//! cost at least with this crate.

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

/// Starts `--floor <port>` and waits for it to say READY.
pub fn spawn(port: u16) -> std::process::Child {
    pg_realtime_e2e::load::spawn_helper("--floor", port)
}

/// Serves until stdin closes.
pub fn serve(port: u16) {
    pg_realtime_e2e::load::serve_helper(port, connection);
}

async fn connection(stream: tokio::net::TcpStream) {
    let config = WebSocketConfig::default().read_buffer_size(2 * 1024);
    let Ok(mut ws) = tokio_tungstenite::accept_async_with_config(stream, Some(config)).await else {
        return;
    };
    while let Some(Ok(Message::Text(text))) = ws.next().await {
        let Ok(frame) = serde_json::from_str::<serde_json::Value>(&text) else {
            continue;
        };
        if ["phx_join", "heartbeat"].contains(&frame["event"].as_str().unwrap_or("")) {
            let reply = serde_json::json!({"topic": frame["topic"], "event": "phx_reply", "ref": frame["ref"],
                "payload": {"status": "ok", "response": {"postgres_changes": []}}});
            if ws.send(Message::Text(reply.to_string().into())).await.is_err() {
                return;
            }
        }
    }
}
