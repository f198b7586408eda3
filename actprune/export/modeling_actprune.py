"""An actprune-pruned causal LM for Hugging Face transformers (`trust_remote_code=True`), needing only torch
and transformers: copied verbatim into each folder `actprune-export` writes.

The folder's weights have every change of basis, scaling and refit folded in already; what depends on
the token is done here, at run time, by `SparseLinear` in place of each pruned projection: the mask
(N:M or a per-token ratio on |x| times a per-channel score weight, or a calibrated threshold; one per
token, or one shared by a batch's rows at a position), the shift and its add-back, the variance
rescaling and learned corrections. `config.actprune` says, per layer, which. It computes what
actprune's `ActSparseLinear` computes, in the same order of operations (the export's test compares them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import transformers
from torch import nn

BASE = "LlamaForCausalLM"  # set by actprune-export: the architecture the weights belong to
Base = getattr(transformers, BASE)

POOLS = {
    "mean": lambda s: s.mean(0, keepdim=True),
    "max": lambda s: s.amax(0, keepdim=True),
    "rms": lambda s: s.square().mean(0, keepdim=True).sqrt(),
}


def top_n_of_m(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n highest scores in every group of m along the last dim; ties go to the lower index."""
    groups = scores.unflatten(-1, (-1, m))
    nth = groups.topk(n, dim=-1, sorted=False).values.amin(-1, keepdim=True)
    above = groups > nth
    at_cut = groups == nth
    room = n - above.sum(-1, keepdim=True, dtype=torch.int32)
    return (above | (at_cut & (at_cut.cumsum(-1, dtype=torch.int32) <= room))).flatten(-2)


class Positions:
    """The absolute positions of the tokens a decoder layer runs (its `position_ids`), for `dense_tokens`."""

    def __init__(self):
        self.ids = None

    def hook(self, module, args, kwargs):
        self.ids = kwargs.get("position_ids")

    def of(self, x: torch.Tensor) -> torch.Tensor:
        ids = self.ids
        if ids is None or ids.shape[-1] != x.shape[-2]:
            ids = torch.arange(x.shape[-2], device=x.device)
        return ids.to(x.device).reshape(-1, x.shape[-2], 1)


class SparseLinear(nn.Module):
    """A pruned projection: `spec` (from config.actprune) names its tensors (loaded with the weights)
    and options."""

    def __init__(self, linear: nn.Linear, spec: dict):
        super().__init__()
        self.linear = linear
        self.spec = spec
        self.positions = None
        for key, (shape, kind, _) in spec["tensors"].items():
            tensor = torch.empty(shape, dtype=getattr(torch, kind))
            owner = self
            if key.startswith("correction."):
                if not hasattr(self, "correction"):
                    self.correction = nn.Module()
                owner, key = self.correction, key.removeprefix("correction.")
            owner.register_buffer(key, tensor)
        self.threshold = spec.get("threshold")  # compared in the weight's dtype, as actprune compares it
        self.pool = spec["mask_pool"] if spec["mask_scope"] == "step" else None

    def tensor(self, key: str) -> torch.Tensor | None:
        """This layer's tensor `key` ("rotation", "correction.u", ...) as the job held it, or None: a
        column-major matrix is stored transposed, and read back as that view (matmuls round by layout)."""
        if key not in self.spec["tensors"]:
            return None
        owner, name = (self.correction, key.removeprefix("correction.")) if "." in key else (self, key)
        value = getattr(owner, name)
        return value.T if self.spec["tensors"][key][2] else value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spec, weight, bias, tensor = self.spec, self.linear.weight, self.linear.bias, self.tensor
        correction = getattr(self, "correction", None)
        if tensor("input_order") is not None:
            x = x[..., tensor("input_order")]
        if tensor("input_scale") is not None:
            x = x * tensor("input_scale")
        elif tensor("rotation") is not None:
            x = x @ tensor("rotation")
        pattern, shift = spec["pattern"], spec["shift"]
        if pattern.get("dense") and shift is None and correction is None:
            return F.linear(x, weight, bias)
        eta = None
        if shift == "static":
            eta = tensor("shift_vector")
        elif shift == "mean":
            eta = x.mean(-1, keepdim=True)
        elif shift == "median":
            eta = x.median(-1, keepdim=True).values
        centred = x if eta is None else x - eta
        if tensor("correction.shift") is not None:
            centred = centred - tensor("correction.shift").to(x.dtype)
        channel_weight = tensor("channel_weight")
        if tensor("correction.log_scale") is not None:
            scale = tensor("correction.log_scale").exp().to(x.dtype)
            channel_weight = scale if channel_weight is None else channel_weight * scale
        keep = self.keep_mask(centred, channel_weight)
        pruned = centred * keep
        if spec["variance"]:
            ratio = centred.float().var(-1, keepdim=True) / pruned.float().var(-1, keepdim=True).clamp_min(1e-12)
            pruned = pruned * ratio.sqrt().to(pruned.dtype)
        if tensor("refit_weight") is not None:
            y = F.linear(pruned, tensor("refit_weight"), tensor("refit_bias"))
        else:
            y = F.linear(pruned, weight, bias)
        if shift == "static":
            y = y + tensor("shift_output")
        elif eta is not None:
            y = y + eta * tensor("weight_rowsum")
        if correction is not None:
            if tensor("correction.shift") is not None:
                y = y + F.linear(tensor("correction.shift").to(y.dtype), weight)
            if tensor("correction.u") is not None:
                dropped = centred * ~keep
                y = (
                    y
                    + (dropped @ tensor("correction.v").to(dropped.dtype)) @ tensor("correction.u").to(dropped.dtype).T
                )
            if tensor("correction.a") is not None:
                y = y * (1 + tensor("correction.a").to(y.dtype)) + tensor("correction.b").to(y.dtype)
        return y

    def keep_mask(self, x: torch.Tensor, channel_weight: torch.Tensor | None) -> torch.Tensor:
        scores = x.abs() if channel_weight is None else x.abs() * channel_weight
        if self.pool is not None and scores.dim() >= 2 and scores.shape[0] > 1:
            scores = POOLS[self.pool](scores.float())
        pattern = self.spec["pattern"]
        if self.threshold is not None:
            keep = scores >= torch.tensor(self.threshold, dtype=self.linear.weight.dtype, device=x.device)
        elif "n" in pattern:
            keep = top_n_of_m(scores, pattern["n"], pattern["m"])
        else:  # a ratio: the whole token is one group
            width = scores.shape[-1]
            keep = top_n_of_m(scores, width - round(pattern["ratio"] * width), width)
        keep = keep.expand(x.shape)
        if self.spec["dense_tokens"]:
            keep = keep | (self.positions.of(x) < self.spec["dense_tokens"])
        return keep


class ActPruneConfig(Base.config_class):
    """`BASE`'s config under a model type of its own (config.json's), which stock transformers does not load."""

    model_type = f"actprune_{Base.config_class.model_type}"


class ActPruneForCausalLM(Base):
    """`BASE` with its pruned projections replaced by `SparseLinear` (see config.actprune)."""

    config_class = ActPruneConfig

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """The model, each tensor copied into an allocation of its own (64-byte aligned): read from this
        folder's file, a tensor sits at its offset there, and alignment changes how a matrix-vector
        product rounds (a learned shift's add-back: 1.4e-3 in a job's perplexity, masks amplify it)."""
        model = super().from_pretrained(*args, **kwargs)
        with torch.no_grad():
            for tensor in [*model.parameters(), *model.buffers()]:
                tensor.data = tensor.data.clone()
        return model

    def __init__(self, config):
        super().__init__(config)
        layers = config.actprune["layers"]
        for name, spec in layers.items():
            parent, leaf = name.rsplit(".", 1)
            owner = self.get_submodule(parent)
            setattr(owner, leaf, SparseLinear(getattr(owner, leaf), spec))
        if any(spec["dense_tokens"] for spec in layers.values()):
            decoder = self.get_submodule(config.actprune["decoder_layers"])
            for index, layer in enumerate(decoder):
                positions = Positions()
                layer.register_forward_pre_hook(positions.hook, with_kwargs=True)
                prefix = f"{config.actprune['decoder_layers']}.{index}."
                for name in layers:
                    if name.startswith(prefix):
                        self.get_submodule(name).positions = positions
