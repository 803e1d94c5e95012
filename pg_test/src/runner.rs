//! A minimal test runner for suites that share one cluster: every test
//! runs (a failure does not stop the rest), the cluster is dropped after the
//! last one, and the summary line is the one `cargo test` prints.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Instant;

pub type Test<C> = (&'static str, fn(&C));

/// The tests of a suite, each named after its function:
/// `tests![a, b]` is `[("a", a), ("b", b)]`.
#[macro_export]
macro_rules! tests {
    ($($test:ident),* $(,)?) => {
        [$((stringify!($test), $test as fn(&_))),*]
    };
}

/// Runs `tests` against `ctx` and exits non-zero if any failed. `filter`
/// (the first command-line argument, as with cargo test) selects by substring.
pub fn run<C>(ctx: C, tests: &[Test<C>]) {
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let selected: Vec<_> = tests
        .iter()
        .filter(|(name, _)| filter.as_deref().is_none_or(|f| name.contains(f)))
        .collect();
    println!("\nrunning {} tests", selected.len());
    let started = Instant::now();
    let mut failed = Vec::new();
    for (name, test) in &selected {
        let t0 = Instant::now();
        let result = catch_unwind(AssertUnwindSafe(|| test(&ctx)));
        let status = if result.is_ok() { "ok" } else { "FAILED" };
        println!("test {name} ... {status} ({:.1}s)", t0.elapsed().as_secs_f64());
        if result.is_err() {
            failed.push(*name);
        }
    }
    drop(ctx);
    let passed = selected.len() - failed.len();
    if !failed.is_empty() {
        println!("\nfailures:");
        for name in &failed {
            println!("    {name}");
        }
    }
    println!(
        "\ntest result: {}. {passed} passed; {} failed; 0 ignored; 0 measured; {} filtered out; finished in {:.2}s\n",
        if failed.is_empty() { "ok" } else { "FAILED" },
        failed.len(),
        tests.len() - selected.len(),
        started.elapsed().as_secs_f64()
    );
    if !failed.is_empty() {
        std::process::exit(101);
    }
}
