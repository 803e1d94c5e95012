//! The subscribers the scale benchmarks drive: joined sockets that count
//! the events they receive, note each one's latency from the stamp it
//! carries (microseconds since the epoch, taken by the writer), and say
//! when the server ended them.

use futures_util::{SinkExt, StreamExt};
use pg_realtime_e2e::load::Ws;
use pg_realtime_e2e::measure::{micros_now, number_after};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

/// What a set of subscribers (or a logical decoding reader) saw.
#[derive(Default)]
pub struct Tally {
    pub delivered: AtomicUsize,
    /// Subscribers that received all they expected.
    pub done: AtomicUsize,
    /// Sockets the server closed, told of an error, or that failed.
    pub ended: AtomicUsize,
    /// The length of the first counted frame, in bytes.
    pub frame_bytes: AtomicUsize,
    /// (stamp, latency) in µs of each event that carried a stamp.
    samples: Mutex<Vec<(u64, u32)>>,
    last_done: Mutex<Option<Instant>>,
}

/// Which frames a subscriber counts, and how many it waits for.
#[derive(Clone, Copy)]
pub struct Expect {
    /// Text every counted frame holds (`"postgres_changes"`).
    pub marker: &'static str,
    /// The key the stamp follows (`"message":"`), if events carry one.
    pub stamp: Option<&'static str>,
    /// Events after which this subscriber is done (None: until aborted).
    pub events: Option<usize>,
}

impl Tally {
    pub fn new() -> Arc<Tally> {
        Arc::default()
    }

    /// An event stamped `stamp_us` arrived now.
    pub fn note(&self, stamp_us: Option<u64>) {
        if let Some(stamp) = stamp_us {
            let latency = micros_now().saturating_sub(stamp).min(u32::MAX as u64) as u32;
            self.samples.lock().unwrap().push((stamp, latency));
        }
        self.delivered.fetch_add(1, Ordering::Relaxed);
    }

    /// Latencies (µs) of the events stamped in `from_us..to_us`.
    pub fn latencies_between(&self, from_us: u64, to_us: u64) -> Vec<u32> {
        let samples = self.samples.lock().unwrap();
        samples
            .iter()
            .filter(|(stamp, _)| (from_us..to_us).contains(stamp))
            .map(|&(_, latency)| latency)
            .collect()
    }

    /// When the last subscriber became done.
    pub fn last_done(&self) -> Option<Instant> {
        *self.last_done.lock().unwrap()
    }

    /// Waits until `delivered` reaches `n`, at most `within`; whether it did.
    pub async fn wait_for(&self, n: usize, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while self.delivered.load(Ordering::Relaxed) < n {
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        true
    }

    /// Waits until `n` subscribers are done or ended, at most `within`.
    pub async fn wait_done(&self, n: usize, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while self.done.load(Ordering::Relaxed) + self.ended.load(Ordering::Relaxed) < n {
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        true
    }
}

/// How often a subscriber sends a heartbeat (servers close silent sockets).
const HEARTBEAT: Duration = Duration::from_secs(20);
/// Subscribers started so far, to spread their heartbeats over `HEARTBEAT`.
static STARTED: AtomicUsize = AtomicUsize::new(0);

/// Reads `ws` as `expect` says, into `tally`; sends a heartbeat every
/// `HEARTBEAT`, each subscriber at its own phase of it, as clients that
/// joined at different times would: sockets that all joined within a few
/// seconds would otherwise beat together, and 10,000 heartbeats at once
/// held back deliveries for 0.4 s on this 2-core machine (bench/README.md,
/// "postgres_changes fan-out").
pub async fn receive(mut ws: Ws, tally: Arc<Tally>, expect: Expect) {
    let phase = STARTED.fetch_add(1, Ordering::Relaxed) % 1000;
    let first = tokio::time::Instant::now() + HEARTBEAT.mul_f64((phase + 1) as f64 / 1000.0);
    let mut heartbeat = tokio::time::interval_at(first, HEARTBEAT);
    let mut seen = 0;
    loop {
        tokio::select! {
            frame = ws.next() => {
                let Some(Ok(Message::Text(text))) = frame else {
                    tally.ended.fetch_add(1, Ordering::Relaxed);
                    return;
                };
                if text.contains(expect.marker) {
                    if seen == 0 {
                        let _ = tally.frame_bytes.compare_exchange(0, text.len(), Ordering::Relaxed, Ordering::Relaxed);
                    }
                    tally.note(expect.stamp.and_then(|key| number_after(&text, key)));
                    seen += 1;
                    if Some(seen) == expect.events {
                        *tally.last_done.lock().unwrap() = Some(Instant::now());
                        tally.done.fetch_add(1, Ordering::Relaxed);
                    }
                } else if text.contains(r#""status":"error""#) || text.contains("phx_close") {
                    eprintln!("a subscriber was ended: {text}");
                    tally.ended.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
            _ = heartbeat.tick() => {
                let beat = r#"{"topic":"phoenix","event":"heartbeat","payload":{},"ref":"hb"}"#;
                let _ = ws.send(Message::Text(beat.into())).await;
            }
        }
    }
}

/// Runs `connect(i)` for each i in `range`, 512 at a time; their sockets.
pub async fn join_all<F, Fut>(range: std::ops::Range<usize>, connect: F) -> Vec<Ws>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Ws> + Send + 'static,
{
    let gate = Arc::new(tokio::sync::Semaphore::new(512));
    let n = range.len();
    let joins: Vec<_> = range
        .map(|i| {
            let (gate, join) = (gate.clone(), connect(i));
            tokio::spawn(async move {
                let _permit = gate.acquire_owned().await.unwrap();
                join.await
            })
        })
        .collect();
    let mut sockets = Vec::with_capacity(n);
    for join in joins {
        sockets.push(join.await.expect("a subscriber failed to join"));
    }
    sockets
}
