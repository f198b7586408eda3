"""Pruning methods: the one registry of small pieces, and what applying one returns.

Three kinds, each carried out by its own pipeline (chosen by `sparsify_`):
- `activation`: each target `nn.Linear` is replaced by a wrapper that masks its input per token;
  the method is `wrap(linear, plan, stats) -> nn.Module`, and the rest of the recipe (thresholds,
  allocation, refit, learned corrections) is `actprune.activation.pipeline`'s;
- `weight`: W is zeroed once, `prune(linear, pattern, inputs, plan)`, where `inputs` (for `layerwise`
  methods) holds what the layer's calibration inputs told (`actprune.weights`);
- `dense`: nothing changes.
Every module of this package is imported below, so a new method is one module here (or any
module imported before use) with a `@activation_method` / `@weight_method` function, plus a
`conf/pruning/<name>.yaml` that selects it.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from ..registry import Registry


@dataclass(frozen=True)
class Method:
    name: str
    kind: str  # dense | activation | weight
    apply: Callable | None  # activation: wrap(linear, plan, stats); weight: prune(linear, pattern, inputs, plan)
    layerwise: str | None = None  # weight methods calibrated layer by layer: "norms" or "hessian"


@dataclass
class Pruned:
    """What applying a method did: each target's module afterwards, the records of the steps that
    ran (allocation, thresholds, refit, learned: as results.json keeps them), their seconds, and the
    hooks left on the model."""

    layers: dict[str, nn.Module]
    records: dict[str, object] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    hooks: list = field(default_factory=list)


METHODS = Registry("pruning.method")


def register(method: Method) -> Method:
    return METHODS.add(method.name, method)


def activation_method(name: str):
    """`@activation_method("act_x")` on `wrap(linear, plan, stats) -> nn.Module`."""

    def add(wrap):
        register(Method(name, "activation", wrap))
        return wrap

    return add


def weight_method(name: str, layerwise: str | None = None):
    """`@weight_method("weight_x", layerwise=None|"norms"|"hessian")` on `prune(linear, pattern, inputs, plan)`."""

    def add(prune):
        register(Method(name, "weight", prune, layerwise))
        return prune

    return add


def get_method(name: str) -> Method:
    return METHODS[name]


for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
