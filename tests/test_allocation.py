"""`pruning.allocation=calibrated`: N chosen per projection, the model-wide kept fraction the target's."""

import pytest
import torch

from actprune import sparsify_
from actprune.activation import ActSparseLinear
from fractions import Fraction

from actprune.activation.allocation import allocate, default_choices
from actprune.masks import parse_sparsity
from actprune.run import table

from .tiny import llama

WINDOWS = torch.randint(0, 256, (4, 40), generator=torch.Generator().manual_seed(2))


def test_the_knapsack_gives_more_to_sensitive_layers_and_keeps_the_budget():
    errors = {"a": {2: 9.0, 4: 1.0, 6: 0.5}, "b": {2: 0.2, 4: 0.1, 6: 0.05}, "c": {2: 5.0, 4: 2.0, 6: 0.1}}
    widths = {"a": 64, "b": 64, "c": 128}
    chosen = allocate(errors, widths, lambda n: Fraction(n, 8), 4)
    assert sum(widths[n] * chosen[n] for n in chosen) == sum(widths.values()) * 4
    brute = min(((x, y, z) for x in (2, 4, 6) for y in (2, 4, 6) for z in (2, 4, 6)
                 if 64 * x + 64 * y + 128 * z == 256 * 4),
                key=lambda c: errors["a"][c[0]] + errors["b"][c[1]] + errors["c"][c[2]])
    assert (chosen["a"], chosen["b"], chosen["c"]) == brute


def test_default_choices_span_a_quarter_to_three_quarters_of_m():
    assert default_choices(parse_sparsity("8:16")) == [4, 6, 8, 10, 12]
    assert default_choices(parse_sparsity("2:4")) == [1, 2, 3]
    assert default_choices(parse_sparsity(0.5)) == [0.3, 0.4, 0.5, 0.6, 0.7]
    assert default_choices(parse_sparsity(0.9)) == [0.7, 0.8, 0.9]


def test_a_calibrated_allocation_reaches_the_targets_sparsity_with_unequal_layers():
    model = llama()
    report = sparsify_(model, {"method": "act_magnitude", "sparsity": "8:16", "allocation": "calibrated"}, WINDOWS)
    per_layer = report.allocation["per_layer"]
    assert len(per_layer) == 14 and len(set(per_layer.values())) > 1
    for name, pattern in per_layer.items():
        assert str(model.get_submodule(name).pattern) == pattern
    report.reset()
    with torch.no_grad():
        model(torch.randint(0, 256, (2, 16)))
    assert report.summary()["measured"] == pytest.approx(0.5)  # the inputs are weighted by width, as measured
    assert report.summary()["allocation"]["per_layer"] == per_layer
    assert all(int(m.seen) > 0 for m in model.modules() if isinstance(m, ActSparseLinear))


@pytest.mark.parametrize("selection", ["topk", "threshold"])
def test_ratios_are_allocated_per_layer_too(selection):
    model = llama()
    report = sparsify_(model, {"method": "act_magnitude", "sparsity": 0.5, "selection": selection,
                               "allocation": "calibrated"}, WINDOWS)
    ratios = {name: float(p) for name, p in report.allocation["per_layer"].items()}
    widths = {name: model.get_submodule(name).in_features for name in ratios}
    assert len(set(ratios.values())) > 1
    assert sum(widths[n] * ratios[n] for n in ratios) == pytest.approx(0.5 * sum(widths.values()))
    if selection == "threshold":  # each layer's threshold calibrated to its own ratio
        for name, ratio in ratios.items():
            assert model.get_submodule(name).pattern.target() == ratio
    else:
        report.reset()
        with torch.no_grad():
            model(torch.randint(0, 256, (2, 16)))
        assert report.summary()["measured"] == pytest.approx(0.5, abs=0.01)  # rounding of kept counts per token


def test_allocated_rows_are_labelled_apart_from_uniform_ones():
    result = {"status": "ok", "sparsity": {"kind": "activation", "pattern": "8:16"}, "metrics": {},
              "config": {"pruning": {"method": "act_magnitude", "sparsity": "8:16", "allocation": "calibrated"}}}
    assert table.row(result)["sparsity"] == "8:16 mean"
    assert table.zeroed_fraction("8:16 mean") == 0.5
    assert "8:16 mean" in table.table([("job", result)])


@pytest.mark.parametrize("config,words", [
    ({"allocation": "greedy"}, "pruning.allocation='greedy': allowed values are \\['uniform', 'calibrated'\\]"),
    ({"allocation": "calibrated", "sparsity": 0.0}, "a sparsity of 0: there is nothing to allocate"),
    ({"allocation": "calibrated", "sparsity": 0.5, "allocation_choices": [0.2, 0.4]}, "include the target's 0.5"),
    ({"allocation": "calibrated", "allocation_choices": [4, 6]}, "include the target's N=8"),
    ({"allocation": "calibrated", "allocation_choices": [8, 16]}, "integers 1 <= N < 16"),
])
def test_bad_allocation_settings_name_the_key(config, words):
    with pytest.raises(ValueError, match=words):
        sparsify_(llama(), {"method": "act_magnitude", "sparsity": "8:16", **config}, WINDOWS)
