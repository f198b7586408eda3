"""TEAL-like selection: one calibrated threshold per wrapped layer instead of a per-token top-k."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..walk import feed
from .wrapper import ActSparseLinear, ScoreSample


@torch.no_grad()
def calibrate_thresholds_(
    model: nn.Module, wrappers: dict[str, ActSparseLinear], windows: torch.Tensor
) -> dict[str, float]:
    """Per layer, the score below which its pattern's fraction of the calibration inputs falls
    (taken on the dense model, in each layer's final basis; an allocation may give each layer its
    own). Sets and returns them."""
    wrappers = {name: layer for name, layer in wrappers.items() if isinstance(layer, ActSparseLinear)}
    thresholds = {}
    with contextlib.ExitStack() as stack:
        samples = {
            name: stack.enter_context(layer.recording_scores(ScoreSample(seed=seed)))
            for seed, (name, layer) in enumerate(wrappers.items())
        }
        feed(model, windows)
    for name, layer in wrappers.items():
        layer.set_threshold(samples[name].quantile(layer.pattern.target()))
        thresholds[name] = float(layer.threshold)
        if not torch.isfinite(layer.threshold):
            raise FloatingPointError(
                f"{name}: the calibrated threshold is {thresholds[name]} (NaN scores on calibration text)"
            )
    return thresholds
