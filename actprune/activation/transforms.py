"""Input transforms of activation pruning: small registered pieces.

Basis transforms (`scaling`, `permute`, `hadamard`, `pca`, and one's own by default) run in the
order listed and change the basis the mask is taken in, `x' = x R`, and the layer absorbs the
inverse once, offline, `W' = W R⁻ᵀ`, so that `x' W'ᵀ = x Wᵀ`. The others have a fixed place after
them and run once, whatever their position in the list: `shift` and `variance` act where the mask
is taken; `refit` fits, in closed form, the weights that map the pruned input back to the dense
output (actprune.activation.refit); `learnable` adds a trained correction in that final basis
(actprune.activation.learned). A list names them in the order they run, each once.
Statistics come from calibration (never from the evaluated batch), so every token is pruned on
its own.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..registry import Registry
from .learned import options_of as learnable_options
from .refit import options_of as refit_options


@dataclass(frozen=True)
class Piece:
    name: str
    needs: frozenset  # calibration statistics it reads: mean, l2, absmax, second_moment
    build: Callable[..., Any]
    place: int = 0  # 0: runs where it is listed; above: a fixed place after those, in this order, once


TRANSFORMS = Registry("pruning.transforms")
BASIS_TRANSFORMS = ("scaling", "permute", "hadamard", "pca")
ROTATIONS = ("hadamard", "pca")


def register_transform(name: str, needs: tuple = (), place: int = 0):
    def add(build):
        TRANSFORMS.add(name, Piece(name, frozenset(needs), build, place))
        return build

    return add


class Basis:
    """`x' = x R`: while no rotation was composed, a gather and a per-channel scale,
    `x' = x[..., order] * scale` (each None where not used); after one, a matrix."""

    def __init__(self):
        self.order = None  # x' = x[..., order] * scale: a permutation of the channels
        self.scale = None
        self.matrix = None  # x' = x @ matrix
        self.inverse_t = None  # R⁻ᵀ, so that W' = W @ R⁻ᵀ

    @property
    def changed(self) -> bool:
        return self.order is not None or self.scale is not None or self.matrix is not None

    def then_scale(self, a: torch.Tensor) -> None:
        if self.matrix is None:
            self.scale = a if self.scale is None else self.scale * a
        else:
            self.matrix, self.inverse_t = self.matrix * a, self.inverse_t / a

    def then_permute(self, order: torch.Tensor) -> None:
        """`x' = x[..., order]`: exact and orthogonal (`R⁻ᵀ = R`), a gather rather than a matmul."""
        if self.matrix is not None:
            self.matrix, self.inverse_t = self.matrix[:, order], self.inverse_t[:, order]
            return
        self.scale = None if self.scale is None else self.scale[order]
        self.order = order if self.order is None else self.order[order]

    def then_rotate(self, q: torch.Tensor) -> None:
        if self.matrix is None:
            d = torch.ones(q.shape[0], dtype=q.dtype) if self.scale is None else self.scale
            rows = slice(None) if self.order is None else self.order  # R = P diag(d) q: row order[j] is d_j q_j
            self.matrix, self.inverse_t = torch.zeros_like(q), torch.zeros_like(q)
            self.matrix[rows], self.inverse_t[rows] = d[:, None] * q, (1 / d)[:, None] * q
            self.order = self.scale = None
        else:
            self.matrix, self.inverse_t = self.matrix @ q, self.inverse_t @ q

    def row(self, v: torch.Tensor) -> torch.Tensor:
        """A vector in input space (e.g. a mean) in the new basis."""
        if self.matrix is not None:
            return v @ self.matrix
        v = v if self.order is None else v[..., self.order]
        return v if self.scale is None else v * self.scale

    def weight(self, w: torch.Tensor) -> torch.Tensor:
        if self.matrix is not None:
            return w @ self.inverse_t
        w = w if self.order is None else w[:, self.order]
        return w if self.scale is None else w / self.scale

    def second_moment(self, m: torch.Tensor) -> torch.Tensor:
        if self.matrix is not None:
            return self.matrix.T @ m @ self.matrix
        m = m if self.order is None else m[self.order][:, self.order]
        return m if self.scale is None else self.scale[:, None] * m * self.scale[None, :]

    def column_l2(self, stats: dict) -> torch.Tensor:
        if self.matrix is None:
            return self.row(stats["l2"]).abs()
        return self.second_moment(stats["second_moment"]).diagonal().clamp_min(0).sqrt()


@register_transform("scaling", needs=("absmax",))
def scaling_transform(basis: Basis, weight: torch.Tensor, stats: dict, alpha: float = 0.5) -> None:
    """SmoothQuant-like: x' = x / s, W' = W s, s_j = max|X_j|^α / max|W_:,j|^(1−α); only which
    entries are kept changes."""
    if basis.matrix is not None:
        raise ValueError("pruning.transforms: put scaling before hadamard/pca (its statistics are per input channel)")
    if not 0 <= alpha <= 1:
        raise ValueError(f"pruning.transforms: scaling alpha={alpha}: allowed values are in [0, 1]")
    x_max = basis.row(stats["absmax"]).abs().clamp_min(1e-5)
    w_max = basis.weight(weight).abs().amax(0).clamp_min(1e-5)
    basis.then_scale(1 / (x_max.pow(alpha) / w_max.pow(1 - alpha)))


def hadamard(width: int) -> torch.Tensor:
    """An orthogonal block-diagonal Hadamard matrix: blocks of the largest power of two dividing `width`."""
    block = width & -width
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < block:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return torch.block_diag(*[h / math.sqrt(block)] * (width // block))


@register_transform("hadamard")
def hadamard_transform(basis: Basis, weight: torch.Tensor, stats: dict | None) -> None:
    basis.then_rotate(hadamard(weight.shape[1]))


@register_transform("pca", needs=("second_moment",))
def pca_transform(basis: Basis, weight: torch.Tensor, stats: dict) -> None:
    """LaRoSa-like: rotate into the eigenbasis of the calibration inputs' second moment."""
    _, vectors = torch.linalg.eigh(basis.second_moment(stats["second_moment"]).double())
    basis.then_rotate(vectors.flip(-1))  # largest eigenvalue first


PERMUTE_RULES = ("snake", "greedy")
PERMUTE_BY = ("score", "l2")


@register_transform("permute", needs=("l2",))
def permute_transform(
    basis: Basis, weight: torch.Tensor, stats: dict, *, group: int, score, by: str = "score", rule: str = "snake"
) -> None:
    """Reorder the channels so that every group of `group` (the M of N:M) holds a balanced share of
    the important ones: a group of many large entries must drop some of them for every token.
    Importance: the calibration ‖X_j‖₂ in the current basis, times the score's channel weight
    (`by: score`, what the mask ranks on average) or alone (`by: l2`). `rule`: `snake` deals the
    channels, sorted, to the groups in snake order; `greedy` gives each, in that order, to the group
    of least summed importance that has room."""
    importance = basis.column_l2(stats)
    if by == "score":
        channel_weight = score.build(basis.weight(weight), basis, stats)
        importance = importance if channel_weight is None else importance * channel_weight
    basis.then_permute(balanced_order(importance, group, rule))


def balanced_order(importance: torch.Tensor, group: int, rule: str) -> torch.Tensor:
    """`order` such that `x[..., order]` has its channels dealt to groups of `group` by `rule`."""
    ranked = importance.argsort(descending=True, stable=True)
    groups = importance.numel() // group
    if rule == "snake":  # round r deals one channel to each group, forth then back: position r in it
        rank = torch.arange(importance.numel())
        rounds, index = rank // groups, rank % groups
        target = torch.where(rounds % 2 == 0, index, groups - 1 - index)
        order = torch.empty_like(ranked)
        order[target * group + rounds] = ranked
        return order
    values = importance.tolist()
    loads = [(0.0, g) for g in range(groups)]  # a heap of (summed importance, group) with room left
    members = [[] for _ in range(groups)]
    for channel in ranked.tolist():
        load, g = heapq.heappop(loads)
        members[g].append(channel)
        if len(members[g]) < group:
            heapq.heappush(loads, (load + values[channel], g))
    return torch.tensor([channel for chosen in members for channel in chosen])


@register_transform("shift", place=1)
def shift_transform(basis: Basis, weight: torch.Tensor, stats: dict | None, mode: str = "median") -> dict:
    """Prune x − η and add η back through the layer; η per token (median, mean) or static: the
    calibration mean, taken in the final basis whatever transforms follow (see recipe)."""
    return {"shift": mode}


@register_transform("variance", place=2)
def variance_transform(basis: Basis, weight: torch.Tensor, stats: dict | None) -> dict:
    return {"variance": True}


@register_transform("refit", place=3)
def refit_transform(basis: Basis, weight: torch.Tensor, stats: dict | None, **options) -> dict:
    """Closed-form weights for the pruned input (actprune.activation.refit), fitted by the activation method."""
    return {"refit": options}


@register_transform("learnable", place=4)
def learnable_transform(basis: Basis, weight: torch.Tensor, stats: dict | None, **options) -> dict:
    """Learned corrections (actprune.activation.learned), built on the layer's final weight, trained by the activation method."""
    return {"learn": options}


class Transforms(tuple):
    """`pruning.transforms` parsed once: `(name, options)` pairs in their order, every option checked;
    `refit` and `learnable` carry all their options, defaults filled in (None where not listed)."""

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self]

    @property
    def refit(self) -> dict | None:
        return next((options for name, options in self if name == "refit"), None)

    @property
    def learnable(self) -> dict | None:
        return next((options for name, options in self if name == "learnable"), None)


def parse_transforms(transforms) -> Transforms:
    """`[shift, {name: shift, mode: static}, variance]` → Transforms([(name, options), ...]), checked."""
    parsed = []
    for item in transforms or []:
        name, options = (
            (item, {}) if isinstance(item, str) else (item.get("name"), {k: v for k, v in item.items() if k != "name"})
        )
        TRANSFORMS[name]  # an unknown name fails here, naming those there are
        if name == "shift" and options.get("mode", "median") not in ("median", "mean", "static"):
            raise ValueError(
                f"pruning.transforms: shift mode={options['mode']!r}: allowed values are median, mean, static"
            )
        if name in FITTED:
            parsed.append((name, FITTED[name](options)))
            continue
        for key, allowed in (("by", PERMUTE_BY), ("rule", PERMUTE_RULES)) if name == "permute" else ():
            if key in options and options[key] not in allowed:
                raise ValueError(
                    f"pruning.transforms: permute {key}={options[key]!r}: allowed values are {', '.join(allowed)}"
                )
        allowed = {"shift": {"mode"}, "scaling": {"alpha"}, "permute": {"by", "rule"}}.get(name, set())
        if set(options) - allowed:
            raise ValueError(
                f"pruning.transforms: {name} has no option {sorted(set(options) - allowed)}: allowed {sorted(allowed)}"
            )
        parsed.append((name, dict(options)))
    names = [name for name, _ in parsed]
    rotated = [name for name in names[names.index("permute") :] if name in ROTATIONS] if "permute" in names else []
    if rotated:
        raise ValueError(
            f"pruning.transforms={names}: permute before {rotated[0]}, which mixes the channels again and undoes "
            f"the balance; allowed: permute after {'/'.join(ROTATIONS)} (it balances the rotated channels)"
        )
    check_places(names)
    return Transforms(parsed)


def check_places(names: list[str]) -> None:
    """Refuse a list that does not say what runs: a step of fixed place listed twice (it runs once)
    or out of the order the steps run in (the same model as that order, under another label)."""
    fixed = sorted((piece.place, piece.name) for piece in TRANSFORMS.values() if piece.place)
    repeated = next((name for _, name in fixed if names.count(name) > 1), None)
    if repeated:
        raise ValueError(
            f"pruning.transforms={names}: {repeated} is listed {names.count(repeated)} times but runs once; "
            f"allowed: each of {', '.join(name for _, name in fixed)} at most once"
        )
    runs = sorted(names, key=lambda name: TRANSFORMS[name].place)  # stable: the basis transforms as listed
    if runs != names:
        raise ValueError(
            f"pruning.transforms={names}: runs as {runs} whatever the order listed (the basis transforms as "
            f"listed, then {', '.join(name for _, name in fixed)}); allowed: that order, {runs}"
        )


# The transforms fitted after wrapping, and the function that checks their options and fills in the defaults.
FITTED = {"refit": refit_options, "learnable": learnable_options}
