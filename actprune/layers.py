"""The one wrapper module: masks the input of a linear layer per token, then runs its own matmul."""

from __future__ import annotations

import weakref
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .masks import Pattern, pattern_keep_mask

Score = Callable[[torch.Tensor], torch.Tensor]


def magnitude(x: torch.Tensor) -> torch.Tensor:
    return x.abs()


class _LastMask:
    """q/k/v (and gate/up) receive the very same input tensor: its mask is computed once.

    A hit needs the same live tensor, unmodified since (`_version`), the same pattern and score.
    """

    def __init__(self):
        self.key = None
        self.keep = self.dropped = None

    def get(self, x: torch.Tensor, pattern: Pattern, score: Score) -> tuple[torch.Tensor, torch.Tensor]:
        if x.is_inference():  # inference tensors have no version counter: no reuse
            keep = pattern_keep_mask(score(x), pattern)
            return keep, keep.numel() - keep.sum()
        if self.key is not None:
            ref, version, last_pattern, last_score = self.key
            if ref() is x and version == x._version and last_pattern == pattern and last_score is score:
                return self.keep, self.dropped
        self.keep = pattern_keep_mask(score(x), pattern)
        self.dropped = self.keep.numel() - self.keep.sum()
        self.key = (weakref.ref(x), x._version, pattern, score)
        return self.keep, self.dropped


_last_mask = _LastMask()


class ActSparseLinear(nn.Module):
    """`y = (x * keep(score(x))) Wᵀ + b` with the wrapped layer's own weight and bias.

    It counts the inputs it zeroes and sees, on the device (no host sync per call), so the
    sparsity actually reached over a benchmark can be reported.
    """

    def __init__(self, linear: nn.Linear, pattern: Pattern, score: Score = magnitude):
        super().__init__()
        self.linear = linear
        self.pattern = pattern
        self.score = score
        device = linear.weight.device
        self.register_buffer("zeroed", torch.zeros((), dtype=torch.int64, device=device), persistent=False)
        self.register_buffer("seen", torch.zeros((), dtype=torch.int64, device=device), persistent=False)

    @property
    def in_features(self) -> int:
        return self.linear.in_features

    @property
    def out_features(self) -> int:
        return self.linear.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen += x.numel()
        if not self.pattern.is_dense():
            keep, dropped = _last_mask.get(x, self.pattern, self.score)
            self.zeroed += dropped
            x = x * keep
        return F.linear(x, self.linear.weight, self.linear.bias)

    def measured_sparsity(self) -> float | None:
        seen = int(self.seen)
        return int(self.zeroed) / seen if seen else None

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, sparsity={self.pattern}"
