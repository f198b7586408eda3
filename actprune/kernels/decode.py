"""Triton GEMV for activation-sparse decoding: reads only the weight rows of the inputs a token keeps.

`y = (x * keep) @ W^T + b` for 1..8 rows, with the weight laid out (in, out) so the weight of one
input channel is one contiguous row. One program owns BLOCK_N outputs and a range of input blocks
(split-K); it computes the keep mask of each input block in registers (N:M top-n, threshold or
dense; per row, or one shared by the rows on their pooled scores), loads a weight row only where some
row keeps its channel (a masked-off load reads no memory), and accumulates in float32. With several K
ranges, each writes float32 partial sums and a second small kernel adds them (deterministic, no
atomics), adds the bias and rounds to the output dtype.

Everything is computed in float32: loads are converted at once, the score is rounded to x's dtype
the way torch rounds `x.abs() * w`, and only the store narrows. Beside being right on a GPU, this is
what the Triton interpreter (TRITON_INTERPRET=1, the CPU tests) computes correctly: it holds bf16 as
uint16 bit patterns, so bf16 arithmetic and comparisons there are garbage, and its float32 -> bf16
casts truncate instead of rounding to nearest even (see `_round_to`).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

try:  # as triton.jit saw it: the kernels below are then interpreted
    INTERPRETED = triton.knobs.runtime.interpret
except AttributeError:  # Triton < 3.4 reads the environment directly
    INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
POOL_CODES = {None: 0, "mean": 1, "max": 2, "rms": 3}  # the kernel's POOL for actprune.masks.POOLS
K_LANES = 32  # input lanes a program handles per step: one group of up to 32, or several small ones
PRODUCT_ELEMENTS = 8192  # rows x lanes x outputs per step: 64 float32 registers a thread at 4 warps
MAX_BLOCK_N = 256
PROGRAMS_PER_SM = 4  # enough programs in flight to cover memory latency on a GPU
INTERPRETER_PROGRAMS = 4  # under the interpreter: enough that the tests split K
# Split-K writes float32 partial sums that the reduce reads back: at most this share of the weight's bytes,
# so that narrow outputs (GQA k/v, small models) do not pay a quarter more traffic for a fuller grid.
PARTIAL_TRAFFIC_SHARE = 1 / 32
REDUCE_ELEMENTS = 128  # outputs a reduce program sums: enough programs that the second launch is not serial


@triton.jit
def _round_to(value, DTYPE: tl.constexpr):
    """float32 `value` rounded to the nearest DTYPE number (ties to even), still in float32."""
    if DTYPE == tl.bfloat16:
        # Round-to-nearest-even of the top 16 bits, on the integer bits: the interpreter's own
        # float32 -> bf16 casts truncate (fp_downcast_rounding="rtne" too), this form is exact in both.
        # A NaN is kept as it is (the sum would carry the GPU's NaN, 0x7FFFFFFF, into -0.0).
        bits = value.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        rounded = tl.where(value != value, value, bits.to(tl.float32, bitcast=True))
    elif DTYPE == tl.float16:
        rounded = value.to(tl.float16).to(tl.float32)  # numpy's and the GPU's casts both round to nearest even
    else:
        rounded = value
    return rounded


@triton.jit
def _load_scores(x_ptr, channel_weight_ptr, rows, k, row_ok, k_ok, K, HAS_CHANNEL_WEIGHT: tl.constexpr):
    """x[rows, k] and its score `|x| * channel_weight` rounded to x's dtype, both float32."""
    x = tl.load(x_ptr + rows[:, None] * K + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
    x = x.to(tl.float32)
    score = tl.abs(x)
    if HAS_CHANNEL_WEIGHT:
        weight = tl.load(channel_weight_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
        score = _round_to(score * weight[None, :], x_ptr.dtype.element_ty)
    return x, score


@triton.jit
def _pooled(score, n_rows, POOL: tl.constexpr):
    """float32 scores (ROWS, lanes), 0 in padded rows, pooled over the rows as `actprune.masks.POOLS`
    computes (POOL 1 mean, 2 max, 3 rms; 0 none): (1, lanes), or the scores themselves. Division and
    square root rounded to nearest, as torch's; sums of up to 8 terms may round in another order."""
    if POOL == 1:
        score = tl.div_rn(tl.sum(score, axis=0), n_rows.to(tl.float32))[None, :]
    elif POOL == 2:
        score = tl.max(score, axis=0)[None, :]
    elif POOL == 3:
        score = tl.sqrt_rn(tl.div_rn(tl.sum(score * score, axis=0), n_rows.to(tl.float32)))[None, :]
    return score


@triton.jit
def sparse_gemv_kernel(
    x_ptr,
    weight_t_ptr,
    channel_weight_ptr,
    bias_ptr,
    threshold_ptr,
    dense_rows_ptr,
    out_ptr,
    n_rows,
    K,
    N,
    n_blocks,
    blocks_per_program,
    N_KEEP: tl.constexpr,
    GROUP: tl.constexpr,
    USE_THRESHOLD: tl.constexpr,
    HAS_DENSE_ROWS: tl.constexpr,
    HAS_CHANNEL_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PARTIAL: tl.constexpr,
    POOL: tl.constexpr,
    ROWS: tl.constexpr,
    K_LANES: tl.constexpr,
    GROUP_LANES: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One (BLOCK_N outputs, K range) tile. The keep mask: top N_KEEP of every GROUP inputs when N_KEEP > 0,
    else `score >= *threshold_ptr` when USE_THRESHOLD, else every input (dense); rows flagged in
    dense_rows_ptr (HAS_DENSE_ROWS) keep every input (a sequence's first tokens, `dense_tokens`); with POOL,
    the rows share one mask, on their scores pooled (`_pooled`)."""
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    rows = tl.arange(0, ROWS)
    row_ok = rows < n_rows
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    # Lanes hold whole groups, each padded to GROUP_LANES (a power of two) when GROUP is not one.
    lane = tl.arange(0, K_LANES)
    member = lane % GROUP_LANES
    group_start = (lane // GROUP_LANES) * GROUP
    if USE_THRESHOLD:
        threshold = tl.load(threshold_ptr).to(tl.float32)
    if HAS_DENSE_ROWS:
        dense_row = tl.load(dense_rows_ptr + rows, mask=row_ok, other=0) != 0
    acc = tl.zeros((ROWS, BLOCK_N), tl.float32)
    first = pid_k * blocks_per_program
    for block in range(first, tl.minimum(first + blocks_per_program, n_blocks)):
        k = block * BLOCK_K + group_start + member
        k_ok = (member < GROUP) & (k < K)
        x, score = _load_scores(x_ptr, channel_weight_ptr, rows, k, row_ok, k_ok, K, HAS_CHANNEL_WEIGHT)
        score = _pooled(score, n_rows, POOL)
        keep = row_ok[:, None] & k_ok[None, :]
        if N_KEEP > 0:  # kept when fewer than N_KEEP group members rank above (higher, or equal and earlier)
            beaten = tl.zeros((ROWS, K_LANES), tl.int32)
            for other in tl.static_range(GROUP):
                k_other = block * BLOCK_K + group_start + other
                _, rival = _load_scores(x_ptr, channel_weight_ptr, rows, k_other, row_ok, k_ok, K, HAS_CHANNEL_WEIGHT)
                rival = _pooled(rival, n_rows, POOL)
                beaten += ((rival > score) | ((rival == score) & (other < member))).to(tl.int32)
            keep = keep & (beaten < N_KEEP)
        elif USE_THRESHOLD:
            keep = keep & (score >= threshold)
        if HAS_DENSE_ROWS:
            keep = keep | (dense_row[:, None] & row_ok[:, None] & k_ok[None, :])
        # A weight row is read only when some row keeps its channel: at batch 1, only the kept columns.
        needed = tl.max(keep.to(tl.int32), axis=0) > 0
        weight = tl.load(
            weight_t_ptr + k.to(tl.int64)[:, None] * N + cols[None, :],
            mask=needed[:, None] & col_ok[None, :],
            other=0.0,
            eviction_policy="evict_first",
        )
        acc += tl.sum(tl.where(keep, x, 0.0)[:, :, None] * weight.to(tl.float32)[None, :, :], axis=1)
    out_mask = row_ok[:, None] & col_ok[None, :]
    if PARTIAL:  # float32 partial sums of this K range, added up by reduce_kernel
        tl.store(out_ptr + pid_k * n_rows * N + rows[:, None] * N + cols[None, :], acc, mask=out_mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        dtype = out_ptr.dtype.element_ty
        tl.store(out_ptr + rows[:, None] * N + cols[None, :], _round_to(acc, dtype).to(dtype), mask=out_mask)


@triton.jit
def reduce_kernel(partial_ptr, bias_ptr, out_ptr, n_splits, N, size, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offsets < size
    acc = tl.zeros((BLOCK,), tl.float32)
    for split in range(n_splits):
        acc += tl.load(partial_ptr + split * size + offsets, mask=ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offsets % N, mask=ok, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    tl.store(out_ptr + offsets, _round_to(acc, dtype).to(dtype), mask=ok)


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    return INTERPRETER_PROGRAMS


def launch_plan(
    rows: int,
    K: int,
    N: int,
    group: int,
    element_size: int,
    programs: int,
    traffic_share: float | None = PARTIAL_TRAFFIC_SHARE,
) -> dict:
    """Tile sizes and split-K of one call: the grid fills `programs` where the partial sums stay within
    `traffic_share` of the weight's bytes (None: no cap); the reduce gets a program per REDUCE_ELEMENTS outputs."""
    group_lanes = triton.next_power_of_2(group)
    block_k = K_LANES // group_lanes * group
    rows_p2 = triton.next_power_of_2(rows)
    block_n = min(MAX_BLOCK_N, PRODUCT_ELEMENTS // (rows_p2 * K_LANES), max(16, triton.next_power_of_2(N)))
    grid_n = triton.cdiv(N, block_n)
    n_blocks = triton.cdiv(K, block_k)
    # Partial sums move 2 · splits · rows · N float32 (written, read back); the weight K · N elements.
    max_splits = n_blocks if traffic_share is None else max(1, int(traffic_share * K * element_size / (2 * rows * 4)))
    wanted = min(n_blocks, max_splits, max(1, programs // grid_n))
    blocks_per_program = triton.cdiv(n_blocks, wanted)
    splits = triton.cdiv(n_blocks, blocks_per_program)
    reduce_block = min(1024, max(16, triton.next_power_of_2(REDUCE_ELEMENTS)))
    return {
        "group_lanes": group_lanes,
        "block_k": block_k,
        "rows_p2": rows_p2,
        "block_n": block_n,
        "grid_n": grid_n,
        "n_blocks": n_blocks,
        "blocks_per_program": blocks_per_program,
        "splits": splits,
        "reduce_block": reduce_block,
    }


def sparse_gemv(
    x: torch.Tensor,
    weight_t: torch.Tensor,
    *,
    n: int | None,
    m: int | None,
    threshold: torch.Tensor | None,
    channel_weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    dense_rows: torch.Tensor | None = None,
    pool: str | None = None,
) -> torch.Tensor:
    """Launch on arguments already checked by `actprune.kernels.sparse_linear`."""
    rows, K = x.shape
    N = weight_t.shape[1]
    group = m or 1  # dense and threshold masks need no groups
    # The interpreter moves no memory worth saving: there the tests split K whatever the widths.
    tiles = launch_plan(
        rows,
        K,
        N,
        group,
        weight_t.element_size(),
        _target_programs(x.device),
        None if x.device.type == "cpu" else PARTIAL_TRAFFIC_SHARE,
    )
    splits = tiles["splits"]
    out = torch.empty(rows, N, device=x.device, dtype=x.dtype)
    target = out if splits == 1 else torch.empty(splits, rows, N, device=x.device, dtype=torch.float32)
    absent = x  # any pointer stands for an optional tensor the kernel is compiled not to read
    sparse_gemv_kernel[(tiles["grid_n"], splits)](
        x,
        weight_t,
        *(absent if t is None else t for t in (channel_weight, bias, threshold, dense_rows)),
        target,
        rows,
        K,
        N,
        tiles["n_blocks"],
        tiles["blocks_per_program"],
        N_KEEP=n or 0,
        GROUP=group,
        USE_THRESHOLD=threshold is not None,
        HAS_DENSE_ROWS=dense_rows is not None,
        HAS_CHANNEL_WEIGHT=channel_weight is not None,
        HAS_BIAS=bias is not None,
        PARTIAL=splits > 1,
        POOL=POOL_CODES[pool],
        ROWS=tiles["rows_p2"],
        K_LANES=K_LANES,
        GROUP_LANES=tiles["group_lanes"],
        BLOCK_K=tiles["block_k"],
        BLOCK_N=tiles["block_n"],
    )
    if splits > 1:
        size = rows * N
        block = tiles["reduce_block"]
        reduce_kernel[(triton.cdiv(size, block),)](
            target, absent if bias is None else bias, out, splits, N, size, HAS_BIAS=bias is not None, BLOCK=block
        )
    return out
