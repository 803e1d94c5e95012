//! The floor for the connections benchmark: a minimal WebSocket server on
//! tokio-tungstenite with pg_realtime's buffer settings (an 8 kB read
//! buffer), run as its own process, that answers joins and heartbeats and
//! keeps each connection in one task. What an idle joined connection must
//! cost at least with this crate.

use futures_util::{SinkExt, StreamExt};
use std::io::BufRead;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

/// Starts `--floor <port>` and waits for it to say READY.
pub fn spawn(port: u16) -> std::process::Child {
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--floor", &port.to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "READY");
    child
}

/// Serves until stdin closes.
pub fn serve(port: u16) {
    super::raise_nofile();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        println!("READY");
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(connection(stream));
            }
        });
        let _ = tokio::task::spawn_blocking(|| std::io::stdin().lines().count()).await;
    });
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
