"""The sparse decode kernels against the emulation (`topk_keep_mask` + F.linear), and the 2:4 prefill.

Without CUDA the kernels run in Triton's interpreter on CPU tensors; with CUDA they are compiled and
run on the GPU, and the GPU-only tests add bigger shapes and the semi-structured prefill.
"""

import os
import subprocess
import sys

import pytest
import torch

# triton.jit decides when a kernel module is imported whether its kernels are interpreted: set before
# triton and actprune.kernels.decode are imported. Not on a CUDA machine, where the tests run the compiled kernels.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

import torch.nn.functional as F  # noqa: E402

from actprune.kernels import MAX_ROWS, decode_unavailable, layout_weight, sparse_linear  # noqa: E402
from actprune.kernels.prefill import semi_structured_linear, semi_structured_unavailable  # noqa: E402
from actprune.masks import POOLS, pooled_scores, topk_keep_mask  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Half precision under the interpreter takes minutes on 2 cores: in `make test`, not `make test-fast`.
DTYPES = [torch.float32, *(pytest.param(dtype, marks=pytest.mark.slow) for dtype in (torch.float16, torch.bfloat16))]
PATTERNS = ["2:4", "8:16", "16:32", "threshold", "dense"]
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}  # relative to the output scale
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def options(pattern: str, scores: torch.Tensor) -> dict:
    """sparse_linear's selection arguments for `pattern`; a threshold is a score that occurs, so ties with it count."""
    if pattern == "threshold":
        return {"threshold": scores.flatten().sort().values[scores.numel() // 2]}
    if pattern == "dense":
        return {}
    n, m = map(int, pattern.split(":"))
    return {"n": n, "m": m}


def emulate(x, weight, *, n=None, m=None, threshold=None, channel_weight=None, bias=None, pool=None):
    """What ActSparseLinear computes, in x's dtype: the reference mask and output."""
    scores = pooled_scores(x.abs() if channel_weight is None else x.abs() * channel_weight, pool)
    if m is not None:
        keep = topk_keep_mask(scores, n, m)
    elif threshold is not None:
        keep = scores >= threshold
    else:
        keep = torch.ones_like(x, dtype=torch.bool)
    keep = keep.expand(x.shape)
    return keep, F.linear(x * keep, weight, bias)


def assert_close(y, reference, dtype):
    assert y.dtype == dtype and y.shape == reference.shape
    scale = reference.float().abs().max().clamp_min(1e-6)
    error = (y.float() - reference.float()).abs().max() / scale
    assert error <= TOLERANCE[dtype], f"relative error {error:.2e} > {TOLERANCE[dtype]:.0e}"


def integer_case(rows, width, out, dtype, seed=0):
    """Small integers, so scores tie often and every float32 sum is exact, whatever its order: outputs must
    then match bit for bit, rounding included. The weight starts with the identity, so the first `width`
    outputs are the masked input itself and any mask flip shows."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randint(1, 5, (rows, width), generator=generator) * (
        torch.randint(0, 2, (rows, width), generator=generator) * 2 - 1
    )
    weight = torch.cat([torch.eye(width), torch.randint(-64, 65, (out, width), generator=generator).float()])
    channel_weight = torch.tensor([0.5, 1.0, 1.5, 2.0])[torch.randint(0, 4, (width,), generator=generator)]
    bias = torch.randint(-8, 9, (width + out,), generator=generator)
    return [t.to(DEVICE, dtype) for t in (x, weight, channel_weight, bias)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_mask_and_rounding_match_the_emulation_exactly(pattern, dtype):
    inputs, weight, channel_weight, bias = integer_case(MAX_ROWS, 96, 40, dtype)
    # One row: a single column of output blocks, so K is split and partial sums are added by a second kernel.
    for rows, cw, b in ((MAX_ROWS, channel_weight, bias), (MAX_ROWS, None, None), (1, channel_weight, bias)):
        x = inputs[:rows]
        kwargs = options(pattern, x.abs() if cw is None else x.abs() * cw)
        keep, _ = emulate(x, weight, channel_weight=cw, bias=b, **kwargs)
        y = sparse_linear(x, layout_weight(weight), channel_weight=cw, bias=b, **kwargs)
        assert torch.equal((y[:, :96] - (0 if b is None else b[:96])) != 0, keep)  # x has no zeros
        # The exact result rounded once to the dtype (F.linear may round partial sums on a GPU).
        exact = F.linear((x * keep).double(), weight.double(), None if b is None else b.double())
        assert torch.equal(y, exact.to(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_random_inputs_match_the_emulation(pattern, dtype):
    width, out = 96, 40
    weight = torch.randn(out, width, device=DEVICE).to(dtype)
    weight_t = layout_weight(weight)
    for rows, use_channel_weight, use_bias in ((1, False, False), (1, True, True), (3, True, False), (8, False, True)):
        x = torch.randn(rows, width, device=DEVICE).to(dtype)
        channel_weight = (torch.rand(width, device=DEVICE) + 0.5).to(dtype) if use_channel_weight else None
        bias = torch.randn(out, device=DEVICE).to(dtype) if use_bias else None
        scores = x.abs() if channel_weight is None else x.abs() * channel_weight
        kwargs = options(pattern, scores)
        _, reference = emulate(x, weight, channel_weight=channel_weight, bias=bias, **kwargs)
        assert_close(sparse_linear(x, weight_t, channel_weight=channel_weight, bias=bias, **kwargs), reference, dtype)


def test_widths_that_are_not_powers_of_two():
    for width, out, (n, m) in ((48, 24, (2, 4)), (576, 40, (8, 16)), (12, 8, (2, 3))):
        x = torch.randn(2, width, device=DEVICE)
        weight = torch.randn(out, width, device=DEVICE)
        _, reference = emulate(x, weight, n=n, m=m)
        assert_close(sparse_linear(x, layout_weight(weight), n=n, m=m), reference, torch.float32)


def test_ties_go_to_the_lower_index():
    x = torch.ones(1, 32, device=DEVICE)
    for n, m in ((2, 4), (8, 16), (16, 32)):
        y = sparse_linear(x, layout_weight(torch.eye(32, device=DEVICE)), n=n, m=m)
        assert torch.equal(y[0], (torch.arange(32, device=DEVICE) % m < n).float())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_scores_are_rounded_to_the_dtype(dtype):
    """|x| * w is rounded to x's dtype before ranking, as torch rounds it: index 1's exact product is below
    index 2's score, but it rounds (to nearest, not down) to the same number and wins the tie."""
    eps = torch.finfo(dtype).eps
    x = torch.tensor([[4.0, 1 + 2 * eps, 1 + eps, 0.25]], device=DEVICE, dtype=dtype)
    channel_weight = torch.tensor([1.0, 1 - eps, 1.0, 1.0], device=DEVICE, dtype=dtype)
    keep, reference = emulate(x, torch.eye(4, device=DEVICE, dtype=dtype), n=2, m=4, channel_weight=channel_weight)
    assert keep.tolist() == [[True, True, False, False]]
    y = sparse_linear(
        x, layout_weight(torch.eye(4, device=DEVICE, dtype=dtype)), n=2, m=4, channel_weight=channel_weight
    )
    assert torch.equal(y, reference)


@pytest.mark.parametrize("pattern", ["2:4", "threshold"])
def test_each_row_has_its_own_mask(pattern):
    x, weight, channel_weight, bias = integer_case(MAX_ROWS, 32, 8, torch.float32, seed=1)
    weight_t = layout_weight(weight)
    kwargs = options(pattern, x.abs() * channel_weight)
    keep, reference = emulate(x, weight, channel_weight=channel_weight, bias=bias, **kwargs)
    assert len({tuple(row.tolist()) for row in keep}) == MAX_ROWS  # every row has a mask of its own
    batch = sparse_linear(x, weight_t, channel_weight=channel_weight, bias=bias, **kwargs)
    alone = torch.cat(
        [sparse_linear(row[None], weight_t, channel_weight=channel_weight, bias=bias, **kwargs) for row in x]
    )
    assert torch.equal(batch, alone)
    assert torch.equal(batch, reference)


@pytest.mark.parametrize("pool", list(POOLS))
@pytest.mark.parametrize("pattern", ["2:4", "8:16", "threshold"])
def test_a_shared_mask_matches_the_emulation_exactly(pattern, pool):
    """`pool`: the rows share one mask, chosen on their scores pooled as actprune.masks.pooled_scores
    pools them; exact on integers (the float32 sums of a few small numbers round in no order)."""
    inputs, weight, channel_weight, bias = integer_case(MAX_ROWS, 96, 40, torch.float32, seed=2)
    for rows in (MAX_ROWS, 3):
        x = inputs[:rows]
        kwargs = options(pattern, pooled_scores(x.abs() * channel_weight, pool))
        keep, _ = emulate(x, weight, channel_weight=channel_weight, bias=bias, pool=pool, **kwargs)
        own, _ = emulate(x, weight, channel_weight=channel_weight, bias=bias, **kwargs)
        assert (keep == keep[:1]).all() and not torch.equal(keep, own)  # one mask, not each row's own
        y = sparse_linear(x, layout_weight(weight), channel_weight=channel_weight, bias=bias, pool=pool, **kwargs)
        assert torch.equal((y[:, :96] - bias[:96]) != 0, keep)
        assert torch.equal(y, F.linear((x * keep).double(), weight.double(), bias.double()).float())


def test_a_shared_mask_reads_only_its_own_rows_of_the_weight():
    """NaN in the weight rows of the channels the shared mask drops, which per-row masks would read."""
    x = torch.randn(MAX_ROWS, 64, device=DEVICE)
    weight = torch.randn(24, 64, device=DEVICE)
    keep, _ = emulate(x, weight, n=8, m=16, pool="mean")
    own, _ = emulate(x, weight, n=8, m=16)
    dropped = ~keep[0]
    assert own[:, dropped].any() and dropped.sum() == 32
    _, reference = emulate(x, weight.masked_fill(dropped, 0.0), n=8, m=16, pool="mean")
    y = sparse_linear(x, layout_weight(weight.masked_fill(dropped, float("nan"))), n=8, m=16, pool="mean")
    assert_close(y, reference, torch.float32)


@pytest.mark.parametrize("pattern", ["8:16", "threshold"])
def test_weight_columns_no_row_keeps_are_not_read(pattern):
    """NaN in the weight columns of channels that every row drops: read, they would poison the output."""
    x = torch.randn(3, 64, device=DEVICE)
    weight = torch.randn(24, 64, device=DEVICE)
    kwargs = options(pattern, x.abs())
    keep, _ = emulate(x, weight, **kwargs)
    dropped = ~keep.any(0)
    assert dropped.any()
    _, reference = emulate(x, weight.masked_fill(dropped, 0.0), **kwargs)
    y = sparse_linear(x, layout_weight(weight.masked_fill(dropped, float("nan"))), **kwargs)
    assert_close(y, reference, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_inputs_stay_nan(dtype):
    """A NaN that is kept reaches the output as NaN, as in the emulation, however the dtype is rounded."""
    x = torch.randn(2, 32, device=DEVICE).to(dtype)
    x[0, 3] = float("nan")
    weight = torch.randn(8, 32, device=DEVICE).to(dtype)
    _, reference = emulate(x, weight)
    y = sparse_linear(x, layout_weight(weight))
    assert reference[0].isnan().all() and y[0].isnan().all() and not y[1].isnan().any()


def test_threshold_as_a_float_or_a_tensor():
    x = torch.randn(2, 32, device=DEVICE, dtype=torch.bfloat16)
    weight_t = layout_weight(torch.eye(32, device=DEVICE, dtype=torch.bfloat16))
    keep, _ = emulate(x, torch.eye(32, device=DEVICE, dtype=torch.bfloat16), threshold=0.5)
    for threshold in (0.5, torch.tensor(0.5), torch.tensor(0.5, device=DEVICE, dtype=torch.bfloat16)):
        assert torch.equal(sparse_linear(x, weight_t, threshold=threshold) != 0, keep)


def test_bad_arguments_are_refused():
    x = torch.randn(2, 48, device=DEVICE)
    weight_t = layout_weight(torch.randn(40, 48, device=DEVICE))
    for rows in (0, MAX_ROWS + 1):
        with pytest.raises(ValueError, match=f"MAX_ROWS = {MAX_ROWS}"):
            sparse_linear(torch.randn(rows, 48, device=DEVICE), weight_t)
    bad = [
        ({"x": x[0]}, "rows, in"),
        ({"weight_t": layout_weight(torch.randn(40, 32, device=DEVICE))}, "weight_t must be"),
        ({"weight_t": torch.randn(40, 48, device=DEVICE).t()}, "layout_weight"),
        ({"weight_t": weight_t.half()}, "must match"),
        ({"n": 2}, "needs both"),
        ({"n": 2, "m": 4, "threshold": 0.5}, "not both"),
        ({"threshold": torch.ones(2)}, "single number"),
        ({"n": 4, "m": 4}, "n < m"),
        ({"n": 2, "m": 64}, "m <= 32"),
        ({"n": 2, "m": 5}, "not a multiple of m=5"),
        ({"channel_weight": torch.ones(47, device=DEVICE)}, "channel_weight must have shape"),
        ({"channel_weight": torch.ones(48, device=DEVICE, dtype=torch.float16)}, "must match"),
        ({"bias": torch.ones(48, device=DEVICE)}, "bias must have shape"),
    ]
    for change, message in bad:
        arguments = {"x": x, "weight_t": weight_t, **change}
        with pytest.raises(ValueError, match=message):
            sparse_linear(arguments.pop("x"), arguments.pop("weight_t"), **arguments)


def test_decode_unavailable_says_why(monkeypatch):
    assert decode_unavailable(DEVICE, torch.float32) is None
    assert "float16, bfloat16 or float32" in decode_unavailable(DEVICE, torch.int8)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reason = decode_unavailable(torch.device("cpu"), torch.float32)
    assert reason == "CPU tensors run the Triton kernels only under TRITON_INTERPRET=1 (tests)"
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        sparse_linear(torch.randn(1, 8), layout_weight(torch.randn(8, 8)))


def test_import_needs_no_triton():
    script = (
        "import sys; sys.modules['triton'] = None; import torch, actprune.kernels as k; "
        "print(k.decode_unavailable(torch.device('cpu'), torch.float32))"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.startswith("triton is not importable")


def test_semi_structured_unavailable_says_why():
    assert "CUDA" in semi_structured_unavailable(2048, 576, 1536, torch.bfloat16, "cpu")
    with pytest.raises(RuntimeError, match="CUDA"):
        semi_structured_linear(torch.randn(32, 64, dtype=torch.bfloat16), torch.randn(16, 64, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="do not fit"):
        semi_structured_linear(torch.randn(32, 64), torch.randn(16, 48))
    if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0):
        assert "float16 or bfloat16" in semi_structured_unavailable(2048, 576, 1536, torch.float32, "cuda")
        assert semi_structured_unavailable(13, 576, 1536, torch.bfloat16, "cuda") is None  # rows are padded
        assert semi_structured_unavailable(13, 20, 1536, torch.bfloat16, "cuda") is not None  # too narrow


def test_prefill_pads_rows_and_compresses_an_input_shared_by_layers_once(monkeypatch):
    """A prompt of any length runs the 2:4 prefill (zero rows pad the operand to the backend's multiple,
    and are sliced off), and q/k/v, which prune one input with one mask, compress it once."""
    from types import SimpleNamespace

    from actprune.kernels import prefill

    compressed = []

    class Fake:  # stands in for a semi-structured class: its "compressed" operand is the padded dense one
        BACKEND = "fake"
        _DTYPE_SHAPE_CONSTRAINTS = {torch.float32: SimpleNamespace(sparse_min_rows=32, sparse_min_cols=64)}

        @staticmethod
        def from_dense(x):
            compressed.append(x.shape)
            return x

    monkeypatch.setattr(prefill, "_backend", lambda device: Fake)
    monkeypatch.setattr(prefill, "semi_structured_unavailable", lambda *args: None)
    monkeypatch.setattr(prefill, "_last_compressed", prefill._LastCompressed())
    x, keep = torch.randn(13, 64), torch.rand(13, 64) > 0.5
    weights = [torch.randn(out, 64) for out in (16, 8, 8)]
    for weight in weights:
        y = prefill.semi_structured_linear(x * keep, weight, source=(x, keep))
        torch.testing.assert_close(y, (x * keep) @ weight.T)
    assert compressed == [(32, 64)]
    x.mul_(2)  # changed in place: compressed again
    torch.testing.assert_close(
        prefill.semi_structured_linear(x * keep, weights[0], source=(x, keep)), (x * keep) @ weights[0].T
    )
    prefill.semi_structured_linear(x * keep, weights[0])  # no source: nothing is shared
    assert compressed == [(32, 64)] * 3


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_cuda_layer_shapes_match_the_emulation(pattern, dtype):
    for width, out in ((576, 192), (1536, 576), (4096, 1024), (14336, 4096)):
        weight = torch.randn(out, width, device="cuda", dtype=dtype) / width**0.5
        weight_t = layout_weight(weight)
        channel_weight = weight.float().norm(dim=0).to(dtype)
        bias = torch.randn(out, device="cuda", dtype=dtype)
        for rows in (1, 5, 8):
            x = torch.randn(rows, width, device="cuda", dtype=dtype)
            kwargs = options(pattern, x.abs() * channel_weight)
            _, reference = emulate(x, weight, channel_weight=channel_weight, bias=bias, **kwargs)
            y = sparse_linear(x, weight_t, channel_weight=channel_weight, bias=bias, **kwargs)
            assert_close(y, reference, dtype)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_semi_structured_prefill_matches_the_emulation(dtype):
    rows, width, out = 2048, 576, 1536
    reason = semi_structured_unavailable(rows, width, out, dtype, "cuda")
    if reason is not None:
        pytest.skip(reason)
    x = torch.randn(rows, width, device="cuda", dtype=dtype)
    weight = torch.randn(out, width, device="cuda", dtype=dtype) / width**0.5
    bias = torch.randn(out, device="cuda", dtype=dtype)
    keep, reference = emulate(x, weight, n=2, m=4, bias=bias)
    for layout in (weight, layout_weight(weight).t()):  # as nn.Linear holds it, and as a view of the kernels' copy
        assert_close(semi_structured_linear(x * keep, layout, bias), reference, dtype)


@pytest.mark.parametrize("K,N", [(4096, 1024), (576, 192), (4096, 4096), (11008, 4096)])
@pytest.mark.parametrize("rows", [1, 4, 8])
def test_split_k_partial_sums_stay_small_and_the_reduce_is_parallel(K, N, rows):
    """On an H200-sized grid (132 SMs): the float32 partials written and read back stay within 1/32 of
    the bf16 weight's bytes (a narrow GQA k/v output filled the grid with 128 splits: +25% traffic at 50%
    density), and the second launch has a program per 128 outputs, not one for up to 1024."""
    import triton

    from actprune.kernels.decode import launch_plan

    tiles = launch_plan(rows, K, N, group=16, element_size=2, programs=4 * 132)
    assert tiles["splits"] == 1 or 2 * tiles["splits"] * rows * N * 4 <= K * N * 2 / 32  # one split: no partials
    assert tiles["splits"] == triton.cdiv(tiles["n_blocks"], tiles["blocks_per_program"])
    assert tiles["reduce_block"] <= 128
