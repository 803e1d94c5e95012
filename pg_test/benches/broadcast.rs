//! Broadcast fan-out (`make bench-broadcast`; bench/README.md,
//! "Broadcast"): N subscribers on one channel (BENCH_SUBSCRIBERS, default
//! "1000,10000") receive a publisher's BENCH_MESSAGES (200) broadcasts,
//! with at most BENCH_WINDOW (4) messages in flight (the publisher sends
//! message k once every subscriber has message k - window), first through
//! a minimal relay built on tokio-tungstenite (this binary with `--relay`,
//! its own process: the ceiling on this machine), then through
//! pg_realtime, in the same run with the same load generator (vsn 1.0.0
//! JSON, loopback only), BENCH_ROUNDS (3) rounds each, alternating which
//! goes first. Prints
//! the median round's deliveries a second and p50/p99 latency (from a
//! timestamp in each payload) of each side, and the ratio. Not a test.

use futures_util::{SinkExt, StreamExt};
use pg_realtime_e2e::load::{connect_and_join, hard_nofile, raise_nofile, setting, Ws};
use pg_realtime_e2e::measure::{micros_now, number_after};
use pg_realtime_e2e::*;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Message;

mod relay;

const TOPIC: &str = "realtime:bench";
const JOIN_CONFIG: &str = r#"{"broadcast":{"self":false}}"#;

/// One run's figures.
struct Figures {
    deliveries_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// What the subscribers of one run share.
struct Run {
    subscribers: usize,
    /// Deliveries of each message so far.
    counts: Vec<AtomicUsize>,
    progress: Notify,
    latencies_us: Mutex<Vec<u32>>,
    last_delivery: Mutex<Option<Instant>>,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(at) = args.iter().position(|a| a == "--relay") {
        relay::serve(args[at + 1].parse().expect("a port"));
        return;
    }
    raise_nofile();
    let sizes: Vec<usize> = setting("BENCH_SUBSCRIBERS", "1000,10000")
        .split(',')
        .map(|n| n.trim().parse().expect("a count"))
        .collect();
    let messages: usize = setting("BENCH_MESSAGES", "200").parse().unwrap();
    let window: usize = setting("BENCH_WINDOW", "4").parse().unwrap();
    let rounds: usize = setting("BENCH_ROUNDS", "3").parse().unwrap();
    // (vsn 2.0.0's kind-4 frames would need a relay that writes them too)
    let vsn = "1.0.0";
    let cluster = Cluster::start_with(ClusterConfig {
        settings: vec![
            "pg_realtime.max_connections = 19000".into(),
            "pg_realtime.max_joins_per_second = 1000000".into(),
            // (the publisher sends as fast as the window lets it)
            "pg_realtime.max_messages_per_second_per_connection = 1000000".into(),
            "log_min_messages = warning".into(),
        ],
        nofile: Some(hard_nofile()),
        ..Default::default()
    });
    cluster.psql("CREATE EXTENSION pg_realtime");
    cluster.wait_for_websocket(Duration::from_secs(10));
    let relay_port = free_port();
    let mut relay = relay::spawn(relay_port);
    let rt = runtime();
    println!(
        "broadcast fan-out: {messages} messages, window {window}, vsn {vsn}, one publisher, median of {rounds} rounds"
    );
    println!(
        "{:>11} {:>14} {:>10} {:>10}   {:>14} {:>10} {:>10}   {:>6}",
        "subscribers", "relay msg/s", "p50 ms", "p99 ms", "ours msg/s", "p50 ms", "p99 ms", "ratio"
    );
    let mut source = 2u8;
    for n in sizes {
        let mut take_source = || {
            // (each run from its own source address: ports in TIME_WAIT from
            // the last one never run out)
            source = source.checked_add(1).expect("at most 253 runs");
            Ipv4Addr::new(127, 0, 0, source)
        };
        let relay_url = format!("ws://127.0.0.1:{relay_port}/socket/websocket?vsn={vsn}");
        let ours_url = format!(
            "ws://127.0.0.1:{}/realtime/v1/websocket?apikey={}&vsn={vsn}",
            cluster.ws_port,
            token("anon", 3600)
        );
        // rounds alternate, which side goes first too, each after the
        // other's sockets are gone; each side's median round is reported
        let (mut ceilings, mut ourses) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            for side in [round % 2, 1 - round % 2] {
                let url = if side == 0 { &relay_url } else { &ours_url };
                let figures = rt.block_on(measure(url, take_source(), n, messages, window));
                settle(&cluster);
                if side == 0 {
                    ceilings.push(figures)
                } else {
                    ourses.push(figures)
                }
            }
        }
        let (ceiling, ours) = (median(ceilings), median(ourses));
        println!(
            "{n:>11} {:>14.0} {:>10.2} {:>10.2}   {:>14.0} {:>10.2} {:>10.2}   {:>6.2}",
            ceiling.deliveries_per_s,
            ceiling.p50_ms,
            ceiling.p99_ms,
            ours.deliveries_per_s,
            ours.p50_ms,
            ours.p99_ms,
            ours.deliveries_per_s / ceiling.deliveries_per_s
        );
    }
    let _ = relay.kill();
    let _ = relay.wait();
    let stats = cluster.psql("SELECT string_agg(name || '=' || value, ' ') FROM realtime.stats() WHERE name IN ('broadcasts_sent', 'clients_too_far_behind', 'connections_total')");
    println!("realtime.stats(): {stats}");
}

/// One run, which must end within `RUN_LIMIT` (a refused join or a
/// dropped subscriber would otherwise leave the publisher waiting).
async fn measure(url: &str, source: Ipv4Addr, n: usize, messages: usize, window: usize) -> Figures {
    const RUN_LIMIT: Duration = Duration::from_secs(300);
    match tokio::time::timeout(RUN_LIMIT, run_once(url, source, n, messages, window)).await {
        Ok(figures) => figures,
        Err(_) => panic!("a run of {n} subscribers on {url} did not end within {RUN_LIMIT:?}"),
    }
}

/// One run: `n` subscribers and a publisher on `url`, from `source`.
async fn run_once(url: &str, source: Ipv4Addr, n: usize, messages: usize, window: usize) -> Figures {
    let run = Arc::new(Run {
        subscribers: n,
        counts: (0..messages).map(|_| AtomicUsize::new(0)).collect(),
        progress: Notify::new(),
        latencies_us: Mutex::new(Vec::with_capacity(n * messages)),
        last_delivery: Mutex::new(None),
    });
    let joined = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::with_capacity(n);
    let gate = Arc::new(tokio::sync::Semaphore::new(256));
    for _ in 0..n {
        let (url, run, joined, gate) = (url.to_owned(), run.clone(), joined.clone(), gate.clone());
        tasks.push(tokio::spawn(async move {
            let permit = gate.acquire_owned().await.unwrap();
            let ws = connect_and_join(&url, source, TOPIC, JOIN_CONFIG).await;
            drop(permit);
            joined.fetch_add(1, Ordering::AcqRel);
            subscribe(ws, run, messages).await;
        }));
    }
    while joined.load(Ordering::Acquire) < n {
        // (a subscriber that failed ends the run: its panic is not waited out)
        if let Some(failed) = tasks.iter().position(|t| t.is_finished()) {
            let task = tasks.swap_remove(failed);
            task.await.expect("a subscriber failed to join");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut publisher = connect_and_join(url, source, TOPIC, JOIN_CONFIG).await;
    let started = Instant::now();
    for k in 0..messages {
        if k >= window {
            wait_for(&run, k - window).await;
        }
        let text = format!(
            r#"{{"topic":"{TOPIC}","event":"broadcast","payload":{{"type":"broadcast","event":"b","payload":{{"seq":{k},"t":{}}}}},"ref":null}}"#,
            micros_now()
        );
        publisher.send(Message::Text(text.into())).await.unwrap();
    }
    wait_for(&run, messages - 1).await;
    for task in tasks {
        task.await.unwrap();
    }
    let elapsed = run.last_delivery.lock().unwrap().unwrap() - started;
    let mut latencies = std::mem::take(&mut *run.latencies_us.lock().unwrap());
    latencies.sort_unstable();
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize] as f64 / 1000.0;
    let _ = publisher.close(None).await;
    Figures {
        deliveries_per_s: (n * messages) as f64 / elapsed.as_secs_f64(),
        p50_ms: at(0.5),
        p99_ms: at(0.99),
    }
}

/// Waits until pg_realtime has let go of the last run's sockets (and so
/// has the relay: its run closed them first), so that no run pays for
/// the one before.
fn settle(cluster: &Cluster) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while cluster.stat("connections_open") > 0 {
        assert!(Instant::now() < deadline, "pg_realtime kept its sockets for a minute");
        std::thread::sleep(Duration::from_millis(50));
    }
    // (and the relay's, closed by the clients, drain from the kernel)
    std::thread::sleep(Duration::from_millis(500));
}

/// The round with the median deliveries a second.
fn median(mut rounds: Vec<Figures>) -> Figures {
    rounds.sort_by(|a, b| a.deliveries_per_s.total_cmp(&b.deliveries_per_s));
    let at = rounds.len() / 2;
    rounds.swap_remove(at)
}

async fn wait_for(run: &Run, k: usize) {
    loop {
        let notified = run.progress.notified();
        if run.counts[k].load(Ordering::Acquire) >= run.subscribers {
            return;
        }
        notified.await;
    }
}

/// Reads broadcasts until all `messages` have come, noting each one's
/// latency; sends a heartbeat every 20 s (servers close silent sockets).
async fn subscribe(mut ws: Ws, run: Arc<Run>, messages: usize) {
    let mut latencies = Vec::with_capacity(messages);
    let mut heartbeat = tokio::time::interval(Duration::from_secs(20));
    heartbeat.tick().await;
    let mut seen = 0;
    while seen < messages {
        tokio::select! {
            frame = ws.next() => {
                let Some(Ok(Message::Text(text))) = frame else {
                    panic!("a subscriber's socket ended: {frame:?}");
                };
                let Some((seq, sent)) = seq_and_time(&text) else { continue };
                latencies.push(micros_now().saturating_sub(sent) as u32);
                seen += 1;
                if run.counts[seq].fetch_add(1, Ordering::AcqRel) + 1 == run.subscribers {
                    run.progress.notify_waiters();
                    if seq == messages - 1 {
                        *run.last_delivery.lock().unwrap() = Some(Instant::now());
                    }
                }
            }
            _ = heartbeat.tick() => {
                let beat = r#"{"topic":"phoenix","event":"heartbeat","payload":{},"ref":"hb"}"#;
                let _ = ws.send(Message::Text(beat.into())).await;
            }
        }
    }
    run.latencies_us.lock().unwrap().extend(latencies);
    let _ = ws.close(None).await;
}

/// `"seq":<k>,"t":<micros>` from a broadcast's text, without parsing it all.
fn seq_and_time(text: &str) -> Option<(usize, u64)> {
    Some((number_after(text, "\"seq\":")? as usize, number_after(text, "\"t\":")?))
}
