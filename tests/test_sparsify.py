import pytest
import torch
from torch import nn

from actprune import plan, sparsify_
from actprune.activation import ActSparseLinear
from actprune.config import PROJECTIONS
from actprune.masks import parse_sparsity
from actprune.methods import METHODS, activation_method

from .tiny import gemma3_multimodal, llama, qwen2


def test_wrapper_at_sparsity_zero_equals_linear_bit_for_bit_with_bias():
    linear = nn.Linear(64, 32, bias=True)
    nn.init.normal_(linear.bias)
    x = torch.randn(3, 5, 64)
    wrapped = ActSparseLinear(linear, parse_sparsity(0.0))
    assert torch.equal(wrapped(x), linear(x))


def test_wrapper_keeps_bias_and_masks_input():
    linear = nn.Linear(16, 8, bias=True)
    nn.init.normal_(linear.bias, std=3.0)
    x = torch.randn(4, 16)
    wrapped = ActSparseLinear(linear, parse_sparsity("2:4"))
    keep = x.abs().unflatten(-1, (-1, 4)).argsort(-1, descending=True).argsort(-1) < 2
    expected = (x * keep.flatten(-2)) @ linear.weight.T + linear.bias
    torch.testing.assert_close(wrapped(x), expected)
    assert wrapped.measured_sparsity() == 0.5


def test_shared_input_mask_is_reused_only_for_the_same_unmodified_input_and_pattern():
    from actprune.masks import pattern_keep_mask

    def reference(wrapper, x):
        keep = pattern_keep_mask(wrapper.score(x), wrapper.pattern)
        return (x * keep) @ wrapper.weight.T + wrapper.bias

    two_four = ActSparseLinear(nn.Linear(16, 4), parse_sparsity("2:4"))
    same = ActSparseLinear(nn.Linear(16, 4), parse_sparsity("2:4"))
    four_eight = ActSparseLinear(nn.Linear(16, 4), parse_sparsity("4:8"))
    other_score = ActSparseLinear(nn.Linear(16, 4), parse_sparsity("2:4"), score=lambda x: -x.abs())
    x = torch.randn(3, 16)
    for wrapper in (two_four, same, four_eight, two_four, other_score):  # each after the previous one
        torch.testing.assert_close(wrapper(x), reference(wrapper, x))
    two_four(x)
    x.mul_(torch.randn_like(x))  # modified in place: the cached mask is stale
    torch.testing.assert_close(two_four(x), reference(two_four, x))
    torch.testing.assert_close(two_four(x.clone()), reference(two_four, x))


def test_inference_mode_works_and_matches_no_grad():
    model = llama()
    sparsify_(model, {"method": "act_magnitude", "sparsity": "2:4"})
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        expected = model(ids).logits
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, expected)


def test_qwen2_with_biases_is_exact_at_sparsity_zero():
    model = qwen2()
    assert model.model.layers[0].self_attn.q_proj.bias.abs().sum() > 0
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        dense = model(ids).logits
        report = sparsify_(model, {"method": "act_magnitude", "sparsity": 0.0})
        assert report.replaced_layers == 2 * 7
        assert torch.equal(model(ids).logits, dense)


def test_qwen2_pruned_changes_output_and_counts_sparsity():
    model = qwen2()
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        dense = model(ids).logits
        report = sparsify_(model, {"method": "act_magnitude", "sparsity": "8:16"})
        pruned = model(ids).logits
    assert not torch.allclose(pruned, dense)
    summary = report.summary()
    assert summary["replaced_layers"] == 14 and summary["measured"] == 0.5
    assert set(summary["per_layer"]) == set(report.layers) and all(v == 0.5 for v in summary["per_layer"].values())


def test_token_output_does_not_depend_on_the_batch():
    model = llama()
    sparsify_(model, {"method": "act_magnitude", "sparsity": 0.5})
    ids = torch.randint(0, 256, (3, 10))
    with torch.no_grad():
        together = model(ids).logits
        alone = model(ids[1:2]).logits
    torch.testing.assert_close(together[1:2], alone, rtol=1e-5, atol=1e-5)


def test_target_modules_and_layers_select_the_layers():
    model = llama(num_hidden_layers=3)
    report = sparsify_(
        model,
        {"method": "act_magnitude", "sparsity": "2:4", "target_modules": ["down_proj", "o_proj"], "layers": [0, 2]},
    )
    assert sorted(report.layers) == sorted(
        f"model.layers.{i}.{p}" for i in (0, 2) for p in ("mlp.down_proj", "self_attn.o_proj")
    )
    assert isinstance(model.model.layers[2].mlp.down_proj, ActSparseLinear)
    assert isinstance(model.model.layers[1].mlp.down_proj, nn.Linear)
    assert isinstance(model.lm_head, nn.Linear)


def test_gemma3_multimodal_prunes_only_the_language_model():
    model = gemma3_multimodal()
    report = sparsify_(model, {"method": "act_magnitude", "sparsity": "2:4"})
    assert report.replaced_layers == 2 * 7
    assert all(".language_model." in name for name in report.layers)
    assert not any(isinstance(m, ActSparseLinear) for m in model.model.vision_tower.modules())


@pytest.mark.parametrize("sparsity", ["2:4", "8:16"])
def test_weight_magnitude_nm_per_output_row(sparsity):
    model = qwen2()
    before = {n: m.weight.detach().clone() for n, m in model.named_modules() if n.endswith("proj")}
    report = sparsify_(model, {"method": "weight_magnitude", "sparsity": sparsity})
    pattern = parse_sparsity(sparsity)
    assert report.replaced_layers == 14
    for name, layer in report.layers.items():
        assert type(layer) is nn.Linear
        groups = (layer.weight != 0).unflatten(-1, (-1, pattern.m))
        assert (groups.sum(-1) == pattern.n).all(), name
        original = before[name]
        kept = layer.weight != 0
        assert torch.equal(layer.weight[kept], original[kept])
        scores = original.abs().unflatten(-1, (-1, pattern.m))
        mask = kept.unflatten(-1, (-1, pattern.m))
        assert (scores.masked_fill(~mask, float("inf")).amin(-1) >= scores.masked_fill(mask, -1).amax(-1)).all()
    assert report.summary()["measured"] == pytest.approx(0.5)


def test_weight_magnitude_ratio_is_one_threshold_per_layer():
    model = llama()
    layer = model.model.layers[0].mlp.down_proj
    original = layer.weight.detach().clone()
    report = sparsify_(model, {"method": "weight_magnitude", "sparsity": 0.3, "target_modules": ["down_proj"]})
    zeroed = layer.weight == 0
    assert zeroed.sum().item() == round(0.3 * original.numel())
    assert original.abs()[zeroed].max() <= original.abs()[~zeroed].min()
    assert report.summary()["per_layer"]["model.layers.0.mlp.down_proj"] == pytest.approx(0.3, abs=1e-4)


def test_dense_replaces_nothing_whatever_the_sparsity():
    model = llama()
    for sparsity in (0.0, "2:4"):
        summary = sparsify_(model, {"method": "dense", "sparsity": sparsity}).summary()
        assert summary["replaced_layers"] == 0 and summary["measured"] == 0.0 and summary["target"] == 0.0
    assert not any(isinstance(m, ActSparseLinear) for m in model.modules())


@pytest.mark.parametrize(
    "config,words",
    [
        (
            {"method": "act_magnitude", "sparsity": "2:4", "target_modules": ["qproj"]},
            ["pruning.target_modules", "unknown ['qproj']", "q_proj", "down_proj"],
        ),
        ({"method": "act_magnitude", "sparsity": "2:4", "layers": [5]}, ["pruning.layers", "0..1"]),
        ({"method": "magnitude", "sparsity": "2:4"}, ["pruning.method", "act_magnitude", "weight_magnitude"]),
        ({"method": "act_magnitude", "sparsity": 1.5}, ["pruning.sparsity", "[0, 1)"]),
        ({"method": "act_magnitude", "sparsity": "8:16"}, ["mlp.down_proj", "input width 40", "multiple of 16"]),
        ({"method": "act_magnitude", "sparsity": 0.99}, ["pruning.sparsity=0.99", "every input", "width 40"]),
        ({"method": "dense", "target_modules": ["wq"]}, ["pruning.target_modules", "wq"]),
    ],
)
def test_bad_settings_name_the_key_and_allowed_values(config, words):
    with torch.device("meta"):
        model = llama(intermediate_size=40)
    with pytest.raises(ValueError) as error:
        sparsify_(model, config)
    for word in words:
        assert word in str(error.value)


def test_unknown_config_key_fails():
    with pytest.raises(Exception, match="sparsty"):
        sparsify_(llama(), {"method": "act_magnitude", "sparsty": 0.5})


def test_a_new_method_is_one_registered_function():
    @activation_method("act_random_test")
    def act_random(linear, plan, stats):
        return ActSparseLinear(linear, plan.pattern, score=lambda x: torch.rand_like(x))

    try:
        report = sparsify_(llama(), {"method": "act_random_test", "sparsity": "2:4", "target_modules": ["o_proj"]})
        assert report.replaced_layers == 2
    finally:
        METHODS.pop("act_random_test")


def test_default_targets_are_the_seven_projections():
    report = sparsify_(llama(), {"method": "act_magnitude", "sparsity": 0.5})
    assert sorted(name.rsplit(".", 1)[-1] for name in report.layers) == sorted(PROJECTIONS * 2)


def test_the_report_says_what_measured_sparsity_covers():
    calibration = torch.randint(0, 256, (2, 16))
    covers = {
        name: sparsify_(llama(), config, calibration).summary()["measured_covers"]
        for name, config in {
            "plain": {"method": "act_magnitude", "sparsity": "2:4"},
            "shift": {"method": "act_magnitude", "sparsity": "2:4", "transforms": ["shift"]},
            "lowrank": {
                "method": "act_magnitude",
                "sparsity": "2:4",
                "transforms": [{"name": "learnable", "forms": ["lowrank"], "steps": 1}],
            },
            "weight": {"method": "weight_magnitude", "sparsity": "2:4"},
        }.items()
    }
    assert "padding included" in covers["plain"] and "still read every input" not in covers["plain"]
    assert "per-token shift" in covers["shift"] and "low-rank correction reads" in covers["lowrank"]
    assert covers["weight"] == "the fraction of zero weights in the pruned layers"


def test_a_model_pruned_already_is_refused_and_restore_is_named():
    model = llama()
    config = {"method": "act_magnitude", "sparsity": "2:4"}
    report = sparsify_(model, config, keep_dense=True)
    with pytest.raises(
        ValueError, match=r"model.layers.0.self_attn.q_proj and 13 other layers are pruned already: .*restore_"
    ):
        plan(model, config)
    report.restore_(model)
    assert plan(model, config).targets
