"""Sparsity allocation: a model-wide target reached with a sparsity chosen per projection.

`pruning.allocation=calibrated` measures, on calibration tokens of the dense model, each pruned
layer's relative output error ‖y_c − y‖² / ‖y‖² for every choice c in `pruning.allocation_choices`:
the N of an N:M pattern (same M), or the ratio of a per-token (or thresholded) sparsity. It then
picks one choice per layer minimising the summed error such that the kept fraction by weight size,
Σ in · out · kept(c) / Σ in · out, equals the target's exactly (what decode reads and prefill
computes scale with in · out); `pruning.allocation_budget=inputs` weighs by input width alone instead
(the kept fraction of inputs, as `measured` counts it). A knapsack, solved by dynamic programming
over the layers' sizes. For ratios this is TEAL's idea (sparsity where it costs least) solved exactly
per projection rather than greedily per block. Sensitive layers keep more, robust ones less.
Layers given an N other than the target's run on the N:M decode kernel, not on fixed-pattern (2:4)
hardware.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import torch
from torch import nn

from ..masks import Pattern
from ..walk import feed
from .wrapper import computing_dense

ALLOCATIONS = ("uniform", "calibrated")
BUDGETS = ("weights", "inputs")  # what the kept fraction is counted over: in · out, or in
DECIMALS = 2  # ratios allocated: the knapsack grows tenfold per decimal


def default_choices(pattern: Pattern) -> list:
    """N:M: N from M/4 to 3M/4 in steps of M/8 (8:16: 4, 6, 8, 10, 12); a ratio r: r - 0.2 .. r + 0.2 in
    steps of 0.1 within (0, 1). The target's own value always among them."""
    if pattern.is_nm:
        m = pattern.m
        return sorted({max(1, min(m - 1, round(m * k / 8))) for k in range(2, 7)} | {pattern.n})
    return sorted({round(pattern.ratio + step / 10, 4) for step in range(-2, 3) if 0 < pattern.ratio + step / 10 < 1})


def check(allocation: str, choices: list | None, pattern: Pattern, budget: str = "weights") -> list | None:
    """The choices to pick from, checked; None for a uniform pattern."""
    if allocation not in ALLOCATIONS:
        raise ValueError(f"pruning.allocation={allocation!r}: allowed values are {list(ALLOCATIONS)}")
    if budget not in BUDGETS:
        raise ValueError(f"pruning.allocation_budget={budget!r}: allowed values are {list(BUDGETS)}")
    if allocation == "uniform":
        return None
    if pattern.is_dense():
        raise ValueError("pruning.allocation=calibrated with a sparsity of 0: there is nothing to allocate")
    choices = sorted(set(choices)) if choices else default_choices(pattern)
    if pattern.is_nm:
        if pattern.n not in choices or not all(float(n).is_integer() and 1 <= n < pattern.m for n in choices):
            raise ValueError(
                f"pruning.allocation_choices={choices}: allowed values are integers 1 <= N < {pattern.m} "
                f"that include the target's N={pattern.n}"
            )
        return [int(n) for n in choices]
    if round(pattern.ratio, DECIMALS) != pattern.ratio:
        raise ValueError(
            f"pruning.sparsity={pattern.ratio} with pruning.allocation=calibrated: allowed values are "
            f"ratios with at most {DECIMALS} decimals (e.g. {round(pattern.ratio, DECIMALS)})"
        )
    if pattern.ratio not in choices or not all(0 <= r < 1 and round(r, DECIMALS) == r for r in choices):
        raise ValueError(
            f"pruning.allocation_choices={choices}: allowed values are ratios in [0, 1) with at most "
            f"{DECIMALS} decimals that include the target's {pattern.ratio}"
        )
    return [float(r) for r in choices]


def with_choice(pattern: Pattern, choice) -> Pattern:
    return Pattern(n=int(choice), m=pattern.m) if pattern.is_nm else Pattern(ratio=float(choice))


def kept(pattern: Pattern, choice) -> Fraction:
    """The fraction of a layer's inputs a choice keeps, exactly."""
    if pattern.is_nm:
        return Fraction(int(choice), pattern.m)
    return 1 - Fraction(str(choice))


def layer_size(layer: nn.Module, budget: str) -> int:
    """What a layer weighs in the budget: its weight's entries, or its input width."""
    return layer.in_features * layer.out_features if budget == "weights" else layer.in_features


def kept_by_weight(layers: list[nn.Module]) -> float | None:
    """The fraction of the layers' weight entries the masks kept over the inputs counted: each layer's
    kept share of its inputs (thresholds and dense tokens as they fell), weighed by in · out; None
    before every layer has counted some."""
    if not all(int(layer.seen) for layer in layers):
        return None
    sizes = [layer_size(layer, "weights") for layer in layers]
    kept = sum(s * (1 - int(layer.zeroed) / int(layer.seen)) for s, layer in zip(sizes, layers))
    return kept / sum(sizes)


@torch.no_grad()
def layer_errors(
    model: nn.Module,
    wrappers: dict[str, nn.Module],
    windows: torch.Tensor,
    choices: list,
    tokens: int = 512,
    seed: int = 0,
) -> dict[str, dict]:
    """Per wrapper and choice, the relative output error on `tokens` calibration tokens of the dense
    model (sampled, seeded, past each window's first 4 tokens)."""
    generator = torch.Generator().manual_seed(seed)
    inputs = {name: [] for name in wrappers}
    per_window = max(1, math.ceil(tokens / len(windows)))

    def keep_some(name):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1])[4:]
            index = torch.randperm(x.shape[0], generator=generator)[:per_window].to(x.device)
            inputs[name].append(x[index])

        return hook

    handles = [w.register_forward_pre_hook(keep_some(name)) for name, w in wrappers.items()]
    try:
        with computing_dense(wrappers.values()):
            feed(model, windows)
    finally:
        for handle in handles:
            handle.remove()
    errors = {}
    for name, wrapper in wrappers.items():
        x = torch.cat(inputs[name])[:tokens][None]  # one row of tokens: per-token masks at mask_scope=step too
        with computing_dense([wrapper]):
            dense = wrapper(x).double()
        uniform, errors[name], dense_tokens = wrapper.pattern, {}, wrapper.dense_tokens
        wrapper.dense_tokens = 0  # sampled tokens, not a sequence: none is a first token
        for choice in choices:
            wrapper.set_pattern(with_choice(uniform, choice))
            errors[name][choice] = float(
                (wrapper(x).double() - dense).pow(2).sum() / dense.pow(2).sum().clamp_min(1e-30)
            )
        wrapper.set_pattern(uniform)
        wrapper.dense_tokens = dense_tokens
        wrapper.reset_counts()
    return errors


def allocate(errors: dict[str, dict], weights: dict[str, int], kept_of, target) -> dict:
    """One choice per layer minimising the summed error with Σ weight · kept(choice) equal to
    Σ weight · kept(target); `kept_of` gives a choice's kept fraction as a Fraction."""
    names = list(errors)
    for name in names:
        broken = [choice for choice, error in errors[name].items() if not math.isfinite(error)]
        if broken:  # a NaN never compares smaller: the knapsack would silently miss its budget
            raise FloatingPointError(
                f"pruning.allocation=calibrated: layer {name} has a non-finite output error "
                f"{errors[name][broken[0]]} for choice {broken[0]} (NaN or inf in the model?)"
            )
    fractions = {choice: kept_of(choice) for name in names for choice in errors[name]} | {target: kept_of(target)}
    scale = math.lcm(*(f.denominator for f in fractions.values()))
    unit = math.gcd(*weights.values())
    sizes = [weights[name] // unit for name in names]
    units = {choice: int(f * scale) for choice, f in fractions.items()}
    budget = sum(sizes) * units[target]
    cost = np.full(budget + 1, np.inf)
    cost[0] = 0.0
    picks = []
    for name, size in zip(names, sizes):
        best, pick = np.full(budget + 1, np.inf), np.full(budget + 1, -1, dtype=np.int16)
        options = list(errors[name].items())
        for index, (choice, error) in enumerate(options):
            shift = size * units[choice]
            candidate = np.full(budget + 1, np.inf)
            candidate[shift:] = cost[: budget + 1 - shift] + error
            better = candidate < best
            best[better], pick[better] = candidate[better], index
        cost = best
        picks.append((pick, options))
    chosen, left = {}, budget
    for name, size, (pick, options) in zip(reversed(names), reversed(sizes), reversed(picks)):
        chosen[name] = options[pick[left]][0]
        left -= size * units[chosen[name]]
    return {name: chosen[name] for name in names}


def allocate_(
    model: nn.Module, wrappers: dict[str, nn.Module], windows: torch.Tensor, choices: list, budget: str
) -> dict:
    """Give each wrapper its sparsity; what was chosen, and the errors it was chosen from."""
    uniform = next(iter(wrappers.values())).pattern
    errors = layer_errors(model, wrappers, windows, choices)
    target = uniform.n if uniform.is_nm else uniform.ratio
    weights = {name: layer_size(w, budget) for name, w in wrappers.items()}
    chosen = allocate(errors, weights, lambda c: kept(uniform, c), target)
    for name, choice in chosen.items():
        wrappers[name].set_pattern(with_choice(uniform, choice))
    return {
        "kind": "calibrated",
        "choices": choices,
        "budget": budget,
        # False: some layers have another N than the target's, which fixed-pattern (2:4) hardware cannot run
        "every_layer_target": all(choice == target for choice in chosen.values()),
        "per_layer": {name: str(with_choice(uniform, choice)) for name, choice in chosen.items()},
        "errors": {name: {str(c): e for c, e in errs.items()} for name, errs in errors.items()},
    }
