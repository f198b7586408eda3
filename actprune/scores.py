"""Selection scores and input transforms of activation pruning: small registered pieces.

A score gives a per-input-channel weight `w` (or None) so that entries are ranked by
`|x_j| * w_j`; a transform gives options of the wrapper. Both may need calibration statistics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn


@dataclass(frozen=True)
class Piece:
    name: str
    needs_calibration: bool
    build: Callable[..., Any]


SCORES: dict[str, Piece] = {}
TRANSFORMS: dict[str, Piece] = {}


def register_score(name: str, needs_calibration: bool = False):
    def add(build):
        SCORES[name] = Piece(name, needs_calibration, build)
        return build

    return add


def register_transform(name: str, needs_calibration: bool = False):
    def add(build):
        TRANSFORMS[name] = Piece(name, needs_calibration, build)
        return build

    return add


@register_score("magnitude")
def magnitude_score(linear: nn.Linear, stats: dict | None) -> torch.Tensor | None:
    return None


@register_score("weight_norm")
def weight_norm_score(linear: nn.Linear, stats: dict | None) -> torch.Tensor:
    """|x_j| · ‖W_:,j‖₂, as in WINA: an input that feeds large weights matters more."""
    return linear.weight.detach().float().norm(dim=0)


@register_score("clact", needs_calibration=True)
def clact_score(linear: nn.Linear, stats: dict) -> torch.Tensor:
    """|x_j| · ‖X_:,j‖₂ with the column norm of the calibration inputs (never the evaluated batch)."""
    return stats["l2"]


@register_transform("shift")
def shift_transform(linear: nn.Linear, stats: dict | None, mode: str = "median") -> dict:
    """Prune x − η and add η back through the layer; η per token (median, mean) or static."""
    if mode == "static":
        return {"shift": "static", "shift_vector": stats["mean"]}
    return {"shift": mode}


@register_transform("variance")
def variance_transform(linear: nn.Linear, stats: dict | None) -> dict:
    return {"variance": True}


def parse_transforms(transforms) -> list[tuple[str, dict]]:
    """`[shift, {name: shift, mode: static}, variance]` → [(name, options), ...], checked."""
    parsed = []
    for item in transforms or []:
        name, options = (item, {}) if isinstance(item, str) else (item.get("name"), {k: v for k, v in item.items() if k != "name"})
        if name not in TRANSFORMS:
            raise ValueError(f"pruning.transforms: {name!r} is unknown: allowed values are {sorted(TRANSFORMS)}")
        if name == "shift" and options.get("mode", "median") not in ("median", "mean", "static"):
            raise ValueError(f"pruning.transforms: shift mode={options['mode']!r}: allowed values are median, mean, static")
        parsed.append((name, dict(options)))
    return parsed


def get_score(name: str) -> Piece:
    if name not in SCORES:
        raise ValueError(f"pruning.score={name!r} is unknown: allowed values are {sorted(SCORES)}")
    return SCORES[name]


def needs_calibration(config) -> bool:
    transforms = parse_transforms(config.transforms)
    static_shift = any(name == "shift" and options.get("mode") == "static" for name, options in transforms)
    return get_score(config.score).needs_calibration or static_shift or any(TRANSFORMS[n].needs_calibration for n, _ in transforms)


def wrapper_options(linear: nn.Linear, config, stats: dict | None) -> dict:
    """Keyword arguments of ActSparseLinear for this layer under `config` (score and transforms)."""
    options = {"channel_weight": get_score(config.score).build(linear, stats)}
    for name, transform_options in parse_transforms(config.transforms):
        options.update(TRANSFORMS[name].build(linear, stats, **transform_options))
    return options
