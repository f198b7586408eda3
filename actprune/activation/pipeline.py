"""The activation recipe: wrap every target, then the steps the plan asks for, in this order —
`dense_tokens` position tracking, calibrated allocation of N per layer, calibrated thresholds,
closed-form refit, learned corrections (layer-wise, then end to end) — each on the model as the
steps before it left it."""

from __future__ import annotations

import hashlib
import importlib
import time
from contextlib import contextmanager

import torch
from torch import nn

from ..calibration import Calibration, code_digest, libraries
from ..methods import Pruned
from ..planning import PruningPlan
from ..walk import decoder_layers
from . import wrapper
from .allocation import allocate_
from .allocation import check as check_allocation
from .learned import fit_or_load_
from .refit import refit_
from .thresholds import calibrate_thresholds_

# The code learned corrections are trained with and on top of (the masks, scores, transforms, refit,
# allocation, thresholds, the layer walk, and the order of the steps here): a change in any of them is a
# new cache key. What upstream code and data made of the layers is keyed apart, by `layer_state`.
TRAINED_ON = (
    __name__,
    "actprune.masks",
    "actprune.walk",
    *(
        f"actprune.activation.{name}"
        for name in ("allocation", "learned", "recipe", "refit", "scores", "thresholds", "transforms", "wrapper")
    ),
)

code_digest(*map(importlib.import_module, TRAINED_ON))  # read at import: the code this process runs


def apply_(
    model: nn.Module, plan: PruningPlan, targets: dict[str, nn.Linear], calibration: Calibration | None
) -> Pruned:
    """Replace each of `targets` by the method's wrapper in `model`, then run the plan's steps."""
    done = Pruned({})
    stats = {}
    if plan.needs.statistics and targets:
        stats = calibration.statistics(model, targets, second_moment="second_moment" in plan.needs.statistics)
        done.seconds["calibration"] = calibration.seconds
    tic = time.perf_counter()
    wrapped = done.layers
    for name, linear in targets.items():
        wrapped[name] = plan.method.apply(linear, plan, stats.get(name))
        if plan.config.backend != getattr(wrapped[name], "backend", "emulate"):
            raise ValueError(
                f"pruning.backend={plan.config.backend}: pruning.method={plan.method.name} builds "
                f"{type(wrapped[name]).__name__} layers, which do not run it"
            )
        _replace(model, name, wrapped[name])
        buffers = {key: value for key, value in wrapped[name].named_buffers(recurse=False) if value.is_floating_point()}
        broken = [key for key, value in buffers.items() if not torch.isfinite(value).all()]
        if broken:  # a NaN score weight would keep nothing in its groups, silently
            raise FloatingPointError(
                f"{name}: pruning.score={plan.config.score}, pruning.transforms="
                f"{list(plan.config.transforms)} gave non-finite {broken} (degenerate calibration statistics?)"
            )
    done.seconds["prune"] = time.perf_counter() - tic
    if not wrapped:
        return done
    if plan.config.dense_tokens:
        done.hooks += _track_positions(model, wrapped)
    choices = check_allocation(plan.config.allocation, plan.config.allocation_choices, plan.pattern)
    if choices is not None:
        with _timed(done, "allocation"):
            done.records["allocation"] = allocate_(
                model, wrapped, calibration.windows, choices, plan.config.allocation_budget
            )
    if plan.config.selection == "threshold":
        with _timed(done, "thresholds"):
            done.records["thresholds"] = calibrate_thresholds_(model, wrapped, calibration.windows)
    refit = plan.transforms.refit
    if refit is not None:
        with _timed(done, "refit"):
            done.records["refit"] = refit_(model, wrapped, calibration.windows, refit)
    learn = plan.transforms.learnable
    if learn is not None:
        with _timed(done, "learn"):
            parts = {
                "dtype": str(next(model.parameters()).dtype),
                "code": code_digest(*map(importlib.import_module, TRAINED_ON)),
                "libraries": libraries(),
            }
            # keyed without the end-to-end options: jobs that differ only in those share the layer-wise fit
            path = calibration.cache_file(
                "learned",
                {**parts, "pruning": _layerwise_settings(plan.settings()), "layers": layer_state(wrapped)},
                ".safetensors",
            )
            learned = done.records["learned"] = fit_or_load_(model, wrapped, calibration.windows, learn, path)
            if learn.get("e2e_steps"):  # on top of the layer-wise fit: keyed by the layers as it left them
                path = calibration.cache_file(
                    "learned",
                    {**parts, "pruning": plan.settings(), "stage": "end_to_end", "layers": layer_state(wrapped)},
                    ".safetensors",
                )
                learned["end_to_end"] = fit_or_load_(model, wrapped, calibration.windows, learn, path, end_to_end=True)
    return done


@contextmanager
def _timed(done: Pruned, step: str):
    """`done.seconds[step]`: the wall time of the block."""
    tic = time.perf_counter()
    yield
    done.seconds[step] = time.perf_counter() - tic


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, leaf = name.rsplit(".", 1)
    setattr(model.get_submodule(parent), leaf, module)


def layer_state(wrapped: dict[str, nn.Module]) -> str:
    """A digest of every wrapped layer as training starts from it: its tensors (weight, the buffers that
    statistics, transforms and refit made: shift, score weight, basis, refit weights; the corrections'
    starting values), its threshold and its settings (the pattern allocation chose). Whatever upstream
    code or data changed them, the key changes with them."""
    sha = hashlib.sha1()
    for name, layer in sorted(wrapped.items()):
        sha.update(f"{name}|{layer.extra_repr()}".encode())
        tensors = {**layer.state_dict(), "threshold": getattr(layer, "threshold", None)}
        for key, value in sorted(tensors.items()):
            if value is not None:
                sha.update(f"|{key}:{value.dtype}:{tuple(value.shape)}|".encode())
                sha.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return sha.hexdigest()[:16]


def _layerwise_settings(settings: dict) -> dict:
    """The pruning settings without the `learnable` transform's end-to-end options."""
    strip = lambda t: {k: v for k, v in t.items() if not k.startswith("e2e_")} if isinstance(t, dict) else t  # noqa: E731
    return {**settings, "transforms": [strip(t) for t in settings["transforms"]]}


def _track_positions(model, wrapped: dict[str, nn.Module]) -> list:
    """Each decoder layer tells its wrappers the absolute positions of the tokens it runs, so that
    `dense_tokens` keeps a sequence's first tokens dense in cached decoding too."""
    prefix, layers = decoder_layers(model)
    handles = []
    for index, layer in enumerate(layers):
        mine = [w for name, w in wrapped.items() if name.startswith(f"{prefix}.{index}.") and hasattr(w, "positions")]
        if mine:
            positions = wrapper.TokenPositions()
            handles.append(layer.register_forward_pre_hook(positions.hook, with_kwargs=True))
            for layer_wrapper in mine:
                layer_wrapper.track_positions(positions)
    return handles
