# `make demo` and `make test` work on a fresh machine with Python 3.11, pip and make:
# each creates .venv and installs what it needs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: demo test lint typecheck clean

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
	$(PY) -m ruff check aiki tests

typecheck: $(VENV)/.installed
	$(PY) -m mypy --strict aiki

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
