# The README's two commands: `make run` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint fmt bench bench-smoke soak clean node pgbouncer

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,embedded,tracing]'
	touch $(STAMP)

run: $(STAMP)  ## start the worker (embedded PostgreSQL unless PGNOTIFY_DATABASE_URL is set)
	PGNOTIFY_LOG_FORMAT=$${PGNOTIFY_LOG_FORMAT:-text} $(BIN)/pgnotify-worker run

NODE_STAMP := examples/node/node_modules/.installed

$(NODE_STAMP): examples/node/package-lock.json
	@if command -v npm >/dev/null; then npm ci --prefix examples/node --no-audit --no-fund --silent && touch $(NODE_STAMP); \
	 else echo "npm not found: the Node.js producer example is not tested"; fi

node: $(NODE_STAMP)

# PgBouncer (transaction mode) for tests/test_pgbouncer.py: apt-get as root, else those tests skip.
APT := DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends
pgbouncer:
	@command -v pgbouncer >/dev/null || [ -x /usr/sbin/pgbouncer ] || \
	 if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	   ($(APT) pgbouncer || (apt-get update -qq && $(APT) pgbouncer)) >/dev/null 2>&1 \
	   || echo "could not install pgbouncer: the PgBouncer tests are skipped"; \
	 else echo "pgbouncer not found: the PgBouncer tests are skipped"; fi

lint: $(STAMP)  ## ruff (lint + format check), mypy, hadolint, manifests and alert rules
	$(BIN)/ruff check src tests bench examples
	$(BIN)/ruff format --check src tests bench examples
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache
	$(BIN)/hadolint Dockerfile
	$(BIN)/python deploy/check.py

fmt: $(STAMP)
	$(BIN)/ruff format src tests bench examples
	$(BIN)/ruff check --fix src tests bench examples

test: lint node pgbouncer  ## lint, then the test suite against a throwaway PostgreSQL
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The long chaos run (not in CI): 5,500 webhooks through 3 replicas with 10 SIGKILLs, 6 SIGTERMs
# and 3 PostgreSQL restarts; lost 0, stuck 0, duplicates only after an expired lease.
soak: $(STAMP)
	PGNOTIFY_CHAOS_ROWS=5500 PGNOTIFY_CHAOS_KILLS=10 PGNOTIFY_CHAOS_TERMS=6 \
	PGNOTIFY_CHAOS_DB_RESTARTS=3 $(BIN)/python -m pytest -s tests/test_chaos.py $(PYTEST_ARGS)

bench: $(STAMP)  ## benchmarks (not tests): latency, throughput, pgbench beside us, provider clients, the producer's INSERT
	$(BIN)/python -m bench.run $(BENCH_ARGS)
	$(BIN)/python -m bench.providers
	$(BIN)/python -m bench.chat
	$(BIN)/python -m bench.producers

bench-smoke: $(STAMP)  ## seconds-long versions for CI; they never fail on a time
	$(BIN)/python -m bench.run --smoke
	$(BIN)/python -m bench.providers --smoke
	$(BIN)/python -m bench.chat --smoke
	$(BIN)/python -m bench.producers --smoke

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
