"""What a wrapped layer is built from: the score and the transforms of `pruning`, in their order."""

from __future__ import annotations

from torch import nn

from ..masks import Pattern
from .learned import Correction
from .scores import get_score
from .transforms import BASIS_TRANSFORMS, TRANSFORMS, Basis, Transforms


def needed_statistics(score: str, transforms: Transforms) -> set[str]:
    """The calibration statistics that the score and the (parsed) transforms read; empty: none."""
    needs = set(get_score(score).needs)
    for name, options in transforms:
        needs |= TRANSFORMS[name].needs
        if name == "shift" and options.get("mode") == "static":
            needs.add("mean")
    if "l2" in needs and any(name in ("hadamard", "pca") for name, _ in transforms):
        needs.add("second_moment")  # column norms in a rotated basis
    return needs


def wrapper_options(
    linear: nn.Linear, score: str, transforms: Transforms, stats: dict | None, pattern: Pattern
) -> dict:
    """Keyword arguments of ActSparseLinear for this layer: score weight, basis, shift, correction.
    `pattern`: the groups `permute` balances (N:M only; the plan refuses it otherwise)."""
    weight = linear.weight.detach().double()
    stats = {k: v.double() if v.is_floating_point() else v for k, v in (stats or {}).items()}
    basis, options = Basis(), {}
    for name, transform_options in transforms:
        if name == "permute":  # balances the pattern's groups, on what the score will rank
            transform_options = {**transform_options, "group": pattern.m, "score": get_score(score)}
        if name in BASIS_TRANSFORMS:
            TRANSFORMS[name].build(basis, weight, stats, **transform_options)
        else:
            options.update(TRANSFORMS[name].build(basis, weight, stats, **transform_options))
    absorbed = basis.weight(weight)
    if options.get("shift") == "static":  # the mean where the mask is taken: in the final basis
        options["shift_vector"] = basis.row(stats["mean"])
    options["channel_weight"] = get_score(score).build(absorbed, basis, stats)
    options.pop("refit", None)  # fitted after wrapping (actprune.activation.refit)
    if "learn" in options:
        learn = options.pop("learn")
        shape = {key: learn[key] for key in ("forms", "rank") if key in learn}  # Correction's defaults otherwise
        options["correction"] = Correction(absorbed.to(linear.weight.device), **shape)
    if basis.changed:
        options.update(
            input_order=basis.order, input_scale=basis.scale, rotation=basis.matrix, absorbed_weight=absorbed
        )
    return options
