"""`sparsify_(model, config)`: prune the targeted projections of a model's decoder layers in place."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import torch
from omegaconf import OmegaConf
from torch import nn

from .config import PruningConfig
from .layers import ActSparseLinear
from .masks import Pattern, parse_sparsity
from .methods import get_method
from .mitigation import needs_calibration, parse_transforms, get_score
from .weights import prune_sequentially_


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The text decoder's layers and their qualified name (a multimodal model's vision tower excluded)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__}: cannot find its decoder layers (model.get_decoder().layers)")
    prefix = next(name for name, module in model.named_modules() if module is layers)
    return prefix, layers


SELECTIONS = ("topk", "threshold")


def pruning_config(config) -> PruningConfig:
    """Accept a PruningConfig, a dict or a DictConfig; unknown keys and wrong types fail here."""
    merged = OmegaConf.merge(OmegaConf.structured(PruningConfig), config)
    return OmegaConf.to_object(merged)


def select_targets(model: nn.Module, config) -> tuple[Pattern, dict[str, nn.Linear]]:
    """Validate `config` against `model` (meta-device models work) and return the layers to prune."""
    pattern, targets, _ = _targets(model, pruning_config(config))
    return pattern, targets


def _targets(model: nn.Module, config: PruningConfig) -> tuple[Pattern, dict[str, nn.Linear], list[str]]:
    method = get_method(config.method)
    pattern = parse_sparsity(config.sparsity)
    get_score(config.score)
    parse_transforms(config.transforms)
    if config.selection not in SELECTIONS:
        raise ValueError(f"pruning.selection={config.selection!r}: allowed values are {list(SELECTIONS)}")
    if config.selection == "threshold" and pattern.is_nm:
        raise ValueError(f"pruning.selection=threshold with pruning.sparsity={pattern}: a calibrated threshold "
                         f"reaches an unstructured ratio; allowed: a float sparsity, or selection=topk for N:M")
    if config.dense_tokens < 0:
        raise ValueError(f"pruning.dense_tokens={config.dense_tokens}: allowed values are integers >= 0")
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
        return Pattern(ratio=0.0), {}, []
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
    return pattern, targets, sorted(skipped)


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
    seconds: dict[str, float] = field(default_factory=dict)  # layer-by-layer methods: calibration vs pruning
    dense: dict[str, tuple[nn.Linear, torch.Tensor]] = field(default_factory=dict)  # with keep_dense

    def restore_(self, model: nn.Module) -> None:
        """Undo `sparsify_(..., keep_dense=True)`: the original layers, with bit-identical weights."""
        if self.layers and not self.dense:
            raise ValueError("nothing to restore: call sparsify_(..., keep_dense=True)")
        with torch.no_grad():
            for name, (linear, weight) in self.dense.items():
                linear.weight.copy_(weight)
                parent_name, leaf = name.rsplit(".", 1)
                setattr(model.get_submodule(parent_name), leaf, linear)
        self.layers, self.dense = {}, {}

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
        }


def sparsify_(model: nn.Module, config, stats: dict | None = None, batches: torch.Tensor | None = None,
              keep_dense: bool = False) -> SparsityReport:
    """Prune `model` in place as `config` (a PruningConfig, dict or DictConfig) says.

    Activation methods replace each target `nn.Linear` by a wrapper that masks its input per
    token; weight methods zero the layer's weight. Scores and transforms that need calibration
    take `stats` ({layer name: statistics}, from `actprune.calibration.statistics`); Wanda and
    SparseGPT take `batches` of calibration token windows. With `keep_dense`, a CPU copy of each
    targeted weight is kept so that `report.restore_(model)` brings the dense model back exactly
    (for a model object reused by the next job). Returns a report of what was replaced.
    """
    config = pruning_config(config)
    method = get_method(config.method)
    pattern, targets, skipped = _targets(model, config)
    if targets and method.kind == "activation" and needs_calibration(config) and stats is None:
        raise ValueError(
            f"pruning.score={config.score} / pruning.transforms={list(config.transforms)} need calibration "
            f"statistics: pass stats= (see actprune.calibration.statistics)"
        )
    report = SparsityReport(method.name, method.kind, pattern, selection=config.selection)
    report.skipped_layers = skipped
    if keep_dense:
        report.dense = {name: (linear, linear.weight.detach().to("cpu", copy=True)) for name, linear in targets.items()}
    if method.kind == "activation":
        report.dense_tokens = config.dense_tokens
    if method.rule and targets and not pattern.is_dense():
        if batches is None:
            raise ValueError(f"pruning.method={method.name} prunes on calibration inputs: pass batches= (token windows)")
        prefix, layers = decoder_layers(model)
        options = {"blocksize": config.blocksize, "percdamp": config.percdamp} if method.rule == "sparsegpt" else {}
        report.seconds = prune_sequentially_(model, layers, prefix, targets, pattern, method.rule, batches, **options)
    for name, linear in targets.items():
        replacement = method.apply(linear, pattern, config, (stats or {}).get(name))
        if replacement is not linear:
            parent_name, leaf = name.rsplit(".", 1)
            setattr(model.get_submodule(parent_name), leaf, replacement)
        if method.kind == "weight":
            with torch.no_grad():
                report.weight_sparsity[name] = float((linear.weight == 0).sum()) / linear.weight.numel()
        report.layers[name] = replacement
    return report


@torch.no_grad()
def calibrate_thresholds_(model: nn.Module, report: SparsityReport, batches: torch.Tensor) -> dict[str, float]:
    """TEAL-like selection: per layer, the score below which the target fraction of the calibration
    inputs falls (taken on the dense model, in each layer's final basis). Sets and returns them."""
    wrappers = {name: layer for name, layer in report.layers.items() if isinstance(layer, ActSparseLinear)}
    for layer in wrappers.values():
        layer.recording = []
    device = next(model.parameters()).device
    try:
        for window in batches:
            model(window[None].to(device), use_cache=False)
        for name, layer in wrappers.items():
            samples = torch.cat(layer.recording).double()
            layer.threshold = torch.quantile(samples, report.pattern.target()).to(device, layer.weight.dtype)
            report.thresholds[name] = float(layer.threshold)
    finally:
        for layer in wrappers.values():
            layer.recording = None
    return report.thresholds
