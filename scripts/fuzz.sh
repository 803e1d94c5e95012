#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets) for $1 executions each, with
# the saved corpus as seeds, and prints one line per target: executions,
# time, corpus size. A crash stops the script with libFuzzer's report; the
# input is under fuzz/artifacts/<target>/ (fix it, then copy it to
# fuzz/regressions/<target>/ so stable tests replay it).
# Needs a nightly toolchain and cargo-fuzz (cargo install cargo-fuzz).
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-1000000}"
cargo +nightly fuzz build -O
for target in $(cargo +nightly fuzz list); do
  mkdir -p "fuzz/corpus/$target"
  start=$(date +%s)
  # -timeout: an input that takes longer than 10 s is a hang; -rss_limit_mb:
  # one that needs more than 2 GB is unbounded memory. Both count as crashes.
  cargo +nightly fuzz run -O "$target" "fuzz/corpus/$target" -- \
    -runs="$runs" -timeout=10 -rss_limit_mb=2048 -max_len=65536 -print_final_stats=1 \
    2> "fuzz/artifacts-$target.log" || { tail -40 "fuzz/artifacts-$target.log"; exit 1; }
  done_runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "fuzz/artifacts-$target.log" | grep -o '[0-9]*$')
  peak=$(grep -o 'stat::peak_rss_mb: *[0-9]*' "fuzz/artifacts-$target.log" | grep -o '[0-9]*$')
  echo "$target: $done_runs executions in $(( $(date +%s) - start )) s, peak RSS ${peak} MB, corpus $(ls "fuzz/corpus/$target" | wc -l) inputs"
  rm -f "fuzz/artifacts-$target.log"
  # keep the smallest corpus with the same coverage: it is committed, and
  # replayed by `make unit`
  cargo +nightly fuzz cmin -O "$target" "fuzz/corpus/$target" > /dev/null 2>&1
done
