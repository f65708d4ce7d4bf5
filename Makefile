# Every target bootstraps .venv from setup.cfg when it is missing or stale.
PYTHON ?= python3
TF ?= tensorflow-cpu
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PEERS := $(VENV)/.peers
RAY_DATA := $(VENV)/.ray-data

.PHONY: install test lint bench bench-quick bench-peers scale scale-ray results results-quick clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[bench,dev,ray,keras,jax]' '$(TF)'
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

# The optional peers of docs/benchmarks.md (PyTorch's DataLoader, Grain), which make bench then runs too. Ends by
# importing TensorFlow beside them, so a dependency that breaks it fails here, not in the middle of a run.
bench-peers: $(PEERS)

$(PEERS): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[peers]'
	$(BIN)/python -c "import tensorflow as tf, torch, grain; tf.constant(torch.ones(2).numpy()); print('tensorflow', tf.__version__, 'torch', torch.__version__, 'grain ok')"
	touch $(PEERS)

scale: $(STAMP)
	$(BIN)/python scripts/scale.py

# The Ray backend on a local 3-node cluster, beside Ray Data's to_tf: needs ray[data] (pandas, pyarrow),
# installed once. Ends by importing Ray Data beside TensorFlow, so a dependency that breaks either fails here.
scale-ray: $(RAY_DATA)
	$(BIN)/python scripts/scale_ray.py

$(RAY_DATA): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[ray-data]'
	$(BIN)/python -c "import ray, ray.data, tensorflow as tf; print('ray', ray.__version__, 'tensorflow', tf.__version__, 'ray.data ok')"
	touch $(RAY_DATA)

# Every figure of the docs measured again at one commit, into docs/results.md (most of an hour on 2 cores:
# give it the machine). With the peers and Ray Data, so that every table has all its rows.
results: $(PEERS) $(RAY_DATA)
	$(BIN)/python scripts/results.py

# The same, in short windows, into bench-results/results-quick.md: a smoke run, not figures to quote.
results-quick: $(STAMP)
	$(BIN)/python scripts/results.py --quick

clean:
	rm -rf $(VENV) bench-results .pytest_cache .ruff_cache *.egg-info
