//! The ceiling for the broadcast benchmark: a minimal broadcast relay on
//! tokio-tungstenite (the crate pg_realtime serves with), run as its own
//! process. It answers joins and heartbeats and sends each broadcast's
//! text, built once, to every other member of the topic; nothing else
//! (no tokens, limits or checks). Its sockets read with the buffer size
//! pg_realtime's do.

use futures_util::{SinkExt, StreamExt};
use std::collections::HashMap;
use std::io::BufRead;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

type Members = Arc<RwLock<HashMap<u64, mpsc::UnboundedSender<Message>>>>;

/// Starts `--relay <port>` and waits for it to say READY.
pub fn spawn(port: u16) -> std::process::Child {
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--relay", &port.to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "READY");
    child
}

/// Serves until stdin closes (the benchmark ended or died).
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
        let members: Members = Arc::default();
        let ids = Arc::new(AtomicU64::new(1));
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                tokio::spawn(connection(stream, members.clone(), ids.fetch_add(1, Ordering::Relaxed)));
            }
        });
        // stdin closing ends the relay
        let _ = tokio::task::spawn_blocking(|| std::io::stdin().lines().count()).await;
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
