"""The weight methods' pipeline: zero W once per target, or, for methods calibrated layer by layer
(Wanda, SparseGPT), decoder layer by decoder layer from the inputs each layer sees with the layers
before it already pruned."""

from __future__ import annotations

import time

import torch
from torch import nn

from .calibration import Calibration
from .methods import Pruned
from .planning import PruningPlan
from .walk import layer_by_layer


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
def apply_(
    model: nn.Module, plan: PruningPlan, targets: dict[str, nn.Linear], calibration: Calibration | None
) -> Pruned:
    """Zero the weights of `targets` in place as `plan.method` says."""
    done = Pruned(dict(targets))
    if plan.pattern.is_dense():
        done.seconds["prune"] = 0.0
    elif plan.method.layerwise is None:
        tic = time.perf_counter()
        for linear in targets.values():
            plan.method.apply(linear, plan.pattern, None, plan)
        done.seconds["prune"] = time.perf_counter() - tic
    else:
        _layerwise_(model, plan, targets, calibration.windows, done.seconds)
    return done


def _layerwise_(model, plan, targets, windows, seconds) -> None:
    """Prune each decoder layer's targets from the statistics of its inputs; `seconds` says how long
    the pruning took and how long the passes over the windows."""
    method, pruning = plan.method, 0.0
    start = time.perf_counter()

    def visit(walk, index, names, hidden):
        nonlocal pruning
        [stream] = hidden
        mine = {name: targets[name] for name in names}
        seen = {
            name: LayerInputStatistics(linear.in_features, method.layerwise == "hessian", linear.weight.device)
            for name, linear in mine.items()
        }
        handles = [linear.register_forward_pre_hook(seen[name].add) for name, linear in mine.items()]
        try:
            walk.run(index, stream)
        finally:
            for handle in handles:
                handle.remove()
        tic = time.perf_counter()
        for name, linear in mine.items():
            method.apply(linear, plan.pattern, seen[name], plan)
        pruning += time.perf_counter() - tic
        return [walk.run(index, stream)]

    layer_by_layer(model, windows, targets, visit, desc=f"{method.name} layers")
    seconds.update(prune=pruning, calibration=time.perf_counter() - start - pruning)
