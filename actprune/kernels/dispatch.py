"""Which calls of a `pruning.backend=kernel` layer run a kernel, and the call itself; every other
call is emulated by the wrapper, with the reason logged once per process.

The layer is an `actprune.activation.ActSparseLinear` (read here, not imported: the wrapper imports
this module). Decode calls of at most `MAX_ROWS` tokens go through the GEMV of `decode.py`, 2:4
prefill through PyTorch's semi-structured sparsity (`prefill.py`).
"""

from __future__ import annotations

import logging

import torch

from ..masks import magnitude, weighted_scores
from . import MAX_ROWS, sparse_linear

log = logging.getLogger(__name__)
_fallbacks_logged: set[str] = set()


def fall_back(reason: str) -> None:
    """Say once per reason why a call of the kernel backend runs the emulation instead."""
    if reason not in _fallbacks_logged:
        _fallbacks_logged.add(reason)
        log.info("pruning.backend=kernel emulates some calls: %s", reason)


def decode(layer, x: torch.Tensor, channel_weight: torch.Tensor | None) -> torch.Tensor | None:
    """The decode kernel's output for the layer's (centred) input `x`, or None where this call is
    emulated; counts what the layer counts."""
    rows = x.numel() // x.shape[-1]
    if layer.busy or rows > MAX_ROWS:
        return None
    if layer.score is not magnitude:
        fall_back("a layer ranks by a score function of its own (the kernels rank |x|·channel_weight)")
        return None
    if layer.threshold is None and not layer.pattern.is_nm and not layer.pattern.is_dense():
        fall_back("a ratio is kept per token by top-k (the kernels take N:M or a calibrated threshold)")
        return None
    if layer.dense_tokens and x.dim() < 3:
        return None  # the emulation says why it cannot tell a sequence's first tokens
    flat = x.reshape(rows, x.shape[-1])
    dense_rows = None
    if layer.dense_tokens:  # a sequence's first tokens stay dense, flagged to the kernel on the device
        dense_rows = (layer.positions_of(x) < layer.dense_tokens).expand(*x.shape[:-1], 1).reshape(rows)
    if layer.threshold is not None:
        y = sparse_linear(
            flat,
            layer.pruned_weight.t(),
            threshold=layer.threshold,
            channel_weight=channel_weight,
            bias=layer.pruned_bias,
            dense_rows=dense_rows,
        )
        if layer.counting:  # the scores again, in torch: only where sparsity is being measured
            dropped = weighted_scores(flat, layer.score, channel_weight) < layer.threshold
            layer.zeroed += (dropped if dense_rows is None else dropped & ~dense_rows[:, None]).sum()
    else:
        n, m = (layer.pattern.n, layer.pattern.m) if layer.pattern.is_nm else (None, None)
        y = sparse_linear(
            flat,
            layer.pruned_weight.t(),
            n=n,
            m=m,
            channel_weight=channel_weight,
            bias=layer.pruned_bias,
            dense_rows=dense_rows,
        )
        if m and layer.counting:  # exactly n of every m kept: the count needs no look at the mask
            pruned_rows = rows if dense_rows is None else rows - dense_rows.sum()
            layer.zeroed += pruned_rows * (flat.shape[-1] - flat.shape[-1] // m * n)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def prefill(layer, pruned: torch.Tensor, source: tuple | None) -> torch.Tensor | None:
    """`pruned Wᵀ + b` through 2:4 semi-structured sparsity (the operand compressed once for the
    layers whose `source`, input and mask, is the same), or None where this call is emulated."""
    if not (layer.pattern.is_nm and (layer.pattern.n, layer.pattern.m) == (2, 4)) or layer.busy:
        return None
    from .prefill import semi_structured_linear, semi_structured_unavailable

    rows = pruned.numel() // pruned.shape[-1]
    reason = semi_structured_unavailable(rows, layer.in_features, layer.out_features, pruned.dtype, pruned.device)
    if layer.dense_tokens:
        reason = "pruning.dense_tokens keeps rows dense, which a 2:4 semi-structured operand cannot hold"
    if reason is not None:
        fall_back(reason)
        return None
    y = semi_structured_linear(pruned.reshape(rows, -1), layer.pruned_weight, layer.pruned_bias, source)
    return y.reshape(*pruned.shape[:-1], y.shape[-1])
