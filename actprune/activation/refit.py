"""`refit`: a closed-form, training-free correction of each pruned layer's weights.

Per wrapped layer, the W′ and b′ that best map the layer's pruned input p (masked and shifted as the
wrapper prunes it, in the final basis) back to the dense output: with t = W x (less what the wrapper
adds back itself, a shift's η through W; the bias b stays and an intercept c is added to it), a
ridge regression toward the dense weights,

    minimise Σ_tokens ‖t − (W′ p + c)‖² + λ ‖[W′ c] − [W 0]‖²,

solved from second moments of (p, t) accumulated in float64. Decoder layer by decoder layer, the
inputs are those of the model already refit before it (`stream: sequential`, as SparseGPT does) or
those of the dense model (`stream: dense`). (Fitting each layer to the dense *model's* outputs
instead, to make up for the error of the layers before it, was tried: SmolLM2 8:16 went from 75 to
3291 perplexity, so it is not offered.) The mask is left as it is: W′ only multiplies the
pruned input, so the sparsity (and the speed) are plain pruning's.

Robustness, because a regression on few tokens overfits: λ is chosen per layer from `ridge`
(multiples of the mean diagonal of Σ p pᵀ, the sum over the fit tokens: scale-free) on held-out
calibration windows, then the layer is fitted on all windows; a layer whose held-out error
refitting does not lower keeps W; each window's first `skip_tokens` tokens (the attention sinks,
whose activations are orders of magnitude larger) are left out of the moments; fewer than
`min_tokens_per_dim` calibration tokens per input dimension is refused before loading.

The held-out windows share no token with the fit windows (calibration windows never overlap), but
they are not independent of the fit in the sequential stream: they reach layer i through the
layers before it, whose final fit included them. Layer i's held-out error is that of its own fit.

Memory: a decoder layer's moments at a time, each projection's freed once it is fitted; a solve
adds a Cholesky factor, (D+1)², and two out × (D+1).
"""

from __future__ import annotations

import contextlib
import math

import torch

from ..walk import layer_by_layer
from .wrapper import computing_dense

DEFAULTS = {
    "ridge": [1e-3, 1e-2, 1e-1, 1.0],
    "intercept": True,
    "stream": "sequential",
    "skip_tokens": 4,
    "holdout": 0.25,
    "min_tokens_per_dim": 4,
}
STREAMS = ("sequential", "dense")
# The largest ridge, 1/float64's epsilon: above it λ = ridge × the mean diagonal of Σ p pᵀ swamps
# Σ p pᵀ in the float64 solve, which gives back W to within rounding (`inf` in all but name); below
# it, λ stays finite for any inputs finite in float32 (Σ p pᵀ <= tokens × 1.2e77).
MAX_RIDGE = 2.0**52
MIN_GAIN = 1e-3  # a refit must lower the held-out error by this fraction: not by rounding noise alone
EXACT = 1e-10  # plain pruning's error below this fraction of the targets' energy: exact already


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# Per option: whether a value is allowed, and the allowed values in words.
CHECKS = {
    "intercept": (lambda v: isinstance(v, bool), "true or false"),
    "stream": (lambda v: v in STREAMS, str(list(STREAMS))),
    "skip_tokens": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an integer >= 0"),
    "holdout": (lambda v: _number(v) and 0 < v < 1, "a number between 0 and 1, both excluded"),
    "min_tokens_per_dim": (lambda v: _number(v) and v >= 0, "a number >= 0"),
}


def options_of(options: dict) -> dict:
    """`refit`'s options with their defaults, checked; every bad value names the option."""
    unknown = set(options) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"pruning.transforms: refit has no option {sorted(unknown)}: allowed {sorted(DEFAULTS)}")
    merged = {**DEFAULTS, **options}
    ridge = merged["ridge"]
    merged["ridge"] = [ridge] if isinstance(ridge, (int, float, str)) else list(ridge)
    if not merged["ridge"] or not all(_number(r) and 0 < r <= MAX_RIDGE for r in merged["ridge"]):
        raise ValueError(
            f"pruning.transforms: refit ridge={ridge!r}: allowed values are a positive finite number up to "
            f"2**52 = {MAX_RIDGE:.3g} or a list of them (1/float64 epsilon: a larger λ = ridge × the mean diagonal "
            f"of Σ p pᵀ swamps Σ p pᵀ in the float64 solve, which gives back W to within rounding)"
        )
    for key, (allowed, words) in CHECKS.items():
        if not allowed(merged[key]):
            raise ValueError(f"pruning.transforms: refit {key}={merged[key]!r}: allowed values are {words}")
    return merged


def split(count: int, holdout: float, need: int = 1) -> tuple[list[int], list[int]]:
    """Calibration windows to fit on and to choose λ on (the last ones); where none is left to fit, the
    advice names what leaves `need` (the windows the fit's tokens need, `check_tokens`)."""
    held = max(1, round(count * holdout))
    if count - held < 1:
        lower = max((k / 100 for k in range(1, 100) if fitted(count, k / 100) >= need), default=None)
        raise ValueError(
            f"pruning.transforms: refit holdout={holdout} holds out {held} of calibration.windows={count}, "
            f"leaving none to fit: allowed: calibration.windows >= {windows_for(need, holdout)} with this holdout"
            + (
                f", or holdout <= {lower} with these {count} windows"
                if lower
                else f" (no holdout leaves {need} of {count} window{'s' * (count > 1)} to fit)"
            )
        )
    return list(range(count - held)), list(range(count - held, count))


def fitted(count: int, holdout: float) -> int:
    """How many of `count` calibration windows `split` fits on."""
    return count - max(1, round(count * holdout))


def windows_for(fit: int, holdout: float) -> int:
    """The fewest calibration windows of which `split` fits on `fit` (at least): from the bound
    count·(1 − holdout) >= fit − 1/2 that rounding allows, up."""
    count = max(fit + 1, math.floor((fit - 0.5) / (1 - holdout)))
    while fitted(count, holdout) < fit:
        count += 1
    return count


def tokens_per_window(options: dict, seqlen: int) -> int:
    """The tokens of each calibration window that the moments count; none left is refused."""
    tokens = seqlen - options["skip_tokens"]
    if tokens < 1:
        raise ValueError(
            f"pruning.transforms: refit skip_tokens={options['skip_tokens']} leaves no token of "
            f"calibration.seqlen={seqlen} to fit: allowed values are skip_tokens < calibration.seqlen"
        )
    return tokens


def check_tokens(options: dict, windows: int, seqlen: int, widths: list[int]) -> None:
    """Refuse a calibration too small for the widest layer: its regression would fit noise."""
    per_window = tokens_per_window(options, seqlen)
    needed = options["min_tokens_per_dim"] * (max(widths) + 1)
    fit, _ = split(windows, options["holdout"], max(1, math.ceil(needed / per_window)))
    tokens = len(fit) * per_window
    if tokens < needed:
        raise ValueError(
            f"pruning.transforms: refit fits on {tokens} calibration tokens ({len(fit)} windows of {seqlen}, less "
            f"{options['skip_tokens']} skipped each), fewer than min_tokens_per_dim={options['min_tokens_per_dim']} x "
            f"{max(widths) + 1} inputs of the widest layer: raise calibration.windows to at least "
            f"{windows_for(math.ceil(needed / per_window), options['holdout'])} (or calibration.seqlen)"
        )


class Moments:
    """Σ p̃ p̃ᵀ, Σ t p̃ᵀ, Σ ‖t‖² and the token count, p̃ = [p, 1] with an intercept; float64."""

    def __init__(self, width: int, out: int, intercept: bool, skip_tokens: int, device):
        size = width + intercept
        self.intercept, self.skip_tokens = intercept, skip_tokens
        self.pp = torch.zeros(size, size, dtype=torch.float64, device=device)
        self.tp = torch.zeros(out, size, dtype=torch.float64, device=device)
        self.tt = torch.zeros((), dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, p: torch.Tensor, t: torch.Tensor) -> None:
        if p.dim() >= 3:  # (batch, tokens, features): a window's first tokens left out
            p, t = p[..., self.skip_tokens :, :], t[..., self.skip_tokens :, :]
        p = p.reshape(-1, p.shape[-1]).double()
        t = t.reshape(-1, t.shape[-1]).double()
        if self.intercept:
            p = torch.cat([p, torch.ones_like(p[:, :1])], 1)
        self.pp.addmm_(p.T, p)  # in place: no (D+1)² temporary
        self.tp.addmm_(t.T, p)
        self.tt += (t * t).sum()
        self.tokens += p.shape[0]

    def absorb_(self, other: Moments) -> None:
        """Add `other`'s moments to these in place, and drop its tensors: their memory goes to the solve."""
        self.pp += other.pp
        self.tp += other.tp
        self.tt += other.tt
        self.tokens += other.tokens
        other.pp = other.tp = None

    def error(self, w: torch.Tensor) -> float:
        """Mean squared error per token of t ≈ w p̃, from the moments alone: Σ‖t‖² + Σ w ∘ (w pp − 2 tp)."""
        terms = (w @ self.pp).sub_(self.tp, alpha=2).mul_(w)  # one out × (D+1) temporary
        return float(self.tt + terms.sum()) / max(1, self.tokens)


def ridge_solve(moments: Moments, start: torch.Tensor, ridge: float) -> torch.Tensor:
    """argmin ‖t − w p̃‖² + λ‖w − start‖², λ = ridge × the mean diagonal of Σ p pᵀ (the sum over the
    moments' tokens), by Cholesky: λ is added to the diagonal of Σ p̃ p̃ᵀ in place for the factorisation
    and the diagonal restored; the factor and the solution are the only new matrices."""
    diagonal = moments.pp.diagonal()
    width = diagonal.numel() - moments.intercept
    lam = ridge * float(diagonal[:width].mean().clamp_min(1e-12))
    saved = diagonal.clone()
    diagonal += lam
    try:
        factor, info = torch.linalg.cholesky_ex(moments.pp)
    finally:
        diagonal.copy_(saved)
    if info.item():
        raise ValueError(
            f"pruning.transforms: refit ridge={ridge}: Σ p pᵀ + λI is not positive definite in float64 "
            f"(order {int(info)} minor): allowed values are a larger ridge"
        )
    solution = torch.add(moments.tp, start, alpha=lam).T  # solved in place: cholesky_solve would copy the factor
    torch.linalg.solve_triangular(factor, solution, upper=False, out=solution)
    torch.linalg.solve_triangular(factor.mT, solution, upper=True, out=solution)
    return solution.T


def fit_layer(wrapper, fit: Moments, held: Moments, options: dict) -> dict:
    """Choose λ on the held-out moments, refit on all of them, set the wrapper's refit weights where
    they lower the held-out error; what was chosen, and the held-out errors."""
    weight = wrapper.linear.weight.detach()
    bias = wrapper.linear.bias  # the targets leave it out: it stays, and an intercept adds to it
    start = weight.new_zeros(weight.shape[0], weight.shape[1] + options["intercept"], dtype=torch.float64)
    start[:, : weight.shape[1]] = weight
    if not fit.tokens or not held.tokens:  # the layer never ran its pruned path (nothing pruned, no shift)
        return {"plain": None, "errors": {}, "tokens": 0, "ridge": None, "kept": True}
    plain = held.error(start)
    errors = {ridge: held.error(ridge_solve(fit, start, ridge)) for ridge in options["ridge"]}
    if not all(map(math.isfinite, (plain, *errors.values()))):  # NaN compares false: W would be kept, unsaid
        raise FloatingPointError(
            f"pruning.transforms: refit's held-out errors are not finite (plain pruning {plain}, per ridge "
            f"{errors}): the calibration moments or the solve overflowed float64"
        )
    ridge = min(errors, key=errors.get)
    record = {"plain": plain, "errors": {str(k): v for k, v in errors.items()}, "tokens": fit.tokens + held.tokens}
    exact = plain <= EXACT * float(held.tt) / held.tokens  # nothing pruned: only rounding to fit
    if exact or not errors[ridge] < plain * (1 - MIN_GAIN):
        return {**record, "ridge": None, "kept": True}
    fit.absorb_(held)  # λ chosen: the layer is fitted on every window
    solved = ridge_solve(fit, start, ridge)
    new_weight, shift = (solved[:, :-1], solved[:, -1]) if options["intercept"] else (solved, None)
    if shift is not None:
        bias = shift if bias is None else bias.detach().double() + shift
    wrapper.set_refit(new_weight, bias)
    return {**record, "ridge": ridge, "kept": False, "refit": errors[ridge]}


@torch.no_grad()
def refit_(model, wrappers: dict, windows: torch.Tensor, options: dict) -> dict:
    """Refit the pruned layers among `wrappers` decoder layer by decoder layer; per layer, the
    held-out error of plain pruning and of the chosen refit. `options`: `options_of`'s."""
    wrappers = {name: w for name, w in wrappers.items() if hasattr(w, "set_refit")}
    fit_windows, held_windows = split(len(windows), options["holdout"])
    tokens_per_window(options, windows.shape[-1])
    layers = {}

    def visit(walk, index, names, hidden):
        [stream] = hidden
        mine = [wrappers[name] for name in names]
        device = mine[0].linear.weight.device
        moments = {
            name: [
                Moments(w.in_features, w.out_features, options["intercept"], options["skip_tokens"], device)
                for _ in range(2)
            ]
            for name, w in zip(names, mine)
        }
        for part, chosen in enumerate((fit_windows, held_windows)):
            with contextlib.ExitStack() as stack:
                for name, w in zip(names, mine):
                    stack.enter_context(w.gathering_moments(moments[name][part]))
                for window in chosen:
                    walk.call(index, window, stream[window])
        for name, w in zip(names, mine):  # each layer's moments freed once it is fitted
            layers[name] = fit_layer(w, *moments.pop(name), options)
        with computing_dense(mine) if options["stream"] == "dense" else contextlib.nullcontext():
            return [walk.run(index, stream)]

    layer_by_layer(model, windows, wrappers, visit, desc="refit")
    kept = sum(record["kept"] for record in layers.values())
    return {"options": options, "layers": layers, "refit_layers": len(layers) - kept, "kept_layers": kept}
