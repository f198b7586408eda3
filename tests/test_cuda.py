"""On a CUDA GPU (skipped elsewhere): whole models with `pruning.backend=kernel` against the emulation, in
bfloat16 and float32, both mask scopes; 2:4 prefill through semi-structured sparsity inside a model; the
bfloat16 default; an exported folder on the GPU. `make gpu-check` runs these with tests/test_kernels.py."""

import copy

import pytest
import torch

from actprune import models, sparsify_

from .test_generate import cached_logits
from .tiny import llama, qwen2

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
pytest.importorskip("triton")
CUDA = torch.device("cuda")
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}  # of the logits' scale: bf16 sums round by their order


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.float() - expected.float()).abs().max() / expected.float().abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "config",
    [
        {"sparsity": "8:16", "score": "weight_norm"},
        {"sparsity": "8:16", "mask_scope": "step"},
        {"sparsity": "2:4", "dense_tokens": 2},
    ],
    ids=["8:16", "8:16-step", "2:4-dense_tokens"],
)
def test_kernel_decoding_on_the_gpu_gives_the_logits_of_the_emulation(config, dtype, kernel_calls):
    base = qwen2(num_hidden_layers=2).to(CUDA, dtype)  # q/k/v biases
    emulated, kernel = copy.deepcopy(base), copy.deepcopy(base)
    sparsify_(emulated, {"method": "act_magnitude", **config})
    sparsify_(kernel, {"method": "act_magnitude", "backend": "kernel", **config})
    ids = torch.randint(0, 256, (4, 10), device=CUDA)
    with torch.no_grad():
        expected = cached_logits(emulated, ids, 6)
        got = cached_logits(kernel, ids, 6)
    assert kernel_calls and set(kernel_calls) == {4}  # every decode step of the 4 sequences ran the kernel
    assert relative_error(got, expected) <= TOLERANCE[dtype]


def test_two_four_prefill_runs_semi_structured_inside_a_model():
    from actprune.kernels.prefill import semi_structured_unavailable

    base = llama(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2).to(
        CUDA, torch.bfloat16
    )
    reason = semi_structured_unavailable(64, 128, 128, torch.bfloat16, CUDA)
    if reason is not None:
        pytest.skip(reason)
    emulated, kernel = copy.deepcopy(base), copy.deepcopy(base)
    sparsify_(emulated, {"method": "act_magnitude", "sparsity": "2:4"})
    sparsify_(kernel, {"method": "act_magnitude", "sparsity": "2:4", "backend": "kernel"})
    ids = torch.randint(0, 256, (1, 64), device=CUDA)
    with torch.no_grad():
        assert relative_error(kernel(ids).logits, emulated(ids).logits) <= TOLERANCE[torch.bfloat16]


def test_bfloat16_is_the_default_on_cuda_and_masks_reach_the_pattern():
    assert models.resolve_dtype("auto", CUDA) == torch.bfloat16
    model = llama().to(CUDA, torch.bfloat16)
    report = sparsify_(model, {"method": "act_magnitude", "sparsity": "8:16", "mask_scope": "step"})
    with torch.no_grad():
        model(torch.randint(0, 256, (4, 16), device=CUDA))
    summary = report.summary()
    assert summary["measured"] == 0.5 and summary["rows_read"] == 0.5


def test_an_exported_folder_runs_on_the_gpu(tmp_path):
    from transformers import AutoModelForCausalLM

    from actprune.export import write_folder

    pruned = qwen2()
    report = sparsify_(pruned, {"method": "act_magnitude", "sparsity": "8:16", "transforms": ["variance"]})
    write_folder(pruned, report, None, tmp_path, {"pruning": {}})
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True, dtype=torch.bfloat16).to(CUDA)
    pruned = pruned.to(CUDA, torch.bfloat16)
    ids = torch.randint(0, 256, (2, 12), device=CUDA)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, pruned(ids).logits)
