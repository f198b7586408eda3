"""Learned corrections for activation-sparse layers, trained decoder layer by decoder layer.

`pruning.transforms: [..., {name: learnable, forms: [affine, shift, scale, lowrank], ...}]` gives
each wrapped layer a `Correction`; `fit_or_load_` trains them on calibration windows (each decoder
layer against the dense layer's output, fed by the already-corrected layers before it) or loads
them from a safetensors file saved by an earlier job with the same settings.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..files import cache_write, set_aside
from ..walk import LayerInputs, layer_by_layer
from .wrapper import computing_dense

log = logging.getLogger(__name__)
FORMS = ("affine", "shift", "scale", "lowrank")
TRAINING = {
    "lr": 1e-3,
    "epochs": 4,
    "steps": None,
    "batch_size": 4,
    "warmup": 10,
    "grad_clip": 1.0,
    "weight_decay": 0.0,
    "seed": 0,
    "schedule": "cosine",
    "objective": "mse",
    "evals": 8,
    "patience": 3,
    "e2e_steps": 0,
    "e2e_lr": 1e-4,
    "e2e_batch_size": 1,
}
SCHEDULES = ("cosine", "constant")
# mse: the mean squared error over the layer's output channels as they are; relative: each channel's
# squared error over that channel's mean square in the dense output, so that a residual stream whose
# energy sits in one channel (Gemma-3-270M: 50-95% per layer, scripts/residual_energy.py) does not make
# the loss that channel's alone.
OBJECTIVES = ("mse", "relative")
OPTIONS = {"forms", "rank", *TRAINING}
RANK = 8


def _integer(low: int):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low, f"integers >= {low}"


def _number(low: float, strict: bool):
    def ok(v):
        return (
            isinstance(v, (int, float))
            and not isinstance(v, bool)
            and math.isfinite(v)
            and (v > low if strict else v >= low)
        )

    return ok, f"numbers {'>' if strict else '>='} {low:g}"


CHECKS = {  # option: (test, the allowed values as an error says them)
    "rank": _integer(1),
    "epochs": _integer(1),
    "batch_size": _integer(1),
    "warmup": _integer(0),
    "seed": _integer(0),
    "evals": _integer(1),
    "patience": _integer(1),
    "e2e_steps": _integer(0),
    "e2e_batch_size": _integer(1),
    "lr": _number(0, True),
    "e2e_lr": _number(0, True),
    "grad_clip": _number(0, True),
    "weight_decay": _number(0, False),
    "steps": (lambda v: v is None or _integer(1)[0](v), "null (epochs decide) or integers >= 1"),
}


def options_of(options: dict) -> dict:
    """`learnable`'s options with their defaults, every one typed and in range, before any model is
    loaded (the widths: `check_rank`); every bad value names the option."""
    unknown = set(options) - OPTIONS
    if unknown:
        raise ValueError(f"pruning.transforms: learnable has no option {sorted(unknown)}: allowed {sorted(OPTIONS)}")
    forms = options.get("forms", FORMS)
    if not isinstance(forms, (list, tuple)) or not forms or set(forms) - set(FORMS):
        raise ValueError(f"pruning.transforms: learnable forms={forms!r}: allowed values are lists of {list(FORMS)}")
    twice = sorted({form for form in forms if list(forms).count(form) > 1})
    if twice:  # a second entry would add nothing: a typo for another form
        raise ValueError(
            f"pruning.transforms: learnable forms={list(forms)!r} names {twice} more than once: allowed values "
            f"are lists of distinct forms of {list(FORMS)}"
        )
    if options.get("schedule", "cosine") not in SCHEDULES:
        raise ValueError(
            f"pruning.transforms: learnable schedule={options['schedule']!r}: allowed values are {list(SCHEDULES)}"
        )
    if options.get("objective", "mse") not in OBJECTIVES:
        raise ValueError(
            f"pruning.transforms: learnable objective={options['objective']!r}: allowed values are {list(OBJECTIVES)}"
        )
    for key, (ok, allowed) in CHECKS.items():
        if key in options and not ok(options[key]):
            raise ValueError(f"pruning.transforms: learnable {key}={options[key]!r}: allowed values are {allowed}")
    return {"forms": list(forms), "rank": RANK, **TRAINING, **options}


def check_rank(options: dict | None, targets: dict[str, nn.Module]) -> None:
    """`learnable`'s options (None: no such transform) against the targeted layers (a meta skeleton
    will do): a low-rank term of rank min(in, out) is W itself (initialised from W's SVD), the layer
    would compute its dense output under a sparse label. Refused from that rank up."""
    if options is None or "lowrank" not in options["forms"] or not targets:
        return
    rank = options["rank"]
    name, layer = min(targets.items(), key=lambda item: min(item[1].weight.shape))
    if rank >= min(layer.weight.shape):
        raise ValueError(
            f"pruning.transforms: learnable rank={rank} reaches the full rank of {name} "
            f"(shape {tuple(layer.weight.shape)}), where the correction gives back the dense layer: "
            f"allowed values are 1..{min(layer.weight.shape) - 1}"
        )


class Correction(nn.Module):
    """Per layer: `(1 + a) ⊙ y + b` on the output, a shift η of the input (added back through W), a
    per-channel scale s of the selection score (straight-through), and a low-rank `U Vᵀ` applied to
    the pruned-away part of the input, initialised from W's SVD (as in R-Sparse). At initialisation
    it changes nothing where nothing is pruned."""

    def __init__(self, weight: torch.Tensor, forms=FORMS, rank: int = RANK):
        super().__init__()
        out_features, in_features = weight.shape
        zeros = lambda n: nn.Parameter(torch.zeros(n, dtype=torch.float32, device=weight.device))  # noqa: E731
        self.a = zeros(out_features) if "affine" in forms else None
        self.b = zeros(out_features) if "affine" in forms else None
        self.shift = zeros(in_features) if "shift" in forms else None
        self.log_scale = zeros(in_features) if "scale" in forms else None
        self.u = self.v = None
        if "lowrank" in forms:
            u, s, vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
            r = min(rank, s.numel())
            self.u, self.v = nn.Parameter(u[:, :r] * s[:r]), nn.Parameter(vh[:r].T.contiguous())

    def channel_scale(self) -> torch.Tensor | None:
        return None if self.log_scale is None else self.log_scale.exp()

    def output(self, y: torch.Tensor, dropped: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The corrected output, from the sparse output `y` and the input entries that were dropped."""
        if self.shift is not None:  # the learned η was subtracted before pruning: add it back
            y = y + F.linear(self.shift.to(y.dtype), weight)
        if self.u is not None:
            y = y + (dropped @ self.v.to(dropped.dtype)) @ self.u.to(dropped.dtype).T
        if self.a is not None:
            y = y * (1 + self.a.to(y.dtype)) + self.b.to(y.dtype)
        return y


def _mse(walk: LayerInputs, index: int, hidden: list, targets: list, windows, channel_weight=None) -> torch.Tensor:
    """The mean squared error of layer `index` on `windows`, each output channel's term times
    `channel_weight` where one is given."""
    total = 0.0
    for w in windows:
        output, target = walk.call(index, w, hidden[w]).float(), targets[w].float()
        if channel_weight is None:
            total = total + F.mse_loss(output, target)
        else:
            total = total + ((output - target).square() * channel_weight).mean()
    return total / len(windows)


def relative_weight(targets: list[torch.Tensor]) -> torch.Tensor:
    """One over each output channel's mean square in the dense outputs `targets` (floored at 1e-6 of
    the mean over channels, so a silent channel does not blow up)."""
    square = sum(t.float().square().flatten(0, -2).sum(0) for t in targets)
    square = square / sum(t[..., 0].numel() for t in targets)
    return 1 / square.clamp_min(1e-6 * float(square.mean()))


def train_(model: nn.Module, wrappers: dict[str, nn.Module], windows: torch.Tensor, options: dict) -> dict:
    """Train the corrections of `wrappers` decoder layer by decoder layer; per layer, the objective
    (`mse` or `relative`) against the dense layer's output before and after training."""
    device = next(model.parameters()).device
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    frozen = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    losses = {}

    def visit(walk, index, names, hidden):
        student, teacher = hidden  # the corrected sparse stream, and the dense one
        count = len(student)
        every = range(count)
        steps = options["steps"] or options["epochs"] * math.ceil(count / options["batch_size"])
        mine = [wrappers[name] for name in names]
        with torch.no_grad(), autocast, computing_dense(mine):
            targets = walk.run(index, teacher)
        weight = relative_weight(targets) if options["objective"] == "relative" else None
        params = [p for w in mine for p in w.correction.parameters()]
        if params:
            for p in params:
                p.requires_grad_(True)
            with torch.no_grad(), autocast:
                before = float(_mse(walk, index, student, targets, every, weight))
            best, best_state, waited, stopped = before, [p.detach().clone() for p in params], 0, steps
            current, diverged = before, False
            optimizer = torch.optim.AdamW(params, lr=options["lr"], weight_decay=options["weight_decay"])
            schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: rate(s, steps, options))
            generator = torch.Generator().manual_seed(options["seed"] + index)
            every_eval = max(1, steps // options["evals"])
            progress = tqdm(range(steps), desc=f"layer {index}", unit="step", leave=False)
            for step in progress:
                chosen = torch.randint(count, (min(options["batch_size"], count),), generator=generator).tolist()
                optimizer.zero_grad(set_to_none=True)
                with autocast:
                    loss = _loss_or_nan(lambda: _mse(walk, index, student, targets, chosen, weight))
                value = loss.item()
                if not math.isfinite(value):  # diverged: the best state is put back below
                    diverged, stopped = True, step + 1
                    break
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, options["grad_clip"])
                optimizer.step()
                schedule.step()
                progress.set_postfix(loss=f"{value:.3g}")
                if (step + 1) % every_eval == 0 or step + 1 == steps:  # early stopping on the whole objective
                    with torch.no_grad(), autocast:
                        current = float(_loss_or_nan(lambda: _mse(walk, index, student, targets, every, weight)))
                    diverged = not math.isfinite(current)
                    if current < best:
                        best, best_state, waited = current, [p.detach().clone() for p in params], 0
                    else:  # a NaN too
                        waited += 1
                        if diverged or waited >= options["patience"]:
                            stopped = step + 1
                            break
            for p in params:  # nothing of the training kept on them
                p.requires_grad_(False)
                p.grad = None
            with torch.no_grad():  # the best state seen, the initial one included: never worse than it
                for p, value in zip(params, best_state):
                    p.copy_(value)
            losses[str(index)] = {
                "before": before,
                "after": best,
                "last": current,
                "steps": stopped,
                "diverged": diverged,
            }
        with torch.no_grad(), autocast:
            student = walk.run(index, student)
        return [student, targets]

    try:
        layer_by_layer(model, windows, wrappers, visit, desc="training corrections", streams=2, context=autocast)
    finally:
        for p, flag in frozen.items():
            p.requires_grad_(flag)
    return losses


def _loss_or_nan(compute) -> torch.Tensor:
    """`compute()`, or NaN where the masks refused NaN scores (a score weight that diverged)."""
    try:
        return compute()
    except FloatingPointError:
        return torch.tensor(math.nan)


def rate(step: int, steps: int, options: dict) -> float:
    """The learning rate's factor: a linear warm-up, then constant or a cosine decay to zero."""
    warm = max(1, options["warmup"])
    if step < warm:
        return (step + 1) / warm
    if options["schedule"] == "constant":
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, steps - warm))))


def _kl(model, windows: torch.Tensor, chosen: list[int], wrappers) -> torch.Tensor:
    """KL(dense model ‖ pruned model) of the next-token distributions, mean over the tokens of `chosen`."""
    device = next(model.parameters()).device
    batch = windows[chosen].to(device)
    with torch.no_grad(), computing_dense(wrappers):
        teacher = F.log_softmax(model(batch, use_cache=False).logits.float(), -1)
    student = F.log_softmax(model(batch, use_cache=False).logits.float(), -1)
    return F.kl_div(student.flatten(0, 1), teacher.flatten(0, 1), log_target=True, reduction="batchmean")


def _mean_kl(model, windows: torch.Tensor, chosen: list[int], wrappers) -> float:
    with torch.no_grad():
        return float(_loss_or_nan(lambda: sum(_kl(model, windows, [w], wrappers) for w in chosen) / len(chosen)))


def split_windows(count: int) -> tuple[list[int], list[int]]:
    """The windows tuned on, and the last quarter held out for the guard (a single window: both)."""
    if count < 2:
        return [0], [0]
    held = max(1, count // 4)
    return list(range(count - held)), list(range(count - held, count))


def tune_end_to_end_(model: nn.Module, wrappers: dict[str, nn.Module], windows: torch.Tensor, options: dict) -> dict:
    """After the layer-wise fit, all corrections but the score scale trained together against the dense
    model's next-token distribution on the calibration windows; kept only where the KL on the held-out
    windows went down. Each step's masks are those its forward computes from the current corrections;
    the scale, which only moves masks, is left as the layer-wise fit left it, so no straight-through
    surrogate runs and the gradient is that of the hard-masked KL. A step whose loss is not finite
    (diverged) ends the tuning, which is then undone."""
    layers = list(wrappers.values())
    params = [p for w in layers for name, p in w.correction.named_parameters() if name != "log_scale"]
    frozen = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    tuned, guard = split_windows(len(windows))
    if tuned == guard:
        log.warning("end-to-end tuning on one calibration window: its guard measures the window it was tuned on")
    steps, ran, diverged = options["e2e_steps"], options["e2e_steps"], False
    try:
        before = _mean_kl(model, windows, guard, layers)
        start = [p.detach().clone() for p in params]
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW(params, lr=options["e2e_lr"], weight_decay=options["weight_decay"])
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: rate(s, steps, options))
        generator = torch.Generator().manual_seed(options["seed"])
        for step in tqdm(range(steps), desc="end-to-end KL", unit="step"):
            picks = torch.randint(len(tuned), (min(options["e2e_batch_size"], len(tuned)),), generator=generator)
            chosen = [tuned[i] for i in picks.tolist()]
            optimizer.zero_grad(set_to_none=True)
            loss = _loss_or_nan(lambda: _kl(model, windows, chosen, layers))
            if not math.isfinite(loss.item()):
                ran, diverged = step + 1, True
                break
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, options["grad_clip"])
            optimizer.step()
            schedule.step()
        for p in params:  # nothing of the training kept on them
            p.requires_grad_(False)
            p.grad = None
        after = math.nan if diverged else _mean_kl(model, windows, guard, layers)
        improved = after < before  # False for a NaN KL too
        if not improved:  # tuning brought the whole model no closer to the dense one: undone
            with torch.no_grad():
                for p, value in zip(params, start):
                    p.copy_(value)
    finally:
        for p, flag in frozen.items():
            p.requires_grad_(flag)
    return {
        "kl_before": before,
        "kl_after": after if improved else before,
        "kl_trained": after,
        "steps": ran,
        "diverged": diverged,
        "guard_windows": guard,
    }


def save(wrappers: dict[str, nn.Module], path: Path) -> None:
    """The corrections, with the cache key they were trained under (the file's name) inside."""
    from safetensors.torch import save as serialize

    tensors = {
        f"{name}.{key}": value.detach().cpu().contiguous()
        for name, wrapper in wrappers.items()
        for key, value in wrapper.correction.state_dict().items()
    }
    cache_write(path, lambda file: file.write(serialize(tensors, metadata={"key": path.stem})))


def load_(wrappers: dict[str, nn.Module], path: Path) -> None:
    """The corrections saved at `path`, refused unless saved under its key (a same-shaped file of
    other settings copied or renamed there would load silently)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as file:
        key = (file.metadata() or {}).get("key")
        if key != path.stem:
            raise ValueError(f"the file was saved under key {key!r}, not {path.stem!r}")
        tensors = {name: file.get_tensor(name) for name in file.keys()}
    states = {}
    for name, wrapper in wrappers.items():  # every layer checked before any is changed
        state = {key.removeprefix(f"{name}."): value for key, value in tensors.items() if key.startswith(f"{name}.")}
        expected = {key: value.shape for key, value in wrapper.correction.state_dict().items()}
        if {key: value.shape for key, value in state.items()} != expected:
            raise ValueError(
                f"{name}: the file holds {sorted(state)}, the correction has {sorted(expected)} (or other shapes)"
            )
        states[name] = state
    for name, state in states.items():
        wrappers[name].correction.load_state_dict(state)


def fit_or_load_(
    model: nn.Module,
    wrappers: dict[str, nn.Module],
    windows: torch.Tensor,
    options: dict,
    path: Path | None,
    end_to_end: bool = False,
) -> dict:
    """Load the corrections from `path` if an earlier job saved them, else fit them (and save them
    there when a path is given): layer by layer (`train_`) or, with `end_to_end`, all together from
    the layer-wise fit (`tune_end_to_end_`)."""
    wrappers = {name: w for name, w in wrappers.items() if getattr(w, "correction", None) is not None}
    stage = "end-to-end tuned" if end_to_end else "learned"
    if path is not None and path.is_file():
        try:
            load_(wrappers, path)
        except Exception as error:  # truncated, of other layers or saved under another key: set aside, trained again
            kept = set_aside(path, "corrupt")
            log.warning(
                "%s corrections %s are unreadable (%s: %s): set aside as %s, training again",
                stage,
                path,
                type(error).__name__,
                error,
                kept,
            )
        else:
            log.info("%s corrections: cache hit, %s", stage, path)
            return {"file": str(path), "cache": "hit"}
    log.info("%s corrections: training them%s", stage, f" into {path}" if path else "")
    tic = time.perf_counter()
    result = (
        tune_end_to_end_(model, wrappers, windows, options)
        if end_to_end
        else {"mse" if options["objective"] == "mse" else "relative_mse": train_(model, wrappers, windows, options)}
    )
    seconds = time.perf_counter() - tic
    if path is not None:
        save(wrappers, path)
    return {"file": str(path) if path else None, "cache": "miss" if path else None, "seconds": seconds, **result}
