# The README's two commands: `make run` and `make test`. Both create .venv on first use.
# `make run` installs what running needs (the package, the embedded PostgreSQL, the tracing
# API); `make test` / `make lint` add the development tools. The everyday commands have targets
# too (make psql, make status); the CLI itself is .venv/bin/pgnotify-worker.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEV    := $(VENV)/.installed-dev
PIP    := $(BIN)/python -m pip install --progress-bar on --disable-pip-version-check

.PHONY: run psql status test lint fmt bench bench-smoke min-deps soak clean node pgbouncer browser lock image-size

$(VENV)/bin/python:
	@echo "--- creating $(VENV)"
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(VENV)/bin/python
	@echo "--- installing pgnotify-worker and its embedded PostgreSQL into $(VENV) (what running needs; make test adds the dev tools)"
	$(PIP) -e '.[embedded,tracing]'
	touch $(STAMP)

$(DEV): $(STAMP) pyproject.toml
	@echo "--- installing the development tools (pytest, ruff, mypy, hadolint, ...) into $(VENV)"
	$(PIP) -e '.[dev,embedded,tracing]'
	touch $(DEV)

run: $(STAMP)  ## start the worker (embedded PostgreSQL unless PGNOTIFY_DATABASE_URL is set)
	PGNOTIFY_LOG_FORMAT=$${PGNOTIFY_LOG_FORMAT:-text} $(BIN)/pgnotify-worker run

psql: $(STAMP)  ## psql on the worker's database (starts the embedded one if needed)
	@$(BIN)/pgnotify-worker psql $(ARGS)

status: $(STAMP)  ## queue per channel and recent errors
	@$(BIN)/pgnotify-worker status $(ARGS)

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

# Debian's chromium for the page tests (Playwright drives it; no browser download): apt-get as root,
# else the page tests skip (or fail under PGNOTIFY_REQUIRE_BROWSER=1, as in CI).
browser:
	@command -v chromium >/dev/null || [ -n "$$PGNOTIFY_CHROMIUM" ] || \
	 if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	   ($(APT) chromium || (apt-get update -qq && $(APT) chromium)) >/dev/null 2>&1 \
	   || echo "could not install chromium: the page tests are skipped"; \
	 else echo "chromium not found: the page tests are skipped (set PGNOTIFY_CHROMIUM to a Chromium binary)"; fi

lint: $(DEV)  ## ruff (lint + format check), mypy, hadolint, manifests and alert rules
	$(BIN)/ruff check src tests bench examples deploy .ci
	$(BIN)/ruff format --check src tests bench examples deploy .ci
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache
	$(BIN)/hadolint Dockerfile
	$(BIN)/python deploy/check.py

fmt: $(DEV)
	$(BIN)/ruff format src tests bench examples deploy .ci
	$(BIN)/ruff check --fix src tests bench examples deploy .ci

test: lint node pgbouncer browser  ## lint, then the test suite against a throwaway PostgreSQL
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The declared minimum versions, tested: a separate venv with every runtime dependency pinned to
# its `>=` minimum from pyproject.toml, running the unit tests and the CLI's --help.
MIN_VENV := .venv-min
min-deps:
	@echo "--- $(MIN_VENV): the runtime dependencies at their declared minimums"
	rm -rf $(MIN_VENV)
	$(PYTHON) -m venv $(MIN_VENV)
	$(PYTHON) .ci/min_constraints.py > $(MIN_VENV)/constraints.txt
	cat $(MIN_VENV)/constraints.txt
	$(MIN_VENV)/bin/python -m pip install --quiet --disable-pip-version-check \
	  --constraint $(MIN_VENV)/constraints.txt -e . pytest pytest-asyncio pytest-timeout standardwebhooks
	$(MIN_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/test_core_*.py tests/test_cli.py -k "core or help"

# The image's dependencies, pinned with hashes (the Dockerfile installs them with --require-hashes):
# pyproject's runtime dependencies plus the tracing and otlp extras, for CPython 3.11 on Linux.
# uv resolves them (installed here on demand, not in the dev extra: only this target needs it);
# tests/test_container.py checks that the lock still satisfies pyproject.toml.
LOCK := requirements/image.lock
lock: $(STAMP)
	$(PIP) --quiet 'uv>=0.4'
	$(BIN)/uv pip compile pyproject.toml --extra tracing --extra otlp --generate-hashes \
	  --python-version 3.11 --python-platform x86_64-manylinux_2_28 --no-header --annotation-style line \
	  --custom-compile-command 'make lock' --index-url https://pypi.org/simple -o $(LOCK)

# The image's installed size, measured outside a container: the lock and the wheel in a fresh
# venv, before and after pip/setuptools/wheel are removed (as the Dockerfile does).
image-size: $(STAMP)
	$(BIN)/python -m bench.image_size

# The long chaos run (not in CI): 5,500 webhooks through 3 replicas with 10 SIGKILLs, 6 SIGTERMs
# and 3 PostgreSQL restarts; lost 0, stuck 0, duplicates only after an expired lease.
soak: $(DEV)
	PGNOTIFY_CHAOS_ROWS=5500 PGNOTIFY_CHAOS_KILLS=10 PGNOTIFY_CHAOS_TERMS=6 \
	PGNOTIFY_CHAOS_DB_RESTARTS=3 $(BIN)/python -m pytest -s tests/test_chaos.py $(PYTEST_ARGS)

BENCH_STAMP := $(VENV)/.installed-bench
$(BENCH_STAMP): $(DEV) pyproject.toml
	$(PIP) -e '.[dev,embedded,tracing,bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)  ## benchmarks (not tests): latency, throughput, pgbench and pgqueuer beside us, provider clients, the producer's INSERT, the worker's RSS
	$(BIN)/python -m bench.run $(BENCH_ARGS)
	$(BIN)/python -m bench.pgqueuer_compare
	$(BIN)/python -m bench.providers
	$(BIN)/python -m bench.chat
	$(BIN)/python -m bench.workflows
	$(BIN)/python -m bench.isolation
	$(BIN)/python -m bench.producers
	$(BIN)/python -m bench.producer_costs
	$(BIN)/python -m bench.inbox
	$(BIN)/python -m bench.status_notify
	$(BIN)/python -m bench.pg_path
	$(BIN)/python -m bench.worker_ab
	$(BIN)/python -m bench.topics
	$(BIN)/python -m bench.console
	$(BIN)/python -m bench.batch
	$(BIN)/python -m bench.scale
	$(BIN)/python -m bench.memory

bench-smoke: $(BENCH_STAMP)  ## seconds-long versions for CI (pgqueuer beside us too); they never fail on a time
	$(BIN)/python -m bench.run --smoke
	$(BIN)/python -m bench.pgqueuer_compare --smoke
	$(BIN)/python -m bench.providers --smoke
	$(BIN)/python -m bench.chat --smoke
	$(BIN)/python -m bench.workflows --smoke
	$(BIN)/python -m bench.isolation --smoke
	$(BIN)/python -m bench.producers --smoke
	$(BIN)/python -m bench.producer_costs --smoke
	$(BIN)/python -m bench.inbox --smoke
	$(BIN)/python -m bench.status_notify --smoke
	$(BIN)/python -m bench.pg_path --smoke
	$(BIN)/python -m bench.worker_ab --smoke
	$(BIN)/python -m bench.topics --smoke
	$(BIN)/python -m bench.console --smoke
	$(BIN)/python -m bench.batch --smoke
	$(BIN)/python -m bench.scale --smoke
	$(BIN)/python -m bench.memory --smoke

clean:
	rm -rf $(VENV) $(MIN_VENV) .pytest_cache .mypy_cache .ruff_cache
