"""The one wrapper module: masks the input of a linear layer per token, then runs its own matmul."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .masks import Pattern, pattern_keep_mask

Score = Callable[[torch.Tensor], torch.Tensor]


def magnitude(x: torch.Tensor) -> torch.Tensor:
    return x.abs()


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
            keep = pattern_keep_mask(self.score(x), self.pattern)
            self.zeroed += keep.numel() - keep.sum()
            x = x * keep
        return F.linear(x, self.linear.weight, self.linear.bias)

    def measured_sparsity(self) -> float | None:
        seen = int(self.seen)
        return int(self.zeroed) / seen if seen else None

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, sparsity={self.pattern}"
