//! The server in-process on `127.0.0.1:0`, driven by tokio-tungstenite
//! clients.

use super::*;
use crate::server::jwt::{
    self,
    tests::{hs256, SECRET},
};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

mod database;
mod http;
mod limits;
mod presence;

type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;

const WAIT: Duration = Duration::from_secs(5);

struct TestServer {
    addr: std::net::SocketAddr,
    ctx: Arc<Context>,
    shutdown: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

fn settings(secret: &str, max_connections: usize, max_channels: usize) -> Settings {
    Settings {
        verifier: Verifier::new(Some(secret), None).unwrap(),
        max_connections,
        max_channels_per_connection: max_channels,
        limits: Limits::default(),
        restart_notice_window: Duration::ZERO,
    }
}

impl TestServer {
    async fn start() -> TestServer {
        Self::with(settings(SECRET, 100, 100), Options::default()).await
    }

    async fn with(settings: Settings, options: Options) -> TestServer {
        Self::with_main(settings, options, None).await
    }

    /// A server whose main-thread requests go to `main`.
    async fn with_main(settings: Settings, options: Options, main: Option<link::MainLink>) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let counters: &'static Counters = Box::leak(Box::default());
        let ctx = Context::new(settings, options, counters, main);
        let (shutdown, rx) = watch::channel(false);
        let task = tokio::spawn(run(vec![listener], ctx.clone(), rx));
        TestServer {
            addr,
            ctx,
            shutdown,
            task: Some(task),
        }
    }

    fn url(&self, token: &str, vsn: Option<&str>) -> String {
        let mut url = format!("ws://{}/realtime/v1/websocket?apikey={token}", self.addr);
        if let Some(v) = vsn {
            url += &format!("&vsn={v}");
        }
        url
    }

    async fn connect(&self) -> Client {
        self.connect_with(&token(60), Some("2.0.0")).await
    }

    async fn connect_with(&self, token: &str, vsn: Option<&str>) -> Client {
        tokio_tungstenite::connect_async(self.url(token, vsn))
            .await
            .expect("upgrade")
            .0
    }

    /// The refused upgrade's status and `error` message.
    async fn refused(&self, url: &str) -> (u16, String) {
        match tokio_tungstenite::connect_async(url).await {
            Err(WsError::Http(response)) => {
                let body: Value = serde_json::from_slice(response.body().as_deref().unwrap_or(b"{}")).unwrap();
                (
                    response.status().as_u16(),
                    body["error"].as_str().unwrap_or("").to_owned(),
                )
            }
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("upgrade should have been refused"),
        }
    }

    fn counter(&self, name: &str) -> u64 {
        self.ctx
            .counters()
            .snapshot()
            .into_iter()
            .find(|(n, _)| *n == name)
            .unwrap()
            .1
    }

    async fn stop(mut self) {
        self.shutdown.send(true).unwrap();
        tokio::time::timeout(WAIT, self.task.take().unwrap())
            .await
            .expect("server stops")
            .unwrap();
    }
}

fn token(valid_for: i64) -> String {
    hs256(
        SECRET,
        json!({"role": "authenticated", "exp": jwt::now() + valid_for, "sub": "u1"}),
    )
}

async fn send(c: &mut Client, v: Value) {
    c.send(Message::Text(v.to_string().into())).await.unwrap();
}

/// The next text frame as JSON (skipping nothing: a binary frame fails).
async fn recv(c: &mut Client) -> Value {
    match tokio::time::timeout(WAIT, c.next()).await.expect("a frame in time") {
        Some(Ok(Message::Text(t))) => serde_json::from_str(&t).unwrap(),
        other => panic!("expected a text frame, got {other:?}"),
    }
}

/// Waits for the server's close frame and returns its code.
async fn closed(c: &mut Client) -> CloseCode {
    loop {
        match tokio::time::timeout(WAIT, c.next()).await.expect("a close in time") {
            Some(Ok(Message::Close(Some(frame)))) => return frame.code,
            Some(Ok(Message::Close(None))) => panic!("close without a code"),
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
}

async fn join(c: &mut Client, join_ref: &str, topic: &str, payload: Value) -> Value {
    send(c, json!([join_ref, join_ref, topic, "phx_join", payload])).await;
    recv(c).await
}

async fn heartbeat_ok(c: &mut Client, r: &str) {
    send(c, json!([null, r, "phoenix", "heartbeat", {}])).await;
    assert_eq!(
        recv(c).await,
        json!([null, r, "phoenix", "phx_reply", {"status": "ok", "response": {}}])
    );
}

#[tokio::test]
async fn heartbeat_v2_and_v1() {
    let server = TestServer::start().await;
    let mut c = server.connect().await;
    heartbeat_ok(&mut c, "9").await;

    // vsn 1.0.0, and a missing vsn means 1.0.0
    for vsn in [Some("1.0.0"), None] {
        let mut v1 = server.connect_with(&token(60), vsn).await;
        send(
            &mut v1,
            json!({"topic": "phoenix", "event": "heartbeat", "payload": {}, "ref": "3"}),
        )
        .await;
        assert_eq!(
            recv(&mut v1).await,
            json!({"topic": "phoenix", "event": "phx_reply", "payload": {"status": "ok", "response": {}}, "ref": "3"})
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn join_then_leave() {
    let server = TestServer::start().await;
    let mut c = server.connect().await;
    let reply = join(
        &mut c,
        "6",
        "realtime:room1",
        json!({"config": {"broadcast": {"self": true}, "postgres_changes": []}}),
    )
    .await;
    assert_eq!(
        reply,
        json!(["6", "6", "realtime:room1", "phx_reply", {"status": "ok", "response": {"postgres_changes": []}}])
    );
    assert_eq!(server.counter("channels_joined"), 1);

    send(&mut c, json!(["6", "7", "realtime:room1", "phx_leave", {}])).await;
    assert_eq!(
        recv(&mut c).await,
        json!(["6", "7", "realtime:room1", "phx_reply", {"status": "ok", "response": {}}])
    );
    assert_eq!(recv(&mut c).await, json!(["6", "6", "realtime:room1", "phx_close", {}]));
    assert_eq!(server.counter("channels_joined"), 0);

    // after the leave, the topic is unknown again
    send(&mut c, json!(["6", "8", "realtime:room1", "phx_leave", {}])).await;
    assert_eq!(recv(&mut c).await[4]["response"]["reason"], "unmatched topic");
    server.stop().await;
}

#[tokio::test]
async fn presence_enabled_join_gets_a_presence_state() {
    let server = TestServer::start().await;
    let mut c = server.connect().await;
    let reply = join(
        &mut c,
        "1",
        "realtime:p",
        json!({"config": {"presence": {"key": "u1", "enabled": true}}}),
    )
    .await;
    assert_eq!(reply[4]["status"], "ok");
    assert_eq!(
        recv(&mut c).await,
        json!(["1", null, "realtime:p", "presence_state", {}])
    );
    server.stop().await;
}

#[tokio::test]
async fn unmatched_topic() {
    let server = TestServer::start().await;
    let mut c = server.connect().await;
    send(
        &mut c,
        json!(["3", "4", "realtime:nowhere", "broadcast", {"type": "broadcast", "event": "e", "payload": {}}]),
    )
    .await;
    assert_eq!(
        recv(&mut c).await,
        json!([null, "4", "realtime:nowhere", "phx_reply", {"status": "error", "response": {"reason": "unmatched topic"}}])
    );
    // topics outside realtime:* cannot be joined
    let reply = join(&mut c, "5", "other:room", json!({})).await;
    assert_eq!(reply[4]["response"]["reason"], "unmatched topic");
    let reply = join(&mut c, "6", "realtime:", json!({})).await;
    assert_eq!(
        reply[4]["response"]["reason"],
        "TopicNameRequired: You must provide a topic name"
    );
    server.stop().await;
}

#[tokio::test]
async fn junk_frames_are_dropped_and_counted() {
    let server = TestServer::start().await;
    let mut c = server.connect().await;
    c.send(Message::Text("this is not json".into())).await.unwrap();
    c.send(Message::Text("[1,2]".into())).await.unwrap();
    c.send(Message::Text(r#"{"topic":"phoenix"}"#.into())).await.unwrap();
    c.send(Message::Binary(vec![9, 9, 9].into())).await.unwrap();
    c.send(Message::Binary(vec![3, 1, 1, 200].into())).await.unwrap();
    // the socket is still served, in order, after the junk
    heartbeat_ok(&mut c, "10").await;
    assert_eq!(server.counter("malformed_frames"), 5);
    server.stop().await;
}

#[tokio::test]
async fn oversized_frame_closes_with_1009() {
    let options = Options {
        max_frame_bytes: 64 * 1024,
        ..Options::default()
    };
    let server = TestServer::with(settings(SECRET, 10, 10), options).await;
    let mut c = server.connect().await;
    let big = format!(
        r#"[null,"1","phoenix","heartbeat",{{"pad":"{}"}}]"#,
        "x".repeat(100 * 1024)
    );
    // The server may close before the whole frame is written.
    let _ = c.send(Message::Text(big.into())).await;
    assert_eq!(closed(&mut c).await, CloseCode::Size);
    assert_eq!(server.counter("oversized_frames"), 1);
    // a frame under the limit on another socket is fine
    let mut ok = server.connect().await;
    heartbeat_ok(&mut ok, "2").await;
    server.stop().await;
}

#[tokio::test]
async fn channel_limit() {
    let server = TestServer::with(settings(SECRET, 10, 2), Options::default()).await;
    let mut c = server.connect().await;
    assert_eq!(join(&mut c, "1", "realtime:a", json!({})).await[4]["status"], "ok");
    assert_eq!(join(&mut c, "2", "realtime:b", json!({})).await[4]["status"], "ok");
    let third = join(&mut c, "3", "realtime:c", json!({})).await;
    assert_eq!(
        third[4],
        json!({"status": "error", "response": {"reason": "ChannelRateLimitReached: Too many channels"}})
    );
    // rejoining a joined topic does not count twice
    send(&mut c, json!(["4", "4", "realtime:a", "phx_join", {}])).await;
    assert_eq!(recv(&mut c).await, json!(["1", "1", "realtime:a", "phx_close", {}]));
    assert_eq!(recv(&mut c).await[4]["status"], "ok");
    assert_eq!(server.counter("joins_refused"), 1);
    server.stop().await;
}

#[tokio::test]
async fn connection_limit_refuses_with_429() {
    let server = TestServer::with(settings(SECRET, 1, 10), Options::default()).await;
    let mut first = server.connect().await;
    let refused = server.refused(&server.url(&token(60), Some("2.0.0"))).await;
    assert_eq!(refused, (429, "Too many connected users".into()));
    heartbeat_ok(&mut first, "1").await;
    drop(first);
    // the slot frees once the first connection has gone
    let deadline = Instant::now() + WAIT;
    loop {
        if let Ok((mut c, _)) = tokio_tungstenite::connect_async(server.url(&token(60), Some("2.0.0"))).await {
            heartbeat_ok(&mut c, "2").await;
            break;
        }
        assert!(Instant::now() < deadline, "slot was never freed");
        tokio::task::yield_now().await;
    }
    server.stop().await;
}

#[tokio::test]
async fn handshake_refusals() {
    let server = TestServer::start().await;
    let base = format!("ws://{}/realtime/v1/websocket", server.addr);
    assert_eq!(
        server.refused(&format!("{base}?vsn=2.0.0")).await,
        (401, "API key is missing".into())
    );
    assert_eq!(
        server.refused(&server.url(&token(-10), None)).await,
        (401, "Token has expired".into())
    );
    let forged = hs256(
        "not-the-secret-not-the-secret-not-the-secret",
        json!({"role": "service_role", "exp": jwt::now() + 60}),
    );
    assert_eq!(
        server.refused(&server.url(&forged, None)).await,
        (401, "Failed to validate JWT signature".into())
    );
    let no_role = hs256(SECRET, json!({"exp": jwt::now() + 60}));
    assert_eq!(
        server.refused(&server.url(&no_role, None)).await,
        (401, "Fields `role` and `exp` are required in JWT".into())
    );
    assert_eq!(
        server.refused(&server.url("garbage", None)).await,
        (401, "The token provided is not a valid JWT".into())
    );
    let wrong_path = format!("ws://{}/elsewhere?apikey={}", server.addr, token(60));
    assert_eq!(server.refused(&wrong_path).await.0, 404);
    assert_eq!(server.refused(&server.url(&token(60), Some("9.0.0"))).await.0, 400);
    assert_eq!(server.counter("handshakes_refused"), 7);
    assert_eq!(server.counter("connections_total"), 0);

    // the Phoenix path and the x-api-key header work too
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = format!("ws://{}/socket/websocket?vsn=2.0.0", server.addr)
        .into_client_request()
        .unwrap();
    request.headers_mut().insert("x-api-key", token(60).parse().unwrap());
    let (mut c, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    heartbeat_ok(&mut c, "1").await;
    server.stop().await;
}

#[tokio::test]
async fn join_with_bad_access_token_is_refused() {
    let server = TestServer::start().await;
    let mut c = server.connect().await;
    let expired = token(-30);
    let reply = join(&mut c, "1", "realtime:a", json!({"access_token": expired})).await;
    let reason = reply[4]["response"]["reason"].as_str().unwrap().to_owned();
    assert!(reason.starts_with("InvalidJWTToken: Token has expired "), "{reason}");
    let forged = hs256(
        "wrong-wrong-wrong-wrong-wrong-wrong-wrong",
        json!({"role": "anon", "exp": jwt::now() + 60}),
    );
    let reply = join(&mut c, "2", "realtime:a", json!({"access_token": forged})).await;
    assert_eq!(
        reply[4]["response"]["reason"],
        "JwtSignatureError: Failed to validate JWT signature"
    );
    // an opaque sb_ key falls back to the (valid) connect token
    let reply = join(&mut c, "3", "realtime:a", json!({"access_token": "sb_publishable_x"})).await;
    assert_eq!(reply[4]["status"], "ok");
    server.stop().await;
}

#[tokio::test]
async fn postgres_changes_without_a_database_and_private_joins_fail_clearly() {
    let server = TestServer::start().await;
    let mut c = server.connect().await;
    let binding = json!({"event": "*", "schema": "public", "table": "t", "filter": "id=eq.1"});
    let reply = join(
        &mut c,
        "1",
        "realtime:a",
        json!({"config": {"postgres_changes": [binding]}}),
    )
    .await;
    // the join succeeds (broadcast still works), the bindings get ids...
    assert_eq!(reply[4]["status"], "ok");
    let entry = &reply[4]["response"]["postgres_changes"][0];
    assert_eq!(entry["table"], "t");
    assert_eq!(entry["filter"], "id=eq.1");
    assert!(entry["id"].as_u64().unwrap() > 0);
    // ...and a system error says why no change will come
    let system = recv(&mut c).await;
    assert_eq!(system[3], "system");
    assert_eq!(system[4]["extension"], "postgres_changes");
    assert_eq!(system[4]["status"], "error");
    let private = join(&mut c, "2", "realtime:b", json!({"config": {"private": true}})).await;
    assert_eq!(private[4]["status"], "error");
    // a private channel needs the database to read its policies
    assert_eq!(
        private[4]["response"]["reason"],
        "Realtime was unable to connect to the project database"
    );
    assert_eq!(server.counter("channels_joined"), 1);
    server.stop().await;
}

/// A stand-in for the worker's main thread: accepts every subscription,
/// then pushes one event to it; reports unsubscriptions.
fn fake_main(rx: link::MainReceiver, unsubscribed: std::sync::mpsc::Sender<String>) {
    std::thread::spawn(move || {
        while let Ok(request) = rx.recv() {
            match request {
                link::MainRequest::Subscribe(s) => {
                    let ids: Vec<u32> = s.bindings.iter().map(|(id, _)| *id).collect();
                    let topic = s.key.topic.clone();
                    s.reply.send(Ok(())).unwrap();
                    let event = crate::server::protocol::Outbound::PostgresChanges {
                        topic,
                        ids,
                        data: Arc::from(r#"{"type":"INSERT","record":{"id":1}}"#),
                        encoded: Default::default(),
                    };
                    s.sink.send(Arc::new(event)).unwrap();
                }
                link::MainRequest::Unsubscribe(key) => unsubscribed.send(key.topic).unwrap(),
                // no database to ask: the reply is dropped
                link::MainRequest::Authorize(_) => {}
            }
        }
    });
}

#[tokio::test]
async fn postgres_changes_subscribe_through_the_main_thread() {
    let (waker, _wake_rx) = crate::server::wake::wake_pair().unwrap();
    let (link, rx) = link::main_link(waker);
    let (unsub_tx, unsub_rx) = std::sync::mpsc::channel();
    fake_main(rx, unsub_tx);
    let server = TestServer::with_main(settings(SECRET, 10, 10), Options::default(), Some(link)).await;

    let mut c = server.connect().await;
    let binding = json!({"event": "INSERT", "schema": "public", "table": "t"});
    let reply = join(
        &mut c,
        "1",
        "realtime:a",
        json!({"config": {"postgres_changes": [binding]}}),
    )
    .await;
    let id = reply[4]["response"]["postgres_changes"][0]["id"].clone();
    // join reply, then "Subscribed to PostgreSQL", then the event
    assert_eq!(
        recv(&mut c).await,
        json!(["1", null, "realtime:a", "system", {"extension": "postgres_changes", "status": "ok", "message": "Subscribed to PostgreSQL", "channel": "a"}])
    );
    let event = recv(&mut c).await;
    assert_eq!(event[3], "postgres_changes");
    assert_eq!(event[4]["ids"], json!([id]));
    assert_eq!(event[4]["data"]["record"], json!({"id": 1}));
    // a refresh to another identity re-subscribes: a new system message
    let other = hs256(SECRET, json!({"role": "service_role", "exp": jwt::now() + 60}));
    send(
        &mut c,
        json!(["1", "3", "realtime:a", "access_token", {"access_token": other}]),
    )
    .await;
    assert_eq!(recv(&mut c).await[4]["message"], "Subscribed to PostgreSQL");
    assert_eq!(recv(&mut c).await[3], "postgres_changes");
    send(&mut c, json!(["1", "2", "realtime:a", "phx_leave", {}])).await;
    assert_eq!(recv(&mut c).await[4]["status"], "ok");
    assert_eq!(unsub_rx.recv_timeout(WAIT).unwrap(), "realtime:a");
    server.stop().await;
}

/// For `restart_notice_window` after the server started, a postgres_changes
/// join hears, right after SUBSCRIBED, that changes committed before may be
/// missing; a re-subscription after a token refresh does not (the channel
/// was live), and past the window nobody does (the other tests).
#[tokio::test]
async fn joins_soon_after_a_start_are_told_to_refetch() {
    let (waker, _wake_rx) = crate::server::wake::wake_pair().unwrap();
    let (link, rx) = link::main_link(waker);
    let (unsub_tx, _unsub_rx) = std::sync::mpsc::channel();
    fake_main(rx, unsub_tx);
    let settings = Settings {
        restart_notice_window: Duration::from_secs(600),
        ..settings(SECRET, 10, 10)
    };
    let server = TestServer::with_main(settings, Options::default(), Some(link)).await;
    let mut c = server.connect().await;
    let binding = json!({"event": "INSERT", "schema": "public", "table": "t"});
    join(
        &mut c,
        "1",
        "realtime:a",
        json!({"config": {"postgres_changes": [binding]}}),
    )
    .await;
    assert_eq!(recv(&mut c).await[4]["message"], "Subscribed to PostgreSQL");
    let notice = recv(&mut c).await;
    assert_eq!(notice[0], "1");
    assert_eq!(notice[3], "system");
    assert_eq!(notice[4]["extension"], "postgres_changes");
    assert_eq!(notice[4]["status"], "error");
    let message = notice[4]["message"].as_str().unwrap();
    assert!(message.starts_with("The realtime server started at 20"), "{message}");
    assert!(message.ends_with("refetch to catch up"), "{message}");
    assert_eq!(recv(&mut c).await[3], "postgres_changes");
    let other = hs256(SECRET, json!({"role": "service_role", "exp": jwt::now() + 60}));
    send(
        &mut c,
        json!(["1", "3", "realtime:a", "access_token", {"access_token": other}]),
    )
    .await;
    assert_eq!(recv(&mut c).await[4]["message"], "Subscribed to PostgreSQL");
    assert_eq!(recv(&mut c).await[3], "postgres_changes");
    server.stop().await;
}

#[tokio::test]
async fn access_token_refresh() {
    let server = TestServer::start().await;
    let mut c = server.connect().await;
    assert_eq!(join(&mut c, "1", "realtime:a", json!({})).await[4]["status"], "ok");
    // a valid refresh gets no reply; the channel stays
    send(
        &mut c,
        json!(["1", "2", "realtime:a", "access_token", {"access_token": token(120)}]),
    )
    .await;
    // sb_ keys and nulls are ignored
    send(
        &mut c,
        json!(["1", "3", "realtime:a", "access_token", {"access_token": "sb_secret_x"}]),
    )
    .await;
    send(
        &mut c,
        json!(["1", "4", "realtime:a", "access_token", {"access_token": null}]),
    )
    .await;
    heartbeat_ok(&mut c, "5").await;
    // an invalid one ends the channel: system error, then phx_close
    send(
        &mut c,
        json!(["1", "6", "realtime:a", "access_token", {"access_token": "not-a-jwt"}]),
    )
    .await;
    assert_eq!(
        recv(&mut c).await,
        json!(["1", null, "realtime:a", "system", {"extension": "system", "status": "error", "message": "The token provided is not a valid JWT", "channel": "a"}])
    );
    assert_eq!(recv(&mut c).await, json!(["1", "1", "realtime:a", "phx_close", {}]));
    assert_eq!(server.counter("channels_joined"), 0);
    // the socket itself stays
    heartbeat_ok(&mut c, "7").await;
    server.stop().await;
}

#[tokio::test]
async fn expiry_is_scheduled() {
    let server = TestServer::start().await;
    let mut c = server.connect().await;
    let short = token(2);
    assert_eq!(
        join(&mut c, "1", "realtime:a", json!({"access_token": short})).await[4]["status"],
        "ok"
    );
    assert_eq!(
        join(&mut c, "2", "realtime:b", json!({"access_token": token(600)})).await[4]["status"],
        "ok"
    );
    // no frames from us: the server wakes up by itself at expiry
    let system = recv(&mut c).await;
    assert_eq!(system[2], "realtime:a");
    assert_eq!(system[3], "system");
    assert!(
        system[4]["message"].as_str().unwrap().starts_with("Token has expired "),
        "{system}"
    );
    assert_eq!(recv(&mut c).await, json!(["1", "1", "realtime:a", "phx_close", {}]));
    // the other channel is untouched
    send(&mut c, json!(["2", "3", "realtime:b", "phx_leave", {}])).await;
    assert_eq!(recv(&mut c).await[4]["status"], "ok");
    server.stop().await;
}

#[tokio::test]
async fn idle_socket_is_closed() {
    let options = Options {
        idle_timeout: Duration::from_millis(300),
        ..Options::default()
    };
    let server = TestServer::with(settings(SECRET, 10, 10), options).await;
    let mut c = server.connect().await;
    let start = Instant::now();
    assert_eq!(closed(&mut c).await, CloseCode::Normal);
    assert!(start.elapsed() >= Duration::from_millis(250));
    assert_eq!(server.counter("idle_closed"), 1);
    server.stop().await;
}

#[tokio::test]
async fn shutdown_closes_with_1001() {
    let server = TestServer::start().await;
    let mut a = server.connect().await;
    let mut b = server.connect_with(&token(60), Some("1.0.0")).await;
    assert_eq!(join(&mut a, "1", "realtime:a", json!({})).await[4]["status"], "ok");
    server.shutdown.send(true).unwrap();
    assert_eq!(closed(&mut a).await, CloseCode::Away);
    assert_eq!(closed(&mut b).await, CloseCode::Away);
    let ctx = server.ctx.clone();
    server.stop().await;
    assert_eq!(
        ctx.counters()
            .connections_open
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

#[tokio::test]
async fn reload_switches_the_secret_without_dropping_connections() {
    let server = TestServer::start().await;
    let mut old = server.connect().await;
    assert_eq!(join(&mut old, "1", "realtime:a", json!({})).await[4]["status"], "ok");
    let new_secret = "rotated-secret-rotated-secret-rotated-secret";
    server.ctx.update_settings(settings(new_secret, 100, 100));
    heartbeat_ok(&mut old, "2").await;
    // new upgrades need the new secret
    assert_eq!(server.refused(&server.url(&token(60), None)).await.0, 401);
    let fresh = hs256(new_secret, json!({"role": "anon", "exp": jwt::now() + 60}));
    let mut c = server.connect_with(&fresh, Some("2.0.0")).await;
    heartbeat_ok(&mut c, "1").await;
    server.stop().await;
}

#[tokio::test]
async fn a_panic_ends_one_connection_only() {
    let server = TestServer::start().await;
    let mut bystander = server.connect().await;
    let mut victim = server.connect().await;
    assert_eq!(join(&mut victim, "1", "realtime:a", json!({})).await[4]["status"], "ok");
    send(&mut victim, json!([null, "1", "phoenix", "__test_panic__", {}])).await;
    // the victim's socket is dropped without a close frame
    let end = tokio::time::timeout(WAIT, victim.next()).await.expect("victim ends");
    assert!(!matches!(end, Some(Ok(Message::Text(_)))), "{end:?}");
    heartbeat_ok(&mut bystander, "2").await;
    let mut next = server.connect().await;
    heartbeat_ok(&mut next, "3").await;
    assert_eq!(server.counter("network_panics"), 1);
    // the dead connection's channel left with it
    assert_eq!(server.counter("channels_joined"), 0);
    assert_eq!(server.ctx.hub.members("realtime:a"), 0);
    server.stop().await;
}

#[tokio::test]
async fn broadcast_between_sockets() {
    let server = TestServer::start().await;
    let mut a = server.connect().await;
    let mut b = server.connect().await;
    let mut v1 = server.connect_with(&token(60), Some("1.0.0")).await;
    assert_eq!(
        join(
            &mut a,
            "1",
            "realtime:room",
            json!({"config": {"broadcast": {"ack": true}}})
        )
        .await[4]["status"],
        "ok"
    );
    assert_eq!(
        join(
            &mut b,
            "1",
            "realtime:room",
            json!({"config": {"broadcast": {"self": true}}})
        )
        .await[4]["status"],
        "ok"
    );
    send(
        &mut v1,
        json!({"topic": "realtime:room", "event": "phx_join", "payload": {}, "ref": "1", "join_ref": "1"}),
    )
    .await;
    assert_eq!(recv(&mut v1).await["payload"]["status"], "ok");

    // a sends kind 3 with ack: a gets the ack only (self is off)
    let mut frame = vec![3, 1, 1, 13, 3, 0, 1];
    frame.extend_from_slice(b"12realtime:roomcur{\"x\":1}");
    a.send(Message::Binary(frame.into())).await.unwrap();
    assert_eq!(
        recv(&mut a).await,
        json!(["1", "2", "realtime:room", "phx_reply", {"status": "ok", "response": {}}])
    );
    // b gets kind 4
    match tokio::time::timeout(WAIT, b.next()).await.unwrap() {
        Some(Ok(Message::Binary(bytes))) => {
            let mut expected = vec![4, 13, 3, 0, 1];
            expected.extend_from_slice(b"realtime:roomcur{\"x\":1}");
            assert_eq!(&bytes[..], &expected[..]);
        }
        other => panic!("expected kind 4, got {other:?}"),
    }
    // the v1 socket gets JSON
    assert_eq!(
        recv(&mut v1).await,
        json!({"topic": "realtime:room", "event": "broadcast", "payload": {"type": "broadcast", "event": "cur", "payload": {"x": 1}}, "ref": null})
    );
    // b (self: true) sends the JSON text form: b receives its own
    send(
        &mut b,
        json!(["1", "5", "realtime:room", "broadcast", {"type": "broadcast", "event": "hi", "payload": {"y": 2}}]),
    )
    .await;
    assert!(matches!(
        tokio::time::timeout(WAIT, b.next()).await.unwrap(),
        Some(Ok(Message::Binary(_)))
    ));
    assert!(matches!(
        tokio::time::timeout(WAIT, a.next()).await.unwrap(),
        Some(Ok(Message::Binary(_)))
    ));
    assert_eq!(recv(&mut v1).await["payload"]["event"], "hi");
    assert_eq!(server.ctx.hub.members("realtime:room"), 3);
    drop(a);
    drop(b);
    drop(v1);
    let deadline = Instant::now() + WAIT;
    while server.ctx.hub.members("realtime:room") > 0 {
        assert!(Instant::now() < deadline, "members never left");
        tokio::task::yield_now().await;
    }
    server.stop().await;
}

/// The next frame, which must be binary.
async fn recv_binary(c: &mut Client) -> Vec<u8> {
    match tokio::time::timeout(WAIT, c.next()).await.expect("a frame in time") {
        Some(Ok(Message::Binary(b))) => b.to_vec(),
        other => panic!("expected a binary frame, got {other:?}"),
    }
}

/// A stand-in for the main thread's answers about private channels: what
/// each `sub` may read and write, changeable by the test.
type Rules = Arc<std::sync::Mutex<std::collections::HashMap<String, (link::Permissions, bool)>>>;

fn policy_main(rx: link::MainReceiver, rules: Rules) {
    std::thread::spawn(move || {
        while let Ok(request) = rx.recv() {
            if let link::MainRequest::Authorize(a) = request {
                let sub = a.claims.sub.clone().unwrap_or_default();
                let (read, write) = rules.lock().unwrap().get(&sub).copied().unwrap_or_default();
                let answer = match a.question {
                    link::Question::Read => read,
                    link::Question::Write(_) => link::Permissions {
                        broadcast: write,
                        presence: write,
                    },
                };
                let _ = a.reply.send(Ok(answer));
            }
        }
    });
}

fn user(sub: &str, valid_for: i64) -> String {
    hs256(
        SECRET,
        json!({"role": "authenticated", "exp": jwt::now() + valid_for, "sub": sub}),
    )
}

/// (Longer than a screen: it plays the main thread's side of each join
/// in turn, so the asks and answers read in order.)
#[tokio::test]
async fn private_channels_follow_their_permissions() {
    let (waker, _wake_rx) = crate::server::wake::wake_pair().unwrap();
    let (link, rx) = link::main_link(waker);
    let rules: Rules = Arc::default();
    let both = link::Permissions {
        broadcast: true,
        presence: true,
    };
    rules.lock().unwrap().insert("member".into(), (both, true));
    rules.lock().unwrap().insert("reader".into(), (both, false));
    policy_main(rx, rules.clone());
    let server = TestServer::with_main(settings(SECRET, 10, 10), Options::default(), Some(link)).await;
    let private = json!({"config": {"private": true, "broadcast": {"ack": true}}});
    let mut member = server.connect_with(&user("member", 60), Some("2.0.0")).await;
    let mut reader = server.connect_with(&user("reader", 60), Some("2.0.0")).await;
    let mut public = server.connect().await;
    assert_eq!(
        join(&mut member, "1", "realtime:room", private.clone()).await[4]["status"],
        "ok"
    );
    assert_eq!(
        join(&mut reader, "1", "realtime:room", private.clone()).await[4]["status"],
        "ok"
    );
    // the same topic, public: another channel altogether
    assert_eq!(
        join(
            &mut public,
            "1",
            "realtime:room",
            json!({"config": {"broadcast": {"ack": true}}})
        )
        .await[4]["status"],
        "ok"
    );
    // an outsider may not join
    let mut outsider = server.connect_with(&user("outsider", 60), Some("2.0.0")).await;
    let refused = join(&mut outsider, "1", "realtime:room", private.clone()).await;
    assert_eq!(refused[4]["status"], "error");
    assert_eq!(
        refused[4]["response"]["reason"],
        "Unauthorized: You do not have permissions to read from this Channel topic: room"
    );

    let note = |r: &str, text: &str| json!(["1", r, "realtime:room", "broadcast", {"type": "broadcast", "event": "note", "payload": {"text": text}}]);
    // a public broadcast never reaches the private channel, and the
    // reader may not write: its broadcast is refused and goes nowhere
    send(&mut public, note("2", "public")).await;
    assert_eq!(recv(&mut public).await[4]["status"], "ok");
    send(&mut reader, note("2", "from the reader")).await;
    let denied = recv(&mut reader).await;
    assert_eq!(denied[4]["status"], "error", "{denied}");
    assert_eq!(
        denied[4]["response"]["reason"],
        "Unauthorized: You do not have permissions to write to this Channel topic: room"
    );
    // the member may write: the reader hears it (a binary kind-4 frame),
    // and it is the first broadcast anyone on the private channel hears
    send(&mut member, note("2", "from the member")).await;
    assert_eq!(recv(&mut member).await[4]["status"], "ok");
    let heard = recv_binary(&mut reader).await;
    let heard = String::from_utf8_lossy(&heard);
    assert!(
        heard.contains("realtime:room") && heard.contains("from the member"),
        "{heard}"
    );

    // the reader loses its membership: the next token refresh ends the channel
    rules.lock().unwrap().remove("reader");
    send(
        &mut reader,
        json!(["1", "3", "realtime:room", "access_token", {"access_token": user("reader", 120)}]),
    )
    .await;
    let system = recv(&mut reader).await;
    assert_eq!(system[3], "system", "{system}");
    assert_eq!(
        system[4]["message"],
        "You no longer have permission to read from this Channel topic: room"
    );
    assert_eq!(recv(&mut reader).await[3], "phx_close");
    // and it hears nothing more: the next frame is the heartbeat reply
    send(&mut member, note("3", "after")).await;
    assert_eq!(recv(&mut member).await[4]["status"], "ok");
    heartbeat_ok(&mut reader, "9").await;
    server.stop().await;
}
