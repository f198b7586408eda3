"""`pruning.backend=kernel` inside a model: decode calls through the Triton kernels compute what the
emulation computes (on CPU under TRITON_INTERPRET=1, set by conftest), and what has no kernel is
refused before loading."""

import copy
import logging
import re
from pathlib import Path

import pytest
import torch

from actprune import kernels, plan, sparsify_
from actprune.activation import ActSparseLinear
from actprune.activation.wrapper import unwrapped
from actprune.kernels import dispatch
from actprune.masks import parse_sparsity, topk_keep_mask
from actprune.run.job import plan_job

from .helpers import job_config, random_windows
from .test_generate import cached_logits
from .tiny import llama, qwen2

pytest.importorskip("triton")
# CPU tensors through the kernels under the interpreter (conftest sets it where there is no GPU); on a CUDA
# machine the kernels are compiled for the GPU, and tests/test_cuda.py runs models through them there.
pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="runs the kernels under Triton's interpreter: see tests/test_cuda.py on a GPU"
)


@pytest.mark.parametrize(
    "config",
    [
        {"sparsity": "2:4"},
        {"sparsity": "8:16", "score": "weight_norm", "transforms": [{"name": "shift", "mode": "static"}]},
        {"sparsity": "16:32", "transforms": ["hadamard", "shift"]},
        {"sparsity": "8:16", "score": "weight_norm", "transforms": ["scaling", "permute"]},
        {"sparsity": 0.5, "selection": "threshold", "score": "amber"},
        {"sparsity": "2:4", "dense_tokens": 2},
        {"sparsity": "8:16", "score": "weight_norm", "mask_scope": "step"},
        {"sparsity": 0.5, "selection": "threshold", "mask_scope": "step", "mask_pool": "max"},
    ],
)
def test_kernel_decoding_gives_the_logits_of_the_emulation(config, kernel_calls):
    base = qwen2(num_hidden_layers=1)  # q/k/v biases
    emulated, kernel = copy.deepcopy(base), copy.deepcopy(base)
    windows = random_windows()
    sparsify_(emulated, {"method": "act_magnitude", **config}, windows)
    report = sparsify_(kernel, {"method": "act_magnitude", "backend": "kernel", **config}, windows)
    ids = torch.randint(0, 256, (2, 8))
    with torch.no_grad():
        expected = cached_logits(emulated, ids, 5)
        report.reset()
        got = cached_logits(kernel, ids, 5)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # The prefill (2 x 5 rows) is emulated; each of the 3 decode steps (2 sequences, one token each) runs
    # the kernel in each of the 7 projections.
    assert kernel_calls == [2] * 3 * 7
    if config.get("selection") != "threshold":
        dense_share = config.get("dense_tokens", 0) / 8
        assert report.summary()["measured"] == pytest.approx(
            parse_sparsity(config["sparsity"]).target() * (1 - dense_share)
        )
    if config.get("mask_scope") == "step" and "selection" not in config:  # the 2 sequences read one mask's rows
        assert report.summary()["rows_read"] == 0.5


def test_a_decode_step_of_the_dense_tokens_stays_dense_under_the_kernel(kernel_calls):
    """Positions 1 and 2 are decoded one at a time and stay dense, 3 and 4 are pruned: all four through the
    kernel (the one-token prefill too), which is told on the device which rows are dense (no host sync)."""
    base = llama(num_hidden_layers=1)
    emulated, kernel = copy.deepcopy(base), copy.deepcopy(base)
    config = {"method": "act_magnitude", "sparsity": "2:4", "dense_tokens": 3}
    sparsify_(emulated, config)
    report = sparsify_(kernel, {**config, "backend": "kernel"})
    ids = torch.randint(0, 256, (1, 5))
    with torch.no_grad():
        expected, got = cached_logits(emulated, ids, 1), cached_logits(kernel, ids, 1)
        torch.testing.assert_close(got[:, :3], base(ids).logits[:, :3], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert kernel_calls == [1] * 5 * 7  # the one-token prefill too
    assert report.summary()["measured"] == pytest.approx(0.5 * 2 / 5)


@pytest.mark.parametrize("selection", [{"n": 2, "m": 4}, {"threshold": 0.5}])
def test_rows_flagged_dense_keep_every_input(selection):
    x, weight = torch.randn(3, 48), torch.randn(40, 48)
    dense_rows = torch.tensor([False, True, False])
    y = kernels.sparse_linear(x, kernels.layout_weight(weight), dense_rows=dense_rows, **selection)
    if "n" in selection:
        keep = topk_keep_mask(x.abs(), 2, 4)
    else:
        keep = x.abs() >= 0.5
    keep[1] = True
    torch.testing.assert_close(y, (x * keep) @ weight.T, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="dense_rows must be \\(3,\\)"):
        kernels.sparse_linear(x, kernels.layout_weight(weight), dense_rows=dense_rows[:2], **selection)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_one_wrapped_layer_matches_the_emulation_in_half_precision(dtype):
    linear = torch.nn.Linear(96, 40, dtype=dtype)
    pattern = parse_sparsity("8:16")
    rotation = torch.linalg.qr(torch.randn(96, 96, dtype=torch.float64))[0]
    absorbed = (linear.weight.double() @ rotation).to(dtype)
    options = dict(rotation=rotation, absorbed_weight=absorbed, shift="median")
    emulated = ActSparseLinear(copy.deepcopy(linear), pattern, **options)
    kernel = ActSparseLinear(copy.deepcopy(linear), pattern, backend="kernel", **options)
    x = torch.randn(3, 1, 96, dtype=dtype)
    torch.testing.assert_close(kernel(x), emulated(x), rtol=2e-2, atol=2e-2)


def test_the_weight_is_laid_out_once_and_restored_exactly():
    model = llama()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    report = sparsify_(model, {"method": "act_magnitude", "sparsity": "2:4", "backend": "kernel"}, keep_dense=True)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.weight.t().is_contiguous() and not layer.weight.is_contiguous()  # one copy, the kernel's layout
    report.restore_(model)
    for name, p in model.named_parameters():
        assert p.is_contiguous() and torch.equal(p, before[name]), name


def test_prefill_without_a_semi_structured_kernel_is_emulated_and_says_why(caplog, monkeypatch):
    monkeypatch.setattr(dispatch, "_fallbacks_logged", set())  # said once per process: earlier tests may have
    model = llama(num_hidden_layers=1)
    sparsify_(model, {"method": "act_magnitude", "sparsity": "2:4", "backend": "kernel"})
    with caplog.at_level(logging.INFO, logger="actprune.kernels.dispatch"), torch.no_grad():
        model(torch.randint(0, 256, (1, 12)))
    assert "pruning.backend=kernel emulates some calls: 2:4 semi-structured" in caplog.text


@pytest.mark.parametrize(
    "config,words",
    [
        (
            {"method": "act_magnitude", "backend": "gpu"},
            "pruning.backend='gpu': allowed values are \\['emulate', 'kernel'\\]",
        ),
        (
            {"method": "weight_magnitude", "sparsity": "2:4", "backend": "kernel"},
            "pruning.method=weight_magnitude prunes weights",
        ),
        ({"method": "act_magnitude", "sparsity": 0.5, "backend": "kernel"}, "with selection=topk ranks a whole token"),
        ({"method": "act_magnitude", "sparsity": "8:64", "backend": "kernel"}, "groups larger than 32"),
        (
            {"method": "act_magnitude", "sparsity": "2:4", "backend": "kernel", "transforms": ["variance"]},
            "pruning.transforms has \\['variance'\\]",
        ),
    ],
)
def test_what_has_no_kernel_is_refused_naming_what_is_supported(config, words):
    with pytest.raises(ValueError, match=words) as error:
        plan(llama(), config)
    if config["backend"] == "kernel":
        assert f"Supported: {kernels.SUPPORT};" in str(error.value)


def test_what_the_kernel_backend_supports_is_said_once_and_quoted_by_the_docs_and_every_refusal():
    docs = (Path(__file__).resolve().parent.parent / "docs" / "speed.md").read_text()
    assert f"> Supported: {kernels.SUPPORT}\n" in docs
    for name in kernels.KERNEL_TRANSFORMS:  # each runs: the plan refuses none of them
        plan(llama(), {"method": "act_magnitude", "sparsity": "2:4", "backend": "kernel", "transforms": [name]})
    for name in kernels.EMULATED_TRANSFORMS:
        with pytest.raises(ValueError, match=f"pruning.transforms has \\['{name}'\\]"):
            plan(llama(), {"method": "act_magnitude", "sparsity": "2:4", "backend": "kernel", "transforms": [name]})
    with pytest.raises(ValueError, match=f"Supported: {re.escape(kernels.SUPPORT)}"):
        ActSparseLinear(torch.nn.Linear(8, 4), parse_sparsity("2:4"), variance=True, backend="kernel")


def test_a_kernel_job_on_a_cpu_without_the_interpreter_fails_before_loading(tiny_setup, tmp_path, monkeypatch):
    cfg = job_config(tiny_setup, tmp_path, "pruning=act_magnitude", "pruning.sparsity=2:4", "pruning.backend=kernel")
    assert plan_job(cfg, tmp_path).pruning.config.backend == "kernel"  # the interpreter is on in the tests
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(
        ValueError,
        match="pruning.backend=kernel on cpu in float32: CPU tensors run the Triton kernels "
        "only under TRITON_INTERPRET=1.*pruning.backend=emulate runs everywhere",
    ):
        plan_job(cfg, tmp_path)
    dense = job_config(tiny_setup, tmp_path, "pruning=dense", "pruning.backend=kernel")
    assert plan_job(dense, tmp_path).pruning.targets == []  # nothing to compute: a sweep may cross it with dense


def test_the_dense_baseline_reads_row_major_weights_as_the_dense_model_does():
    model = llama()
    sparsify_(model, {"method": "act_magnitude", "sparsity": "2:4", "backend": "kernel"})
    layer = model.model.layers[0].self_attn.q_proj
    laid_out = layer.linear.weight.data
    with unwrapped(model):
        linear = model.model.layers[0].self_attn.q_proj
        assert isinstance(linear, torch.nn.Linear) and linear.weight.is_contiguous()
        assert torch.equal(linear.weight, laid_out)
    assert model.model.layers[0].self_attn.q_proj is layer
    assert layer.linear.weight.data_ptr() == laid_out.data_ptr() and not layer.linear.weight.is_contiguous()


def test_refit_weights_go_through_the_kernel_too(kernel_calls):
    base = llama(num_hidden_layers=1)
    emulated, kernel = copy.deepcopy(base), copy.deepcopy(base)
    config = {"method": "act_magnitude", "sparsity": "8:16", "transforms": [{"name": "refit", "min_tokens_per_dim": 0}]}
    windows = torch.randint(0, 256, (8, 32))
    sparsify_(emulated, config, windows)
    sparsify_(kernel, {**config, "backend": "kernel"}, windows)
    assert any(m.refit_weight is not None for m in kernel.modules() if isinstance(m, ActSparseLinear))
    ids = torch.randint(0, 256, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(cached_logits(kernel, ids, 3), cached_logits(emulated, ids, 3), rtol=1e-4, atol=1e-4)
    assert kernel_calls  # the decode steps ran the kernel, with W′
