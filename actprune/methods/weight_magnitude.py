"""The weight baseline: zero W by |W|, N:M along each output row's inputs, or one threshold over
the whole layer for a ratio."""

import torch

from ..masks import pattern_keep_mask
from . import weight_method


@weight_method("weight_magnitude")
@torch.no_grad()
def weight_magnitude(linear, pattern, inputs=None, plan=None):
    scores = linear.weight.abs()
    if pattern.is_nm:
        keep = pattern_keep_mask(scores, pattern)
    else:
        keep = pattern_keep_mask(scores.flatten(), pattern).view_as(scores)
    linear.weight.mul_(keep)
