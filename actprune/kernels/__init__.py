"""Real sparse compute for activation sparsity: decode GEMVs that skip the weight columns of zeroed inputs.

Decoding a token is memory-bound, so an input channel that the mask zeroes saves reading its weight
column. `sparse_linear` does what `ActSparseLinear` emulates, `(x * keep(score(x))) W^T + b`, for
1..MAX_ROWS rows, with the selection (N:M top-n, threshold or none) fused into a Triton GEMV that reads
only the weight rows (of `layout_weight(W)`) some row keeps. Triton is imported only when a kernel runs,
so `import actprune.kernels` works without it. 2:4 prefill through PyTorch's semi-structured sparsity
lives in `actprune.kernels.prefill`.
"""

from __future__ import annotations

import os
import sys

import torch

from ..masks import POOLS

MAX_ROWS = 8
MAX_GROUP = 32  # the top-n rank is unrolled over a group's members: small groups only
DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# What `pruning.backend=kernel` runs, said once: the plan's refusal, the wrapper's and docs/speed.md use it.
# Transforms that run in torch around the kernel, or are folded into W.
KERNEL_TRANSFORMS = ("shift", "scaling", "permute", "hadamard", "pca", "refit")
EMULATED_TRANSFORMS = ("variance", "learnable")  # per-token work that no kernel fuses
SUPPORT = (
    f"activation methods; N:M patterns with M <= {MAX_GROUP} (selection=topk) or a float sparsity with "
    f"selection=threshold; transforms {', '.join(KERNEL_TRANSFORMS)} (not {', '.join(EMULATED_TRANSFORMS)})"
)


def unsupported(kind: str, method: str, pattern, selection: str, transforms: list[str]) -> list[str]:
    """What of a pruning setting (method kind and name, Pattern, selection, transform names) no kernel
    runs, in words; empty where the kernel backend runs all of it."""
    if kind != "activation":
        return [f"pruning.method={method} prunes weights (a dense matmul of a sparse W)"]
    problems = []
    if pattern.is_nm and pattern.m > MAX_GROUP:
        problems.append(f"pruning.sparsity={pattern} has groups larger than {MAX_GROUP}")
    elif not pattern.is_nm and not pattern.is_dense() and selection != "threshold":
        problems.append(f"pruning.sparsity={pattern} with selection=topk ranks a whole token")
    emulated = [name for name in transforms if name in EMULATED_TRANSFORMS]
    if emulated:
        problems.append(f"pruning.transforms has {emulated}")
    return problems


def decode_unavailable(device: torch.device, dtype: torch.dtype) -> str | None:
    """None where the decode kernels can run on `device` for `dtype`, else why not, in one line."""
    try:
        import triton
    except ImportError as error:
        return f"triton is not importable ({error})"
    device = torch.device(device)
    if dtype not in DTYPES:
        return f"the decode kernels take float16, bfloat16 or float32, not {dtype}"
    if device.type == "cpu":
        knobs = getattr(triton, "knobs", None)  # Triton < 3.4 has none and reads the variable itself
        if not (knobs.runtime.interpret if knobs is not None else os.environ.get("TRITON_INTERPRET") == "1"):
            return "CPU tensors run the Triton kernels only under TRITON_INTERPRET=1 (tests)"
        decode = sys.modules.get(f"{__name__}.decode")
        if decode is not None and not decode.INTERPRETED:  # triton.jit chose compiled kernels at import
            return f"{__name__}.decode was imported before TRITON_INTERPRET=1 was set: its kernels need a GPU"
        return None
    if device.type != "cuda":
        return f"the decode kernels run on CUDA devices, not {device.type}"
    if dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) < (8, 0):
        return (
            f"bfloat16 needs compute capability 8.0 or newer, {torch.cuda.get_device_name(device)} has "
            f"{'.'.join(map(str, torch.cuda.get_device_capability(device)))}"
        )
    return None


def layout_weight(weight: torch.Tensor) -> torch.Tensor:
    """The (out, in) weight as the kernels read it, laid out once: (in, out), so that the weight column
    of one input channel is one contiguous row, read whole or skipped."""
    return weight.t().contiguous()


def sparse_linear(
    x: torch.Tensor,
    weight_t: torch.Tensor,
    *,
    n: int | None = None,
    m: int | None = None,
    threshold: float | torch.Tensor | None = None,
    channel_weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    dense_rows: torch.Tensor | None = None,
    pool: str | None = None,
) -> torch.Tensor:
    """`(x * keep) @ W^T + bias` for x (rows, in), 1 <= rows <= MAX_ROWS, weight_t = layout_weight(W).

    The score is `|x| * channel_weight` rounded to x's dtype (`|x|` without channel_weight), per row, or
    with `pool` (a name of `actprune.masks.POOLS`) one score per channel pooled over the rows in float32,
    which every row then shares (a decode step's shared mask: only its kept weight rows are read):
    keep is its top `n` of every `m` consecutive channels (ties to the lower index), or `score >= threshold`,
    or everything when neither is given; a row flagged in `dense_rows` (bool, (rows,)) keeps everything
    (decided on the device: no host sync). Accumulated in float32, returned (rows, out) in x's dtype.
    """
    _check(x, weight_t, n, m, threshold, channel_weight, bias)
    if pool is not None and pool not in POOLS:
        raise ValueError(f"pool={pool!r}: allowed values are None (a mask per row) or {list(POOLS)}")
    if dense_rows is not None and (dense_rows.shape != (x.shape[0],) or dense_rows.device != x.device):
        raise ValueError(
            f"dense_rows must be ({x.shape[0]},) on {x.device}, got {tuple(dense_rows.shape)} on {dense_rows.device}"
        )
    reason = decode_unavailable(x.device, x.dtype)
    if reason is not None:
        raise RuntimeError(f"sparse_linear cannot run here: {reason}")
    if threshold is not None:  # compared in x's dtype, as torch compares; read on the device, no host sync
        threshold = torch.as_tensor(threshold).to(x.device, x.dtype)
    from .decode import sparse_gemv

    return sparse_gemv(
        x.contiguous(),
        weight_t,
        n=n,
        m=m,
        threshold=threshold,
        channel_weight=None if channel_weight is None else channel_weight.contiguous(),
        bias=None if bias is None else bias.contiguous(),
        dense_rows=None if dense_rows is None else dense_rows.to(torch.int8).contiguous(),
        pool=None if pool is None or x.shape[0] == 1 else pool,  # one row: its own score, as pooled_scores
    )


def _check(x, weight_t, n, m, threshold, channel_weight, bias) -> None:
    if x.dim() != 2 or not 1 <= x.shape[0] <= MAX_ROWS:
        raise ValueError(
            f"x must be (rows, in) with 1 <= rows <= MAX_ROWS = {MAX_ROWS}, got shape {tuple(x.shape)}: "
            f"split larger batches (or use the emulation, ActSparseLinear)"
        )
    width = x.shape[1]
    if weight_t.dim() != 2 or weight_t.shape[0] != width:
        raise ValueError(f"weight_t must be (in, out) = ({width}, out) from layout_weight, got {tuple(weight_t.shape)}")
    if weight_t.stride() != (weight_t.shape[1], 1):
        raise ValueError("weight_t must be contiguous (in, out): lay it out once with layout_weight(weight)")
    tensors = {"weight_t": weight_t, "channel_weight": channel_weight, "bias": bias}
    for name, shape in (("channel_weight", (width,)), ("bias", (weight_t.shape[1],))):
        if tensors[name] is not None and tuple(tensors[name].shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(tensors[name].shape)}")
    for name, tensor in tensors.items():
        if tensor is not None and (tensor.dtype != x.dtype or tensor.device != x.device):
            raise ValueError(
                f"{name} is {tensor.dtype} on {tensor.device}, x is {x.dtype} on {x.device}: they must match"
            )
    if threshold is not None and torch.as_tensor(threshold).numel() != 1:
        raise ValueError(f"threshold must be a single number, got shape {tuple(torch.as_tensor(threshold).shape)}")
    if (n is None) != (m is None):
        raise ValueError(f"n={n}, m={m}: an N:M pattern needs both")
    if m is not None:
        if threshold is not None:
            raise ValueError("give either n and m (top-n of every m) or threshold, not both")
        if not 1 <= n < m <= MAX_GROUP:
            raise ValueError(f"n={n}, m={m}: the kernel needs 1 <= n < m <= {MAX_GROUP}")
        if width % m:
            raise ValueError(f"in_features={width} is not a multiple of m={m}")
