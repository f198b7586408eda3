"""Pruning methods: one registry of small pieces, each owning its recipe.

A method says what it needs from calibration (`needs`) and applies itself to the targeted layers
of a model (`apply_`). Three kinds:
- `activation`: each target `nn.Linear` is replaced by a wrapper that masks its input per token
  (`wrap(linear, plan, stats)` builds it); the steps the plan asks for follow: calibrated
  thresholds (`pruning.selection=threshold`), closed-form weights (`refit`), learned corrections
  (`learnable`);
- `weight`: W is zeroed once, layer by layer (`prune(linear, pattern, inputs, plan)`), where
  `inputs` (for `layerwise` methods) holds what the layer's calibration inputs told;
- `dense`: nothing changes.
Every module of this package is imported below, so a new method is one module here (or any
module imported before use) with a `@activation_method` / `@weight_method` function, plus a
`conf/pruning/<name>.yaml` that selects it.
"""

from __future__ import annotations

import importlib
import pkgutil
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..activation import wrapper
from ..activation.allocation import allocate_
from ..activation.allocation import check as check_allocation
from ..activation.learned import fit_or_load_
from ..activation.recipe import learnable_options, needed_statistics, refit_options
from ..activation.refit import refit_
from ..activation.thresholds import calibrate_thresholds_
from ..calibration import code_digest
from ..walk import LayerInputs, decoder_layers

if TYPE_CHECKING:
    from ..calibration import Calibration
    from ..sparsify import PruningPlan, SparsityReport


@dataclass(frozen=True)
class Needs:
    """What a method reads from calibration: statistics of the targets' inputs, token windows."""

    statistics: frozenset = frozenset()
    windows: bool = False

    def __bool__(self) -> bool:
        return bool(self.statistics) or self.windows


@dataclass(frozen=True)
class Method:
    name: str
    kind: str  # dense | activation | weight
    apply: Callable  # activation: wrap(linear, plan, stats); weight: prune(linear, pattern, inputs, plan)
    layerwise: str | None = None  # weight methods calibrated layer by layer: "norms" or "hessian"

    def needs(self, plan: PruningPlan) -> Needs:
        if self.kind == "activation":
            steps = (plan.config.selection == "threshold" or learnable_options(plan.transforms) is not None
                     or refit_options(plan.transforms) is not None or plan.config.allocation != "uniform")
            return Needs(frozenset(needed_statistics(plan.config.score, plan.transforms)), steps)
        return Needs(windows=self.layerwise is not None and not plan.pattern.is_dense())

    def apply_(self, model: nn.Module, plan: PruningPlan, targets: dict[str, nn.Linear],
               calibration: Calibration | None, report: SparsityReport) -> dict[str, nn.Module]:
        """Prune `targets` in place; return each target's module after pruning."""
        if self.kind == "activation":
            return _activation_(self, model, plan, targets, calibration, report)
        if self.kind == "weight":
            return _weight_(self, model, plan, targets, calibration, report)
        return dict(targets)


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    METHODS[method.name] = method
    return method


def activation_method(name: str):
    """`@activation_method("act_x")` on `wrap(linear, plan, stats) -> nn.Module`."""
    def add(wrap):
        register(Method(name, "activation", wrap))
        return wrap

    return add


def weight_method(name: str, layerwise: str | None = None):
    """`@weight_method("weight_x", layerwise=None|"norms"|"hessian")` on `prune(linear, pattern, inputs, plan)`."""
    def add(prune):
        register(Method(name, "weight", prune, layerwise))
        return prune

    return add


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"pruning.method={name!r} is unknown: allowed values are {sorted(METHODS)}")
    return METHODS[name]


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, leaf = name.rsplit(".", 1)
    setattr(model.get_submodule(parent), leaf, module)


def _activation_(method, model, plan, targets, calibration, report) -> dict[str, nn.Module]:
    needs = method.needs(plan)
    stats = {}
    if needs.statistics and targets:
        stats = calibration.statistics(model, targets, second_moment="second_moment" in needs.statistics)
        report.seconds["calibration"] = calibration.seconds
    tic = time.perf_counter()
    wrapped = {}
    for name, linear in targets.items():
        wrapped[name] = method.apply(linear, plan, stats.get(name))
        if plan.config.backend != getattr(wrapped[name], "backend", "emulate"):
            raise ValueError(f"pruning.backend={plan.config.backend}: pruning.method={method.name} builds "
                             f"{type(wrapped[name]).__name__} layers, which do not run it")
        _replace(model, name, wrapped[name])
        buffers = {key: value for key, value in wrapped[name].named_buffers(recurse=False) if value.is_floating_point()}
        broken = [key for key, value in buffers.items() if not torch.isfinite(value).all()]
        if broken:  # a NaN score weight would keep nothing in its groups, silently
            raise FloatingPointError(f"{name}: pruning.score={plan.config.score}, pruning.transforms="
                                     f"{list(plan.config.transforms)} gave non-finite {broken} (degenerate calibration statistics?)")
    report.seconds["prune"] = time.perf_counter() - tic
    if plan.config.dense_tokens:
        report.hooks += _track_positions(model, wrapped)
    choices = check_allocation(plan.config.allocation, plan.config.allocation_choices, plan.pattern)
    if choices is not None and wrapped:
        tic = time.perf_counter()
        report.allocation = allocate_(model, wrapped, calibration.windows, choices, plan.config.allocation_budget)
        report.seconds["allocation"] = time.perf_counter() - tic
    if plan.config.selection == "threshold" and wrapped:
        tic = time.perf_counter()
        report.thresholds = calibrate_thresholds_(model, wrapped, calibration.windows)
        report.seconds["thresholds"] = time.perf_counter() - tic
    refit = refit_options(plan.transforms)
    if refit is not None and wrapped:
        tic = time.perf_counter()
        report.refit = refit_(model, wrapped, calibration.windows, refit)
        report.seconds["refit"] = time.perf_counter() - tic
    learn = learnable_options(plan.transforms)
    if learn is not None and wrapped:
        tic = time.perf_counter()
        parts = {"dtype": str(next(model.parameters()).dtype), "code": code_digest(*map(importlib.import_module, TRAINED_ON))}
        # keyed without the end-to-end options: jobs that differ only in those share the layer-wise fit
        path = calibration.cache_file("learned", {**parts, "pruning": _layerwise_settings(plan.settings())}, ".safetensors")
        report.learned = fit_or_load_(model, wrapped, calibration.windows, learn, path)
        if learn.get("e2e_steps"):
            path = calibration.cache_file("learned", {**parts, "pruning": plan.settings(), "stage": "end_to_end"}, ".safetensors")
            report.learned["end_to_end"] = fit_or_load_(model, wrapped, calibration.windows, learn, path, end_to_end=True)
        report.seconds["learn"] = time.perf_counter() - tic
    return wrapped


# What learned corrections are trained on top of (the masks, scores, transforms, refit, allocation,
# thresholds, the layer walk, and the order of the steps above): a change in any of them is a new cache key.
TRAINED_ON = (__name__, "actprune.masks", "actprune.walk", *(f"actprune.activation.{name}" for name in (
    "allocation", "learned", "recipe", "refit", "scores", "thresholds", "transforms", "wrapper")))


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
                layer_wrapper.positions = positions
    return handles


class LayerInputStatistics:
    """What a layerwise weight method reads from one linear layer's calibration inputs."""

    def __init__(self, width: int, hessian: bool, device):
        self.count = 0
        self.sumsq = torch.zeros(width, dtype=torch.float64, device=device)
        self.hessian = torch.zeros(width, width, dtype=torch.float32, device=device) if hessian else None

    def add(self, module, args):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        self.count += x.shape[0]
        self.sumsq += (x.double() ** 2).sum(0)
        if self.hessian is not None:
            self.hessian += x.T @ x


@torch.no_grad()
def _weight_(method, model, plan, targets, calibration, report) -> dict[str, nn.Module]:
    if method.layerwise is not None and not plan.pattern.is_dense():
        _layerwise_(method, model, plan, targets, calibration, report)  # times its passes and pruning apart
        return dict(targets)
    tic = time.perf_counter()
    if not plan.pattern.is_dense():
        for linear in targets.values():
            method.apply(linear, plan.pattern, None, plan)
    report.seconds["prune"] = time.perf_counter() - tic
    return dict(targets)


def _layerwise_(method, model, plan, targets, calibration, report) -> None:
    # Each decoder layer sees the windows as the already-pruned layers before it produce them; only
    # one decoder layer's inputs and statistics are held at a time.
    seconds = {"calibration": 0.0, "prune": 0.0}
    tic = time.perf_counter()
    walk = LayerInputs(model, calibration.windows)
    hidden = walk.hidden
    seconds["calibration"] += time.perf_counter() - tic
    for index in tqdm(range(len(walk.layers)), desc=f"{method.name} layers", unit="layer"):
        mine = {name: targets[name] for name in walk.names(index, targets)}
        if mine:
            tic = time.perf_counter()
            seen = {name: LayerInputStatistics(linear.in_features, method.layerwise == "hessian", linear.weight.device)
                    for name, linear in mine.items()}
            handles = [linear.register_forward_pre_hook(seen[name].add) for name, linear in mine.items()]
            try:
                walk.run(index, hidden)
            finally:
                for handle in handles:
                    handle.remove()
            seconds["calibration"] += time.perf_counter() - tic
            tic = time.perf_counter()
            for name, linear in mine.items():
                method.apply(linear, plan.pattern, seen[name], plan)
            del seen
            seconds["prune"] += time.perf_counter() - tic
        tic = time.perf_counter()
        hidden = walk.run(index, hidden)
        seconds["calibration"] += time.perf_counter() - tic
    report.seconds.update(seconds)


for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
