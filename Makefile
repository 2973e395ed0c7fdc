# jaccli: `make demo` and `make test` set everything up on a fresh machine with only Python.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Installed first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
OUT    ?= out

.DEFAULT_GOAL := help
.PHONY: help install demo test lint format sample-models bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

install: $(VENV)/.installed  ## create .venv and install jaccli with its test tools

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

demo: install  ## compute Jacobians of the shipped sample models (CPU, seconds)
	@mkdir -p $(OUT)
	$(BIN)/jaccli inspect sample_models/digits_cnn.safetensors
	$(BIN)/jaccli compute sample_models/digits_mlp.safetensors sample_models/digits_test.npy \
		--granularity block -o $(OUT)/digits_mlp_jacobians.h5
	$(BIN)/jaccli compute sample_models/digits_cnn.safetensors sample_models/digits_test_images.npy \
		--limit 100 -o $(OUT)/digits_cnn_jacobians.h5

test: install  ## run the whole test suite
	$(BIN)/python -m pytest -q -n auto

lint: install  ## ruff: lint rules and import order
	$(BIN)/ruff check .

format: install  ## ruff: fix what can be fixed automatically
	$(BIN)/ruff check --fix .

sample-models: install  ## retrain the sample models on scikit-learn's bundled digits data
	$(BIN)/python -m pip install --quiet -e ".[train]"
	$(BIN)/python sample_models/train.py

bench: install  ## benchmarks vs peers, written to out/ (BENCH_ARGS="--quick --device cuda")
	@mkdir -p $(OUT)
	$(BIN)/python benchmarks/bench_jacobians.py $(BENCH_ARGS) --output $(OUT)/bench_jacobians.md
	$(BIN)/python benchmarks/bench_spectra.py $(BENCH_ARGS) --output $(OUT)/bench_spectra.md
	$(BIN)/python benchmarks/bench_params.py $(BENCH_ARGS) --output $(OUT)/bench_params.md
	$(BIN)/python benchmarks/bench_formats.py $(BENCH_ARGS) --output $(OUT)/bench_formats.md
	$(BIN)/python benchmarks/bench_ntk.py $(BENCH_ARGS) --output $(OUT)/bench_ntk.md
	$(BIN)/python benchmarks/bench_scaling.py $(BENCH_ARGS) --output $(OUT)/bench_scaling.md

clean:  ## remove the virtual environment, caches and demo output
	rm -rf $(VENV) $(OUT) .pytest_cache .ruff_cache *.egg-info
