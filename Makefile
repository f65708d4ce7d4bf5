# Every target bootstraps .venv from setup.cfg when it is missing or stale.
PYTHON ?= python3
TF ?= tensorflow-cpu
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test lint bench bench-quick scale clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[bench,dev]' '$(TF)'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check mpfeed tests scripts
	$(BIN)/ruff format --check mpfeed tests scripts

bench: $(STAMP)
	$(BIN)/python scripts/bench.py

bench-quick: $(STAMP)
	$(BIN)/python scripts/bench.py --quick

scale: $(STAMP)
	$(BIN)/python scripts/scale.py

clean:
	rm -rf $(VENV) bench-results .pytest_cache .ruff_cache *.egg-info
