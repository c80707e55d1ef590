# The one entry point: `make demo`, `make test`. CI runs .ci/run, which calls `make test`.
CARGO ?= cargo
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test lint doc mutants bench redis-server docker-or-redis-server

## Runs the main job: a scheduler over a simulated backlog (REDIS_URL or a throwaway redis-server).
demo: redis-server
	$(CARGO) run --locked --quiet --bin task-semaphore -- demo

## fmt check, clippy -D warnings on all targets, docs, then every test against a real Redis.
test: lint docker-or-redis-server
	$(CARGO) test --locked

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --locked --all-targets -- -D warnings

doc:
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --locked --no-deps

## Breaks each guarantee in lua/ in turn and checks that a test fails (several minutes).
mutants: docker-or-redis-server
	python3 .ci/mutations.py

## Measures throughput, latency, tick cost and memory (REDIS_URL or a throwaway redis-server; a few minutes).
bench: redis-server
	$(CARGO) run --release --locked --bin task-semaphore -- bench

# redis-server from Debian's package, unless REDIS_URL names a server already.
redis-server:
	@if [ -z "$$REDIS_URL" ] && ! command -v redis-server >/dev/null 2>&1; then \
		echo "redis-server is missing: installing Debian's package"; \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; \
	fi

# The tests also accept a Docker engine (testcontainers) when there is no redis-server.
docker-or-redis-server:
	@if [ -z "$$REDIS_URL" ] && ! command -v redis-server >/dev/null 2>&1 && docker info >/dev/null 2>&1; then \
		echo "no redis-server: the tests will start one with testcontainers"; \
	else $(MAKE) --no-print-directory redis-server; fi
