//! The baseline for the postgres_changes benchmark: streaming logical
//! decoding, `pg_recvlogical` with `test_decoding`, reading the same
//! commits, each INSERT line's stamp turned into a latency as our
//! subscribers do.

use super::subscribers::Tally;
use pg_realtime_e2e::measure::number_after;
use pg_realtime_e2e::Cluster;
use std::io::BufRead;
use std::process::{Child, Stdio};
use std::sync::Arc;

pub struct Decoding {
    child: Child,
    pub tally: Arc<Tally>,
}

impl Decoding {
    /// Creates slot `bench` on `cluster` (wal_level = logical) and streams
    /// it; INSERTs into `table` are counted.
    pub fn start(cluster: &Cluster, table: &str) -> Decoding {
        cluster.psql("SELECT pg_create_logical_replication_slot('bench', 'test_decoding')");
        let mut child = std::process::Command::new(cluster.program("pg_recvlogical"))
            .arg("-h")
            .arg(&cluster.dir)
            .args(["-p", &cluster.port.to_string(), "-U", "postgres", "-d", "postgres"])
            .args(["--slot", "bench", "--start", "--no-loop", "-f", "-"])
            .args(["-o", "skip-empty-xacts=1"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("pg_recvlogical runs");
        let tally = Tally::new();
        let lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let (counted, prefix) = (tally.clone(), format!("table public.{table}: INSERT:"));
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                if line.starts_with(&prefix) {
                    counted.note(number_after(&line, "message[text]:'"));
                }
            }
        });
        Decoding { child, tally }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }
}

impl Drop for Decoding {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
