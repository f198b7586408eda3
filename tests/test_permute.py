"""`permute`: a reordering of the input channels that balances the groups of N:M, exact as a change of basis."""

import copy
from unittest import mock

import pytest
import torch
from torch import nn

from actprune import plan, sparsify_
from actprune.activation.recipe import wrapper_options
from actprune.activation.transforms import Basis, balanced_order, parse_transforms
from actprune.masks import Pattern, parse_sparsity

from .helpers import random_windows
from .tiny import llama, qwen2

COMPOSED = [
    ["permute"],
    [{"name": "permute", "by": "l2", "rule": "greedy"}],
    ["scaling", "permute", {"name": "shift", "mode": "static"}, "variance"],
    ["permute", "scaling"],
    ["hadamard", "permute"],
    ["pca", {"name": "permute", "rule": "greedy"}],
]


@pytest.mark.parametrize("transforms", COMPOSED)
def test_nothing_pruned_the_permuted_model_gives_the_dense_output(transforms):
    model = qwen2()  # q/k/v biases
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        dense = model(ids).logits
    config = {"method": "act_magnitude", "sparsity": "8:16", "score": "weight_norm", "transforms": transforms}
    report = sparsify_(model, config, random_windows())
    moved = [w for w in report.layers.values() if w.input_order is not None or w.rotation is not None]
    assert len(moved) == len(report.layers)  # every layer got a change of basis...
    for layer in report.layers.values():
        layer.set_pattern(Pattern(ratio=0.0))  # ...and prunes nothing now
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rule", ["snake", "greedy"])
def test_the_order_is_a_permutation_that_keeps_exactly_n_per_group(rule):
    model = llama()
    config = {"method": "act_magnitude", "sparsity": "2:4", "transforms": [{"name": "permute", "rule": rule}]}
    report = sparsify_(model, config, random_windows())
    layer = report.layers["model.layers.0.mlp.down_proj"]
    order = layer.input_order
    assert torch.equal(order.sort().values, torch.arange(layer.in_features))  # each channel once
    assert not torch.equal(order, torch.arange(layer.in_features))
    seen, inputs = [], []
    linear = torch.nn.functional.linear

    def spy(x, weight, bias=None):
        if weight is layer.linear.weight:
            seen.append(x)
        return linear(x, weight, bias)

    layer.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    with mock.patch("actprune.activation.wrapper.F.linear", spy), torch.no_grad():
        model(torch.randint(0, 256, (2, 7)))
    pruned, x = seen[0], inputs[0][..., order]
    assert ((pruned != 0).unflatten(-1, (-1, 4)).sum(-1) == 2).all()
    # the two largest of every group of the permuted input are kept, as they are
    keep = x.abs().unflatten(-1, (-1, 4)).argsort(-1, descending=True).argsort(-1).flatten(-2) < 2
    torch.testing.assert_close(pruned, x * keep)


def test_two_heavy_channels_of_one_group_are_split():
    importance = torch.tensor([9.0, 8.0, 1.0, 1.0, 0.5, 0.5, 0.2, 0.1])  # both heavy ones in group 0 of 4
    for rule in ("snake", "greedy"):
        order = balanced_order(importance, 4, rule)
        groups = importance[order].unflatten(0, (2, 4))
        assert sorted(groups.max(1).values.tolist()) == [8.0, 9.0], rule


def test_snake_deals_forth_then_back_and_greedy_evens_the_sums():
    importance = torch.tensor([6.0, 5.0, 4.0, 3.0, 2.0, 1.0])
    snake = importance[balanced_order(importance, 3, "snake")].unflatten(0, (2, 3))
    # ranks 0, 1 to groups 0, 1; ranks 2, 3 to groups 1, 0; ranks 4, 5 to groups 0, 1
    assert snake.tolist() == [[6.0, 3.0, 2.0], [5.0, 4.0, 1.0]]
    importance = torch.tensor([5.0, 4.0, 3.0, 3.0, 2.0, 1.0])
    greedy = importance[balanced_order(importance, 3, "greedy")].unflatten(0, (2, 3))
    assert greedy.sum(1).tolist() == [9.0, 9.0]  # snake gives 10 and 8


def test_the_layer_balances_what_the_score_ranks_unless_told_by_l2():
    linear = nn.Linear(8, 4)
    with torch.no_grad():
        linear.weight[:, 5:7] *= 1000  # channels 5 and 6 (group 1) feed large weights: weight_norm ranks them first
    stats = {
        "l2": torch.tensor([9.0, 8.0, 1.0, 1.0, 0.5, 0.4, 0.3, 0.2])
    }  # ranks 5 and 6 by l2: snake keeps them together
    groups = {}
    for score, by in (("magnitude", "score"), ("weight_norm", "score"), ("weight_norm", "l2")):
        transforms = parse_transforms([{"name": "permute", "by": by}])
        order = wrapper_options(linear, score, transforms, stats, parse_sparsity("2:4"))["input_order"]
        groups[score, by] = [int(order.tolist().index(channel)) // 4 for channel in (0, 1, 5, 6)]
    assert groups["magnitude", "score"][:2] in ([0, 1], [1, 0])  # the two largest inputs apart
    assert groups["weight_norm", "score"][2] != groups["weight_norm", "score"][3]  # the two largest scores apart
    assert groups["weight_norm", "l2"][2] == groups["weight_norm", "l2"][3]


def test_a_permutation_composes_with_scales_and_rotations_exactly():
    torch.manual_seed(0)
    width = 8
    a, b, v, w = torch.rand(width) + 0.5, torch.rand(width) + 0.5, torch.randn(3, width), torch.randn(5, width)
    p, p2 = torch.randperm(width), torch.randperm(width)
    q = torch.linalg.qr(torch.randn(width, width))[0]
    basis, expected = Basis(), v
    for step, apply in (
        (lambda: basis.then_scale(a), lambda x: x * a),
        (lambda: basis.then_permute(p), lambda x: x[..., p]),
        (lambda: basis.then_scale(b), lambda x: x * b),
        (lambda: basis.then_rotate(q), lambda x: x @ q),
        (lambda: basis.then_permute(p2), lambda x: x[..., p2]),
    ):
        step()
        expected = apply(expected)
        torch.testing.assert_close(basis.row(v), expected)
        torch.testing.assert_close(basis.row(v) @ basis.weight(w).T, v @ w.T)  # the layer's output is kept
        torch.testing.assert_close(basis.second_moment(v.T @ v), expected.T @ expected)


def test_by_l2_gives_q_k_v_one_order_which_folds_into_the_input_they_share():
    orders = {}
    for by in ("l2", "score"):
        config = {
            "method": "act_magnitude",
            "sparsity": "8:16",
            "score": "weight_norm",
            "transforms": [{"name": "permute", "by": by}],
        }
        report = sparsify_(llama(), config, random_windows())
        orders[by] = [report.layers[f"model.layers.0.self_attn.{n}_proj"].input_order for n in "qkv"]
    assert all(torch.equal(order, orders["l2"][0]) for order in orders["l2"])
    assert not all(torch.equal(order, orders["score"][0]) for order in orders["score"])


@pytest.mark.parametrize(
    "config, words",
    [
        ({"transforms": [{"name": "permute", "by": "absmax"}]}, "permute by='absmax': allowed values are score, l2"),
        (
            {"transforms": [{"name": "permute", "rule": "sort"}]},
            "permute rule='sort': allowed values are snake, greedy",
        ),
        (
            {"transforms": [{"name": "permute", "group": 8}]},
            "permute has no option \\['group'\\]: allowed \\['by', 'rule'\\]",
        ),
        (
            {"transforms": ["permute", "variance", "hadamard"]},
            "permute before hadamard.*allowed: permute after hadamard/pca",
        ),
        ({"transforms": ["scaling", "permute", "pca"]}, "permute before pca"),
        ({"sparsity": 0.5, "transforms": ["permute"]}, "=\\['permute'\\] with pruning.sparsity=0.5"),
        ({"sparsity": 0.0, "transforms": ["permute"]}, "allowed: an N:M sparsity"),
        ({"sparsity": 0.5, "selection": "threshold", "transforms": ["permute"]}, "a whole-token top-k or threshold"),
    ],
)
def test_what_makes_no_sense_is_refused_naming_the_key_and_the_allowed_values(config, words):
    with pytest.raises(ValueError, match=f"pruning.transforms.*{words}"):
        plan(llama(), {"method": "act_magnitude", "sparsity": "8:16", **config})


def test_permute_after_a_rotation_or_with_a_dense_reference_is_planned():
    assert parse_transforms(["hadamard", "permute"]).names == ["hadamard", "permute"]
    assert plan(llama(), {"method": "dense", "transforms": ["permute"]}).targets == []  # a sweep's dense row
    assert plan(copy.deepcopy(llama()), {"method": "act_magnitude", "sparsity": "2:4", "transforms": ["permute"]})
