# `make demo` and `make test` work on a fresh machine with Python 3.11, pip and make:
# each creates .venv and installs what it needs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: demo test sim typecheck bench bench-quick clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/aiki demo

test: $(VENV)/.installed
	$(PY) -m pytest
	$(PY) -m mypy --strict aiki
	$(PY) -m ruff check aiki tests simulations benchmarks

# The deterministic simulation: 200 seeds x 10 virtual minutes of faults, every fault class,
# plus every seed in simulations/regressions.txt (CI's budget: 10 minutes on 2 cores).
# Nightly size: make sim SEEDS=0-999 MINUTES=30. Replay one seed: python -m simulations run --seed N
SEEDS ?= 0-199
MINUTES ?= 10
JOBS ?= 2
sim: $(VENV)/.installed
	$(PY) -m simulations sweep --seeds $(SEEDS) --minutes $(MINUTES) --regressions --jobs $(JOBS)

# Benchmarks (issue 6): Aiki's throughput beside DBOS Transact on SQLite and PostgreSQL, the
# single-commit baseline, latency, scale and idle; prints the tables, writes
# benchmarks/results/latest.json. BENCH_ARGS picks suites or options, e.g. BENCH_ARGS=throughput.
BENCH_ARGS ?=
$(VENV)/.installed-bench: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[dev,bench]'
	touch $@

bench: $(VENV)/.installed-bench
	$(PY) -m benchmarks $(BENCH_ARGS)

bench-quick: $(VENV)/.installed-bench
	$(PY) -m benchmarks --quick $(BENCH_ARGS)

typecheck: $(VENV)/.installed
	$(PY) -m mypy --strict aiki

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
