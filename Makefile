# The README's two commands: `make run` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint fmt bench bench-smoke clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,embedded]'
	touch $(STAMP)

run: $(STAMP)  ## start the worker (embedded PostgreSQL unless PGNOTIFY_DATABASE_URL is set)
	PGNOTIFY_LOG_FORMAT=$${PGNOTIFY_LOG_FORMAT:-text} $(BIN)/pgnotify-worker run

lint: $(STAMP)  ## ruff (lint + format check) and mypy
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy

fmt: $(STAMP)
	$(BIN)/ruff format src tests bench
	$(BIN)/ruff check --fix src tests bench

test: lint  ## lint, then the test suite against a throwaway PostgreSQL
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)  ## benchmarks (not tests): latency, throughput, pgbench beside us, provider clients
	$(BIN)/python -m bench.run $(BENCH_ARGS)
	$(BIN)/python -m bench.providers
	$(BIN)/python -m bench.chat

bench-smoke: $(STAMP)  ## seconds-long versions for CI; they never fail on a time
	$(BIN)/python -m bench.run --smoke
	$(BIN)/python -m bench.providers --smoke
	$(BIN)/python -m bench.chat --smoke

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
