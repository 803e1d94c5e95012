//! A paced writer for the load benchmarks: one psql session on its own
//! thread committing one statement at a time at a steady rate.

use crate::Cluster;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct PacedWriter {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

impl PacedWriter {
    /// Sends `statement(k)` for k = 0, 1, ... at `per_second`, each its
    /// own transaction (psql's autocommit), until `stop`.
    pub fn start<F>(cluster: &Cluster, per_second: u32, statement: F) -> PacedWriter
    where
        F: Fn(u64) -> String + Send + 'static,
    {
        let mut session = cluster.psql_session();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut stdin = session.stdin.take().unwrap();
            let period = Duration::from_secs(1) / per_second;
            let started = Instant::now();
            let mut sent = 0u64;
            while !stopping.load(Ordering::Acquire) {
                // (on a schedule, not a sleep after each: the rate holds)
                if let Some(wait) = (started + period * sent as u32).checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                writeln!(stdin, "{}", statement(sent)).expect("psql takes the statement");
                sent += 1;
            }
            drop(stdin);
            let out = session.wait_with_output().unwrap();
            assert!(out.status.success(), "the writer's psql failed");
            sent
        });
        PacedWriter { stop, thread }
    }

    /// Stops, waits until psql has committed everything sent; returns
    /// how many statements that was.
    pub fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Release);
        self.thread.join().unwrap()
    }
}
