"""Benchmarks: registered pieces that measure a pruned model.

A benchmark is a class registered with `@benchmark("name")`, built with its options (the
`benchmark.<name>` config, checked against its `Options` dataclass). `prepare(env)` runs before
the model is loaded: it checks options and data and fails early, naming the key; it returns what
`results.json` records at its top level (e.g. where the data came from). `run(model, tokenizer,
env)` measures the pruned model and returns a `Measured`: metrics for the table and W&B, details
for `results.json[name]`. Every module of this package is imported below, so a new benchmark is
one module here plus `conf/benchmark/<name>.yaml` (`# @package benchmark.<name>`, its options).
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..registry import Registry
from ..run.results import RESERVED


@dataclass
class Env:
    """What a benchmark may read besides its options."""

    data_dir: str | None = None
    cache_dir: str | None = None
    job_dir: Path | None = None
    seed: int = 0
    model_key: tuple = ()  # identifies the loaded model and tokenizer, for in-process reuse
    max_positions: int | None = None  # the model's context length (max_position_embeddings), where it says
    tokenizer: Callable[[], object] | None = None  # the model's tokenizer, loaded on the first call (no weights)


@dataclass
class Measured:
    metrics: dict
    details: dict | None = None
    timings: dict = field(default_factory=dict)  # extra named timings besides the benchmark's own


BENCHMARKS = Registry("benchmark")


def benchmark(name: str):
    """Register a benchmark class under `name` (its config: `benchmark.<name>`)."""

    def add(cls):
        if name in RESERVED:
            raise ValueError(f"benchmark name {name!r} is a key results.json keeps for itself: choose another")
        cls.name = name
        BENCHMARKS.add(name, cls)
        return cls

    return add


def options_of(name: str, options) -> object:
    """`benchmark.<name>` checked against the benchmark's `Options` dataclass."""
    schema = BENCHMARKS[name].Options
    if OmegaConf.is_config(options):
        options = OmegaConf.to_container(options, resolve=True)
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), options or {}))
    except OmegaConfBaseException as error:
        raise ValueError(f"benchmark.{name}: {error.msg if hasattr(error, 'msg') else error}") from None


def build(name: str, options):
    """The benchmark `name` with its checked options."""
    options = options_of(name, options)
    return BENCHMARKS[name](options)


for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
