//! What the load benchmarks share (`pg_test/benches/`): file limits,
//! resident memory, sockets from a chosen loopback address joined to a
//! channel with vsn 1.0.0, and the helper processes (a relay, a floor
//! server) they start from their own binary.

use futures_util::{SinkExt, StreamExt};
use std::io::BufRead;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::Message;

pub type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// A benchmark's setting from the environment, or its default.
pub fn setting(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.into())
}

/// The hard `RLIMIT_NOFILE`, which root cannot raise here.
pub fn hard_nofile() -> u32 {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    let line = limits.lines().find(|l| l.starts_with("Max open files")).unwrap();
    line.split_whitespace().nth(4).unwrap().parse().unwrap()
}

/// Raises this process's soft file limit to the hard one.
pub fn raise_nofile() {
    let hard = hard_nofile();
    let status = std::process::Command::new("prlimit")
        .arg(format!("--pid={}", std::process::id()))
        .arg(format!("--nofile={hard}:{hard}"))
        .status()
        .expect("prlimit runs");
    assert!(status.success(), "prlimit failed");
}

/// `VmRSS` of `pid`, in kB.
pub fn rss_kb(pid: i32) -> u64 {
    crate::measure::status_kb(pid, "VmRSS")
}

/// A socket from `source` to `url` (on 127.0.0.1), upgraded, joined to
/// `topic` with `config`; each step within a minute.
pub async fn connect_and_join(url: &str, source: Ipv4Addr, topic: &str, config: &str) -> Ws {
    connect_and_join_with(url, source, topic, &format!(r#"{{"config":{config}}}"#)).await
}

/// As `connect_and_join`, with the join's whole `payload` (a config and
/// an `access_token`, as supabase-js sends).
pub async fn connect_and_join_with(url: &str, source: Ipv4Addr, topic: &str, payload: &str) -> Ws {
    let mut ws = connect(url, source).await;
    let within = Duration::from_secs(60);
    let join = format!(r#"{{"topic":"{topic}","event":"phx_join","payload":{payload},"ref":"1","join_ref":"1"}}"#);
    ws.send(Message::Text(join.into())).await.unwrap();
    loop {
        match tokio::time::timeout(within, ws.next())
            .await
            .expect("a join reply in time")
        {
            Some(Ok(Message::Text(t))) if t.contains("phx_reply") => {
                assert!(t.contains(r#""status":"ok""#), "join refused: {t}");
                return ws;
            }
            Some(Ok(_)) => continue,
            other => panic!("join failed: {other:?}"),
        }
    }
}

/// A socket from `source` to `url` (on 127.0.0.1), upgraded within a
/// minute, joined to nothing.
pub async fn connect(url: &str, source: Ipv4Addr) -> Ws {
    let port: u16 = url
        .split(':')
        .nth(2)
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(IpAddr::V4(source), 0)).unwrap();
    let stream = socket
        .connect(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port))
        .await
        .expect("connect");
    let _ = stream.set_nodelay(true);
    let within = Duration::from_secs(60);
    let (ws, _) = tokio::time::timeout(within, tokio_tungstenite::client_async(url, stream))
        .await
        .expect("an upgrade in time")
        .expect("upgrade");
    ws
}

/// Waits (a minute at most) for the `system` message that says a joined
/// channel's postgres_changes are subscribed; panics on an error one.
pub async fn await_subscribed(ws: &mut Ws) {
    loop {
        match tokio::time::timeout(Duration::from_secs(60), ws.next())
            .await
            .expect("a subscription status in time")
        {
            Some(Ok(Message::Text(t))) if t.contains(r#""extension":"postgres_changes""#) => {
                assert!(t.contains(r#""status":"ok""#), "subscription refused: {t}");
                return;
            }
            Some(Ok(_)) => continue,
            other => panic!("the socket ended before its subscription: {other:?}"),
        }
    }
}

/// Starts this binary again with `flag <port>` (a helper server) and waits
/// for it to say READY; it serves until its stdin closes.
pub fn spawn_helper(flag: &str, port: u16) -> std::process::Child {
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([flag, &port.to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "READY");
    child
}

/// Runs a helper server: `accept` for each connection on 127.0.0.1:`port`
/// (2 tokio threads), READY once listening, until stdin closes.
pub fn serve_helper<F, Fut>(port: u16, accept: F)
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    raise_nofile();
    let rt = crate::runtime();
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        println!("READY");
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                tokio::spawn(accept(stream));
            }
        });
        let _ = tokio::task::spawn_blocking(|| std::io::stdin().lines().count()).await;
    });
}
