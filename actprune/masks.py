"""Sparsity patterns and the masks they induce: pure functions of a score tensor."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch

Score = Callable[[torch.Tensor], torch.Tensor]

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class Pattern:
    """Either a per-token ratio (`ratio`, the fraction zeroed) or N:M (`n` kept in every `m`)."""

    ratio: float | None = None
    n: int | None = None
    m: int | None = None

    @property
    def is_nm(self) -> bool:
        return self.m is not None

    def group(self, width: int) -> int:
        """Length of the groups the mask ranks within, for an input of `width` channels."""
        return self.m if self.is_nm else width

    def kept(self, width: int) -> int:
        """How many entries of a group of `self.group(width)` are kept."""
        if self.is_nm:
            return self.n
        return width - round(self.ratio * width)

    def target(self) -> float:
        return 1.0 - self.n / self.m if self.is_nm else self.ratio

    def is_dense(self) -> bool:
        return self.target() == 0.0

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else f"{self.ratio:g}"


def parse_sparsity(value) -> Pattern:
    """`0.5` (fraction of each token's inputs zeroed) or `"N:M"` (N kept in every M)."""
    allowed = 'a float r in [0, 1) or a string "N:M" with 1 <= N < M'
    if isinstance(value, bool):
        raise ValueError(f"pruning.sparsity={value!r}: expected {allowed}")
    if isinstance(value, (int, float)):
        if not 0.0 <= float(value) < 1.0:
            raise ValueError(f"pruning.sparsity={value!r} is outside [0, 1): expected {allowed}")
        return Pattern(ratio=float(value))
    if isinstance(value, str):
        match = _NM.match(value)
        if match is None:
            try:
                return parse_sparsity(float(value))
            except ValueError:
                raise ValueError(f"pruning.sparsity={value!r} is malformed: expected {allowed}") from None
        n, m = int(match[1]), int(match[2])
        if not 1 <= n < m:
            raise ValueError(f"pruning.sparsity={value!r}: N:M needs 1 <= N < M, expected {allowed}")
        return Pattern(n=n, m=m)
    raise ValueError(f"pruning.sparsity={value!r} has type {type(value).__name__}: expected {allowed}")


def topk_keep_mask(scores: torch.Tensor, n: int, m: int, resolve_ties: bool | None = None) -> torch.Tensor:
    """Boolean mask keeping the `n` highest scores in every group of `m` along the last dim.

    Ties at the cut are broken towards the lower index, so exactly `n` survive per group.
    The mask is a comparison against each group's n-th largest score: no scatter, no float mask.
    `resolve_ties=None` resolves them on CUDA always (checking first would synchronise, and bf16
    ties are common) and on CPU only where the count shows a tie.
    """
    if not 1 <= n <= m:
        raise ValueError(f"cannot keep {n} of every {m} entries")
    groups = scores.unflatten(-1, (-1, m))
    nth = groups.topk(n, dim=-1, sorted=False).values.amin(-1, keepdim=True)
    keep = groups >= nth
    if resolve_ties is None:
        resolve_ties = keep.is_cuda or int(keep.sum()) != keep.numel() // m * n
    if resolve_ties:
        count = torch.int16 if m < 2**15 else torch.int32  # small counters: less memory traffic
        above = groups > nth
        at_cut = keep & ~above
        room = n - above.sum(-1, keepdim=True, dtype=count)
        keep = above | (at_cut & (at_cut.cumsum(-1, dtype=count) <= room))
        if not keep.is_cuda and int(keep.sum()) != keep.numel() // m * n:  # on CUDA this would synchronise
            raise FloatingPointError(
                f"NaN scores: a group keeps fewer than {n} of {m} entries (a NaN in a pruned "
                f"layer's input or in its score weights)"
            )
    return keep.flatten(-2)


def magnitude(x: torch.Tensor) -> torch.Tensor:
    return x.abs()


def weighted_scores(x: torch.Tensor, score: Score, channel_weight: torch.Tensor | None) -> torch.Tensor:
    """What a mask of `x` ranks: `score(x)`, times the per-channel weight where there is one."""
    return score(x) if channel_weight is None else score(x) * channel_weight


# How the rows that share one mask (`mask_scope=step`: the sequences of one decode step) pool their
# scores of a channel, in float32: ranked and compared with a threshold on the scale of one token's score.
POOLS = {
    "mean": lambda s: s.mean(0, keepdim=True),
    "max": lambda s: s.amax(0, keepdim=True),
    "rms": lambda s: s.square().mean(0, keepdim=True).sqrt(),
}
SCOPES = ("token", "step")


def pooled_scores(scores: torch.Tensor, pool: str | None) -> torch.Tensor:
    """The scores that one mask shared by the rows of dim 0 ranks: `scores` itself where `pool` is None
    or there is one row (the per-token mask, bit for bit), else pooled over dim 0, keepdim, float32."""
    if pool is None or scores.dim() < 2 or scores.shape[0] == 1:
        return scores
    return POOLS[pool](scores.float())


def pattern_keep_mask(scores: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Per-token mask of `pattern` over the last dimension of `scores`."""
    width = scores.shape[-1]
    return topk_keep_mask(scores, pattern.kept(width), pattern.group(width))
