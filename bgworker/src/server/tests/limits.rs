//! What one client may not do to the server: make it wait for the main
//! thread, fill its memory, starve its timers, or hold it with joins and
//! handshakes past the limits (`Limits`).

use super::*;
use crate::changes::registry::ChannelKey;

/// A stand-in main thread that holds every subscription unanswered (the
/// test answers through the returned receiver) and reports
/// unsubscriptions.
fn slow_main(
    rx: link::MainReceiver,
) -> (
    std::sync::mpsc::Receiver<link::Subscribe>,
    std::sync::mpsc::Receiver<ChannelKey>,
) {
    let (held_tx, held) = std::sync::mpsc::channel();
    let (unsub_tx, unsubscribed) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        while let Ok(request) = rx.recv() {
            match request {
                link::MainRequest::Subscribe(s) => {
                    let _ = held_tx.send(s);
                }
                link::MainRequest::Unsubscribe(key) => {
                    let _ = unsub_tx.send(key);
                }
                link::MainRequest::Authorize(_) => {}
            }
        }
    });
    (held, unsubscribed)
}

/// A main thread that subscribes everything, noting the role each
/// subscription was asked for, in order; and its wake-up socket's end,
/// to keep while the server runs.
fn role_recording_main() -> (
    link::MainLink,
    Arc<std::sync::Mutex<Vec<String>>>,
    crate::server::wake::WakeReceiver,
) {
    let (waker, wake_rx) = crate::server::wake::wake_pair().unwrap();
    let (link, rx) = link::main_link(waker);
    let asked = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let seen = asked.clone();
    std::thread::spawn(move || {
        while let Ok(request) = rx.recv() {
            if let link::MainRequest::Subscribe(s) = request {
                seen.lock().unwrap().push(s.claims.role.clone());
                let _ = s.reply.send(Ok(()));
            }
        }
    });
    (link, asked, wake_rx)
}

fn with_limits(limits: Limits) -> Settings {
    Settings {
        limits,
        ..settings(SECRET, 100, 100)
    }
}

async fn slow_server(
    options: Options,
) -> (
    TestServer,
    std::sync::mpsc::Receiver<link::Subscribe>,
    std::sync::mpsc::Receiver<ChannelKey>,
) {
    let (waker, _wake_rx) = crate::server::wake::wake_pair().unwrap();
    let (link, rx) = link::main_link(waker);
    let (held, unsubscribed) = slow_main(rx);
    let server = TestServer::with_main(settings(SECRET, 10, 10), options, Some(link)).await;
    (server, held, unsubscribed)
}

fn pg_join(filter: Option<&str>) -> Value {
    let mut binding = json!({"event": "*", "schema": "public", "table": "t"});
    if let Some(f) = filter {
        binding["filter"] = json!(f);
    }
    json!({"config": {"postgres_changes": [binding]}})
}

#[tokio::test]
async fn a_join_waiting_for_the_main_thread_holds_nothing_else_up() {
    let (server, held, unsubscribed) = slow_server(Options::default()).await;
    let mut c = server.connect().await;
    assert_eq!(join(&mut c, "1", "realtime:other", json!({})).await[4]["status"], "ok");
    // a postgres_changes join the main thread does not answer yet
    send(&mut c, json!(["2", "2", "realtime:slow", "phx_join", pg_join(None)])).await;
    let pending = tokio::task::spawn_blocking(move || held.recv_timeout(WAIT).unwrap())
        .await
        .unwrap();
    // meanwhile: heartbeats, another channel's broadcasts, another leave
    heartbeat_ok(&mut c, "3").await;
    let mut other = server.connect().await;
    assert_eq!(
        join(&mut other, "1", "realtime:other", json!({})).await[4]["status"],
        "ok"
    );
    send(
        &mut other,
        json!(["1", "2", "realtime:other", "broadcast", {"type": "broadcast", "event": "e", "payload": {"n": 1}}]),
    )
    .await;
    match tokio::time::timeout(WAIT, c.next()).await.unwrap() {
        Some(Ok(Message::Binary(bytes))) => assert!(String::from_utf8_lossy(&bytes).contains("\"n\":1")),
        other => panic!("expected the broadcast, got {other:?}"),
    }
    send(&mut c, json!(["1", "4", "realtime:other", "phx_leave", {}])).await;
    assert_eq!(recv(&mut c).await[4]["status"], "ok");
    assert_eq!(recv(&mut c).await[3], "phx_close");
    // then the answer: the join's reply and its status, in that order
    pending.reply.send(Ok(())).unwrap();
    let reply = recv(&mut c).await;
    assert_eq!(
        (reply[1].as_str(), reply[3].as_str()),
        (Some("2"), Some("phx_reply")),
        "{reply}"
    );
    assert_eq!(recv(&mut c).await[4]["message"], "Subscribed to PostgreSQL");
    assert!(unsubscribed.try_recv().is_err());
    server.stop().await;
}

// (multi-threaded: the test blocks on the stand-in main thread's reports)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_end_with_their_channel_however_it_ends() {
    let options = Options {
        ask_timeout: Duration::from_millis(200),
        ..Options::default()
    };
    let (server, held, unsubscribed) = slow_server(options).await;
    let held = std::sync::Mutex::new(held);
    let next_held = || held.lock().unwrap().recv_timeout(WAIT).unwrap();
    let next_unsubscribed = || unsubscribed.recv_timeout(WAIT).unwrap();
    let mut c = server.connect().await;

    // left while joining (what realtime-js does when a join times out)
    send(&mut c, json!(["1", "1", "realtime:left", "phx_join", pg_join(None)])).await;
    let first = next_held();
    send(&mut c, json!(["1", "2", "realtime:left", "phx_leave", {}])).await;
    assert_eq!(recv(&mut c).await[4]["status"], "ok");
    assert_eq!(next_unsubscribed(), first.key);

    // not answered in time: refused, and ended in case the answer comes
    send(&mut c, json!(["3", "3", "realtime:late", "phx_join", pg_join(None)])).await;
    let late = next_held();
    assert_eq!(recv(&mut c).await[4]["status"], "ok");
    let status = recv(&mut c).await;
    assert!(
        status[4]["message"].as_str().unwrap().starts_with("Timed out"),
        "{status}"
    );
    assert_eq!(next_unsubscribed(), late.key);
    // its late answer changes nothing: the next frame is the heartbeat's
    let _ = late.reply.send(Ok(()));
    heartbeat_ok(&mut c, "4").await;

    // replaced by a rejoin: the old join ends, the new one is another key
    send(&mut c, json!(["5", "5", "realtime:twice", "phx_join", pg_join(None)])).await;
    let old = next_held();
    send(&mut c, json!(["6", "6", "realtime:twice", "phx_join", pg_join(None)])).await;
    assert_eq!(next_unsubscribed(), old.key);
    let new = next_held();
    assert_ne!(new.key, old.key);
    new.reply.send(Ok(())).unwrap();
    // (the close of the old join, then the new one's reply and status)
    assert_eq!(recv(&mut c).await[3], "phx_close");
    assert_eq!(recv(&mut c).await[4]["status"], "ok");
    assert_eq!(recv(&mut c).await[4]["message"], "Subscribed to PostgreSQL");

    // the socket closes: its subscription ends
    drop(c);
    assert_eq!(next_unsubscribed(), new.key);
    server.stop().await;
}

#[tokio::test]
async fn a_reader_too_far_behind_is_told_and_disconnected() {
    let limits = Limits {
        max_pending_bytes: 512 * 1024,
        ..Limits::default()
    };
    let server = TestServer::with(with_limits(limits), Options::default()).await;
    let mut stalled = server.connect().await;
    let mut sender = server.connect().await;
    for c in [&mut stalled, &mut sender] {
        assert_eq!(join(c, "1", "realtime:big", json!({})).await[4]["status"], "ok");
    }
    // 200 broadcasts of 100 kB: far more than the socket buffers and the
    // queue together hold, while `stalled` reads nothing
    let payload = format!("{{\"blob\":\"{}\"}}", "x".repeat(100_000));
    let mut most_pending = 0;
    for n in 0..200 {
        let mut frame = vec![3, 0, 0, 12, 1, 0, 1];
        frame.extend_from_slice(b"realtime:bige");
        frame.extend_from_slice(payload.as_bytes());
        sender.send(Message::Binary(frame.into())).await.unwrap();
        if n % 20 == 0 {
            heartbeat_ok(&mut sender, "h").await;
        }
        most_pending = most_pending.max(server.ctx.budget.pending_bytes());
    }
    assert!(most_pending <= 512 * 1024 + 200_000, "{most_pending} bytes waited");
    // the stalled reader: what was written before, then one notice, then
    // the close (1013: try again later)
    let mut notice = None;
    let code = loop {
        match tokio::time::timeout(WAIT, stalled.next())
            .await
            .expect("frames in time")
        {
            Some(Ok(Message::Text(t))) => notice = Some(t.to_string()),
            Some(Ok(Message::Close(Some(frame)))) => break frame.code,
            Some(Ok(_)) => continue,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(code, CloseCode::Again);
    let notice = notice.expect("a notice before the close");
    assert!(notice.contains("pg_realtime.max_pending_bytes"), "{notice}");
    assert_eq!(server.counter("clients_too_far_behind"), 1);
    assert_eq!(server.ctx.budget.pending_bytes(), 0);
    heartbeat_ok(&mut sender, "last").await;
    server.stop().await;
}

#[tokio::test]
async fn a_stream_of_messages_does_not_starve_the_idle_timer() {
    let options = Options {
        idle_timeout: Duration::from_millis(300),
        ..Options::default()
    };
    let limits = Limits {
        max_pending_bytes: 1 << 30,
        max_pending_bytes_total: 1 << 30,
        ..Limits::default()
    };
    let server = TestServer::with(with_limits(limits), options).await;
    let mut quiet = server.connect().await;
    assert_eq!(
        join(&mut quiet, "1", "realtime:flood", json!({})).await[4]["status"],
        "ok"
    );
    // four senders flood the topic faster than one reader takes it, for
    // longer than the idle timeout (keeping themselves alive); each one's
    // last broadcast is a sentinel the quiet reader must not get to
    let mut floods = Vec::new();
    for _ in 0..4 {
        let mut sender = server.connect().await;
        assert_eq!(
            join(&mut sender, "1", "realtime:flood", json!({})).await[4]["status"],
            "ok"
        );
        floods.push(tokio::spawn(async move {
            let started = Instant::now();
            let mut n = 0u64;
            loop {
                let last = started.elapsed() >= Duration::from_millis(1500);
                let event = if last { "last" } else { "more" };
                send(&mut sender, json!(["1", null, "realtime:flood", "broadcast", {"type": "broadcast", "event": event, "payload": {"n": n}}])).await;
                n += 1;
                if last {
                    return sender;
                }
            }
        }));
    }
    let code = loop {
        match tokio::time::timeout(WAIT, quiet.next()).await.expect("frames in time") {
            Some(Ok(Message::Binary(b))) => {
                assert!(
                    !String::from_utf8_lossy(&b).contains("last"),
                    "still open at the end of the flood"
                );
            }
            Some(Ok(Message::Close(Some(frame)))) => break frame.code,
            Some(Ok(_)) => continue,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(code, CloseCode::Normal);
    for flood in floods {
        let _ = flood.await;
    }
    server.stop().await;
}

#[tokio::test]
async fn joins_over_the_limits_are_refused_clearly() {
    let limits = Limits {
        max_bindings_per_join: 3,
        max_filter_conditions: 2,
        max_conditions_per_join: 5,
        max_filter_bytes: 64,
        joins_per_second_per_connection: 6,
        ..Limits::default()
    };
    let server = TestServer::with(with_limits(limits), Options::default()).await;
    let mut c = server.connect().await;
    let binding = |filter: &str| json!({"event": "*", "schema": "public", "table": "t", "filter": filter});
    let cases = [
        (
            json!([
                binding("a=eq.1"),
                binding("a=eq.2"),
                binding("a=eq.3"),
                binding("a=eq.4")
            ]),
            "pg_realtime.max_bindings_per_join (3)",
        ),
        (
            json!([binding("a=eq.1,b=eq.2,c=eq.3")]),
            "pg_realtime.max_filter_conditions (2)",
        ),
        (
            json!([binding(&format!("a=eq.{}", "1".repeat(100)))]),
            "pg_realtime.max_filter_bytes (64)",
        ),
        (
            json!([
                binding("a=eq.1,b=eq.2"),
                binding("a=eq.1,b=eq.2"),
                binding("a=eq.1,b=eq.2")
            ]),
            "pg_realtime.max_conditions_per_join (5)",
        ),
    ];
    for (i, (bindings, why)) in cases.iter().enumerate() {
        let topic = format!("realtime:limit{i}");
        let r = i.to_string();
        let reply = join(&mut c, &r, &topic, json!({"config": {"postgres_changes": bindings}})).await;
        assert_eq!(reply[4]["status"], "ok", "{reply}");
        let system = recv(&mut c).await;
        assert_eq!(system[4]["status"], "error", "{system}");
        assert!(system[4]["message"].as_str().unwrap().contains(why), "{system}");
    }
    // six joins a second on this connection: the seventh within the second
    // is refused
    let mut refused = None;
    for n in 4..12 {
        let reply = join(&mut c, &n.to_string(), &format!("realtime:rate{n}"), json!({})).await;
        if reply[4]["status"] == "error" {
            refused = Some(reply);
            break;
        }
    }
    let refused = refused.expect("a join over the rate");
    assert_eq!(
        refused[4]["response"]["reason"],
        "ClientJoinRateLimitReached: Too many joins per second"
    );
    server.stop().await;
}

#[tokio::test]
async fn upgrades_past_the_handshake_limit_get_429() {
    let limits = Limits {
        max_pending_handshakes: 2,
        ..Limits::default()
    };
    let server = TestServer::with(with_limits(limits), Options::default()).await;
    // two upgrades that never send their request hold both places
    let idle: Vec<TcpStream> = vec![
        TcpStream::connect(server.addr).await.unwrap(),
        TcpStream::connect(server.addr).await.unwrap(),
    ];
    // (wait until the server has accepted both: the third is refused)
    let deadline = Instant::now() + WAIT;
    while server.ctx.handshaking.load(std::sync::atomic::Ordering::Acquire) < 2 {
        assert!(Instant::now() < deadline, "the server never accepted them");
        tokio::task::yield_now().await;
    }
    let (status, error) = server.refused(&server.url(&token(60), Some("2.0.0"))).await;
    assert_eq!((status, error.as_str()), (429, "Too many connected users"));
    drop(idle);
    let deadline = Instant::now() + WAIT;
    while server.ctx.handshaking.load(std::sync::atomic::Ordering::Acquire) > 0 {
        assert!(Instant::now() < deadline, "the idle upgrades were never let go");
        tokio::task::yield_now().await;
    }
    let mut c = server.connect().await;
    heartbeat_ok(&mut c, "1").await;
    server.stop().await;
}

#[tokio::test]
async fn sockets_past_the_descriptor_capacity_get_429() {
    let server = TestServer::start().await;
    server.ctx.set_socket_capacity(2);
    let mut a = server.connect().await;
    let mut b = server.connect().await;
    let (status, _) = server.refused(&server.url(&token(60), Some("2.0.0"))).await;
    assert_eq!(status, 429);
    heartbeat_ok(&mut a, "1").await;
    heartbeat_ok(&mut b, "1").await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_refreshes_count_as_joins() {
    let (link, asked, _wake_rx) = role_recording_main();
    let limits = Limits {
        joins_per_second_per_connection: 5,
        ..Limits::default()
    };
    let server = TestServer::with_main(with_limits(limits), Options::default(), Some(link)).await;
    let mut c = server.connect().await;
    assert_eq!(join(&mut c, "1", "realtime:a", pg_join(None)).await[4]["status"], "ok");
    assert_eq!(recv(&mut c).await[4]["message"], "Subscribed to PostgreSQL");
    // a client alternating two identities as fast as it can, ending on anon
    let (user, anon) = (
        token(600),
        hs256(SECRET, json!({"role": "anon", "exp": jwt::now() + 600})),
    );
    for n in 0..200 {
        let t = if n % 2 == 0 { &user } else { &anon };
        send(
            &mut c,
            json!(["1", n.to_string(), "realtime:a", "access_token", {"access_token": t}]),
        )
        .await;
    }
    // the main thread is asked within the rate, the last identity last;
    // the channel goes on (each answer reported, none an error)
    let deadline = Instant::now() + WAIT;
    loop {
        let frame = recv(&mut c).await;
        assert_eq!(frame[4]["status"], "ok", "{frame}");
        if asked.lock().unwrap().last().map(String::as_str) == Some("anon")
            && frame[4]["message"] == "Subscribed to PostgreSQL"
        {
            break;
        }
        assert!(Instant::now() < deadline, "the last identity was never asked about");
    }
    // the socket still answers (what else comes first is statuses, all ok)
    send(&mut c, json!([null, "hb", "phoenix", "heartbeat", {}])).await;
    loop {
        let frame = recv(&mut c).await;
        assert_eq!(frame[4]["status"], "ok", "{frame}");
        if frame[2] == "phoenix" {
            break;
        }
    }
    let asked = asked.lock().unwrap().len();
    assert!(asked <= 12, "the main thread was asked {asked} times for 200 refreshes");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_identity_is_asked_about_however_busy_the_socket() {
    let (link, asked, _wake_rx) = role_recording_main();
    let limits = Limits {
        joins_per_second_per_connection: 2,
        ..Limits::default()
    };
    let server = TestServer::with_main(with_limits(limits), Options::default(), Some(link)).await;
    let mut c = server.connect().await;
    assert_eq!(join(&mut c, "1", "realtime:a", pg_join(None)).await[4]["status"], "ok");
    assert_eq!(recv(&mut c).await[4]["message"], "Subscribed to PostgreSQL");
    // the rate spent, the last identity (anon) waits
    let service = hs256(SECRET, json!({"role": "service_role", "exp": jwt::now() + 600}));
    let anon = hs256(SECRET, json!({"role": "anon", "exp": jwt::now() + 600}));
    for t in [&service, &token(600), &anon] {
        send(
            &mut c,
            json!(["1", "r", "realtime:a", "access_token", {"access_token": t}]),
        )
        .await;
    }
    // a heartbeat every 40 ms: the retry must not be put off by them
    let started = Instant::now();
    while asked.lock().unwrap().last().map(String::as_str) != Some("anon") {
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "never asked: {:?}",
            asked.lock().unwrap()
        );
        send(&mut c, json!([null, "hb", "phoenix", "heartbeat", {}])).await;
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    server.stop().await;
}
