# Every target bootstraps .venv from setup.cfg when it is missing or stale.
PYTHON ?= python3
TF ?= tensorflow-cpu
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PEERS := $(VENV)/.peers

.PHONY: install test lint bench bench-quick bench-peers scale clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[bench,dev,ray]' '$(TF)'
	touch $(STAMP)

# The suite, after the linters and the type checker (so CI, which runs make test, runs them too).
test: lint
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check mpfeed tests scripts
	$(BIN)/ruff format --check mpfeed tests scripts
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python scripts/bench.py

bench-quick: $(STAMP)
	$(BIN)/python scripts/bench.py --quick

# The optional peers of BENCH.md (PyTorch's DataLoader, Grain), which make bench then runs too. Ends by
# importing TensorFlow beside them, so a dependency that breaks it fails here, not in the middle of a run.
bench-peers: $(PEERS)

$(PEERS): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[peers]'
	$(BIN)/python -c "import tensorflow as tf, torch, grain; tf.constant(torch.ones(2).numpy()); print('tensorflow', tf.__version__, 'torch', torch.__version__, 'grain ok')"
	touch $(PEERS)

scale: $(STAMP)
	$(BIN)/python scripts/scale.py

clean:
	rm -rf $(VENV) bench-results .pytest_cache .ruff_cache *.egg-info
