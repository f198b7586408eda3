"""Selection scores of activation pruning: per input channel, a weight `w` in the final basis
(after any transforms), so that the entries of a token are ranked by `|x'_j| · w_j`."""

from __future__ import annotations

import torch

from ..registry import Registry
from .transforms import Basis, Piece

SCORES = Registry("pruning.score")


def register_score(name: str, needs: tuple = ()):
    def add(build):
        SCORES.add(name, Piece(name, frozenset(needs), build))
        return build

    return add


@register_score("magnitude")
def magnitude_score(weight: torch.Tensor, basis: Basis, stats: dict | None) -> torch.Tensor | None:
    return None


@register_score("weight_norm")
def weight_norm_score(weight: torch.Tensor, basis: Basis, stats: dict | None) -> torch.Tensor:
    """|x_j| · ‖W_:,j‖₂, as in WINA: an input that feeds large weights matters more."""
    return weight.norm(dim=0)


@register_score("amber")
def amber_score(weight: torch.Tensor, basis: Basis, stats: dict | None) -> torch.Tensor:
    """|x_j| · ‖Ŵ_:,j‖₂ with Ŵ each output row of W standardised (zero mean, unit variance), so
    that a few outlier rows cannot decide the ranking (our reading of Amber Pruner's robust norm)."""
    standardised = (weight - weight.mean(1, keepdim=True)) / weight.std(1, keepdim=True).clamp_min(1e-12)
    return standardised.norm(dim=0)


@register_score("clact", needs=("l2",))
def clact_score(weight: torch.Tensor, basis: Basis, stats: dict) -> torch.Tensor:
    """|x_j| · ‖X_:,j‖₂ with the column norm of the calibration inputs (never the evaluated batch)."""
    return basis.column_l2(stats)


def get_score(name: str) -> Piece:
    return SCORES[name]
