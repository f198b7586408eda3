"""Which calls of a `pruning.backend=kernel` layer run a kernel, and the call itself; every other
call is emulated by the wrapper, with the reason logged once per process.

The layer is an `actprune.activation.ActSparseLinear` (read here, not imported: the wrapper imports
this module). Decode calls of at most `MAX_ROWS` tokens go through the GEMV of `decode.py`, 2:4
prefill through PyTorch's semi-structured sparsity (`prefill.py`).
"""

from __future__ import annotations

import logging

import torch

from ..masks import magnitude
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
    pool = layer.pool if x.dim() >= 2 and x.shape[0] > 1 else None  # one row: its own mask, as the emulation
    if pool is not None and x.dim() >= 3 and rows != x.shape[0]:
        fall_back("mask_scope=step over several positions in one call (the kernel shares a mask over all its rows)")
        return None
    flat = x.reshape(rows, x.shape[-1])
    dense_rows = None
    if layer.dense_tokens:  # a sequence's first tokens stay dense, flagged to the kernel on the device
        dense_rows = (layer.positions_of(x) < layer.dense_tokens).expand(*x.shape[:-1], 1).reshape(rows)
    n, m = (layer.pattern.n, layer.pattern.m) if layer.pattern.is_nm and layer.threshold is None else (None, None)
    y = sparse_linear(
        flat,
        layer.pruned_weight.t(),
        n=n,
        m=m,
        threshold=layer.threshold,
        channel_weight=channel_weight,
        bias=layer.pruned_bias,
        dense_rows=dense_rows,
        pool=pool,
    )
    if layer.counting:  # the mask again, in torch: only where sparsity is being measured
        layer.count(*layer.keep_mask(x, channel_weight))
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
