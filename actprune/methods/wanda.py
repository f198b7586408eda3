"""Wanda (Sun et al., 2024): zero W by |W_ij| · ‖X_j‖₂, compared within each output row (N:M along
the row, or a ratio per row), layer by layer on calibration windows."""

import torch

from ..masks import pattern_keep_mask
from . import weight_method


@weight_method("weight_wanda", layerwise="norms")
@torch.no_grad()
def wanda_(linear, pattern, inputs, plan=None):
    scores = linear.weight.detach().float().abs() * inputs.sumsq.sqrt().float()[None, :]
    linear.weight.mul_(pattern_keep_mask(scores, pattern))
