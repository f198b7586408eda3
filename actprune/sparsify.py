"""`sparsify_(model, config)`: prune the targeted projections of a model's decoder layers in place.

`sparsify_` carries out a plan (`actprune.planning.plan`: the config checked against the model) with
the pipeline of its method's kind, which takes what it needs from a `Calibration`, and reports
what was done in a `SparsityReport`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from . import weights
from .activation import allocation, pipeline
from .activation.wrapper import ActSparseLinear
from .calibration import Calibration
from .masks import Pattern
from .methods import Pruned
from .planning import PruningPlan, plan

# Each kind of method is carried out by its pipeline: `apply_(model, plan, targets, calibration) -> Pruned`.
PIPELINES = {
    "activation": pipeline.apply_,
    "weight": weights.apply_,
    "dense": lambda model, plan, targets, calibration: Pruned(dict(targets)),
}


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
    mask_scope: str = "token"
    mask_pool: str = "mean"
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
                layer.reset_counts()

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
            "mask_scope": self.mask_scope,
            **({"mask_pool": self.mask_pool} if self.mask_scope == "step" else {}),
            "rows_read": rows_read(wrappers) if wrappers else None,
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
        text = (
            "the fraction of pruned layers' input entries the masks zeroed, over every token the benchmarks "
            "fed (padding included, e.g. lm_eval's; generate's timed runs are not counted, its warm-up is); "
            "rows_read: the share of their weight a decode step of each call's batch reads (the rows of the "
            "channels some sequence keeps at a position), weighted by row length"
        )
        wrappers = [layer for layer in self.layers.values() if isinstance(layer, ActSparseLinear)]
        dense_reads = [
            reason
            for reason, used in (
                ("a per-token shift reads it to find η", any(w.shift in ("mean", "median") for w in wrappers)),
                (
                    "the low-rank correction reads the dropped entries",
                    any(w.correction is not None and w.correction.u is not None for w in wrappers),
                ),
            )
            if used
        ]
        if dense_reads:
            text += "; the layers still read every input (" + ", ".join(dense_reads) + ")"
        return text


def rows_read(wrappers: list[ActSparseLinear]) -> float | None:
    """The fraction of the pruned layers' weight (rows weighted by their length, out_features) that a decode
    step of the benchmark's batch must read: the rows of the channels some sequence keeps at a position."""
    kept = sum(int(w.rows_kept) * w.out_features for w in wrappers)
    total = sum(int(w.rows_total) * w.out_features for w in wrappers)
    return kept / total if total else None


def sparsify_(
    model: nn.Module, config, calibration: Calibration | torch.Tensor | None = None, keep_dense: bool = False
) -> SparsityReport:
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
        report.mask_scope, report.mask_pool = pruning.config.mask_scope, pruning.config.mask_pool
    if keep_dense:
        report.dense = {name: (linear, linear.weight.detach().to("cpu", copy=True)) for name, linear in targets.items()}
    tic = time.perf_counter()
    done = PIPELINES[method.kind](model, pruning, targets, calibration)
    report.layers, report.hooks, report.seconds = done.layers, done.hooks, done.seconds
    report.seconds.setdefault("prune", time.perf_counter() - tic)
    records = done.records
    report.allocation, report.refit, report.learned = (records.get(key) for key in ("allocation", "refit", "learned"))
    report.thresholds = records.get("thresholds", {})
    if method.kind == "weight":
        with torch.no_grad():
            report.weight_sparsity = {
                name: float((linear.weight == 0).sum()) / linear.weight.numel() for name, linear in targets.items()
            }
    if needs:
        report.calibration = calibration.record()
    return report
