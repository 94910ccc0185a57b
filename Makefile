# `make demo` and `make test` do all set-up on a fresh machine, then run.
# Set-up (the .venv with pinned dependencies, the extension build) is skipped when nothing changed.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEPS_STAMP := $(VENV)/.deps-installed
BUILD_STAMP := $(VENV)/.extension-built
CSRC := $(shell find csrc -type f 2>/dev/null)
PYTEST := $(BIN)/python -m pytest

.PHONY: setup demo test test-all test-gpu bench bench-quality clean

setup: $(BUILD_STAMP)

$(DEPS_STAMP): requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	touch $@

$(BUILD_STAMP): $(DEPS_STAMP) setup.py pyproject.toml $(CSRC)
	$(BIN)/python -m pip install --quiet --no-build-isolation --no-deps -e .
	$(BIN)/python -c "import rpo_fast; print('rpo_fast backends:', rpo_fast.available_backends())"
	touch $@

demo: setup
	$(BIN)/rpo-fast demo

test: setup
	$(PYTEST)

test-all: setup
	$(PYTEST) -m "not gpu"

test-gpu: setup
	$(PYTEST) -m gpu

bench: setup
	$(BIN)/python -m benchmarks.run $(BENCH_ARGS)  # e.g. BENCH_ARGS=--quick

bench-quality: setup
	$(BIN)/python -m benchmarks.quality $(BENCH_ARGS)

clean:
	rm -rf build *.egg-info rpo_fast/_C*.so $(BUILD_STAMP)
