//! Benchmark 3, *burst*: S subscribers on one unfiltered table and one
//! R-row transaction (S × R deliveries; SCALE_BURSTS, default
//! "10000x1000,100x100000"), beside a bare tokio-tungstenite relay
//! (`relay/`) fanning out R broadcasts of the same frame size to S
//! subscribers in the same run: time until the last subscriber has all,
//! the server's memory peak over its resident set before the burst
//! (`VmHWM`, reset through /proc/<pid>/clear_refs), and a heartbeat
//! prober's slowest reply throughout.

use super::heartbeats::{Heartbeats, Prober};
use super::subscribers::{join_all, receive, Expect, Tally};
use super::{fresh_source, open_cluster, print_stats, setting, settle};
use crate::relay;
use futures_util::SinkExt;
use pg_realtime_e2e::load::{await_subscribed, connect, connect_and_join, Ws};
use pg_realtime_e2e::measure::status_kb;
use pg_realtime_e2e::*;
use std::net::Ipv4Addr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

const SCHEMA: &str = "
CREATE ROLE anon NOLOGIN;
CREATE ROLE authenticator NOINHERIT LOGIN;
GRANT anon TO authenticator;
CREATE TABLE burst (id bigserial PRIMARY KEY, n int NOT NULL, body text NOT NULL);
GRANT SELECT ON burst TO anon;
CREATE PUBLICATION supabase_realtime FOR TABLE burst;
";
const TOPIC: &str = "realtime:burst";
/// Longest a burst may take before the run fails.
const LIMIT: Duration = Duration::from_secs(300);

/// One side's figures for one burst.
struct Figures {
    seconds: f64,
    peak_mb: f64,
    heartbeats: Heartbeats,
    frame_bytes: usize,
}

pub fn run() {
    let shapes: Vec<(usize, usize)> = setting("SCALE_BURSTS", "10000x1000,100x100000")
        .split(',')
        .map(|s| {
            let (subs, rows) = s.trim().split_once('x').expect("SUBSCRIBERSxROWS");
            (subs.parse().unwrap(), rows.parse().unwrap())
        })
        .collect();
    let cluster = open_cluster(&[
        // (room for a 100k-row transaction in the ring, and for each
        // subscriber's queue to hold all of it)
        "pg_realtime.queue_size = 256MB",
        "pg_realtime.max_pending_bytes = 512MB",
        "pg_realtime.max_pending_bytes_total = 4GB",
    ]);
    cluster.psql(SCHEMA);
    let rt = runtime();
    println!();
    println!("burst: one transaction of R rows to S subscribers of the table (vsn 1.0.0), beside a bare relay");
    println!("fanning out R broadcasts of the same frame size; heartbeats every 100 ms on another socket");
    println!(
        "{:>11} {:>7} {:>6}   {:>26}   {:>26}   {:>6}",
        "subscribers", "rows", "bytes", "relay s / peak MB / hb ms", "ours s / peak MB / hb ms", "ratio"
    );
    for (subs, rows) in shapes {
        let ours = rt.block_on(ours(&cluster, subs, rows));
        settle(&cluster);
        let port = free_port();
        let mut relay = relay::spawn(port);
        let theirs = rt.block_on(relayed(port, relay.id() as i32, subs, rows, ours.frame_bytes));
        let _ = relay.kill();
        let _ = relay.wait();
        let show = |f: &Figures| {
            format!(
                "{:>8.2} / {:>6.0} / {:>6.1}{}",
                f.seconds,
                f.peak_mb,
                f.heartbeats.max_ms,
                if f.heartbeats.answered == f.heartbeats.sent {
                    " "
                } else {
                    "!"
                }
            )
        };
        println!(
            "{subs:>11} {rows:>7} {:>6}   {:>26}   {:>26}   {:>6.2}",
            ours.frame_bytes,
            show(&theirs),
            show(&ours),
            theirs.seconds / ours.seconds
        );
        for (side, f) in [("relay", &theirs), ("ours", &ours)] {
            let h = &f.heartbeats;
            if h.answered < h.sent {
                println!("{:>11} {side}: {} of {} heartbeats answered", "", h.answered, h.sent);
            }
        }
    }
    print_stats(
        &cluster,
        &[
            "events_delivered",
            "events_dropped",
            "clients_too_far_behind",
            "transactions_lost",
        ],
    );
}

/// `subs` subscribers of `burst`, then one `rows`-row INSERT.
async fn ours(cluster: &Cluster, subs: usize, rows: usize) -> Figures {
    let url = cluster.ws_url(&token("anon", 3600), Some("1.0.0"));
    let config = r#"{"postgres_changes":[{"event":"INSERT","schema":"public","table":"burst"}]}"#;
    let source = fresh_source();
    let sockets = join_all(0..subs, |_| {
        let url = url.clone();
        async move {
            let mut ws = connect_and_join(&url, source, TOPIC, config).await;
            await_subscribed(&mut ws).await;
            ws
        }
    })
    .await;
    let worker = cluster.worker_pid().expect("the worker runs");
    let insert = format!("INSERT INTO burst (n, body) SELECT g, repeat('x', 40) FROM generate_series(1, {rows}) g");
    let mut command = cluster.psql_command(&insert);
    measure(
        sockets,
        &url,
        worker,
        "\"event\":\"postgres_changes\"",
        rows,
        async move {
            let out = tokio::task::spawn_blocking(move || command.output().unwrap())
                .await
                .unwrap();
            assert!(out.status.success(), "the burst's INSERT failed");
        },
    )
    .await
}

/// The relay's side: `subs` subscribers, and a publisher that sends `rows`
/// broadcasts, as fast as its socket takes them, each relayed as a frame
/// of about `frame_bytes`.
async fn relayed(port: u16, pid: i32, subs: usize, rows: usize, frame_bytes: usize) -> Figures {
    let url = format!("ws://127.0.0.1:{port}/socket/websocket?vsn=1.0.0");
    let source = fresh_source();
    let sockets = join_all(0..subs, |_| {
        let url = url.clone();
        async move { connect_and_join(&url, source, TOPIC, "{}").await }
    })
    .await;
    let mut publisher = connect_and_join(&url, source, TOPIC, "{}").await;
    let padding = "x".repeat(frame_bytes.saturating_sub(relayed_frame(rows / 2, "").len()));
    let publishing = &mut publisher;
    let figures = measure(sockets, &url, pid, "\"event\":\"broadcast\"", rows, async move {
        for k in 0..rows {
            let text = format!(
                r#"{{"topic":"{TOPIC}","event":"broadcast","payload":{},"ref":null}}"#,
                broadcast_payload(k, &padding)
            );
            publishing.feed(Message::Text(text.into())).await.unwrap();
        }
        publishing.flush().await.unwrap();
    })
    .await;
    // (open until the end: the relay drops a leaving member's frames)
    drop(publisher);
    figures
}

/// The payload of the publisher's broadcast `k`.
fn broadcast_payload(k: usize, body: &str) -> serde_json::Value {
    serde_json::json!({"type": "broadcast", "event": "row", "payload": {"n": k, "body": body}})
}

/// The frame the relay sends for broadcast `k` (as `relay/` writes it).
fn relayed_frame(k: usize, body: &str) -> String {
    serde_json::json!({"topic": TOPIC, "event": "broadcast", "payload": broadcast_payload(k, body), "ref": null})
        .to_string()
}

/// Reads `sockets` (each waiting for `rows` frames holding `marker`),
/// resets the server's memory peak, runs `burst`, and waits until every
/// subscriber has all, with a heartbeat prober on one more socket.
async fn measure<F>(sockets: Vec<Ws>, url: &str, pid: i32, marker: &'static str, rows: usize, burst: F) -> Figures
where
    F: std::future::Future<Output = ()>,
{
    let subs = sockets.len();
    let tally = Tally::new();
    let expect = Expect {
        marker,
        stamp: None,
        events: Some(rows),
    };
    let readers: Vec<_> = sockets
        .into_iter()
        .map(|ws| tokio::spawn(receive(ws, tally.clone(), expect)))
        .collect();
    // (joined to nothing: the relay would send it every broadcast)
    let prober = Prober::start(connect(url, Ipv4Addr::LOCALHOST).await);
    let before_kb = status_kb(pid, "VmRSS");
    // (as root: "5" resets VmHWM to the current resident set)
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").expect("clear_refs (run as root)");
    let started = Instant::now();
    burst.await;
    let all = tally.wait_done(subs, LIMIT).await;
    let heartbeats = prober.stop().await;
    let peak_kb = status_kb(pid, "VmHWM");
    let done = tally.done.load(Ordering::Relaxed);
    readers.iter().for_each(|r| r.abort());
    assert!(
        all && done == subs,
        "{done} of {subs} subscribers got all {rows} rows ({} ended) within {LIMIT:?}",
        tally.ended.load(Ordering::Relaxed)
    );
    Figures {
        seconds: (tally.last_done().unwrap() - started).as_secs_f64(),
        peak_mb: peak_kb.saturating_sub(before_kb) as f64 / 1024.0,
        heartbeats,
        frame_bytes: tally.frame_bytes.load(Ordering::Relaxed),
    }
}
