//! Scale on one machine (`make bench-scale`; bench/README.md, "Scale"):
//! issue 17's four benchmarks, each beside a baseline measured in the
//! same run: idle joined connections against a bare tokio-tungstenite
//! server (`idle`), postgres_changes fan-out against streaming logical
//! decoding (`changes`), a burst of one large transaction against a bare
//! relay (`burst`), and a join storm against quiet delivery and a bare
//! server (`joins`). SCALE_BENCHES picks some ("idle,changes,burst,joins").
//! Loopback only; every count and duration is bounded. Not a test.

use pg_realtime_e2e::load::{hard_nofile, raise_nofile, setting};
use pg_realtime_e2e::*;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

#[path = "scale/burst.rs"]
mod burst;
#[path = "scale/changes.rs"]
mod changes;
#[path = "scale/decoding.rs"]
mod decoding;
mod floor;
#[path = "scale/heartbeats.rs"]
mod heartbeats;
#[path = "scale/idle.rs"]
mod idle;
#[path = "scale/inbox.rs"]
mod inbox;
#[path = "scale/joins.rs"]
mod joins;
mod relay;
#[path = "scale/subscribers.rs"]
mod subscribers;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |at: usize| args[at].clone();
    match args.get(1).map(String::as_str) {
        Some("--floor") => return floor::serve(arg(2).parse().expect("a port")),
        Some("--relay") => return relay::serve(arg(2).parse().expect("a port")),
        Some("--generate") => return idle::generate(&arg(2), arg(3).parse().unwrap(), arg(4).parse().unwrap()),
        _ => {}
    }
    raise_nofile();
    let started = Instant::now();
    for bench in setting("SCALE_BENCHES", "idle,changes,burst,joins").split(',') {
        match bench.trim() {
            "idle" => idle::run(),
            "changes" => changes::run(),
            "burst" => burst::run(),
            "joins" => joins::run(),
            other => panic!("no benchmark {other:?}: idle, changes, burst or joins"),
        }
    }
    println!();
    println!("all in {:.0} s", started.elapsed().as_secs_f64());
}

/// A loopback source address no earlier run used (ports a run left in
/// TIME_WAIT never run out): 127.0.0.2, .3, ...
fn fresh_source() -> Ipv4Addr {
    static NEXT: AtomicU8 = AtomicU8::new(2);
    let last = NEXT.fetch_add(1, Ordering::Relaxed);
    assert!(last < 255, "at most 253 source addresses");
    Ipv4Addr::new(127, 0, 0, last)
}

/// A cluster that lets the benchmarks in: as many sockets as the hard
/// file limit allows, no join or handshake rate limits, `settings` more.
fn open_cluster(settings: &[&str]) -> Cluster {
    let hard = hard_nofile();
    let mut all = vec![
        format!("pg_realtime.max_connections = {hard}"),
        "pg_realtime.max_joins_per_second = 1000000".into(),
        "pg_realtime.max_pending_handshakes = 100000".into(),
        "log_min_messages = warning".into(),
    ];
    all.extend(settings.iter().map(|s| s.to_string()));
    let cluster = Cluster::start_with(ClusterConfig {
        settings: all,
        nofile: Some(hard),
        ..Default::default()
    });
    cluster.psql("CREATE EXTENSION pg_realtime");
    cluster.wait_for_websocket(Duration::from_secs(10));
    cluster
}

/// `open_cluster` with the seed app's schema (examples/marketplace).
fn seed_app_cluster(settings: &[&str]) -> Cluster {
    let cluster = open_cluster(settings);
    let schema = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/marketplace/schema.sql");
    let sql = std::fs::read_to_string(schema).unwrap();
    cluster.psql(&format!("SET client_min_messages = error; {sql}"));
    cluster
}

/// A new worker process (the old one terminated; the postmaster starts
/// another), serving WebSockets; its pid.
fn fresh_worker(cluster: &Cluster) -> i32 {
    let old = cluster.worker_pid().expect("the worker runs");
    cluster.psql(&format!("SELECT pg_terminate_backend({old})"));
    let pid = cluster.wait_for_a_new_worker(old);
    cluster.wait_for_websocket(Duration::from_secs(10));
    pid
}

/// Waits until pg_realtime has let go of the last run's sockets.
fn settle(cluster: &Cluster) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while cluster.stat("connections_open") > 0 {
        assert!(Instant::now() < deadline, "pg_realtime kept its sockets for a minute");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The `realtime.stats()` counters `names`, as the worker has them.
fn print_stats(cluster: &Cluster, names: &[&str]) {
    let list = names.iter().map(|n| format!("'{n}'")).collect::<Vec<_>>().join(", ");
    let stats = cluster.psql(&format!(
        "SELECT string_agg(name || '=' || value, ' ' ORDER BY name) FROM realtime.stats() WHERE name IN ({list})"
    ));
    println!("realtime.stats(): {stats}");
}
