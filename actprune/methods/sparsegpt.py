"""SparseGPT (Frantar & Alistarh, 2023): choose the mask by w² / [H⁻¹]²_jj block by block and update
the rest of each row from the inverse Hessian of the layer's inputs, layer by layer on calibration
windows."""

from __future__ import annotations

import torch
from torch import nn

from ..masks import Pattern
from . import weight_method


@weight_method("weight_sparsegpt", layerwise="hessian")
@torch.no_grad()
def sparsegpt_(
    linear: nn.Linear, pattern: Pattern, inputs, plan=None, blocksize: int | None = None, percdamp: float | None = None
) -> None:
    """SparseGPT (Frantar & Alistarh, 2023): choose the mask by w² / [H⁻¹]²_jj block by block and
    update the remaining weights with the inverse Hessian of the layer's inputs (OBS). Block size and
    dampening: the arguments, else `pruning.blocksize` / `pruning.percdamp`."""
    blocksize = blocksize or (plan.config.blocksize if plan else 128)
    percdamp = percdamp if percdamp is not None else plan.config.percdamp if plan else 0.01
    if blocksize < 1 or (pattern.is_nm and blocksize % pattern.m):  # `plan` checks this for jobs; direct calls too
        raise ValueError(
            f"blocksize={blocksize} with sparsity {pattern}: allowed values are positive multiples of "
            f"{pattern.m if pattern.is_nm else 1}, so that no group of M crosses a block"
        )
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
