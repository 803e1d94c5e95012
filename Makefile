# pg_realtime: `make run` brings up the demo, `make test` runs every suite.
# Both install what they need first (Debian packages, cargo-pgrx, npm).

SHELL := /bin/bash
export PATH := $(HOME)/.cargo/bin:$(PATH)
PG_CONFIG ?= /usr/bin/pg_config
# Where `cargo pgrx test` keeps its cluster: a directory the postgres user owns.
PGRX_PGDATA ?= /var/tmp/pg_realtime/pgrx-pgdata
# The PostgreSQL majors `make test` covers: the #[pg_test] suite on every
# supported major, the end-to-end suites on 14, 15 and 18. `make test PG=17`
# runs both on that major only.
PG ?=
PGTEST_MAJORS := $(if $(PG),$(PG),14 15 16 17 18)
E2E_MAJORS := $(if $(PG),$(PG),14 15 18)

.PHONY: deps install install-release run test lint unit majors pgtest e2e bench bench-instructions bench-rls bench-matching bench-soak bench-broadcast bench-scale fuzz clean

deps:
	scripts/install-deps.sh

install: deps
	cargo pgrx install --pg-config $(PG_CONFIG)

install-release: deps
	cargo pgrx install --release --pg-config $(PG_CONFIG)

## The demo: build, install, start a cluster with the marketplace schema.
run: install-release
	scripts/run-demo.sh

## Every suite on every supported major, as CI runs it (PG=NN: one major).
test: deps lint unit majors

## The suites that need PostgreSQL, per major (scripts/test-majors.sh
## fetches, caches and registers the majors first).
majors:
	scripts/test-majors.sh "$(PGTEST_MAJORS)" "$(E2E_MAJORS)"

lint:
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings

unit:
	cargo test -p bgworker

## The same two suites on the system PostgreSQL 15 only.
pgtest:
	mkdir -p $(dir $(PGRX_PGDATA)) && chown postgres: $(dir $(PGRX_PGDATA)) 2>/dev/null || true
	cargo pgrx test pg15 --runas postgres --pgdata $(PGRX_PGDATA)

# `cargo pgrx test` leaves its test build installed: reinstall before the
# end-to-end suites start their clusters. The release build, so the suites
# also prove the install that release tooling and `make run` use.
e2e: install-release
	cargo test -p pg_realtime_e2e

clean:
	cargo clean
	rm -rf pg_test/js/node_modules

## Capture overhead and latency benchmarks (see bench/README.md).
## Each fuzz target for FUZZ_RUNS executions (needs a nightly toolchain
## and cargo-fuzz; not part of `make test`: see fuzz/README.md).
FUZZ_RUNS ?= 1000000
fuzz:
	scripts/fuzz.sh $(FUZZ_RUNS)

bench: install-release
	bench/run.sh

## The capture overhead in instructions, under callgrind (needs valgrind).
bench-instructions: install-release
	bench/instructions.sh

## RLS-checked delivery throughput against no RLS (see bench/README.md).
bench-rls: install-release
	cargo bench -p pg_realtime_e2e --bench rls

## Five minutes of writers and rejoining subscribers, then every
## subscription's events checked (bench/README.md, "Soak"); SOAK_SECONDS,
## SOAK_RATE, SOAK_SUBSCRIBERS change it.
bench-soak: install-release
	cargo bench -p pg_realtime_e2e --bench soak

## The worker ruling out a change nobody wants: raw pre-check against
## Broadcast fan-out to 1,000 and 10,000 subscribers beside a bare
## tokio-tungstenite relay (bench/README.md, "Broadcast").
bench-broadcast: install-release
	cargo bench -p pg_realtime_e2e --bench broadcast

## Scale on one machine, each beside a baseline in the same run (about
## 3 minutes; bench/README.md, "Scale"): idle connections and memory,
## postgres_changes fan-out beside pg_recvlogical, one-transaction
## bursts beside a bare relay, a join storm.
bench-scale: install-release
	cargo bench -p pg_realtime_e2e --bench scale

## parse-and-match, in one process (see bench/README.md).
bench-matching:
	cargo bench -p bgworker --bench matching
