# The one entry point: `make demo`, `make test`. CI runs .ci/run, which calls `make test`.
CARGO ?= cargo
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test lint doc mutants bench script-cost chaos redis-server docker-or-redis-server faketime valgrind

## Runs the main job: a scheduler over a simulated backlog (REDIS_URL or a throwaway redis-server).
demo: redis-server
	$(CARGO) run --locked --quiet --bin task-semaphore -- demo

## fmt check, clippy -D warnings on all targets, docs, then every test against a real Redis.
test: lint docker-or-redis-server faketime
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

## Instructions each Lua script costs inside Redis (callgrind: repeatable where time is not).
## SCRIPT_COST_ARGS are the options of `task-semaphore workload`.
SCRIPT_COST_ARGS ?= --slots 1000 --poll-many --sweep
script-cost: redis-server valgrind
	bash .ci/script-cost.sh $(SCRIPT_COST_ARGS)

## The chaos suite, longer: replicas as processes under faults, release build, then a
## table. CHAOS_SECONDS (default 240) is shared by the scenarios; each repeats runs of
## CHAOS_RUN_SECONDS (default 12).
CHAOS_SECONDS ?= 240
CHAOS_TABLE := $(CURDIR)/target/chaos-table.tsv
chaos: redis-server faketime
	@mkdir -p target && rm -f $(CHAOS_TABLE)
	@CHAOS_SECONDS=$(CHAOS_SECONDS) CHAOS_TABLE=$(CHAOS_TABLE) $(CARGO) test --release --locked --test chaos \
		-- --test-threads=1 --nocapture chaos_; status=$$?; \
	echo; echo "chaos suite, CHAOS_SECONDS=$(CHAOS_SECONDS)"; \
	awk -F'\t' 'BEGIN { printf "%-20s %5s %9s %9s %7s %11s %9s %14s %15s %9s %6s\n", \
		"scenario", "runs", "replicas", "started", "faults", "violations", "timeouts", "stale refused", \
		"never started", "reclaims", "secs" } \
		{ printf "%-20s %5s %9s %9s %7s %11s %9s %14s %15s %9s %6s\n", $$1, $$2, $$3, $$4, $$5, $$6, $$7, $$8, $$9, $$10, $$11; \
		  for (i = 2; i <= 10; i++) t[i] += $$i; s += $$11 } \
		END { printf "%-20s %5s %9s %9s %7s %11s %9s %14s %15s %9s %6s\n", "total", t[2], t[3], t[4], t[5], t[6], t[7], t[8], t[9], t[10], s }' \
		$(CHAOS_TABLE) 2>/dev/null || echo "(no table: the suite did not run)"; \
	exit $$status

# Debian's faketime (the chaos suite runs replicas under it; never redis-server). Not
# fatal: without it that one scenario is skipped with a notice.
faketime:
	@if ! command -v faketime >/dev/null 2>&1; then \
		echo "faketime is missing: installing Debian's package"; \
		{ $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq faketime >/dev/null; } || \
		echo "could not install faketime: the chaos suite will skip its skewed-clock scenario"; \
	fi

valgrind:
	@if ! command -v valgrind >/dev/null 2>&1; then \
		echo "valgrind is missing: installing Debian's package"; \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null; \
	fi

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
