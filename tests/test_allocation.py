"""`pruning.allocation=calibrated`: N chosen per projection, the model-wide kept fraction the target's."""

import copy
from fractions import Fraction

import pytest
import torch

from actprune import sparsify_
from actprune.activation import ActSparseLinear
from actprune.activation.allocation import allocate, default_choices
from actprune.masks import parse_sparsity
from actprune.planning import plan
from actprune.run import table

from .tiny import llama

WINDOWS = torch.randint(0, 256, (4, 40), generator=torch.Generator().manual_seed(2))


def test_the_knapsack_gives_more_to_sensitive_layers_and_keeps_the_budget():
    errors = {"a": {2: 9.0, 4: 1.0, 6: 0.5}, "b": {2: 0.2, 4: 0.1, 6: 0.05}, "c": {2: 5.0, 4: 2.0, 6: 0.1}}
    widths = {"a": 64, "b": 64, "c": 128}
    chosen = allocate(errors, widths, lambda n: Fraction(n, 8), 4)
    assert sum(widths[n] * chosen[n] for n in chosen) == sum(widths.values()) * 4
    brute = min(
        ((x, y, z) for x in (2, 4, 6) for y in (2, 4, 6) for z in (2, 4, 6) if 64 * x + 64 * y + 128 * z == 256 * 4),
        key=lambda c: errors["a"][c[0]] + errors["b"][c[1]] + errors["c"][c[2]],
    )
    assert (chosen["a"], chosen["b"], chosen["c"]) == brute


def test_default_choices_span_a_quarter_to_three_quarters_of_m():
    assert default_choices(parse_sparsity("8:16")) == [4, 6, 8, 10, 12]
    assert default_choices(parse_sparsity("2:4")) == [1, 2, 3]
    assert default_choices(parse_sparsity(0.5)) == [0.3, 0.4, 0.5, 0.6, 0.7]
    assert default_choices(parse_sparsity(0.9)) == [0.7, 0.8, 0.9]


def kept_over(model, per_layer: dict, size) -> Fraction:
    """The kept fraction of an allocation, each layer weighed by `size(layer)`."""
    layers = {name: model.get_submodule(name) for name in per_layer}
    kept = sum(size(layers[name]) * (1 - Fraction(str(parse_sparsity(p).target()))) for name, p in per_layer.items())
    return kept / sum(size(layer) for layer in layers.values())


def weight_size(layer):
    return layer.in_features * layer.out_features


def test_a_calibrated_allocation_keeps_the_targets_fraction_of_weights_with_unequal_layers():
    model = llama()
    report = sparsify_(model, {"method": "act_magnitude", "sparsity": "8:16", "allocation": "calibrated"}, WINDOWS)
    per_layer = report.allocation["per_layer"]
    assert len(per_layer) == 14 and len(set(per_layer.values())) > 1
    for name, pattern in per_layer.items():
        assert str(model.get_submodule(name).pattern) == pattern
    assert kept_over(model, per_layer, weight_size) == Fraction(1, 2)  # decode bytes and FLOPs: in · out
    assert report.summary()["kept_by_weight"] is None and report.allocation["budget"] == "weights"  # nothing fed yet
    report.reset()
    with torch.no_grad():
        model(torch.randint(0, 256, (2, 16)))
    assert report.summary()["allocation"]["per_layer"] == per_layer
    assert report.summary()["kept_by_weight"] == 0.5  # N:M keeps exactly N of every M
    assert all(int(m.seen) > 0 for m in model.modules() if isinstance(m, ActSparseLinear))


def test_an_inputs_budget_keeps_the_targets_fraction_of_inputs_and_says_what_it_keeps_of_weights():
    model = llama()
    report = sparsify_(
        model,
        {"method": "act_magnitude", "sparsity": "8:16", "allocation": "calibrated", "allocation_budget": "inputs"},
        WINDOWS,
    )
    per_layer = report.allocation["per_layer"]
    assert kept_over(model, per_layer, lambda layer: layer.in_features) == Fraction(1, 2)
    assert report.allocation["budget"] == "inputs"
    report.reset()
    with torch.no_grad():
        model(torch.randint(0, 256, (2, 16)))
    assert report.summary()["measured"] == pytest.approx(0.5)  # measured weighs the inputs by width too
    assert report.summary()["kept_by_weight"] == pytest.approx(float(kept_over(model, per_layer, weight_size)))


def kept_by_hand(model, ids, keep) -> float:
    """The weight entries the layers' masks keep on `ids`, counted apart from the layers' own counts:
    `keep(layer, x)` is a layer's mask of its input `x`; each layer weighed by in · out."""
    kept = {}

    def count(layer, args):
        kept[layer] = keep(layer, args[0]).double().mean()

    handles = [m.register_forward_pre_hook(count) for m in model.modules() if isinstance(m, ActSparseLinear)]
    with torch.no_grad():
        model(ids)
    for handle in handles:
        handle.remove()
    return float(sum(weight_size(layer) * share for layer, share in kept.items()) / sum(map(weight_size, kept)))


@pytest.mark.parametrize(
    "config,kept",
    [
        ({"sparsity": "2:4"}, 0.5),
        ({"sparsity": "8:16", "skip_layers": ["*.down_proj"]}, 0.5),
        ({"sparsity": "2:4", "dense_tokens": 4}, 0.5 + 0.5 * 4 / 16),  # a sequence's first 4 of 16 tokens whole
    ],
)
def test_every_activation_job_records_the_fraction_by_weight_its_masks_kept(config, kept):
    model = llama()
    report = sparsify_(model, {"method": "act_magnitude", **config}, WINDOWS)
    with torch.no_grad():
        model(torch.randint(0, 256, (2, 16)))
    assert report.summary()["kept_by_weight"] == pytest.approx(kept)


def test_a_thresholds_kept_fraction_by_weight_is_what_it_kept_not_its_target():
    model = llama()
    config = {"method": "act_magnitude", "sparsity": 0.3, "selection": "threshold", "dense_tokens": 4}
    report = sparsify_(model, config, WINDOWS)
    ids = torch.randint(0, 256, (2, 16))
    first = torch.arange(16)[:, None] < 4  # (tokens, 1): the dense tokens
    counted = kept_by_hand(model, ids, lambda layer, x: (x.abs() >= layer.threshold) | first)
    report.reset()
    with torch.no_grad():
        model(ids)
    assert report.summary()["kept_by_weight"] == pytest.approx(counted, abs=1e-9)
    assert counted - 0.7 > 0.05  # far above the target's 0.7 (about 0.7 + 0.3 · 4/16): what was kept


def test_shared_masks_allocate_on_the_per_token_errors_of_the_sampled_tokens():
    """The 512 sampled tokens are no decode step: one mask shared over them would be another error."""
    model = llama()
    config = {"method": "act_magnitude", "sparsity": "8:16", "allocation": "calibrated"}
    token = sparsify_(copy.deepcopy(model), config, WINDOWS).allocation
    step = sparsify_(copy.deepcopy(model), {**config, "mask_scope": "step"}, WINDOWS).allocation
    assert step["errors"] == token["errors"] and step["per_layer"] == token["per_layer"]


def test_the_record_says_whether_every_layer_keeps_the_target_pattern():
    config = {"method": "act_magnitude", "sparsity": "8:16", "allocation": "calibrated"}
    mixed = sparsify_(llama(), config, WINDOWS).allocation
    assert set(mixed["per_layer"].values()) != {"8:16"} and mixed["every_layer_target"] is False
    fixed = sparsify_(llama(), {**config, "allocation_choices": [8]}, WINDOWS).allocation
    assert set(fixed["per_layer"].values()) == {"8:16"} and fixed["every_layer_target"] is True


def test_a_non_finite_layer_error_is_refused_naming_the_layer_and_the_choice():
    errors = {"a": {2: 1.0, 4: 0.5, 6: 0.1}, "b": {2: float("nan"), 4: 0.5, 6: 0.1}}
    with pytest.raises(FloatingPointError, match="layer b has a non-finite output error nan for choice 2"):
        allocate(errors, {"a": 64, "b": 64}, lambda n: Fraction(n, 8), 4)


@pytest.mark.parametrize("selection", ["topk", "threshold"])
def test_ratios_are_allocated_per_layer_too(selection):
    model = llama()
    report = sparsify_(
        model, {"method": "act_magnitude", "sparsity": 0.5, "selection": selection, "allocation": "calibrated"}, WINDOWS
    )
    ratios = {name: float(p) for name, p in report.allocation["per_layer"].items()}
    assert len(set(ratios.values())) > 1
    assert kept_over(model, report.allocation["per_layer"], weight_size) == Fraction(1, 2)
    if selection == "threshold":  # each layer's threshold calibrated to its own ratio
        for name, ratio in ratios.items():
            assert model.get_submodule(name).pattern.target() == ratio
    else:
        report.reset()
        with torch.no_grad():
            model(torch.randint(0, 256, (2, 16)))
        kept_inputs = kept_over(model, report.allocation["per_layer"], lambda layer: layer.in_features)
        assert report.summary()["measured"] == pytest.approx(1 - float(kept_inputs), abs=0.01)  # kept counts round


def test_allocated_rows_are_labelled_apart_from_uniform_ones_with_the_kept_fraction_of_weights():
    result = {
        "status": "ok",
        "sparsity": {"kind": "activation", "pattern": "8:16", "kept_by_weight": 0.549},
        "metrics": {},
        "config": {"pruning": {"method": "act_magnitude", "sparsity": "8:16", "allocation": "calibrated"}},
    }
    assert table.row(result)["sparsity"] == "8:16 mean (w 0.549)"
    assert table.zeroed_fraction("8:16 mean (w 0.549)") == 0.5
    assert "8:16 mean (w 0.549)" in table.table([("job", result)])
    older = {**result, "sparsity": {"kind": "activation", "pattern": "8:16"}}  # recorded before kept_by_weight
    assert table.row(older)["sparsity"] == "8:16 mean"
    uniform = {**result, "config": {"pruning": {"method": "act_magnitude", "sparsity": "8:16"}}}
    assert table.row(uniform)["sparsity"] == "8:16"


@pytest.mark.parametrize(
    "config,words",
    [
        ({"allocation": "greedy"}, "pruning.allocation='greedy': allowed values are \\['uniform', 'calibrated'\\]"),
        ({"allocation": "calibrated", "sparsity": 0.0}, "a sparsity of 0: there is nothing to allocate"),
        ({"allocation": "calibrated", "sparsity": 0.5, "allocation_choices": [0.2, 0.4]}, "include the target's 0.5"),
        ({"allocation": "calibrated", "allocation_choices": [4, 6]}, "include the target's N=8"),
        ({"allocation": "calibrated", "allocation_choices": [8, 16]}, "integers 1 <= N < 16"),
        (
            {"allocation": "calibrated", "allocation_budget": "flops"},
            "pruning.allocation_budget='flops': allowed values are \\['weights', 'inputs'\\]",
        ),
        # each decimal of a ratio makes the knapsack ten times larger
        ({"allocation": "calibrated", "sparsity": 0.3333}, "pruning.sparsity=0.3333 .* at most 2 decimals"),
        (
            {"allocation": "calibrated", "sparsity": 0.5, "allocation_choices": [0.333, 0.5, 0.667]},
            "pruning.allocation_choices=.* at most 2 decimals",
        ),
        (
            {"allocation": "calibrated", "method": "weight_magnitude", "sparsity": "2:4"},
            "pruning.allocation=calibrated with pruning.method=weight_magnitude: .*\\['act_magnitude'\\].* uniform",
        ),
    ],
)
def test_bad_allocation_settings_name_the_key_before_loading(config, words):
    with torch.device("meta"):  # a skeleton, as a job checks before loading any weight
        skeleton = llama()
    with pytest.raises(ValueError, match=words):
        plan(skeleton, {"method": "act_magnitude", "sparsity": "8:16", **config})


def test_a_sweep_may_cross_the_dense_model_with_allocation():
    assert plan(llama(), {"method": "dense", "sparsity": 0.0, "allocation": "calibrated"}).targets == []
    with pytest.raises(ValueError, match="pruning.allocation_budget='flops'"):  # checked where it applies
        plan(
            llama(),
            {"method": "act_magnitude", "sparsity": "2:4", "allocation": "calibrated", "allocation_budget": "flops"},
        )
