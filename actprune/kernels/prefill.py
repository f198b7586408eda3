"""2:4 prefill through PyTorch's semi-structured sparsity, with the *activation* as the sparse operand.

A prefill matmul is compute-bound. The sparse tensor cores of compute capability 8.x and 9.x multiply
a first operand holding 2 nonzeros in every 4 along the reduced dimension at up to twice the dense
rate; an activation pruned 2:4 along its input channels is exactly such an operand for
`A (rows, in) @ W^T (in, out)`. It changes with every input, so it is compressed at run time
(`torch.sparse` semi-structured tensors; its cost is part of each call).

The weight is taken (out, in), as nn.Linear holds it; the matmul reads its transpose, which is the
row-major second operand where W is a view `layout_weight(W).t()` of the copy the decode kernels read.
"""

from __future__ import annotations

import weakref

import torch
from torch.sparse import (
    SparseSemiStructuredTensor,
    SparseSemiStructuredTensorCUSPARSELT,
    SparseSemiStructuredTensorCUTLASS,
)

DTYPES = (torch.float16, torch.bfloat16)


def _backend(device: torch.device) -> type[SparseSemiStructuredTensor] | str:
    """The semi-structured class torch would use on `device` (cuSPARSELt unless CUTLASS is forced or it is
    absent), or why there is none; torch tests CUTLASS on 8.x only and cuSPARSELt on 8.x and 9.x."""
    major = torch.cuda.get_device_capability(device)[0]
    cusparselt = torch.backends.cusparselt.is_available() and major in (8, 9)
    if cusparselt and not SparseSemiStructuredTensor._FORCE_CUTLASS:
        return SparseSemiStructuredTensorCUSPARSELT
    if major == 8:
        return SparseSemiStructuredTensorCUTLASS
    return (
        f"no semi-structured backend for compute capability {major}.x (cuSPARSELt: 8.x or 9.x, "
        f"available={torch.backends.cusparselt.is_available()}; CUTLASS: 8.x)"
    )


def semi_structured_unavailable(
    rows: int, in_features: int, out_features: int, dtype: torch.dtype, device: torch.device | str
) -> str | None:
    """None where a (rows, in_features) 2:4 activation can be the sparse operand of its matmul with the
    transposed (out_features, in_features) weight on `device`, else why not, in one line."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"2:4 semi-structured matmuls run on CUDA devices only, not {device.type}"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return f"2:4 sparse tensor cores need compute capability 8.0 or newer ({torch.cuda.get_device_name(device)})"
    if dtype not in DTYPES:
        return f"2:4 semi-structured activations must be float16 or bfloat16, not {dtype}"
    backend = _backend(device)
    if isinstance(backend, str):
        return backend
    # The sparse operand's limits (the dense one is padded by torch, so out_features is free).
    limits = backend._DTYPE_SHAPE_CONSTRAINTS[dtype]
    min_cols = limits.sparse_min_cols  # rows are padded with zero rows (2:4 too) to the backend's multiple
    if in_features < min_cols or in_features % min_cols:
        return f"{backend.BACKEND} needs in_features to be a multiple of {min_cols} (at least that), got {in_features}"
    if out_features < 1:
        return f"out_features={out_features}"
    return None


class _LastCompressed:
    """q/k/v (and gate/up) prune the very same input with the very same mask: it is compressed once.
    A hit needs the same live `source` tensors (the input and its mask), unmodified since."""

    def __init__(self):
        self.key, self.sparse = None, None

    def get(self, pruned_x: torch.Tensor, source: tuple | None, compress) -> torch.Tensor:
        if source is None or any(t.is_inference() for t in source):  # no version counter: no reuse
            return compress(pruned_x)
        key = tuple((weakref.ref(t), t._version) for t in source)
        if self.key is not None and all(
            ref() is t and version == t._version for (ref, version), t in zip(self.key, source)
        ):
            return self.sparse
        self.key, self.sparse = key, compress(pruned_x)
        return self.sparse


_last_compressed = _LastCompressed()


def padded_rows(rows: int, dtype: torch.dtype, device: torch.device | str) -> int:
    """The row count the sparse operand is padded to (zero rows) for the semi-structured backend."""
    multiple = _backend(torch.device(device))._DTYPE_SHAPE_CONSTRAINTS[dtype].sparse_min_rows
    return -(-rows // multiple) * multiple


def semi_structured_linear(
    pruned_x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, source: tuple | None = None
) -> torch.Tensor:
    """`pruned_x @ weight.T + bias` with pruned_x (rows, in) holding at most 2 nonzeros in every 4 (the
    kept entries of a 2:4 mask), compressed here (rows padded with zeros to the backend's multiple; once
    for layers that share `source`, the tensors pruned_x was computed from), and weight (out, in)."""
    if pruned_x.dim() != 2 or weight.dim() != 2 or weight.shape[1] != pruned_x.shape[1]:
        raise ValueError(
            f"pruned_x (rows, in) and weight (out, in) do not fit: {tuple(pruned_x.shape)} and {tuple(weight.shape)}"
        )
    for name, tensor in (("weight", weight), ("bias", bias)):
        if tensor is not None and (tensor.dtype != pruned_x.dtype or tensor.device != pruned_x.device):
            raise ValueError(
                f"{name} is {tensor.dtype} on {tensor.device}, "
                f"pruned_x is {pruned_x.dtype} on {pruned_x.device}: they must match"
            )
    reason = semi_structured_unavailable(*pruned_x.shape, weight.shape[0], pruned_x.dtype, pruned_x.device)
    if reason is not None:
        raise RuntimeError(f"semi_structured_linear cannot run here: {reason}")
    rows = pruned_x.shape[0]

    def compress(x):
        padding = padded_rows(rows, x.dtype, x.device) - rows
        return _backend(x.device).from_dense(torch.nn.functional.pad(x, (0, 0, 0, padding)).contiguous())

    sparse = _last_compressed.get(pruned_x, source, compress)
    # Only the sparse operand's own matmul is exposed for a sparse first operand (addmm takes a sparse second).
    y = torch.mm(sparse, weight.t())[:rows]
    return y if bias is None else y + bias
