# The two set-up commands on a fresh clone: `make demo` and `make test`.
# Both create .venv and install vqtok into it first (once; again when the lock file changes).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEMO_OUT ?= runs/demo

.PHONY: install demo test test-slow test-all bench-quality clean

$(STAMP): pyproject.toml requirements-lock.txt
	$(PYTHON) -m venv $(VENV)
	# torch first and exactly: the local CPU build, so nothing pulls CUDA packages
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c requirements-lock.txt -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# Main job on the embedded default: train a tokenizer on the bundled Fashion-MNIST sample.
demo: $(STAMP)
	$(BIN)/vqtok train-vqvae --data examples/fashion-mnist --out $(DEMO_OUT) --steps 1500

# The fast test suite (what every change must keep green).
test: $(STAMP)
	$(BIN)/python -m pytest

# Long tests that guard correctness (CI runs them too).
test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow

test-all: test test-slow

bench-quality: $(STAMP)
	$(BIN)/python benchmarks/vqvae_quality.py

clean:
	rm -rf $(VENV) runs build *.egg-info
