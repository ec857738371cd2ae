# northstar — the two commands: `make run` and `make test`.
#
# `make run` and `make test` share the dev build (one compile serves both on a fresh machine);
# `make bench` builds the release profile, which is what benchmark numbers are quoted for.

CARGO      ?= cargo
DATA       ?= data
LISTEN     ?= 127.0.0.1:7070
DEMO       ?= 5000
DEV_BIN    := target/debug/northstar
REL_BIN    := target/release/northstar

.PHONY: run test bench build release deps test-deps lint fmt clean-data

## Installs nats-server if missing, builds, starts `northstar serve` on the embedded
## nats-server with data/ and sends the demo workload.
run: deps build
	$(DEV_BIN) serve --data $(DATA) --listen $(LISTEN) --demo $(DEMO)

## Unit and integration tests (real nats-server processes, real Parquet, real HTTP).
test: test-deps
	$(CARGO) test --all-targets -- --test-threads=4

## Benchmarks on the release build, each next to a baseline measured in the same run.
bench: deps release
	$(REL_BIN) bench ingest
	$(REL_BIN) bench limits
	$(REL_BIN) bench activation
	$(REL_BIN) bench billing
	$(REL_BIN) bench soak --minutes 10

build:
	$(CARGO) build

release:
	$(CARGO) build --release

deps:
	@./scripts/install-deps.sh

test-deps:
	@./scripts/install-deps.sh --test

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings

fmt:
	$(CARGO) fmt

## Removes the local data dir (stop northstar first).
clean-data:
	rm -rf $(DATA)/events $(DATA)/rejected $(DATA)/jetstream
