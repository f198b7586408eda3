"""Weight pruning with calibration, layer by layer: Wanda and SparseGPT.

Each decoder layer in turn sees the calibration windows as the already-pruned layers before it
produce them; its targeted projections are pruned from statistics of their inputs; its outputs
feed the next layer. Only one decoder layer's inputs and statistics are held at a time.
"""

from __future__ import annotations

import time

import torch
from torch import nn
from tqdm.auto import tqdm

from .masks import Pattern, pattern_keep_mask


class _Stop(Exception):
    pass


@torch.no_grad()
def first_layer_inputs(model: nn.Module, layers: nn.ModuleList, batches: torch.Tensor) -> list:
    """(args, kwargs) of the first decoder layer for each calibration window."""
    captured = []

    def catch(module, args, kwargs):
        captured.append((args, kwargs))
        raise _Stop

    handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        for window in batches:
            try:
                model(window[None].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


def _output(result):
    return result[0] if isinstance(result, tuple) else result


def _next_inputs(layer: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The next layer's (args, kwargs): this layer's output in place of its hidden states."""
    hidden = _output(layer(*args, **kwargs))
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


class _Inputs:
    """Accumulates what a rule needs from one linear layer's inputs."""

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


def wanda_(linear: nn.Linear, pattern: Pattern, inputs: _Inputs, **options) -> None:
    """Zero W by |W_ij| · ‖X_j‖₂, compared within each output row (N:M along the row, or a ratio per row)."""
    scores = linear.weight.detach().float().abs() * inputs.sumsq.sqrt().float()[None, :]
    linear.weight.mul_(pattern_keep_mask(scores, pattern))


def sparsegpt_(linear: nn.Linear, pattern: Pattern, inputs: _Inputs, blocksize: int = 128,
               percdamp: float = 0.01) -> None:
    """SparseGPT (Frantar & Alistarh, 2023): choose the mask by w² / [H⁻¹]²_jj block by block and
    update the remaining weights with the inverse Hessian of the layer's inputs (OBS)."""
    weight = linear.weight.detach().float().clone()
    columns = weight.shape[1]
    hessian = 2 * inputs.hessian / max(inputs.count, 1)
    dead = hessian.diagonal() == 0
    hessian[dead, dead] = 1
    weight[:, dead] = 0
    hessian += percdamp * hessian.diagonal().mean() * torch.eye(columns, device=hessian.device)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hessian)), upper=True)
    prune_per_group = pattern.m - pattern.n if pattern.is_nm else 0
    for start in range(0, columns, blocksize):
        end = min(start + blocksize, columns)
        block, block_hinv = weight[:, start:end].clone(), hinv[start:end, start:end]
        pruned, errors = torch.zeros_like(block), torch.zeros_like(block)
        if pattern.is_nm:
            mask = torch.zeros_like(block, dtype=torch.bool)
        else:  # a ratio: the smallest w²/d² of this block
            saliency = block**2 / block_hinv.diagonal()[None, :] ** 2
            cut = saliency.flatten().sort().values[int(saliency.numel() * pattern.ratio)] if pattern.ratio > 0 else -1
            mask = saliency <= cut if pattern.ratio > 0 else torch.zeros_like(block, dtype=torch.bool)
        for i in range(end - start):
            column = block[:, i]
            if pattern.is_nm and i % pattern.m == 0:
                saliency = block[:, i : i + pattern.m] ** 2 / block_hinv.diagonal()[i : i + pattern.m][None, :] ** 2
                mask.scatter_(1, i + saliency.topk(prune_per_group, dim=1, largest=False).indices, True)
            kept = column.masked_fill(mask[:, i], 0)
            pruned[:, i] = kept
            error = (column - kept) / block_hinv[i, i]
            block[:, i:] -= error[:, None] @ block_hinv[i, i:][None, :]
            errors[:, i] = error
        weight[:, start:end] = pruned
        weight[:, end:] -= errors @ hinv[start:end, end:]
    linear.weight.copy_(weight.to(linear.weight.dtype))


RULES = {"wanda": (wanda_, False), "sparsegpt": (sparsegpt_, True)}


@torch.no_grad()
def prune_sequentially_(model: nn.Module, layers: nn.ModuleList, prefix: str, targets: dict[str, nn.Linear],
                        pattern: Pattern, rule: str, batches: torch.Tensor, **options) -> dict[str, float]:
    """Prune `targets` decoder layer by decoder layer with `rule`, each layer calibrated on the
    outputs of the already-pruned layers before it. Returns seconds spent calibrating and pruning."""
    prune, hessian = RULES[rule]
    seconds = {"calibration": 0.0, "prune": 0.0}
    tic = time.perf_counter()
    inputs = first_layer_inputs(model, layers, batches)
    seconds["calibration"] += time.perf_counter() - tic
    for index, layer in enumerate(tqdm(layers, desc=f"{rule} layers", unit="layer")):
        mine = {name: linear for name, linear in targets.items() if name.startswith(f"{prefix}.{index}.")}
        if mine:
            tic = time.perf_counter()
            seen = {name: _Inputs(linear.in_features, hessian, linear.weight.device) for name, linear in mine.items()}
            handles = [linear.register_forward_pre_hook(seen[name].add) for name, linear in mine.items()]
            try:
                for args, kwargs in inputs:
                    layer(*args, **kwargs)
            finally:
                for handle in handles:
                    handle.remove()
            seconds["calibration"] += time.perf_counter() - tic
            tic = time.perf_counter()
            for name, linear in mine.items():
                prune(linear, pattern, seen[name], **options)
            del seen
            seconds["prune"] += time.perf_counter() - tic
        tic = time.perf_counter()
        inputs = [_next_inputs(layer, args, kwargs) for args, kwargs in inputs]
        seconds["calibration"] += time.perf_counter() - tic
    return seconds
