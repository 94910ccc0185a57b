# `make demo` and `make test` do all set-up on a fresh machine, then run.
# Set-up (the .venv with pinned dependencies, the extension build) is skipped when nothing changed.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEPS_STAMP := $(VENV)/.deps-installed
BUILD_STAMP := $(VENV)/.extension-built
CSRC := $(shell find csrc -type f 2>/dev/null)
PYTEST := $(BIN)/python -m pytest
# diffusers and the test tools a bare GPU machine may lack, at the versions set-up installed
GPU_WHEEL_NAMES := diffusers|importlib.metadata|zipp|pytest|iniconfig|pluggy|pygments|pytest-timeout

.PHONY: setup demo test test-all test-gpu gpu-check gpu-wheels bench bench-step bench-quality clean

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

# GPU tests on a machine with its own torch: no set-up (offline GPU machines cannot install the pins)
GPU_PYTHON = $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON))
test-gpu:
	$(GPU_PYTHON) -m pytest -o addopts= -m gpu

# On a GPU machine with its own torch (no set-up: nothing is downloaded there): builds the
# extension for that GPU, runs the kernel tests, the loss benchmark, a few training steps and
# the step's components on the real SD1.5, SDXL, SD3.5 and FLUX.1 architectures; writes
# gpu-check.{json,md} to $OUT. Without a GPU: a dry run of every stage that needs none.
gpu-check:
	$(GPU_PYTHON) -m benchmarks.gpu_check

# Here, before a GPU run: the wheels the GPU machine lacks (pure Python), into gpu_wheels/.
gpu-wheels: setup
	rm -rf gpu_wheels
	$(BIN)/python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 -d gpu_wheels \
	  $$($(BIN)/python -m pip freeze | grep -iE '^($(GPU_WHEEL_NAMES))==')
	@du -sh gpu_wheels && ls gpu_wheels

bench: setup
	$(BIN)/python -m benchmarks.loss $(BENCH_ARGS)  # e.g. BENCH_ARGS=--quick

# rpo-fast train beside the official Diffusion-DPO trainer: OFFICIAL=/path/to/a/DiffusionDPO/checkout
bench-step: setup
	$(BIN)/python -m benchmarks.step --official $(OFFICIAL) $(BENCH_ARGS)

bench-quality: setup
	$(BIN)/python -m benchmarks.quality $(BENCH_ARGS)

clean:
	rm -rf build *.egg-info rpo_fast/_C*.so $(BUILD_STAMP)
