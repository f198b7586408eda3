"""`plan(model, config)`: the one place a pruning config is checked against a model.

A meta-device skeleton works, so a job checks before loading any weight. The plan holds the
method, the pattern, the parsed transforms, the qualified names of the layers to prune and what the
method reads from calibration (`needs`).
"""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass

from omegaconf import OmegaConf
from torch import nn

from . import kernels
from .activation import allocation
from .activation.learned import check_rank
from .activation.recipe import needed_statistics
from .activation.scores import get_score
from .activation.transforms import Transforms, parse_transforms
from .activation.wrapper import BACKENDS, ActSparseLinear
from .config import PruningConfig
from .masks import POOLS, SCOPES, Pattern, parse_sparsity
from .methods import METHODS, Method, get_method
from .walk import decoder_layers

SELECTIONS = ("topk", "threshold")


def pruning_config(config) -> PruningConfig:
    """Accept a PruningConfig, a dict or a DictConfig; unknown keys and wrong types fail here."""
    if isinstance(config, PruningConfig):
        return config
    merged = OmegaConf.merge(OmegaConf.structured(PruningConfig), config)
    return OmegaConf.to_object(merged)


@dataclass(frozen=True)
class Needs:
    """What a method reads from calibration: statistics of the targets' inputs, token windows."""

    statistics: frozenset = frozenset()
    windows: bool = False

    def __bool__(self) -> bool:
        return bool(self.statistics) or self.windows


@dataclass(frozen=True)
class PruningPlan:
    """A pruning config checked against a model: the method, pattern, parsed transforms and the
    qualified names of the layers to prune (and of those `skip_layers` kept dense)."""

    config: PruningConfig
    method: Method
    pattern: Pattern
    transforms: Transforms
    targets: list[str]
    skipped: list[str]
    needs: Needs = Needs()  # what the method reads from calibration; empty where no layer is pruned

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
        raise ValueError(
            f"pruning.selection=threshold with pruning.sparsity={pattern}: a calibrated threshold "
            f"reaches an unstructured ratio; allowed: a float sparsity, or selection=topk for N:M"
        )
    if "permute" in transforms.names and method.kind == "activation" and not pattern.is_nm:
        raise ValueError(
            f"pruning.transforms={transforms.names} with pruning.sparsity={pattern}: permute balances the "
            f"groups of an N:M pattern, and a whole-token top-k or threshold does not depend on the order "
            f"of the channels; allowed: an N:M sparsity, or pruning.transforms without permute"
        )
    if config.mask_scope not in SCOPES or config.mask_pool not in POOLS:
        raise ValueError(
            f"pruning.mask_scope={config.mask_scope!r}, pruning.mask_pool={config.mask_pool!r}: allowed values "
            f"are {list(SCOPES)} and {list(POOLS)}"
        )
    if config.mask_scope != "token" and method.kind == "weight":
        raise ValueError(
            f"pruning.mask_scope={config.mask_scope} with pruning.method={method.name}: a weight method's zeros "
            f"do not depend on the tokens; allowed with weight methods: token"
        )
    if config.dense_tokens < 0:
        raise ValueError(f"pruning.dense_tokens={config.dense_tokens}: allowed values are integers >= 0")
    if method.kind != "dense":  # a sweep may cross the dense model with allocation: nothing to allocate there
        allocation.check(config.allocation, config.allocation_choices, pattern, config.allocation_budget)
    if config.allocation != "uniform" and method.kind == "weight":  # weight methods would run uniform, unsaid
        supported = sorted(name for name, m in METHODS.items() if m.kind == "activation")
        raise ValueError(
            f"pruning.allocation={config.allocation} with pruning.method={method.name}: allocation "
            f"is for activation methods ({supported}); allowed with weight methods: uniform"
        )
    if config.backend not in BACKENDS:
        raise ValueError(f"pruning.backend={config.backend!r}: allowed values are {list(BACKENDS)}")
    problems = kernels.unsupported(method.kind, method.name, pattern, config.selection, transforms.names)
    if config.backend == "kernel" and method.kind != "dense" and problems:
        raise ValueError(
            f"pruning.backend=kernel: {'; '.join(problems)}. Supported: {kernels.SUPPORT}; "
            f"pruning.backend=emulate runs everything"
        )
    if config.blocksize < 1 or config.percdamp < 0:
        raise ValueError(
            f"pruning.blocksize={config.blocksize}, pruning.percdamp={config.percdamp}: allowed "
            f"values are blocksize >= 1 and percdamp >= 0"
        )
    prefix, layers = decoder_layers(model)
    indices = range(len(layers)) if config.layers is None else config.layers
    for index in indices:
        if not 0 <= index < len(layers):
            raise ValueError(f"pruning.layers contains {index}: allowed values are 0..{len(layers) - 1}")
    pruned = [name for name, module in layers.named_modules() if isinstance(module, ActSparseLinear)]
    if pruned:
        raise ValueError(
            f"{prefix}.{pruned[0]} and {len(pruned) - 1} other layers are pruned already: plan and "
            f"sparsify_ a dense model (`report.restore_(model)` undoes sparsify_(..., keep_dense=True))"
        )
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
            raise ValueError(
                f"pruning.skip_layers: {skip!r} matches no targeted layer (names look like {next(iter(targets))!r})"
            )
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
    check_rank(transforms.learnable, targets)
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
    return PruningPlan(
        config, method, pattern, transforms, list(targets), sorted(skipped), _needs(method, config, pattern, transforms)
    )


def _needs(method: Method, config: PruningConfig, pattern: Pattern, transforms: Transforms) -> Needs:
    if method.kind == "activation":
        steps = (
            config.selection == "threshold"
            or transforms.learnable is not None
            or transforms.refit is not None
            or config.allocation != "uniform"
        )
        return Needs(frozenset(needed_statistics(config.score, transforms)), steps)
    return Needs(windows=method.layerwise is not None and not pattern.is_dense())
