#!/usr/bin/env bash
# pg_realtime capture overhead and latency, measured side by side in one run.
#
#   bench/run.sh            (after `make install-release`; `make bench` does both)
#
# Single-row INSERT throughput with pgbench, synchronous_commit = off so the
# CPU cost of capture shows rather than fsync, for four tables that differ
# only in what happens on INSERT:
#   (a) nothing                         (the baseline)
#   (b) pg_realtime capture, nobody subscribed
#   (c) pg_realtime capture, one supabase-js subscriber connected to the
#       table (its filter, n=eq.-1, matches none of the bench rows, as a
#       user's filter matches none of the other users' rows: the capture
#       trigger drops each row after encoding its n, see bgworker::shared::prefilter)
#   (d) a trigger calling pg_notify('bench', row_to_json(NEW)::text)
#   (e) pg_realtime capture, one supabase-js subscriber receiving every row
#       (on this 2-core machine the Node client's own CPU competes with the
#       server: this is the whole pipeline, not the capture cost)
#   (f) as (c), but the subscriber's filter is n=gt.1000000000, which no
#       key filter can serve: every row is encoded, published and matched
#       by the worker, none is sent (what (c) measured before key filters)
#   (g) as (d), with a LISTEN client (node-postgres, bench/listener.mjs)
#       receiving every notification: the baseline for (e). (Its backend
#       listens throughout, so (d)'s commits wake it too: PostgreSQL
#       signals every listener of the database, whatever the channel.)
# Rounds interleave the variants (in reverse order every other round, so
# that drift within a round favours none), and each variant is reported
# as the median over rounds of its TPS divided by (a)'s in the same round:
# this VM's speed wanders by +-20% over minutes, and pairing within a round
# cancels most of that. Then commit-to-client latency: 1,000 single-row
# INSERTs at 200/s, each row stamped with clock_timestamp(), received by a
# supabase-js subscriber that subtracts the stamp from its own clock.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_RUN=${SECONDS_PER_RUN:-4}
ROUNDS=${ROUNDS:-9}
VARIANTS=${VARIANTS:-a b c d e f g}
CLIENTS=${CLIENTS:-2}
# BENCH_CONF: more postgresql.conf lines, for experiments; LATENCY=0 skips
# the latency run; PROTOCOL=prepared runs pgbench with prepared statements
# (-M prepared; the default is the simple protocol).
# The cluster, its schema and subscribers (shared with bench/instructions.sh).
. bench/cluster.sh
init_cluster
as_pg "$BIN/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w start >/dev/null
create_schema

start_subscriber bench_c 0 n=eq.-1
C_PID=$SUB_PID
start_subscriber bench_e 0
E_PID=$SUB_PID
start_subscriber bench_f 0 n=gt.1000000000
F_PID=$SUB_PID
start_listener bench_g
G_PID=$SUB_PID
wait_for_idle_capture

for t in $VARIANTS; do
  echo "INSERT INTO bench_$t (n, body, ts) VALUES (:client_id, 'a short message body of some forty bytes', now());" > "$DIR/insert_$t.sql"
done

WORKER_PID=$(psql_b -t -A -c "SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_realtime'")
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
TICKS=$(getconf CLK_TCK)

POSTMASTER_PID=$(head -1 "$DIR/data/postmaster.pid")
LISTENER_BACKEND=$(psql_b -t -A -c "SELECT pid FROM pg_stat_activity WHERE usename = 'listener'")
# CPU of the server's processes: the backends pgbench used (exited, so
# counted in the postmaster's reaped-children time) plus the realtime
# worker plus (g)'s LISTEN backend, which sends the notifications.
server_ticks() {
  echo $(( $(awk '{print $16 + $17}' "/proc/$POSTMASTER_PID/stat") + $(cpu_ticks "$WORKER_PID") + $(cpu_ticks "$LISTENER_BACKEND") ))
}

# pgbench's backends exit when it does; their CPU reaches the postmaster's
# reaped-children total once the postmaster has reaped them.
backends_gone() {
  for _ in $(seq 200); do
    pgrep -P "$POSTMASTER_PID" -f "postgres: postgres postgres" >/dev/null || return 0
    sleep 0.01
  done
}

pgbench_run() {  # variant -> "TPS transactions"
  as_pg "$BIN/pgbench" -n -M "${PROTOCOL:-simple}" -h "$DIR" -p "$PGPORT" -U postgres -c "$CLIENTS" -j "$CLIENTS" -T "$SECONDS_PER_RUN" \
    -f "$DIR/insert_$1.sql" postgres 2>/dev/null \
    | awk '/^tps = / {tps = $3} /number of transactions actually processed/ {split($0, f, ": "); n = f[2]} END {print tps, n}'
}

declare -A runs worker_cpu server_us ratios cpu_ratios
echo "pgbench: $ROUNDS rounds x ($VARIANTS), ${SECONDS_PER_RUN}s each, $CLIENTS clients, synchronous_commit=off"
for round in $(seq "$ROUNDS"); do
  order=$VARIANTS
  [ $((round % 2)) = 0 ] && order=$(echo "$VARIANTS" | tr ' ' '\n' | tac | tr '\n' ' ')
  declare -A this=() this_us=()
  for t in $order; do
    before=$(cpu_ticks "$WORKER_PID")
    server_before=$(server_ticks)
    read -r v n <<< "$(pgbench_run "$t")"
    backends_gone
    after=$(cpu_ticks "$WORKER_PID")
    server_after=$(server_ticks)
    runs[$t]="${runs[$t]:-} $v"
    this[$t]=$v
    # the realtime worker's CPU during the run, as a share of one core
    w=$(awk -v d=$((after - before)) -v hz="$TICKS" -v s="$SECONDS_PER_RUN" 'BEGIN {printf "%.0f", 100 * d / hz / s}')
    worker_cpu[$t]="${worker_cpu[$t]:-} $w"
    # server CPU per transaction, in microseconds (steal time and the
    # client's own CPU are not in it, so it is steadier than TPS here)
    u=$(awk -v d=$((server_after - server_before)) -v hz="$TICKS" -v n="$n" 'BEGIN {printf "%.1f", 1e6 * d / hz / n}')
    server_us[$t]="${server_us[$t]:-} $u"
    this_us[$t]=$u
    printf '  round %s  (%s)  %10.1f tps   server CPU %6s us/txn   worker CPU %3s%% of a core\n' "$round" "$t" "$v" "$u" "$w"
  done
  for t in $VARIANTS; do
    ratios[$t]="${ratios[$t]:-} $(awk -v v="${this[$t]}" -v a="${this[a]}" 'BEGIN {print v / a}')"
    cpu_ratios[$t]="${cpu_ratios[$t]:-} $(awk -v v="${this_us[$t]}" -v a="${this_us[a]}" 'BEGIN {print a / v}')"
  done
done

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
# lower and upper quartile (nearest rank)
quartiles() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {q1=int((NR+3)/4); q3=int((3*NR+3)/4); printf "%.3f-%.3f", a[q1], a[q3]}'; }
# A 95% confidence interval for the median (distribution-free: the order
# statistics at ranks n/2 -+ 1.96 sqrt(n)/2, from the binomial(n, 1/2)
# count of rounds below the true median); "-" under 6 rounds.
median_ci() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {
  if (NR < 6) { printf "-"; exit }
  h = 1.96 * sqrt(NR) / 2; j = int(NR / 2 - h); k = int(NR / 2 + h) + 2
  if (j < 1) j = 1; if (k > NR) k = NR
  printf "%.3f-%.3f", a[j], a[k] }'; }
echo
echo "per variant: median TPS; median over rounds of TPS / (a)'s TPS in the same round (its 95% confidence"
echo "interval; quartiles of the rounds); median server CPU per transaction, and the median over rounds of"
echo "(a)'s CPU per transaction divided by the variant's in the same round (its 95% confidence interval):"
for t in $VARIANTS; do
  m=$(echo "${runs[$t]}" | median)
  u=$(echo "${server_us[$t]}" | median)
  label=$(case $t in a) echo "no trigger";; b) echo "capture, no subscriber";; c) echo "capture, 1 subscriber";;
          d) echo "pg_notify(row_to_json)";; e) echo "capture + full delivery";;
          f) echo "capture, 1 range filter";; g) echo "pg_notify + LISTEN client";; esac)
  printf '  (%s) %-24s %10.1f tps   ratio %.3f (CI %s; quartiles %s)   %6.1f us/txn   CPU ratio %.3f (CI %s)\n' "$t" "$label" "$m" \
    "$(echo "${ratios[$t]}" | median)" "$(echo "${ratios[$t]}" | median_ci)" "$(echo "${ratios[$t]}" | quartiles)" \
    "$u" "$(echo "${cpu_ratios[$t]}" | median)" "$(echo "${cpu_ratios[$t]}" | median_ci)"
done
delivered=$(psql_b -t -A -c "SELECT value FROM realtime.stats() WHERE name = 'events_delivered'")
dropped=$(psql_b -t -A -c "SELECT value FROM realtime.stats() WHERE name = 'events_dropped'")
stat() { psql_b -t -A -c "SELECT value FROM realtime.stats() WHERE name = '$1'"; }
echo "  (c) rows inserted: $(psql_b -t -A -c "SELECT count(*) FROM bench_c"), none sent (filter matches none);" \
  "rows dropped by the key filter: $(stat rows_filtered_out)"
echo "  (f) rows inserted: $(psql_b -t -A -c "SELECT count(*) FROM bench_f"), none sent (filter matches none)"
echo "  (e) rows inserted: $(psql_b -t -A -c "SELECT count(*) FROM bench_e"), events delivered: $delivered, dropped: $dropped"
kill "$G_PID" 2>/dev/null && wait "$G_PID" 2>/dev/null || true
echo "  (g) rows inserted: $(psql_b -t -A -c "SELECT count(*) FROM bench_g"), notifications received:" \
  "$(tail -1 "$DIR/listen-bench_g.out")"
kill "$C_PID" "$E_PID" "$F_PID" 2>/dev/null || true
SUB_PID=""

[ "${LATENCY:-1}" = 0 ] && exit 0
echo
echo "commit-to-client latency: 1000 single-row INSERTs at 200/s"
echo "INSERT INTO bench_lat (n, body, ts) VALUES (1, 'latency probe', clock_timestamp());" > "$DIR/lat.sql"
start_subscriber bench_lat 1000
as_pg "$BIN/pgbench" -n -h "$DIR" -p "$PGPORT" -U postgres -c 1 -t 1000 -R 200 -f "$DIR/lat.sql" postgres >/dev/null 2>&1
wait "$SUB_PID" || true
SUB_PID=""
echo "  $(tail -1 "$DIR/sub-bench_lat.out")"
