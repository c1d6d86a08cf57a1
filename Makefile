# The two set-up commands on a fresh clone: `make demo` and `make test`.
# Both create .venv and install vqtok into it first (once; again when the lock file changes).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
BENCH_STAMP := $(VENV)/.bench-installed-stamp
DEMO_OUT ?= runs/demo

.PHONY: install demo test test-slow test-all test-gpu bench-quality bench-tokenize bench-prior bench-prior-throughput bench-commit bench-chaos bench-scale bench-decode bench-photo bench-tokenize-256 clean

$(STAMP): pyproject.toml requirements-lock.txt
	$(PYTHON) -m venv $(VENV)
	# torch first and exactly: the local CPU build, so nothing pulls CUDA packages
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c requirements-lock.txt -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# the `bench` extra (faiss-cpu, vector-quantize-pytorch), pinned by the same lock file
$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install -q -c requirements-lock.txt -e ".[bench]"
	touch $(BENCH_STAMP)

# Main job on the embedded default (local Ray, local files, the bundled Fashion-MNIST sample):
# `vqtok demo` converts the sample to WebDataset shards, trains a tokenizer on 2 Ray Train workers,
# tokenizes to Parquet, trains a class-conditional prior and samples a grid (a re-run skips what exists).
demo: $(STAMP)
	$(BIN)/vqtok demo --out $(DEMO_OUT)

# The fast test suite (what every change must keep green).
test: $(STAMP)
	$(BIN)/python -m pytest

# Long tests that guard correctness (CI runs them too).
test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow

test-all: test test-slow

# The tests that need CUDA (on a GPU machine; skipped elsewhere).
test-gpu: $(STAMP)
	$(BIN)/python -m pytest -m gpu

bench-quality: $(STAMP)
	$(BIN)/python benchmarks/vqvae_quality.py

# Fashion-MNIST 70k (default architecture) and 256 px photographs (llamagen-vq16, random weights)
bench-tokenize: $(STAMP)
	$(BIN)/python benchmarks/tokenize_throughput.py

# the 256 px case alone: encoder-only vs `vqtok tokenize` on JPEG photographs, peak RSS at two corpus
# sizes; about 5-10 minutes on 2 cores
bench-tokenize-256: $(STAMP)
	$(BIN)/python benchmarks/tokenize_throughput.py --case photo256

# needs the tokenizer bench-quality writes (benchmarks/out/quality/ours/tokenizer); about an hour on 2 cores
bench-prior: $(STAMP)
	$(BIN)/python benchmarks/prior_quality.py

# reads the token dataset bench-prior writes
bench-prior-throughput: $(STAMP)
	$(BIN)/python benchmarks/prior_throughput.py

# the commit protocol's cost per unit, new vs old, 100 to 20,000 units, local disk and moto S3; 20-25 minutes
bench-commit: $(STAMP)
	$(BIN)/python benchmarks/commit_cost.py

# 100 SIGKILLs at random moments during vqtok tokenize (about 30 minutes on 2 cores)
bench-chaos: $(STAMP)
	$(BIN)/python benchmarks/chaos.py

# 1,000,000 images in 1,000 shards; 10k vs 1M memory; a resume that reads no committed byte (about 30 minutes)
bench-scale: $(STAMP)
	$(BIN)/python benchmarks/scale.py

# 256 px decode, old vs new preprocessing policy (whole vs reduced JPEG decode) on the Debian
# desktop-background photographs (installed if missing): img/s per core and PSNR; about 2-3 minutes
bench-decode: $(STAMP)
	$(BIN)/python benchmarks/decode_speed.py

# tokenizer quality on 64x64 crops of real photographs (Debian desktop backgrounds, split by picture):
# conv vs vqgan vs the vqgan network around vector-quantize-pytorch's quantizer; about 20 minutes on 2 cores
bench-photo: $(BENCH_STAMP)
	$(BIN)/python benchmarks/photo_quality.py

clean:
	rm -rf $(VENV) runs build *.egg-info

# which vqtok files and functions one image passes through (tokenize -> train-prior -> sample), and the
# README's reading order checked against them; about a minute. TRACE_ARGS: e.g. --label after --compare
# benchmarks/trace_before.json
# what the Triton kernel's first call compiles, for sm_90 ahead of time, before/now (no GPU needed; ~5 min)
.PHONY: bench-kernel-compile
bench-kernel-compile: $(STAMP)
	$(BIN)/python benchmarks/kernel_compile.py

.PHONY: bench-trace
bench-trace: $(STAMP)
	$(BIN)/python benchmarks/trace_path.py $(TRACE_ARGS)

# captions on real data (openclipart's 8,121 titled drawings, rendered once into benchmarks/out/captions):
# tokenize with vs without captions, train-text-tokenizer on the titles, export-lm at N and 10N rows;
# about 10 minutes on 2 cores. CAPTIONS_ARGS: e.g. --only tokenize
.PHONY: bench-captions
bench-captions: $(STAMP)
	$(BIN)/python benchmarks/captions.py $(CAPTIONS_ARGS)

# text priors measured (issue 23): prompt fidelity vs a class prior on the same tokens, dark/light
# attributes, caption information (Fashion-MNIST and openclipart), captioning; resumable stages under
# benchmarks/out/text_prior. Needs benchmarks/out/captions (make bench-captions CAPTIONS_ARGS="--only corpus").
# TEXT_PRIOR_ARGS: --setting quick (35-60 min) / medium (about 70 min idle) / full (about 2.5 h), --only STAGE.
.PHONY: bench-text-prior
bench-text-prior: $(STAMP)
	$(BIN)/python benchmarks/text_prior_quality.py $(TEXT_PRIOR_ARGS)

# issue 24: the GPU suite in one command of about 8 minutes, Ray-free, on a GPU machine's own python3 (its
# torch and triton; vqtok imported from this checkout, missing pure-Python packages from benchmarks/gpu_wheels):
# the gpu tests, then the kernel, encoder, training, sampling and tokenization figures, each part under its own
# time limit. Then `python benchmarks/gpu_report.py runs/gpu` appends the tables to benchmarks/RESULTS.md.
# GPU_SUITE_ARGS: e.g. --only kernel,encoders; --limit PART=SECONDS; --cpu-smoke (every part tiny, on the CPU).
GPU_SUITE_OUT ?= runs/gpu
.PHONY: gpu-suite
gpu-suite:
	PYTHON=$(PYTHON) bash benchmarks/gpu_suite.sh --out $(GPU_SUITE_OUT) $(GPU_SUITE_ARGS)
