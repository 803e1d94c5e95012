//! Benchmark 2, *postgres_changes fan-out*: 1,000 messages a second into
//! the seed app's `messages` table, N subscribers each filtered on their
//! own `recipient_id` with row-level security on, beside streaming
//! logical decoding (`pg_recvlogical`, `test_decoding`) reading the same
//! commits in the same run: write → client latency and CPU per delivered
//! event (the worker's; the walsender's plus pg_recvlogical's).

use super::decoding::Decoding;
use super::inbox;
use super::subscribers::Tally;
use super::{fresh_source, print_stats, seed_app_cluster, setting, settle};
use pg_realtime_e2e::measure::{cpu_us, micros_now, percentiles, Percentiles};
use pg_realtime_e2e::writer::PacedWriter;
use pg_realtime_e2e::*;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// One side's figures for one count.
struct Side {
    latency: Percentiles,
    cpu_us_per_event: f64,
}

pub fn run() {
    let counts: Vec<usize> = setting("SCALE_SUBSCRIBERS", "1000,10000")
        .split(',')
        .map(|n| n.trim().parse().expect("a count"))
        .collect();
    let rate: u32 = setting("SCALE_RATE", "1000").parse().unwrap();
    let seconds: u64 = setting("SCALE_SECONDS", "10").parse().unwrap();
    let cluster = seed_app_cluster(&[
        "wal_level = logical",
        "max_wal_senders = 4",
        "max_replication_slots = 4",
    ]);
    let decoding = Decoding::start(&cluster, "messages");
    let walsender = walsender_pid(&cluster);
    let rt = runtime();
    println!();
    println!("postgres_changes fan-out: {rate} messages/s for {seconds} s into `messages`, each to one subscriber");
    println!("(filtered on its recipient_id, RLS on), beside pg_recvlogical (test_decoding) on the same commits");
    println!(
        "{:>11} {:>7}   {:>19} {:>10}   {:>19} {:>10}   {:>13}",
        "subscribers", "events", "decoding p50/p99 ms", "CPU us/ev", "ours p50/p99 ms", "CPU us/ev", "ratio p50/p99"
    );
    for n in counts {
        let tally = Tally::new();
        let url = cluster.ws_url(&token("anon", 3600), Some("1.0.0"));
        let (readers, _) = rt.block_on(inbox::subscribe(&url, fresh_source(), 0..n, &tally));
        let worker = cluster.worker_pid().expect("the worker runs");
        let decoded = decoding.tally.delivered.load(Ordering::Relaxed);
        let (cpu_ours, cpu_theirs) = (cpu_us(worker), cpu_us(walsender) + cpu_us(decoding.pid()));
        let delivered_before = cluster.stat("events_delivered");
        let from = micros_now();
        let writer = PacedWriter::start(&cluster, rate, move |k| inbox::message_to(k, n));
        std::thread::sleep(Duration::from_secs(seconds));
        let rows = writer.stop() as usize;
        let ours_all = rt.block_on(tally.wait_for(rows, Duration::from_secs(60)));
        let theirs_all = rt.block_on(decoding.tally.wait_for(decoded + rows, Duration::from_secs(60)));
        let to = micros_now();
        let ours = Side {
            latency: percentiles(tally.latencies_between(from, to)),
            cpu_us_per_event: (cpu_us(worker) - cpu_ours) as f64 / rows as f64,
        };
        let theirs = Side {
            latency: percentiles(decoding.tally.latencies_between(from, to)),
            cpu_us_per_event: (cpu_us(walsender) + cpu_us(decoding.pid()) - cpu_theirs) as f64 / rows as f64,
        };
        println!(
            "{n:>11} {rows:>7}   {:>9.2} / {:>7.2} {:>10.1}   {:>9.2} / {:>7.2} {:>10.1}   {:>6.2} / {:>4.2}",
            theirs.latency.p50_ms,
            theirs.latency.p99_ms,
            theirs.cpu_us_per_event,
            ours.latency.p50_ms,
            ours.latency.p99_ms,
            ours.cpu_us_per_event,
            ours.latency.p50_ms / theirs.latency.p50_ms,
            ours.latency.p99_ms / theirs.latency.p99_ms,
        );
        println!(
            "{:>11} received: ours {} of {rows} (max {:.2} ms, sockets ended {}), decoding {} (max {:.2} ms); \
             realtime.stats() events_delivered +{}",
            "",
            tally.delivered.load(Ordering::Relaxed),
            ours.latency.max_ms,
            tally.ended.load(Ordering::Relaxed),
            decoding.tally.delivered.load(Ordering::Relaxed) - decoded,
            theirs.latency.max_ms,
            cluster.stat("events_delivered") - delivered_before,
        );
        assert!(ours_all && theirs_all, "events were missing (above)");
        readers.iter().for_each(|r| r.abort());
        settle(&cluster);
    }
    print_stats(
        &cluster,
        &[
            "channels_joined",
            "joins_refused",
            "events_delivered",
            "events_dropped",
            "rls_checks",
            "rls_rows_checked",
            "rls_checks_planned",
        ],
    );
}

/// The walsender serving pg_recvlogical, once it streams.
fn walsender_pid(cluster: &Cluster) -> i32 {
    for _ in 0..200 {
        if let Ok(pid) = cluster.psql("SELECT pid FROM pg_stat_replication LIMIT 1").parse() {
            return pid;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("pg_recvlogical never streamed:\n{}", cluster.log());
}
