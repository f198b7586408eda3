"""Wanda and SparseGPT: exact patterns, layer-by-layer calibration, and better than magnitude."""

import copy
import json
import math

import pytest
import torch
from torch import nn

from actprune import sparsify_
from actprune.activation import ActSparseLinear
from actprune.masks import parse_sparsity
from actprune.methods.sparsegpt import sparsegpt_
from actprune.methods.wanda import wanda_
from actprune.weights import LayerInputStatistics as _Inputs

from .conftest import SHARED_DATA, STORIES, needs_shared
from .tiny import llama, qwen2

BATCHES = torch.randint(0, 256, (4, 16))


@pytest.mark.parametrize("method", ["weight_wanda", "weight_sparsegpt"])
@pytest.mark.parametrize("sparsity", ["2:4", "4:8"])
def test_nm_keeps_exactly_n_per_group_of_each_row(method, sparsity):
    model = qwen2()
    report = sparsify_(model, {"method": method, "sparsity": sparsity}, BATCHES)
    pattern = parse_sparsity(sparsity)
    assert report.replaced_layers == 14 and report.summary()["measured"] == pytest.approx(0.5, abs=1e-3)
    for name, layer in report.layers.items():
        kept = (layer.weight != 0).unflatten(-1, (-1, pattern.m)).sum(-1)
        assert (kept <= pattern.n).all() and (kept >= pattern.n - 1).all(), name  # a kept weight may be exactly 0
    assert set(report.seconds) == {"calibration", "prune"}


def test_wanda_ratio_is_exact_per_row_and_uses_the_input_norms():
    linear = nn.Linear(16, 6)
    inputs = _Inputs(16, hessian=False, device="cpu")
    x = torch.randn(50, 16) * torch.linspace(0.1, 5, 16)
    inputs.add(linear, (x,))
    original = linear.weight.detach().clone()
    with torch.no_grad():
        wanda_(linear, parse_sparsity(0.25), inputs)
    assert ((linear.weight == 0).sum(1) == 4).all()
    metric = original.abs() * x.norm(dim=0)
    zeroed = linear.weight == 0
    assert (metric.masked_fill(~zeroed, -1).amax(1) <= metric.masked_fill(zeroed, float("inf")).amin(1)).all()


@pytest.mark.parametrize("sparsity", [0.5, "2:4"])
def test_sparsegpt_reconstructs_the_layer_better_than_magnitude(sparsity):
    torch.manual_seed(1)
    linear = nn.Linear(64, 32, bias=False)
    x = torch.randn(512, 64) @ torch.randn(64, 64) * 0.3  # correlated inputs, as in a real layer
    inputs = _Inputs(64, hessian=True, device="cpu")
    inputs.add(linear, (x,))
    dense = linear.weight.detach().clone()
    sparse = copy.deepcopy(linear)
    with torch.no_grad():
        sparsegpt_(sparse, parse_sparsity(sparsity), inputs, blocksize=128, percdamp=0.01)
    magnitude = copy.deepcopy(linear)
    from actprune.methods.weight_magnitude import weight_magnitude

    with torch.no_grad():
        weight_magnitude(magnitude, parse_sparsity(sparsity))
    error = lambda w: ((x @ w.T) - (x @ dense.T)).pow(2).mean().item()  # noqa: E731
    assert (sparse.weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.02)
    assert error(sparse.weight) < error(magnitude.weight)


@pytest.mark.parametrize("blocksize", [6, -4])
def test_sparsegpt_called_directly_refuses_blocks_that_split_groups(blocksize):
    linear = nn.Linear(16, 8, bias=False)
    inputs = _Inputs(16, hessian=True, device="cpu")
    inputs.add(linear, (torch.randn(32, 16),))
    with pytest.raises(
        ValueError, match=f"blocksize={blocksize} with sparsity 2:4: allowed values are positive multiples of 4"
    ):
        sparsegpt_(linear, parse_sparsity("2:4"), inputs, blocksize=blocksize)


def test_layers_are_calibrated_on_the_outputs_of_the_pruned_layers_before_them():
    model = llama()
    dense = copy.deepcopy(model)
    first_calls = {}

    def remember(index):
        def hook(module, args, kwargs):
            first_calls.setdefault(index, ((args[0] if args else kwargs["hidden_states"]).clone(), kwargs))

        return hook

    for index in (0, 1):
        model.model.layers[index].register_forward_pre_hook(remember(index), with_kwargs=True)
    sparsify_(model, {"method": "weight_wanda", "sparsity": 0.5}, BATCHES[:1])
    hidden, kwargs = first_calls[0]
    kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
    with torch.no_grad():
        pruned_out = model.model.layers[0](hidden, **kwargs)
        dense_out = dense.model.layers[0](hidden, **kwargs)
    pruned_out, dense_out = (o[0] if isinstance(o, tuple) else o for o in (pruned_out, dense_out))
    torch.testing.assert_close(first_calls[1][0], pruned_out)
    assert not torch.allclose(first_calls[1][0], dense_out, atol=1e-4)


def test_needs_calibration_windows():
    with pytest.raises(ValueError, match="pass calibration="):
        sparsify_(llama(), {"method": "weight_sparsegpt", "sparsity": 0.5})


@needs_shared
def test_on_stories260k_wanda_and_sparsegpt_beat_magnitude(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from actprune import calibration, perplexity

    tokenizer = AutoTokenizer.from_pretrained(STORIES)
    text, _ = calibration.corpus_text("wikitext2_validation", str(SHARED_DATA))
    batches = calibration.sample_windows(tokenizer, text, 32, 256, seed=0)
    with open(SHARED_DATA / "wikitext-2-raw-v1" / "test.jsonl") as file:
        test = "\n\n".join(json.loads(line)["text"] for line in file)
    results = {}
    for sparsity in (0.5, "2:4"):
        for method in ("weight_magnitude", "weight_wanda", "weight_sparsegpt"):
            model = AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()
            sparsify_(model, {"method": method, "sparsity": sparsity}, batches)
            results[(method, sparsity)] = perplexity(model, tokenizer, test, seqlen=512, max_windows=40)["ppl"]
    for sparsity in (0.5, "2:4"):
        assert results[("weight_wanda", sparsity)] < results[("weight_magnitude", sparsity)], results
        assert results[("weight_sparsegpt", sparsity)] < results[("weight_magnitude", sparsity)], results
    assert all(math.isfinite(v) for v in results.values())


@pytest.mark.parametrize(
    "config",
    [
        {"method": "weight_sparsegpt", "sparsity": "2:4"},
        {"method": "weight_wanda", "sparsity": 0.5},
        {"method": "weight_magnitude", "sparsity": 0.5},
        {"method": "act_magnitude", "sparsity": "2:4", "transforms": ["hadamard", "shift"]},
    ],
)
def test_restore_brings_back_the_dense_model_bit_for_bit(config):
    model = qwen2()
    before = {name: p.detach().clone() for name, p in model.state_dict().items()}
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        dense_logits = model(ids).logits
    report = sparsify_(model, config, BATCHES, keep_dense=True)
    with torch.no_grad():
        assert not torch.equal(model(ids).logits, dense_logits)
    report.restore_(model)
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[n], before[n]) for n in before)
    assert not any(isinstance(m, ActSparseLinear) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, dense_logits)
