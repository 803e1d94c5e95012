#!/usr/bin/env bash
# Runs the suites that need PostgreSQL on several majors:
#
#   scripts/test-majors.sh "14 15 16 17 18" "14 15 18"
#
# The first list gets the #[pg_test] suite (`cargo pgrx test pgNN --runas
# postgres`), the second the end-to-end suites (the release build installed
# into that major, then `cargo test -p pg_realtime_e2e` with its
# pg_config). Fetches and registers the majors first (scripts/pg-majors.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

PGTEST_MAJORS=(${1:-14 15 16 17 18})
E2E_MAJORS=(${2:-14 15 18})
PGDATA_ROOT=${PGDATA_ROOT:-/var/tmp/pg_realtime}

scripts/pg-majors.sh fetch $(printf '%s\n' "${PGTEST_MAJORS[@]}" "${E2E_MAJORS[@]}" | sort -u)

for m in "${PGTEST_MAJORS[@]}"; do
  echo "==> #[pg_test] suite on PostgreSQL $m"
  pgdata="$PGDATA_ROOT/pgrx-pgdata-$m"
  mkdir -p "$PGDATA_ROOT"
  [ "$(id -u)" = 0 ] && chown postgres: "$PGDATA_ROOT"
  cargo pgrx test "pg$m" --runas postgres --pgdata "$pgdata"
done

# `cargo pgrx test` leaves its test build installed: the release build goes
# in just before each major's end-to-end suites.
for m in "${E2E_MAJORS[@]}"; do
  config=$(scripts/pg-majors.sh pg-config "$m")
  echo "==> end-to-end suites on PostgreSQL $m ($config)"
  cargo pgrx install --release --pg-config "$config"
  PG_CONFIG=$config cargo test -p pg_realtime_e2e
done
