//! Benchmark 4, *joins*: a storm of SCALE_STORM (10,000) connections,
//! each joining its user's inbox (postgres_changes, filtered, RLS on),
//! while SCALE_STEADY (100) subscribers already joined receive 200
//! messages a second: the joins answered a second (until each channel's
//! "Subscribed to PostgreSQL"), beside a bare tokio-tungstenite server
//! answering the same joins in the same run (`floor/`), and the steady
//! subscribers' latency during the storm beside the seconds before it.

use super::inbox;
use super::subscribers::{join_all, Tally};
use super::{fresh_source, print_stats, seed_app_cluster, setting, settle};
use crate::floor;
use pg_realtime_e2e::load::connect_and_join;
use pg_realtime_e2e::measure::{micros_now, percentiles};
use pg_realtime_e2e::writer::PacedWriter;
use pg_realtime_e2e::*;
use std::time::{Duration, Instant};

const RATE: u32 = 200;
const QUIET: Duration = Duration::from_secs(5);

pub fn run() {
    let storm: usize = setting("SCALE_STORM", "10000").parse().unwrap();
    let steady: usize = setting("SCALE_STEADY", "100").parse().unwrap();
    let rt = runtime();
    let floor_rate = rt.block_on(floor_storm(storm));
    let cluster = seed_app_cluster(&[]);
    let url = cluster.ws_url(&token("anon", 3600), Some("1.0.0"));
    let tally = Tally::new();
    let (readers, _) = rt.block_on(inbox::subscribe(&url, fresh_source(), 0..steady, &tally));
    let writer = PacedWriter::start(&cluster, RATE, move |k| inbox::message_to(k, steady));
    let quiet_from = micros_now();
    std::thread::sleep(QUIET);
    let storm_from = micros_now();
    let stormers = Tally::new();
    let (storm_readers, took) = rt.block_on(inbox::subscribe(
        &url,
        fresh_source(),
        steady..steady + storm,
        &stormers,
    ));
    let storm_to = micros_now();
    let rows = writer.stop() as usize;
    let all = rt.block_on(tally.wait_for(rows, Duration::from_secs(60)));
    let quiet = percentiles(tally.latencies_between(quiet_from, storm_from));
    let during = percentiles(tally.latencies_between(storm_from, storm_to));
    let ours_rate = storm as f64 / took.as_secs_f64();
    println!();
    println!("join storm: {storm} connections each joining a filtered, RLS-checked inbox, beside a bare server;");
    println!("{steady} subscribers joined before receive {RATE} messages/s throughout");
    println!(
        "{:>8}   {:>14} {:>14} {:>6}   {:>22} {:>22} {:>13}",
        "joins", "floor joins/s", "ours joins/s", "ratio", "quiet p50/p99 ms", "in storm p50/p99 ms", "ratio p50/p99"
    );
    println!(
        "{storm:>8}   {floor_rate:>14.0} {ours_rate:>14.0} {:>6.2}   {:>10.2} / {:>9.2} {:>10.2} / {:>9.2} {:>6.2} / {:>4.2}",
        ours_rate / floor_rate,
        quiet.p50_ms,
        quiet.p99_ms,
        during.p50_ms,
        during.p99_ms,
        during.p50_ms / quiet.p50_ms,
        during.p99_ms / quiet.p99_ms,
    );
    println!(
        "{:>8}   steady subscribers received {} of {rows} ({} quiet, {} in the storm of {:.2} s; max {:.2} ms)",
        "",
        tally.delivered.load(std::sync::atomic::Ordering::Relaxed),
        quiet.count,
        during.count,
        took.as_secs_f64(),
        during.max_ms.max(quiet.max_ms),
    );
    assert!(all, "the steady subscribers missed events (above)");
    readers.iter().chain(&storm_readers).for_each(|r| r.abort());
    settle(&cluster);
    print_stats(
        &cluster,
        &[
            "connections_total",
            "channels_joined",
            "joins_refused",
            "subscriptions",
            "events_delivered",
        ],
    );
}

/// The same storm against the floor server; its joins a second.
async fn floor_storm(storm: usize) -> f64 {
    let port = free_port();
    let mut server = floor::spawn(port);
    let url = format!("ws://127.0.0.1:{port}/socket/websocket?vsn=1.0.0");
    let source = fresh_source();
    let started = Instant::now();
    let sockets = join_all(0..storm, |i| {
        let url = url.clone();
        async move { connect_and_join(&url, source, &format!("realtime:inbox-{i}"), "{}").await }
    })
    .await;
    let rate = storm as f64 / started.elapsed().as_secs_f64();
    drop(sockets);
    let _ = server.kill();
    let _ = server.wait();
    rate
}
