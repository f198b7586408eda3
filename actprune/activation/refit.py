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
(multiples of the mean diagonal of E[p pᵀ]) on held-out calibration windows; a layer whose
held-out error refitting does not lower keeps W; each window's first `skip_tokens` tokens (the
attention sinks, whose activations are orders of magnitude larger) are left out of the moments;
fewer than `min_tokens_per_dim` calibration tokens per input dimension is refused before loading.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from ..walk import LayerInputs
from .learned import bypassed

DEFAULTS = {"ridge": [1e-3, 1e-2, 1e-1, 1.0], "intercept": True, "stream": "sequential", "skip_tokens": 4,
            "holdout": 0.25, "min_tokens_per_dim": 4}
STREAMS = ("sequential", "dense")
MIN_GAIN = 1e-3  # a refit must lower the held-out error by this fraction: not by rounding noise alone
EXACT = 1e-10  # plain pruning's error below this fraction of the targets' energy: exact already


def options_of(options: dict) -> dict:
    """`refit`'s options with their defaults, checked; every bad value names the option."""
    unknown = set(options) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"pruning.transforms: refit has no option {sorted(unknown)}: allowed {sorted(DEFAULTS)}")
    merged = {**DEFAULTS, **options}
    ridge = merged["ridge"]
    merged["ridge"] = [ridge] if isinstance(ridge, (int, float)) else list(ridge)
    if not merged["ridge"] or not all(isinstance(r, (int, float)) and r > 0 for r in merged["ridge"]):
        raise ValueError(f"pruning.transforms: refit ridge={ridge!r}: allowed values are a positive number or a list of them")
    if merged["stream"] not in STREAMS:
        raise ValueError(f"pruning.transforms: refit stream={merged['stream']!r}: allowed values are {list(STREAMS)}")
    if not 0 < merged["holdout"] < 1 or merged["skip_tokens"] < 0 or merged["min_tokens_per_dim"] < 0:
        raise ValueError(f"pruning.transforms: refit holdout={merged['holdout']}, skip_tokens={merged['skip_tokens']}, "
                         f"min_tokens_per_dim={merged['min_tokens_per_dim']}: allowed values are 0 < holdout < 1, "
                         f"skip_tokens >= 0, min_tokens_per_dim >= 0")
    return merged


def split(count: int, holdout: float) -> tuple[list[int], list[int]]:
    """Calibration windows to fit on and to choose λ on (the last ones)."""
    held = max(1, round(count * holdout))
    if count - held < 1:
        raise ValueError(f"pruning.transforms: refit needs at least 2 calibration windows (one to fit, one held out), "
                         f"got {count}: raise calibration.windows")
    return list(range(count - held)), list(range(count - held, count))


def check_tokens(options: dict, windows: int, seqlen: int, widths: list[int]) -> None:
    """Refuse a calibration too small for the widest layer: its regression would fit noise."""
    options = options_of(options)
    fit, _ = split(windows, options["holdout"])
    tokens = len(fit) * max(0, seqlen - options["skip_tokens"])
    needed = options["min_tokens_per_dim"] * (max(widths) + 1)
    if tokens < needed:
        per_window = max(1, seqlen - options["skip_tokens"])
        raise ValueError(
            f"pruning.transforms: refit fits on {tokens} calibration tokens ({len(fit)} windows of {seqlen}, less "
            f"{options['skip_tokens']} skipped each), fewer than min_tokens_per_dim={options['min_tokens_per_dim']} x "
            f"{max(widths) + 1} inputs of the widest layer: raise calibration.windows to at least "
            f"{math.ceil(math.ceil(needed / per_window) / (1 - options['holdout']))} (or calibration.seqlen)")


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
            p, t = p[..., self.skip_tokens:, :], t[..., self.skip_tokens:, :]
        p = p.reshape(-1, p.shape[-1]).double()
        t = t.reshape(-1, t.shape[-1]).double()
        if self.intercept:
            p = torch.cat([p, torch.ones_like(p[:, :1])], 1)
        self.pp += p.T @ p
        self.tp += t.T @ p
        self.tt += (t * t).sum()
        self.tokens += p.shape[0]

    def merged(self, other: Moments) -> Moments:
        both = Moments.__new__(Moments)
        both.intercept, both.skip_tokens = self.intercept, self.skip_tokens
        both.pp, both.tp, both.tt = self.pp + other.pp, self.tp + other.tp, self.tt + other.tt
        both.tokens = self.tokens + other.tokens
        return both

    def error(self, w: torch.Tensor) -> float:
        """Mean squared error per token of t ≈ w p̃, from the moments alone."""
        total = self.tt - 2 * (w * self.tp).sum() + ((w @ self.pp) * w).sum()
        return float(total) / max(1, self.tokens)


def ridge_solve(moments: Moments, start: torch.Tensor, ridge: float) -> torch.Tensor:
    """argmin ‖t − w p̃‖² + λ‖w − start‖², λ = ridge × the mean diagonal of Σ p pᵀ."""
    width = moments.pp.shape[0] - moments.intercept
    lam = ridge * moments.pp.diagonal()[:width].mean().clamp_min(1e-12)
    eye = torch.eye(moments.pp.shape[0], dtype=torch.float64, device=moments.pp.device)
    return torch.linalg.solve(moments.pp + lam * eye, (moments.tp + lam * start).T).T


def fit_layer(wrapper, fit: Moments, held: Moments, options: dict) -> dict:
    """Choose λ on the held-out moments, refit on all of them, set the wrapper's refit weights where
    they lower the held-out error; what was chosen, and the held-out errors."""
    weight = wrapper.linear.weight.detach().double()
    bias = wrapper.linear.bias  # the targets leave it out: it stays, and an intercept adds to it
    start = torch.cat([weight, torch.zeros_like(weight[:, :1])], 1) if options["intercept"] else weight
    if not fit.tokens or not held.tokens:  # the layer never ran its pruned path (nothing pruned, no shift)
        return {"plain": None, "errors": {}, "tokens": 0, "ridge": None, "kept": True}
    plain = held.error(start)
    errors = {ridge: held.error(ridge_solve(fit, start, ridge)) for ridge in options["ridge"]}
    ridge = min(errors, key=errors.get)
    record = {"plain": plain, "errors": {str(k): v for k, v in errors.items()}, "tokens": fit.tokens + held.tokens}
    exact = plain <= EXACT * float(held.tt) / held.tokens  # nothing pruned: only rounding to fit
    if exact or not errors[ridge] < plain * (1 - MIN_GAIN):
        return {**record, "ridge": None, "kept": True}
    solved = ridge_solve(fit.merged(held), start, ridge)
    new_weight, shift = (solved[:, :-1], solved[:, -1]) if options["intercept"] else (solved, None)
    if shift is not None:
        bias = shift if bias is None else bias.detach().double() + shift
    wrapper.set_refit(new_weight, bias)
    return {**record, "ridge": ridge, "kept": False, "refit": errors[ridge]}


@torch.no_grad()
def refit_(model, wrappers: dict, windows: torch.Tensor, options: dict) -> dict:
    """Refit the pruned layers among `wrappers` decoder layer by decoder layer; per layer, the
    held-out error of plain pruning and of the chosen refit."""
    options = options_of(options)
    wrappers = {name: w for name, w in wrappers.items() if hasattr(w, "set_refit")}
    fit_windows, held_windows = split(len(windows), options["holdout"])
    walk = LayerInputs(model, windows)
    hidden = walk.hidden
    layers = {}
    for index in tqdm(range(len(walk.layers)), desc="refit", unit="layer"):
        names = walk.names(index, wrappers)
        if names:
            mine = [wrappers[name] for name in names]
            device = mine[0].linear.weight.device
            moments = {name: [Moments(w.in_features, w.out_features, options["intercept"], options["skip_tokens"], device)
                              for _ in range(2)] for name, w in zip(names, mine)}
            for part, chosen in enumerate((fit_windows, held_windows)):
                for name, w in zip(names, mine):
                    w.moments = moments[name][part]
                for window in chosen:
                    walk.call(index, window, hidden[window])
            for w in mine:
                w.moments = None
            for name, w in zip(names, mine):
                layers[name] = fit_layer(w, *moments[name], options)
            if options["stream"] == "dense":
                with bypassed(mine):
                    hidden = walk.run(index, hidden)
                continue
        hidden = walk.run(index, hidden)
    kept = sum(record["kept"] for record in layers.values())
    return {"options": options, "layers": layers, "refit_layers": len(layers) - kept, "kept_layers": kept}
