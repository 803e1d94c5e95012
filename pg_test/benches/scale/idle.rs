//! Benchmark 1, *connections and memory*: SCALE_CONNECTIONS (default
//! "1000,10000,max") idle joined connections, each joined to a channel of
//! its own, opened by SCALE_GENERATORS (2) generator processes (each bound
//! by the same file limit) from several 127.0.0.x source addresses; for
//! each count, the server's resident memory per connection (`VmRSS` from
//! /proc, after minus before, each count against a fresh server process)
//! and the joins a second, beside a minimal tokio-tungstenite server built
//! here with the same buffer settings (the floor), in the same run. "max"
//! is as many as the worker says the hard `RLIMIT_NOFILE` leaves it.

use super::{fresh_source, fresh_worker, open_cluster, print_stats, setting, settle};
use crate::floor;
use pg_realtime_e2e::load::{connect_and_join, raise_nofile, rss_kb};
use pg_realtime_e2e::*;
use std::io::{BufRead, Write};
use std::net::Ipv4Addr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn run() {
    let generators: usize = setting("SCALE_GENERATORS", "2").parse().unwrap();
    let cluster = open_cluster(&[]);
    let capacity = client_sockets(&cluster);
    let counts: Vec<usize> = setting("SCALE_CONNECTIONS", "1000,10000,max")
        .split(',')
        .map(|n| match n.trim() {
            "max" => capacity,
            n => n.parse().expect("a count"),
        })
        .collect();
    let token = token("anon", 3600);
    println!("idle joined connections: {generators} generator processes, one channel each, vsn 1.0.0");
    println!(
        "{:>11}   {:>14} {:>12}   {:>14} {:>12}   {:>6}",
        "connections", "floor kB/conn", "joins/s", "ours kB/conn", "joins/s", "ratio"
    );
    for n in counts {
        let floor_url = "ws://127.0.0.1:PORT/socket/websocket?vsn=1.0.0".to_owned();
        let ours_url = format!(
            "ws://127.0.0.1:{}/realtime/v1/websocket?apikey={token}&vsn=1.0.0",
            cluster.ws_port
        );
        // Each count against fresh server processes: memory an earlier,
        // larger run freed would otherwise be reused without growing RSS.
        let floor_port = free_port();
        let mut floor = floor::spawn(floor_port);
        let floor_url = floor_url.replace("PORT", &floor_port.to_string());
        let (floor_kb, floor_rate) = hold(&floor_url, floor.id() as i32, n, generators);
        let _ = floor.kill();
        let _ = floor.wait();
        let worker = fresh_worker(&cluster);
        let (ours_kb, ours_rate) = hold(&ours_url, worker, n, generators);
        println!(
            "{n:>11}   {floor_kb:>14.2} {floor_rate:>12.0}   {ours_kb:>14.2} {ours_rate:>12.0}   {:>6.2}",
            ours_kb / floor_kb
        );
        settle(&cluster);
    }
    print_stats(
        &cluster,
        &[
            "connections_total",
            "handshakes_refused",
            "channels_joined",
            "joins_refused",
        ],
    );
}

/// Opens `n` joined connections to `url` through `generators` processes,
/// holds them while the server's memory is read, then lets them go.
/// Returns kB per connection and joins a second.
fn hold(url: &str, server_pid: i32, n: usize, generators: usize) -> (f64, f64) {
    let before = rss_kb(server_pid);
    let started = Instant::now();
    let mut children: Vec<(Child, std::io::Lines<std::io::BufReader<std::process::ChildStdout>>)> = (0..generators)
        .map(|g| {
            let share = n / generators + usize::from(g < n % generators);
            // (a source address per generator: ephemeral ports last)
            let source = fresh_source().octets()[3];
            let mut child = Command::new(std::env::current_exe().unwrap())
                .args(["--generate", url, &share.to_string(), &source.to_string()])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
            (child, lines)
        })
        .collect();
    for (_, lines) in &mut children {
        let line = lines.next().expect("a generator line").unwrap();
        assert_eq!(line, "JOINED", "a generator failed: {line}");
    }
    let elapsed = started.elapsed();
    // (let the server settle: buffers of the handshakes freed)
    std::thread::sleep(Duration::from_secs(2));
    let after = rss_kb(server_pid);
    for (child, _) in &mut children {
        writeln!(child.stdin.as_mut().unwrap(), "DONE").unwrap();
    }
    for (mut child, _) in children {
        assert!(child.wait().unwrap().success());
    }
    (
        (after.saturating_sub(before)) as f64 / n as f64,
        n as f64 / elapsed.as_secs_f64(),
    )
}

/// A generator process (`--generate`): `n` connections to `url` from 127.0.0.`source`,
/// each joined; says JOINED, holds them (answering nothing: idle) until
/// DONE on stdin.
pub fn generate(url: &str, n: usize, source: u8) {
    raise_nofile();
    let rt = runtime();
    rt.block_on(async {
        let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(512));
        let mut joins = Vec::with_capacity(n);
        for i in 0..n {
            let (url, gate) = (url.to_owned(), gate.clone());
            joins.push(tokio::spawn(async move {
                let _permit = gate.acquire_owned().await.unwrap();
                connect_and_join(
                    &url,
                    Ipv4Addr::new(127, 0, 0, source),
                    &format!("realtime:idle-{i}"),
                    "{}",
                )
                .await
            }));
        }
        let mut sockets = Vec::with_capacity(n);
        for join in joins {
            sockets.push(join.await.expect("a connection failed"));
        }
        println!("JOINED");
        let _ = tokio::task::spawn_blocking(|| {
            let mut line = String::new();
            let _ = std::io::stdin().read_line(&mut line);
        })
        .await;
        drop(sockets);
    });
}

/// How many client sockets the worker says its file limit leaves (its
/// log line at start, `src/worker/fds.rs`).
fn client_sockets(cluster: &Cluster) -> usize {
    let log = cluster.log();
    let line = log
        .lines()
        .find(|l| l.contains("client sockets"))
        .expect("the worker's file-limit line");
    let before = line.split(" client sockets").next().unwrap();
    before.rsplit(' ').next().unwrap().parse().expect("a count")
}
