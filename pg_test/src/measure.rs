//! What the load benchmarks measure with: the wall clock that payloads
//! carry, a process's CPU time and memory peak from /proc, and latency
//! percentiles.

use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

/// Microseconds since the epoch, the clock payload stamps are taken on
/// (the server's `clock_timestamp()` reads the same clock here).
pub fn micros_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_micros() as u64
}

/// User plus system CPU time of `pid` (all its threads) so far, in µs.
pub fn cpu_us(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // (the command name may hold spaces: fields count from after it)
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    ticks * 1_000_000 / clock_ticks()
}

fn clock_ticks() -> u64 {
    static TICKS: OnceLock<u64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        let out = std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .expect("getconf runs");
        String::from_utf8_lossy(&out.stdout).trim().parse().expect("CLK_TCK")
    })
}

/// A `/proc/<pid>/status` line's kB (`VmRSS`, `VmHWM`).
pub fn status_kb(pid: i32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} for {pid}"))
}

/// Latency percentiles of a set of samples.
#[derive(Clone, Copy, Debug, Default)]
pub struct Percentiles {
    pub count: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// The percentiles of `samples_us` (nearest rank); all zero when empty.
pub fn percentiles(mut samples_us: Vec<u32>) -> Percentiles {
    if samples_us.is_empty() {
        return Percentiles::default();
    }
    samples_us.sort_unstable();
    let at = |q: f64| samples_us[((samples_us.len() - 1) as f64 * q).round() as usize] as f64 / 1000.0;
    Percentiles {
        count: samples_us.len(),
        p50_ms: at(0.5),
        p99_ms: at(0.99),
        max_ms: at(1.0),
    }
}

/// The decimal number right after `key` in `text` (`"message":"` then
/// digits), without parsing the whole frame.
pub fn number_after(text: &str, key: &str) -> Option<u64> {
    let at = text.find(key)? + key.len();
    let digits = &text[at..];
    let end = digits.find(|c: char| !c.is_ascii_digit()).unwrap_or(digits.len());
    digits[..end].parse().ok()
}
