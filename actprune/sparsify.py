"""`sparsify_(model, config)`: prune the targeted projections of a model's decoder layers in place.

`plan(model, config)` is the one place a pruning config is checked against a model (a meta-device
skeleton works, so a job checks before loading any weight); `sparsify_` carries a plan out with the
method it names, which takes what it needs from a `Calibration`.
"""

from __future__ import annotations

import fnmatch
import time
from dataclasses import asdict, dataclass, field

import torch
from omegaconf import OmegaConf
from torch import nn

from .activation import allocation
from .activation.learned import check_rank
from .activation.scores import get_score
from .activation.transforms import parse_transforms
from .activation.wrapper import BACKENDS, ActSparseLinear
from .calibration import Calibration
from .config import PruningConfig
from .masks import Pattern, parse_sparsity
from .methods import METHODS, Method, Needs, get_method
from .walk import decoder_layers

SELECTIONS = ("topk", "threshold")


def pruning_config(config) -> PruningConfig:
    """Accept a PruningConfig, a dict or a DictConfig; unknown keys and wrong types fail here."""
    if isinstance(config, PruningConfig):
        return config
    merged = OmegaConf.merge(OmegaConf.structured(PruningConfig), config)
    return OmegaConf.to_object(merged)


@dataclass(frozen=True)
class PruningPlan:
    """A pruning config checked against a model: the method, pattern, parsed transforms and the
    qualified names of the layers to prune (and of those `skip_layers` kept dense)."""

    config: PruningConfig
    method: Method
    pattern: Pattern
    transforms: list[tuple[str, dict]]
    targets: list[str]
    skipped: list[str]

    @property
    def needs(self) -> Needs:
        """What the method reads from calibration; empty where no layer is pruned."""
        return self.method.needs(self) if self.targets else Needs()

    def settings(self) -> dict:
        return asdict(self.config)


def plan(model: nn.Module, config) -> PruningPlan:
    """Check `config` against `model`'s decoder layers; every bad value names its key."""
    config = pruning_config(config)
    method = get_method(config.method)
    pattern = parse_sparsity(config.sparsity)
    get_score(config.score)
    transforms = parse_transforms(config.transforms)
    if config.selection not in SELECTIONS:
        raise ValueError(f"pruning.selection={config.selection!r}: allowed values are {list(SELECTIONS)}")
    if config.selection == "threshold" and pattern.is_nm:
        raise ValueError(f"pruning.selection=threshold with pruning.sparsity={pattern}: a calibrated threshold "
                         f"reaches an unstructured ratio; allowed: a float sparsity, or selection=topk for N:M")
    if config.dense_tokens < 0:
        raise ValueError(f"pruning.dense_tokens={config.dense_tokens}: allowed values are integers >= 0")
    if method.kind != "dense":  # a sweep may cross the dense model with allocation: nothing to allocate there
        allocation.check(config.allocation, config.allocation_choices, pattern, config.allocation_budget)
    if config.allocation != "uniform" and method.kind == "weight":  # weight methods would run uniform, unsaid
        supported = sorted(name for name, m in METHODS.items() if m.kind == "activation")
        raise ValueError(f"pruning.allocation={config.allocation} with pruning.method={method.name}: allocation "
                         f"is for activation methods ({supported}); allowed with weight methods: uniform")
    if config.backend not in BACKENDS:
        raise ValueError(f"pruning.backend={config.backend!r}: allowed values are {list(BACKENDS)}")
    if config.backend == "kernel" and method.kind != "dense":
        _check_kernel_backend(method, pattern, transforms, config)
    if config.blocksize < 1 or config.percdamp < 0:
        raise ValueError(f"pruning.blocksize={config.blocksize}, pruning.percdamp={config.percdamp}: allowed "
                         f"values are blocksize >= 1 and percdamp >= 0")
    prefix, layers = decoder_layers(model)
    indices = range(len(layers)) if config.layers is None else config.layers
    for index in indices:
        if not 0 <= index < len(layers):
            raise ValueError(f"pruning.layers contains {index}: allowed values are 0..{len(layers) - 1}")
    available = sorted({n.rsplit(".", 1)[-1] for n, m in layers.named_modules() if isinstance(m, nn.Linear)})
    unknown = [name for name in config.target_modules if name not in available]
    if unknown or not config.target_modules:
        raise ValueError(
            f"pruning.target_modules={list(config.target_modules)}: unknown {unknown}; "
            f"this model's decoder layers have {available}"
        )
    targets = {}
    for index in indices:
        for name, module in layers[index].named_modules():
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in config.target_modules:
                targets[f"{prefix}.{index}.{name}"] = module
    skipped = []
    for skip in config.skip_layers:
        matched = [name for name in targets if fnmatch.fnmatch(name, skip)]
        if not matched:
            raise ValueError(f"pruning.skip_layers: {skip!r} matches no targeted layer (names look like {next(iter(targets))!r})")
        for name in matched:
            skipped.append(name)
            del targets[name]
    if method.kind == "dense":  # a sweep may cross dense with sparsities: they do not apply
        return PruningPlan(config, method, Pattern(ratio=0.0), transforms, [], [])
    if not targets:
        raise ValueError(
            f"pruning.layers={config.layers}, pruning.skip_layers={list(config.skip_layers)}: no layer is left to "
            f"prune with pruning.method={method.name}; name some layers, or use pruning=dense for the dense model"
        )
    check_rank(transforms, targets)
    if method.layerwise == "hessian" and pattern.is_nm and config.blocksize % pattern.m:
        raise ValueError(
            f"pruning.blocksize={config.blocksize} with pruning.sparsity={pattern}: SparseGPT's groups of {pattern.m} "
            f"would cross its blocks; allowed: a blocksize that is a multiple of {pattern.m}"
        )
    if not pattern.is_nm and not pattern.is_dense():
        too_narrow = {name: m.in_features for name, m in targets.items() if pattern.kept(m.in_features) < 1}
        if too_narrow:
            name, width = next(iter(too_narrow.items()))
            raise ValueError(
                f"pruning.sparsity={pattern}: would zero every input of {name} (width {width}); "
                f"allowed: a ratio that keeps at least one entry of every targeted layer"
            )
    if pattern.is_nm:
        uneven = {name: m.in_features for name, m in targets.items() if m.in_features % pattern.m}
        if uneven:
            name, width = next(iter(uneven.items()))
            raise ValueError(
                f"pruning.sparsity={pattern}: layer {name} has input width {width}, not a multiple of "
                f"{pattern.m} ({len(uneven)} such layers); choose another M or drop it from "
                f"pruning.target_modules"
            )
    return PruningPlan(config, method, pattern, transforms, list(targets), sorted(skipped))


KERNEL_SUPPORT = ("activation methods; N:M patterns with M <= 32 (selection=topk) or a float sparsity with "
                  "selection=threshold; transforms shift, scaling, hadamard, pca (not variance, learnable)")


def _check_kernel_backend(method: Method, pattern: Pattern, transforms: list[tuple[str, dict]], config) -> None:
    """Refuse, before loading, what `pruning.backend=kernel` has no kernel for."""
    from .kernels import MAX_GROUP

    problems = []
    if method.kind != "activation":
        problems.append(f"pruning.method={method.name} prunes weights (a dense matmul of a sparse W)")
    elif pattern.is_nm and pattern.m > MAX_GROUP:
        problems.append(f"pruning.sparsity={pattern} has groups larger than {MAX_GROUP}")
    elif not pattern.is_nm and not pattern.is_dense() and config.selection != "threshold":
        problems.append(f"pruning.sparsity={pattern} with selection=topk ranks a whole token")
    unsupported = [name for name, _ in transforms if name in ("variance", "learnable")]
    if method.kind == "activation" and unsupported:
        problems.append(f"pruning.transforms has {unsupported}")
    if problems:
        raise ValueError(f"pruning.backend=kernel: {'; '.join(problems)}. Supported: {KERNEL_SUPPORT}; "
                         f"pruning.backend=emulate runs everything")


@dataclass
class SparsityReport:
    """What `sparsify_` did; `summary()` reads the measured sparsity from the layers as they ran."""

    method: str
    kind: str
    pattern: Pattern
    layers: dict[str, nn.Module] = field(default_factory=dict)
    weight_sparsity: dict[str, float] = field(default_factory=dict)
    skipped_layers: list[str] = field(default_factory=list)
    dense_tokens: int = 0
    selection: str = "topk"
    thresholds: dict[str, float] = field(default_factory=dict)
    allocation: dict | None = None  # N chosen per layer (pruning.allocation=calibrated), and the errors behind it
    refit: dict | None = None  # closed-form weights: per layer the held-out errors and the ridge chosen
    learned: dict | None = None  # learned corrections: trained (with their losses) or loaded, and where
    calibration: dict | None = None  # the calibration used, as results.json records it
    seconds: dict[str, float] = field(default_factory=dict)  # calibration, prune, thresholds, learn
    dense: dict[str, tuple[nn.Linear, torch.Tensor]] = field(default_factory=dict)  # with keep_dense
    hooks: list = field(default_factory=list)  # hook handles the method left on the model

    def restore_(self, model: nn.Module) -> None:
        """Undo `sparsify_(..., keep_dense=True)`: the original layers, with bit-identical weights."""
        if self.layers and not self.dense:
            raise ValueError("nothing to restore: call sparsify_(..., keep_dense=True)")
        with torch.no_grad():
            for name, (linear, weight) in self.dense.items():
                linear.weight.copy_(weight)
                linear.weight.data = linear.weight.data.contiguous()  # the kernel backend had transposed it
                parent_name, leaf = name.rsplit(".", 1)
                setattr(model.get_submodule(parent_name), leaf, linear)
        for handle in self.hooks:
            handle.remove()
        self.layers, self.dense, self.hooks = {}, {}, []

    @property
    def replaced_layers(self) -> int:
        return len(self.layers)

    def reset(self) -> None:
        """Forget what the layers counted so far (e.g. before the benchmark that should be measured)."""
        for layer in self.layers.values():
            if isinstance(layer, ActSparseLinear):
                layer.zeroed.zero_()
                layer.seen.zero_()

    def summary(self) -> dict:
        per_layer, zeroed, seen = {}, 0, 0
        wrappers = [layer for layer in self.layers.values() if isinstance(layer, ActSparseLinear)]
        for name, layer in self.layers.items():
            if isinstance(layer, ActSparseLinear):
                layer_zeroed, layer_seen = int(layer.zeroed), int(layer.seen)
            else:  # weight methods: the fraction of W that is zero
                layer_seen = layer.weight.numel()
                layer_zeroed = round(self.weight_sparsity[name] * layer_seen)
            per_layer[name] = layer_zeroed / layer_seen if layer_seen else None
            zeroed, seen = zeroed + layer_zeroed, seen + layer_seen
        return {
            "method": self.method,
            "kind": self.kind,
            "pattern": str(self.pattern),
            "target": self.pattern.target(),
            "measured": zeroed / seen if seen else (0.0 if self.kind == "dense" else None),
            "replaced_layers": self.replaced_layers,
            "skipped_layers": self.skipped_layers,
            "dense_tokens": self.dense_tokens,
            "selection": self.selection,
            "thresholds": self.thresholds,
            "per_layer": per_layer,
            "measured_covers": self.measured_covers(),
            **({"kept_by_weight": allocation.kept_by_weight(wrappers)} if wrappers else {}),
            **({"allocation": self.allocation} if self.allocation else {}),
        }

    def measured_covers(self) -> str:
        """What `measured` counts, and where the pruned layers still read every input."""
        if self.kind == "dense":
            return "nothing is pruned"
        if self.kind == "weight":
            return "the fraction of zero weights in the pruned layers"
        text = ("the fraction of pruned layers' input entries the masks zeroed, over every token the benchmarks "
                "fed (padding included, e.g. lm_eval's; generate's timed runs are not counted, its warm-up is)")
        wrappers = [layer for layer in self.layers.values() if isinstance(layer, ActSparseLinear)]
        dense_reads = [reason for reason, used in (
            ("a per-token shift reads it to find η", any(w.shift in ("mean", "median") for w in wrappers)),
            ("the low-rank correction reads the dropped entries",
             any(w.correction is not None and w.correction.u is not None for w in wrappers))) if used]
        if dense_reads:
            text += "; the layers still read every input (" + ", ".join(dense_reads) + ")"
        return text


def sparsify_(model: nn.Module, config, calibration: Calibration | torch.Tensor | None = None,
              keep_dense: bool = False) -> SparsityReport:
    """Prune `model` in place as `config` (a PruningConfig, dict, DictConfig, or a `plan` of them) says.

    Activation methods replace each target `nn.Linear` by a wrapper that masks its input per
    token; weight methods zero the layer's weight. Methods that learn from calibration text
    (scores and transforms with statistics, thresholds, learned corrections, Wanda, SparseGPT)
    read it from `calibration`: a `Calibration`, or a tensor of token windows (count × seqlen).
    With `keep_dense`, a CPU copy of each targeted weight is kept so that `report.restore_(model)`
    brings the dense model back exactly (for a model object reused by the next job).
    """
    pruning = config if isinstance(config, PruningPlan) else plan(model, config)
    if isinstance(calibration, torch.Tensor):
        calibration = Calibration(calibration)
    method, needs = pruning.method, pruning.needs
    if needs and calibration is None:
        raise ValueError(
            f"pruning.method={method.name} (score={pruning.config.score}, transforms={list(pruning.config.transforms)}, "
            f"selection={pruning.config.selection}) learns from calibration text: pass calibration= "
            f"(token windows, or an actprune.calibration.Calibration)"
        )
    targets = {name: model.get_submodule(name) for name in pruning.targets}
    report = SparsityReport(method.name, method.kind, pruning.pattern, selection=pruning.config.selection)
    report.skipped_layers = pruning.skipped
    if method.kind == "activation":
        report.dense_tokens = pruning.config.dense_tokens
    if keep_dense:
        report.dense = {name: (linear, linear.weight.detach().to("cpu", copy=True)) for name, linear in targets.items()}
    tic = time.perf_counter()
    report.layers = method.apply_(model, pruning, targets, calibration, report)
    report.seconds.setdefault("prune", time.perf_counter() - tic)
    if method.kind == "weight":
        with torch.no_grad():
            report.weight_sparsity = {name: float((linear.weight == 0).sum()) / linear.weight.numel()
                                      for name, linear in targets.items()}
    if needs:
        report.calibration = calibration.record()
    return report
