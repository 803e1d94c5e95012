//! End-to-end: a real cluster with pg_realtime preloaded, raw WebSocket
//! clients (tokio-tungstenite) and the real supabase-js under Node 22.
//!
//! Run with `make test` (which installs the extension and the npm packages
//! first), or `cargo test -p pg_realtime_e2e` once they are in place.

use futures_util::{SinkExt, StreamExt};
use pg_realtime_e2e::runner::{self, Test};
use pg_realtime_e2e::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

const WAIT: Duration = Duration::from_secs(10);

struct Ctx {
    cluster: Cluster,
    rt: tokio::runtime::Runtime,
}

fn main() {
    let cluster = Cluster::start();
    cluster.psql("CREATE EXTENSION pg_realtime");
    cluster.wait_for_websocket(WAIT);
    let rt = runtime();
    let tests: &[Test<Ctx>] = &pg_realtime_e2e::tests![
        supabase_js_subscribes_and_heartbeats,
        forged_and_expired_apikeys_never_subscribe,
        refused_upgrade_has_status_and_json_body,
        vsn1_raw_client_gets_heartbeat_replies,
        malformed_frames_are_counted_and_the_socket_stays,
        reload_rotates_the_secret_without_dropping_connections,
        network_threads_block_signals,
        terminated_worker_restarts_and_cluster_stays,
        worker_error_restarts_the_worker_not_the_cluster,
        create_extension_warns_when_not_preloaded,
        fast_shutdown_with_clients_connected,
        readme_snippet_reaches_subscribed,
        make_run_demo_serves_and_stops_on_ctrl_c,
    ];
    runner::run(Ctx { cluster, rt }, tests);
}

async fn connect(url: &str) -> Ws {
    tokio_tungstenite::connect_async(url).await.expect("upgrade").0
}

async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::Text(v.to_string().into())).await.unwrap();
}

async fn recv(ws: &mut Ws) -> Value {
    match tokio::time::timeout(WAIT, ws.next()).await.expect("a frame in time") {
        Some(Ok(Message::Text(t))) => serde_json::from_str(&t).unwrap(),
        other => panic!("expected a text frame, got {other:?}"),
    }
}

async fn heartbeat_v2(ws: &mut Ws, r: &str) {
    send(ws, json!([null, r, "phoenix", "heartbeat", {}])).await;
    assert_eq!(
        recv(ws).await,
        json!([null, r, "phoenix", "phx_reply", {"status": "ok", "response": {}}])
    );
}

async fn close_code(ws: &mut Ws) -> Option<CloseCode> {
    loop {
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("the socket ends in time")
        {
            Some(Ok(Message::Close(frame))) => return frame.map(|f| f.code),
            Some(Ok(_)) => continue,
            _ => return None,
        }
    }
}

fn supabase_env(cluster: &Cluster, key: String) -> Vec<(&'static str, String)> {
    vec![
        ("SUPABASE_URL", cluster.http_url()),
        ("ANON_KEY", key.clone()),
        ("BAD_KEY", key),
    ]
}

fn supabase_js_subscribes_and_heartbeats(ctx: &Ctx) {
    let before = ctx.cluster.stat("connections_total");
    let out = node_ok("subscribe.mjs", &supabase_env(&ctx.cluster, token("anon", 600)));
    let result: Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(result["status"], "SUBSCRIBED");
    assert!(
        result["heartbeats"].as_array().unwrap().iter().any(|s| s == "ok"),
        "{result}"
    );
    assert!(ctx.cluster.stat("connections_total") > before);
}

fn forged_and_expired_apikeys_never_subscribe(ctx: &Ctx) {
    let forged = token_with(
        "not-the-secret-not-the-secret-not-the-secret",
        json!({"role": "service_role", "exp": now() + 600}),
    );
    for bad in [forged, token("anon", -60)] {
        let before = ctx.cluster.stat("handshakes_refused");
        let out = node_ok("refused.mjs", &supabase_env(&ctx.cluster, bad));
        let result: Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
        let seen = result["seen"].as_array().unwrap();
        assert!(!seen.is_empty() && seen.iter().all(|s| s != "SUBSCRIBED"), "{result}");
        assert!(
            ctx.cluster.stat("handshakes_refused") > before,
            "the server never refused an upgrade"
        );
    }
}

fn refused_upgrade_has_status_and_json_body(ctx: &Ctx) {
    ctx.rt.block_on(async {
        let forged = token_with(
            "wrong-wrong-wrong-wrong-wrong-wrong",
            json!({"role": "anon", "exp": now() + 60}),
        );
        for (key, status, message) in [
            (forged, 401, "Failed to validate JWT signature"),
            (token("anon", -5), 401, "Token has expired"),
            (
                token_with(SECRET, json!({"exp": now() + 60})),
                401,
                "Fields `role` and `exp` are required in JWT",
            ),
        ] {
            match tokio_tungstenite::connect_async(ctx.cluster.ws_url(&key, Some("2.0.0"))).await {
                Err(WsError::Http(response)) => {
                    assert_eq!(response.status().as_u16(), status);
                    let body: Value = serde_json::from_slice(response.body().as_deref().unwrap()).unwrap();
                    assert_eq!(body, json!({ "error": message }));
                }
                other => panic!("expected an HTTP refusal, got {:?}", other.map(|_| ())),
            }
        }
    });
}

fn vsn1_raw_client_gets_heartbeat_replies(ctx: &Ctx) {
    ctx.rt.block_on(async {
        // no vsn at all means 1.0.0
        for url in [ctx.cluster.ws_url(&token("anon", 60), None), ctx.cluster.ws_url(&token("anon", 60), Some("1.0.0"))] {
            let mut ws = connect(&url).await;
            for r in ["1", "2"] {
                send(&mut ws, json!({"topic": "phoenix", "event": "heartbeat", "payload": {}, "ref": r})).await;
                assert_eq!(
                    recv(&mut ws).await,
                    json!({"topic": "phoenix", "event": "phx_reply", "payload": {"status": "ok", "response": {}}, "ref": r})
                );
            }
        }
    });
}

fn malformed_frames_are_counted_and_the_socket_stays(ctx: &Ctx) {
    let before = ctx.cluster.stat("malformed_frames");
    ctx.rt.block_on(async {
        let mut ws = connect(&ctx.cluster.ws_url(&token("anon", 60), Some("2.0.0"))).await;
        ws.send(Message::Text("{{{ not json".into())).await.unwrap();
        ws.send(Message::Binary(vec![7, 7].into())).await.unwrap();
        heartbeat_v2(&mut ws, "5").await;
    });
    assert_eq!(ctx.cluster.stat("malformed_frames"), before + 2);
}

fn reload_rotates_the_secret_without_dropping_connections(ctx: &Ctx) {
    let rotated = "rotated-rotated-rotated-rotated-rotated-42";
    let new_token = token_with(rotated, json!({"role": "anon", "exp": now() + 600}));
    ctx.rt.block_on(async {
        let mut old = connect(&ctx.cluster.ws_url(&token("anon", 600), Some("2.0.0"))).await;
        ctx.cluster
            .psql(&format!("ALTER SYSTEM SET pg_realtime.jwt_secret = '{rotated}'"));
        ctx.cluster.psql("SELECT pg_reload_conf()");
        // The worker applies the reload on its own schedule: wait for the
        // first upgrade the new secret gets through.
        let deadline = Instant::now() + WAIT;
        let mut fresh = loop {
            if let Ok((ws, _)) = tokio_tungstenite::connect_async(ctx.cluster.ws_url(&new_token, Some("2.0.0"))).await {
                break ws;
            }
            assert!(
                Instant::now() < deadline,
                "the rotated secret was never accepted:\n{}",
                ctx.cluster.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        heartbeat_v2(&mut fresh, "1").await;
        // the connection made with the old secret is still served
        heartbeat_v2(&mut old, "2").await;
        // and the old secret no longer opens new ones
        let refused = tokio_tungstenite::connect_async(ctx.cluster.ws_url(&token("anon", 600), Some("2.0.0"))).await;
        assert!(matches!(refused, Err(WsError::Http(ref r)) if r.status() == 401));
    });
    ctx.cluster.psql("ALTER SYSTEM RESET pg_realtime.jwt_secret");
    ctx.cluster.psql("SELECT pg_reload_conf()");
    // back to the cluster's secret (set in postgresql.conf) for later tests
    let deadline = Instant::now() + WAIT;
    ctx.rt.block_on(async {
        while tokio_tungstenite::connect_async(ctx.cluster.ws_url(&token("anon", 60), None))
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "the original secret was never restored");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    // Neither pg_realtime nor Postgres's own "parameter ... changed to" line
    // on reload writes the secret to the log.
    let log = ctx.cluster.log();
    let leaks: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(rotated) || l.contains(SECRET))
        .map(|l| &l[..l.len().min(200)])
        .collect();
    assert!(leaks.is_empty(), "secret in the server log: {leaks:?}");
    assert!(
        log.contains("parameter \"pg_realtime.jwt_secret\" changed"),
        "the reload was not logged at all"
    );
}

/// SigBlk of a task, as a bit set (bit n-1 = signal n).
fn blocked_signals(status: &str) -> u64 {
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("SigBlk:"))
        .expect("SigBlk line")
        .trim();
    u64::from_str_radix(hex, 16).unwrap()
}

fn network_threads_block_signals(ctx: &Ctx) {
    let pid = ctx.cluster.worker_pid().expect("worker running");
    let bit = |sig: u32| 1u64 << (sig - 1);
    let (mut net_threads, mut main_checked) = (0, false);
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap().path();
        let comm = std::fs::read_to_string(task.join("comm")).unwrap();
        let blocked = blocked_signals(&std::fs::read_to_string(task.join("status")).unwrap());
        if task.file_name().unwrap().to_str() == Some(&pid.to_string()) {
            // the main thread takes SIGTERM and SIGHUP
            assert_eq!(blocked & (bit(15) | bit(1)), 0, "main thread blocks SIGTERM/SIGHUP");
            main_checked = true;
        } else if comm.starts_with("pg_realtime net") {
            for sig in [1, 2, 10, 12, 14, 15, 17] {
                assert_ne!(
                    blocked & bit(sig),
                    0,
                    "network thread {comm:?} does not block signal {sig}"
                );
            }
            net_threads += 1;
        }
    }
    assert!(main_checked);
    assert!(net_threads >= 2, "expected the runtime's threads, found {net_threads}");
}

fn postmaster_started(cluster: &Cluster) -> String {
    cluster.psql("SELECT pg_postmaster_start_time()")
}

fn terminated_worker_restarts_and_cluster_stays(ctx: &Ctx) {
    let c = &ctx.cluster;
    let started = postmaster_started(c);
    let old = c.worker_pid().expect("worker running");
    assert_eq!(c.psql(&format!("SELECT pg_terminate_backend({old})")), "t");
    let deadline = Instant::now() + Duration::from_secs(20);
    let new = loop {
        if let Some(pid) = c.worker_pid().filter(|p| *p != old) {
            break pid;
        }
        assert!(Instant::now() < deadline, "the worker was not restarted:\n{}", c.log());
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_ne!(new, old);
    assert_eq!(postmaster_started(c), started, "the cluster restarted");
    c.wait_for_websocket(WAIT);
    ctx.rt.block_on(async {
        let deadline = Instant::now() + WAIT;
        let mut ws = loop {
            match tokio_tungstenite::connect_async(c.ws_url(&token("anon", 60), Some("2.0.0"))).await {
                Ok((ws, _)) => break ws,
                Err(e) => assert!(Instant::now() < deadline, "no WebSocket after restart: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        heartbeat_v2(&mut ws, "1").await;
    });
}

fn worker_error_restarts_the_worker_not_the_cluster(_ctx: &Ctx) {
    // The worker's main thread fails at start-up (its database is missing):
    // the worker exits with an error and is restarted; the cluster stays up.
    let cluster = Cluster::start_with(ClusterConfig {
        settings: vec!["pg_realtime.database = 'no_such_database'".into()],
        ..ClusterConfig::default()
    });
    let started = postmaster_started(&cluster);
    let needle = "database \"no_such_database\" does not exist";
    let deadline = Instant::now() + Duration::from_secs(30);
    while cluster.log().matches(needle).count() < 2 {
        assert!(
            Instant::now() < deadline,
            "worker did not fail and restart:\n{}",
            cluster.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(postmaster_started(&cluster), started, "the cluster restarted");
    assert_eq!(cluster.psql("SELECT 1"), "1");
    assert!(!cluster.log().contains("terminating any other active server processes"));
}

fn create_extension_warns_when_not_preloaded(_ctx: &Ctx) {
    let cluster = Cluster::start_with(ClusterConfig {
        preload: false,
        ..ClusterConfig::default()
    });
    let out = cluster.psql_output("CREATE EXTENSION pg_realtime");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("WARNING:  pg_realtime is installed but realtime is not running"),
        "{stderr}"
    );
    assert!(stderr.contains("shared_preload_libraries"), "{stderr}");
    assert_eq!(
        cluster.psql("SELECT count(*) FROM pg_namespace WHERE nspname = 'realtime'"),
        "1"
    );
    assert_eq!(cluster.psql("SELECT realtime.preloaded()"), "f");
    let stats = cluster.psql_output("SELECT * FROM realtime.stats()");
    assert!(!stats.status.success());
    assert!(String::from_utf8_lossy(&stats.stderr).contains("pg_realtime is not running"));
}

fn fast_shutdown_with_clients_connected(ctx: &Ctx) {
    let mut cluster = Cluster::start();
    cluster.wait_for_websocket(WAIT);
    ctx.rt.block_on(async {
        let mut clients = Vec::new();
        for i in 0..5 {
            let vsn = if i % 2 == 0 { Some("2.0.0") } else { None };
            let mut ws = connect(&cluster.ws_url(&token("anon", 600), vsn)).await;
            if vsn.is_some() {
                send(
                    &mut ws,
                    json!([format!("{i}"), format!("{i}"), "realtime:room", "phx_join", {}]),
                )
                .await;
                assert_eq!(recv(&mut ws).await[4]["status"], "ok");
            }
            clients.push(ws);
        }
        let waiting: Vec<_> = clients
            .into_iter()
            .map(|mut ws| tokio::spawn(async move { close_code(&mut ws).await }))
            .collect();
        let took = tokio::task::spawn_blocking(move || {
            let took = cluster.pg_ctl_stop();
            drop(cluster);
            took
        })
        .await
        .unwrap();
        assert!(took < Duration::from_secs(5), "pg_ctl stop -m fast took {took:?}");
        for w in waiting {
            assert_eq!(w.await.unwrap(), Some(CloseCode::Away));
        }
    });
}

/// Reads a child's stdout lines on a thread, so they can be awaited with a deadline.
fn line_reader(stdout: std::process::ChildStdout) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    rx
}

/// Waits for a line containing `needle`; returns it with the lines before it.
fn wait_for_line(
    rx: &std::sync::mpsc::Receiver<String>,
    needle: &str,
    within: Duration,
) -> (Option<String>, Vec<String>) {
    let deadline = Instant::now() + within;
    let mut seen = Vec::new();
    loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) if line.contains(needle) => return (Some(line), seen),
            Ok(line) => seen.push(line),
            Err(_) => return (None, seen),
        }
    }
}

/// `make run`'s demo script (the extension is installed already): it serves
/// the marketplace demo, its printed snippet and tokens work, and Ctrl-C
/// stops the cluster.
///
/// (Longer than a screen: one run of the script, checked step by step.)
fn make_run_demo_serves_and_stops_on_ctrl_c(ctx: &Ctx) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned();
    let demo_dir = format!("/var/tmp/pg_realtime_e2e/demo-{}", std::process::id());
    let (pg_port, ws_port) = (free_port(), free_port());
    let snippet = js_dir().join(format!("demo-snippet-{}.generated.mjs", std::process::id()));
    let mut child = std::process::Command::new(root.join("scripts/run-demo.sh"))
        .env("DEMO_DIR", &demo_dir)
        .env("PGPORT", pg_port.to_string())
        .env("WS_PORT", ws_port.to_string())
        .env("SNIPPET", &snippet)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap();
    let lines = line_reader(child.stdout.take().unwrap());
    let (ready, banner) = wait_for_line(&lines, "ready", Duration::from_secs(60));
    let interrupt = |child: &std::process::Child| {
        let _ = std::process::Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status();
    };
    if ready.is_none() {
        interrupt(&child);
        let _ = child.wait();
        panic!("the demo never became ready: {banner:?}");
    }
    let value = |label: &str| {
        banner
            .iter()
            .find_map(|l| l.trim().strip_prefix(label).map(|v| v.trim().to_owned()))
            .unwrap_or_else(|| panic!("no {label} in {banner:?}"))
    };
    let buyer = value("buyer token");
    assert!(banner
        .iter()
        .any(|l| l.contains(&format!("ws://localhost:{ws_port}/realtime/v1/websocket"))));

    // the printed snippet, as a user would run it
    let mut node = std::process::Command::new(node())
        .arg(&snippet)
        .current_dir(js_dir())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (subscribed, seen) = wait_for_line(&line_reader(node.stdout.take().unwrap()), "SUBSCRIBED", WAIT);
    let _ = node.kill();
    let _ = node.wait();
    let _ = std::fs::remove_file(&snippet);
    assert!(
        subscribed.is_some(),
        "the demo snippet did not reach SUBSCRIBED: {seen:?}"
    );

    // a printed user token joins a channel
    ctx.rt.block_on(async {
        let url = format!("ws://127.0.0.1:{ws_port}/realtime/v1/websocket?apikey={buyer}&vsn=2.0.0");
        let mut ws = connect(&url).await;
        send(
            &mut ws,
            json!(["1", "1", "realtime:orders", "phx_join", {"access_token": buyer}]),
        )
        .await;
        assert_eq!(recv(&mut ws).await[4]["status"], "ok");
    });

    // Ctrl-C: the script stops the cluster and exits
    interrupt(&child);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "the demo exited with {status}");
            break;
        }
        assert!(Instant::now() < deadline, "the demo did not stop on Ctrl-C");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        !std::path::Path::new(&demo_dir).join("data/postmaster.pid").exists(),
        "the demo cluster is still running"
    );
    assert!(std::net::TcpStream::connect(("127.0.0.1", ws_port)).is_err());
    let _ = std::fs::remove_dir_all(&demo_dir);
}

/// The README's supabase-js snippet, pasted as is, with the URL and key that
/// `make run` prints substituted.
fn readme_snippet_reaches_subscribed(ctx: &Ctx) {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let start = readme.find("<!-- snippet:start -->").expect("snippet start marker");
    let end = readme.find("<!-- snippet:end -->").expect("snippet end marker");
    let block = &readme[start..end];
    let code = block
        .split("```js")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("a js block");
    let code = code
        .replace("http://localhost:4000", &ctx.cluster.http_url())
        .replace("<anon key printed by make run>", &token("anon", 600));
    let path = js_dir().join("readme-snippet.generated.mjs");
    std::fs::write(&path, code).unwrap();
    // The snippet keeps listening, as an app would: read its output until
    // SUBSCRIBED, then stop it.
    let mut child = std::process::Command::new(node())
        .arg(&path)
        .current_dir(js_dir())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + WAIT;
    let mut seen = Vec::new();
    let subscribed = loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) if line.contains("SUBSCRIBED") => break true,
            Ok(line) => seen.push(line),
            Err(_) => break false,
        }
    };
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    let _ = std::fs::remove_file(&path);
    assert!(
        subscribed,
        "snippet did not reach SUBSCRIBED: {seen:?}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
