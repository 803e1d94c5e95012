#!/usr/bin/env bash
# pg_realtime's capture cost in instructions, counted by Valgrind
# (callgrind): unlike TPS on a shared VM, the same every run.
#
#   bench/instructions.sh      (after `make install-release`; needs valgrind)
#
# The whole cluster runs under callgrind (every process it forks is
# counted). For each variant of bench/run.sh -- (a) no trigger, (b) capture
# with nobody subscribed, (c) capture with one subscriber whose equality
# filter matches no row, (f) the same with a range filter -- one pgbench client runs N and then 2N single-row
# INSERTs; each run's backend writes its own count at exit, and the
# difference of the two, divided by N, is the backend's instructions per
# transaction, free of start-up and connection costs. The worker's share
# for (f) comes from two clusters, one per run length: the difference of
# its totals divided by N. Under Valgrind the worker wakes for nearly every
# commit, so its figure includes a wake-up per transaction: an upper bound
# of what it costs when commits come in batches.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-1000}
VARIANTS=${VARIANTS:-a b c f}
command -v valgrind >/dev/null || { echo "needs valgrind (apt-get install valgrind)"; exit 1; }
OUT=$(mktemp -d /tmp/pg_realtime_callgrind.XXXXXX)
chmod 777 "$OUT"

. bench/cluster.sh

# Starts the cluster under callgrind, one output file per process.
start_counted() {
  init_cluster
  as_pg valgrind --tool=callgrind --callgrind-out-file="$OUT/$1.%p" "$BIN/postgres" -D "$DIR/data" \
    > "$DIR/valgrind.log" 2>&1 &
  for _ in $(seq 600); do "$BIN/pg_isready" -q -h "$DIR" -p "$PGPORT" && break; sleep 0.5; done
  create_schema
  start_subscriber bench_c 0 n=eq.-1
  start_subscriber bench_f 0 n=gt.1000000000
  wait_for_idle_capture
}

# Runs `count` INSERTs into bench_<variant> on one connection; prints the
# instructions its backend executed (its callgrind file appears at exit).
counted_run() {  # tag variant count
  echo "INSERT INTO bench_$2 (n, body, ts) VALUES (1, 'a short message body of some forty bytes', now());" > "$DIR/insert.sql"
  ls "$OUT" > "$DIR/before"
  as_pg "$BIN/pgbench" -n -h "$DIR" -p "$PGPORT" -U postgres -c 1 -t "$3" -f "$DIR/insert.sql" postgres >/dev/null 2>&1
  # its backend is gone from pg_stat_activity before callgrind has written
  # its file: wait for both, then take the largest new file (the other new
  # ones are this script's short psql sessions)
  for _ in $(seq 100); do
    [ "$(psql_b -t -A -c "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgbench'")" = 0 ] && break
    sleep 0.2
  done
  local file="" previous="-"
  for _ in $(seq 100); do
    sleep 0.5
    file=$(ls "$OUT" | grep -vxFf "$DIR/before" | while read -r f; do
      echo "$(awk '/^totals:/ {print $2}' "$OUT/$f") $f"; done | sort -n | tail -1 | cut -d' ' -f2)
    [ -n "$file" ] && [ "$file" = "$previous" ] && grep -q '^totals:' "$OUT/$file" && break
    previous=$file
  done
  awk '/^totals:/ {print $2}' "$OUT/$file"
}

stop_cluster() {
  for p in $SUB_PIDS; do kill "$p" 2>/dev/null || true; done
  SUB_PID=""
  SUB_PIDS=""
  as_pg "$BIN/pg_ctl" -D "$DIR/data" -m fast -w stop >/dev/null
  rm -rf "$DIR/data"
}

worker_total() {  # tag
  grep -l 'pg_realtime_worker_main' "$OUT/$1".* | xargs awk '/^totals:/ {print $2}'
}

echo "instructions per single-row INSERT transaction (callgrind, N=$N and 2N, one client)"
start_counted one
declare -A per_txn
for t in $VARIANTS; do
  once=$(counted_run one "$t" "$N")
  twice=$(counted_run one "$t" $((2 * N)))
  per_txn[$t]=$(( (twice - once) / N ))
done
stop_cluster
for t in $VARIANTS; do
  label=$(case $t in a) echo "no trigger";; b) echo "capture, no subscriber";; c) echo "capture, 1 subscriber";;
          f) echo "capture, 1 range filter";; *) echo "$t";; esac)
  printf '  (%s) %-24s backend %7d   over (a) %+6d (%+.1f%%)\n' "$t" "$label" "${per_txn[$t]}" \
    $(( per_txn[$t] - per_txn[a] )) "$(awk -v v="${per_txn[$t]}" -v a="${per_txn[a]}" 'BEGIN {print 100 * (v - a) / a}')"
done
# The worker's share where it has work: (f)'s rows all reach it ((c)'s
# are dropped by the trigger, which wakes nobody).
if [[ " $VARIANTS " == *" f "* ]]; then
  start_counted f1; counted_run f1 f "$N" >/dev/null; stop_cluster
  start_counted f2; counted_run f2 f $((2 * N)) >/dev/null; stop_cluster
  w=$(( ($(worker_total f2) - $(worker_total f1)) / N ))
  printf '  (f) realtime worker %d per transaction (upper bound: one wake-up each)\n' "$w"
fi
rm -rf "$OUT"
