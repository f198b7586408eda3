"""Pruning methods: small registered pieces that turn one target `nn.Linear` into its pruned form.

A method gets the layer, the parsed pattern, the pruning config and the layer's calibration
statistics (or None) and returns the module that replaces it (or the layer itself, changed in
place). Add one with `@register("name", kind)`; `pruning.method=name`
then selects it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .layers import ActSparseLinear, magnitude
from .masks import Pattern, pattern_keep_mask
from .mitigation import wrapper_options


@dataclass(frozen=True)
class Method:
    name: str
    kind: str  # "dense", "activation" (masks inputs at run time) or "weight" (zeroes W once)
    apply: Callable[[nn.Linear, Pattern, Any, dict | None], nn.Module]
    rule: str | None = None  # weight methods pruned layer by layer on calibration inputs (actprune.weights)


METHODS: dict[str, Method] = {}


def register(name: str, kind: str, rule: str | None = None):
    def add(apply):
        METHODS[name] = Method(name, kind, apply, rule)
        return apply

    return add


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"pruning.method={name!r} is unknown: allowed values are {sorted(METHODS)}")
    return METHODS[name]


@register("dense", kind="dense")
def dense(linear: nn.Linear, pattern: Pattern, config=None, stats=None) -> nn.Module:
    return linear


@register("act_magnitude", kind="activation")
def act_magnitude(linear: nn.Linear, pattern: Pattern, config, stats: dict | None) -> nn.Module:
    """Per token, keep the inputs with the largest |x| (times `pruning.score`'s channel weight)."""
    options = wrapper_options(linear, config, stats)
    return ActSparseLinear(linear, pattern, score=magnitude, dense_tokens=config.dense_tokens, **options)


@register("weight_magnitude", kind="weight")
@torch.no_grad()
def weight_magnitude(linear: nn.Linear, pattern: Pattern, config=None, stats=None) -> nn.Module:
    """Zero W by |W|: N:M along each output row's inputs, or one threshold over the whole layer."""
    if pattern.is_dense():
        return linear
    scores = linear.weight.abs()
    if pattern.is_nm:
        keep = pattern_keep_mask(scores, pattern)
    else:
        keep = pattern_keep_mask(scores.flatten(), pattern).view_as(scores)
    linear.weight.mul_(keep)
    return linear


@register("weight_wanda", kind="weight", rule="wanda")
def weight_wanda(linear: nn.Linear, pattern: Pattern, config=None, stats=None) -> nn.Module:
    """Wanda (Sun et al., 2024): |W_ij|·‖X_j‖₂ per output row; the pass is `actprune.weights`."""
    return linear


@register("weight_sparsegpt", kind="weight", rule="sparsegpt")
def weight_sparsegpt(linear: nn.Linear, pattern: Pattern, config=None, stats=None) -> nn.Module:
    """SparseGPT (Frantar & Alistarh, 2023): OBS reconstruction; the pass is `actprune.weights`."""
    return linear
