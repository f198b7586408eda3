"""The one wrapper module: masks the input of a linear layer per token, then runs its own matmul."""

from __future__ import annotations

import contextlib
import weakref
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..kernels import dispatch
from ..masks import POOLS, SCOPES, Pattern, Score, magnitude, pattern_keep_mask, pooled_scores, weighted_scores

BACKENDS = ("emulate", "kernel")


class _LastMask:
    """q/k/v (and gate/up) receive the very same input tensor: its mask is computed once.

    A hit needs the same live tensor, unmodified since (`_version`), the same pattern, score,
    per-channel score weight and pooling.
    """

    def __init__(self):
        self.key = None
        self.keep = self.dropped = None

    def get(self, x: torch.Tensor, pattern: Pattern, score: Score, weight: torch.Tensor | None, pool: str | None):
        if x.is_inference():  # inference tensors have no version counter: no reuse
            keep = _keep_mask(x, pattern, score, weight, pool)
            return keep, keep.numel() - keep.sum()
        if self.key is not None:
            ref, version, last_pattern, last_score, last_weight, last_pool = self.key
            if (
                ref() is x
                and version == x._version
                and last_pattern == pattern
                and last_score is score
                and last_weight is weight
                and last_pool == pool
            ):
                return self.keep, self.dropped
        self.keep = _keep_mask(x, pattern, score, weight, pool)
        self.dropped = self.keep.numel() - self.keep.sum()
        self.key = (weakref.ref(x), x._version, pattern, score, weight, pool)
        return self.keep, self.dropped


def _keep_mask(x, pattern: Pattern, score: Score, weight: torch.Tensor | None, pool: str | None) -> torch.Tensor:
    return pattern_keep_mask(pooled_scores(weighted_scores(x, score, weight), pool), pattern).expand(x.shape)


_last_mask = _LastMask()


def straight_through(keep: torch.Tensor, scores: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """The hard mask forward; backward, the gradient of a sigmoid around each group's cut, so that a
    learned score scale gets a signal although the mask is discrete."""
    width = scores.shape[-1]
    group, kept = pattern.group(width), pattern.kept(width)
    if kept >= group:
        return keep.to(scores.dtype)
    grouped = scores.unflatten(-1, (-1, group))
    top = grouped.detach().topk(kept + 1, dim=-1).values
    cut = ((top[..., kept - 1] + top[..., kept]) / 2).unsqueeze(-1)
    soft = torch.sigmoid((grouped - cut) / (cut.abs() * 0.1 + 1e-6)).flatten(-2)
    return keep.to(scores.dtype) + soft - soft.detach()


class ScoreSample:
    """Scores seen while a threshold is calibrated: a seeded random subset of every call's entries,
    over all tokens and channels (a strided subset would see only a few channels)."""

    def __init__(self, per_call: int = 4096, seed: int = 0):
        self.per_call = per_call
        self.generator = torch.Generator().manual_seed(seed)
        self.parts: list[torch.Tensor] = []

    def add(self, scores: torch.Tensor) -> None:
        flat = scores.flatten()
        index = torch.randint(flat.numel(), (min(self.per_call, flat.numel()),), generator=self.generator)
        self.parts.append(flat[index.to(flat.device)].float().cpu())

    def quantile(self, q: float) -> torch.Tensor:
        return torch.quantile(torch.cat(self.parts).double(), q)


SHIFTS = ("mean", "median", "static")


class TokenPositions:
    """The absolute positions of the tokens a decoder layer is running (its `position_ids`), set by a
    hook on the layer: a decode step's one token sits at index 0 of its chunk but may be token 40."""

    def __init__(self):
        self.ids: torch.Tensor | None = None

    def hook(self, module, args, kwargs) -> None:
        self.ids = kwargs.get("position_ids")

    def of(self, x: torch.Tensor) -> torch.Tensor:
        """Positions shaped to broadcast over `x` (batch, tokens, features) as (batch or 1, tokens, 1);
        a chunk's own indices where the layer was given none (a full forward from position 0)."""
        ids = self.ids
        if ids is None or ids.shape[-1] != x.shape[-2]:
            ids = torch.arange(x.shape[-2], device=x.device)
        return ids.to(x.device).reshape(-1, x.shape[-2], 1)  # a layer of a model split over devices


class ActSparseLinear(nn.Module):
    """`y = (x * keep(score(x))) Wᵀ + b` with the wrapped layer's own weight and bias.

    Options, each a light error correction that uses the current token or calibration only:
    - `input_order`, `input_scale` or `rotation`: prune in another basis, `x' = x[..., input_order] *
      input_scale` (either may be None) or `x @ rotation`, with `absorbed_weight` (`W R⁻ᵀ`) copied into
      the layer once, so `x' W'ᵀ = x Wᵀ`;
    - `channel_weight`: the score becomes `score(x) * channel_weight` (e.g. ‖W_:,j‖₂);
    - `shift`: prune `x − η` and add `η` back through the layer, `y = prune(x − η) Wᵀ + b + η W 1`
      with η the token's mean or median (rank-1 add-back), or `static`: η = `shift_vector`
      (the calibration mean per channel) and the add-back `η Wᵀ` is precomputed;
    - `variance`: rescale the pruned input so its per-token variance matches the unpruned one;
    - `dense_tokens`: the first k tokens of each sequence stay dense (attention sinks), counted in
      absolute positions where `positions` (a `TokenPositions` fed by the decoder layer) knows them;
    - `mask_scope="step"`: the rows at one position of a call (dim 0: the sequences of one decode step,
      or the windows of a batched forward) share one mask, ranked on their scores pooled by `mask_pool`
      (`actprune.masks.POOLS`), so that a decode step of B sequences reads the kept weight rows only;
    - `threshold` (set by `calibrate_thresholds_`): keep entries whose score reaches a calibrated
      per-layer threshold instead of a per-token top-k; the sparsity reached then varies;
    - `refit` (set by `actprune.activation.refit`): the pruned input is multiplied by weights W′, b′
      fitted to give back the dense output, the mask unchanged;
    - `correction`: learned terms (output affine, input shift, score scale, low-rank residual on the
      dropped entries), see `actprune.activation.learned`.
    It counts the inputs it zeroes and sees, and the weight rows a decode step must read (those some
    row of the call at one position keeps), on the device (no host sync per call), so the sparsity
    actually reached over a benchmark can be reported.
    Other steps change it only through its methods: `set_pattern`, `set_threshold`, `set_refit`,
    `track_positions`, and the modes `computing_dense`, `recording_scores`, `gathering_moments`,
    `uncounted` (context managers that restore the layer on exit).
    `backend="kernel"` computes what the emulation computes with real sparse compute where one
    applies (`actprune.kernels`): decode calls of at most `kernels.MAX_ROWS` tokens through a GEMV
    that reads only the weight columns of kept inputs (selection fused), 2:4 prefill through
    PyTorch's semi-structured sparse matmul; elsewhere it emulates and logs why once.
    """

    def __init__(
        self,
        linear: nn.Linear,
        pattern: Pattern,
        score: Score = magnitude,
        *,
        channel_weight: torch.Tensor | None = None,
        shift: str | None = None,
        shift_vector: torch.Tensor | None = None,
        variance: bool = False,
        input_order: torch.Tensor | None = None,
        input_scale: torch.Tensor | None = None,
        rotation: torch.Tensor | None = None,
        absorbed_weight: torch.Tensor | None = None,
        dense_tokens: int = 0,
        mask_scope: str = "token",
        mask_pool: str = "mean",
        correction: nn.Module | None = None,
        backend: str = "emulate",
    ):
        super().__init__()
        if mask_scope not in SCOPES or mask_pool not in POOLS:
            raise ValueError(
                f"pruning.mask_scope={mask_scope!r}, pruning.mask_pool={mask_pool!r}: allowed values are "
                f"{list(SCOPES)} and {list(POOLS)}"
            )
        if backend not in BACKENDS:
            raise ValueError(f"pruning.backend={backend!r}: allowed values are {list(BACKENDS)}")
        if backend == "kernel" and (variance or correction is not None):
            raise ValueError(
                f"pruning.backend=kernel runs no variance or learned corrections. Supported: {kernels.SUPPORT}"
            )
        if shift is not None and shift not in SHIFTS:
            raise ValueError(f"shift={shift!r}: allowed values are {list(SHIFTS)}")
        if (shift == "static") != (shift_vector is not None):
            raise ValueError("shift='static' needs shift_vector (the calibration mean per input channel)")
        self.linear = linear
        self.pattern = pattern
        self.score = score
        self.shift = shift
        self.variance = variance
        self.dense_tokens = dense_tokens
        self.mask_scope, self.mask_pool = mask_scope, mask_pool
        self.pool = mask_pool if mask_scope == "step" else None  # what `pooled_scores` takes
        self.positions: TokenPositions | None = None  # set by `track_positions` where dense_tokens counts absolute ones
        self.backend = backend
        self.correction = correction  # learned (actprune.activation.learned.Correction), trained after wrapping
        self.threshold = None  # TEAL-like selection (`set_threshold`): keep the entries whose score reaches it
        self.counting = True  # counts zeroed and seen inputs; off on a timed decode path (`uncounted`)
        # The modes other steps put the layer in, each through its own context manager below.
        self._dense = False  # `computing_dense`: the dense output (a learned correction's training target)
        self._recording = None  # `recording_scores`: a ScoreSample while a threshold is being calibrated
        self._moments = None  # `gathering_moments`: a refit.Moments of (pruned input, target)
        weight = linear.weight
        device = weight.device
        if (input_order is not None or input_scale is not None or rotation is not None) != (
            absorbed_weight is not None
        ):
            raise ValueError("a change of basis needs the absorbed weight W R⁻ᵀ, and only then")
        if rotation is not None and (input_order is not None or input_scale is not None):
            raise ValueError("a rotation holds any permutation and scale composed before it: give it alone")
        if absorbed_weight is not None:
            with torch.no_grad():
                weight.copy_(absorbed_weight)
        self.register_buffer("input_order", None if input_order is None else input_order.to(device))
        self.register_buffer("input_scale", None if input_scale is None else input_scale.to(device, weight.dtype))
        self.register_buffer("rotation", None if rotation is None else rotation.to(device, weight.dtype))
        self.register_buffer(
            "channel_weight", None if channel_weight is None else channel_weight.to(device, weight.dtype)
        )
        if shift == "static":
            shift_vector = shift_vector.to(device, weight.dtype)
            self.register_buffer("shift_vector", shift_vector)
            self.register_buffer("shift_output", F.linear(shift_vector, weight).detach())
        elif shift is not None:
            self.register_buffer("weight_rowsum", weight.detach().sum(1))
        if backend == "kernel":  # laid out once: W stays a (transposed) view of the kernel's copy, no second copy
            linear.weight.data = kernels.layout_weight(weight.data).t()
        self.register_buffer("refit_weight", None)  # W′ and b′ of `refit`, used on the pruned input only
        self.register_buffer("refit_bias", None)
        self.register_buffer("zeroed", torch.zeros((), dtype=torch.int64, device=device), persistent=False)
        self.register_buffer("seen", torch.zeros((), dtype=torch.int64, device=device), persistent=False)
        # weight rows (input channels) some row of a call keeps, summed over its positions; and the rows there were
        self.register_buffer("rows_kept", torch.zeros((), dtype=torch.int64, device=device), persistent=False)
        self.register_buffer("rows_total", torch.zeros((), dtype=torch.int64, device=device), persistent=False)

    def set_refit(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Multiply the pruned input by `weight` (and add `bias`) instead of the layer's own W and b."""
        like = self.linear.weight
        weight = weight.to(like.device, like.dtype)
        if self.backend == "kernel":  # in the kernel's layout, as W is
            weight = kernels.layout_weight(weight).t()
        self.refit_weight = weight
        self.refit_bias = None if bias is None else bias.to(like.device, like.dtype)

    def set_pattern(self, pattern: Pattern) -> None:
        """Another pattern for this layer (an allocation's choice)."""
        self.pattern = pattern

    def set_threshold(self, threshold: torch.Tensor | float | None) -> None:
        """Keep the entries whose score reaches `threshold` (None: the pattern's per-token top-k)."""
        like = self.linear.weight
        self.threshold = None if threshold is None else torch.as_tensor(threshold).to(like.device, like.dtype)

    def track_positions(self, positions: TokenPositions) -> None:
        """Read the absolute positions of the tokens from `positions` (for `dense_tokens`)."""
        self.positions = positions

    @contextmanager
    def computing_dense(self):
        """The layer computes its dense output (in its own basis: exact)."""
        self._dense = True
        try:
            yield
        finally:
            self._dense = False

    @contextmanager
    def recording_scores(self, sample: ScoreSample):
        """The layer computes its dense output and adds some of the scores it sees to `sample`."""
        self._recording = sample
        try:
            yield sample
        finally:
            self._recording = None

    @contextmanager
    def gathering_moments(self, moments):
        """The layer adds (pruned input, dense output less add-back) of every call to `moments` (refit)."""
        self._moments = moments
        try:
            yield moments
        finally:
            self._moments = None

    @contextmanager
    def uncounted(self):
        """No counting work (a few small kernels per call): for timed decoding."""
        self.counting = False
        try:
            yield
        finally:
            self.counting = True

    def reset_counts(self) -> None:
        for count in (self.zeroed, self.seen, self.rows_kept, self.rows_total):
            count.zero_()

    def count(self, keep: torch.Tensor, dropped: torch.Tensor) -> None:
        """Add a call's mask to the counts: the entries it zeroes, and the weight rows a decode step of
        its rows must read at each position (those any row keeps)."""
        if not self.counting:
            return
        self.zeroed += dropped
        union = keep.any(0) if keep.dim() >= 2 else keep
        self.rows_kept += union.sum()
        self.rows_total += union.numel()

    @property
    def busy(self) -> bool:
        """Recording scores or gathering moments: what the emulation alone computes."""
        return self._recording is not None or self._moments is not None

    @property
    def pruned_weight(self) -> torch.Tensor:
        return self.linear.weight if self.refit_weight is None else self.refit_weight

    @property
    def pruned_bias(self) -> torch.Tensor | None:
        return self.linear.bias if self.refit_weight is None else self.refit_bias

    @property
    def in_features(self) -> int:
        return self.linear.in_features

    @property
    def out_features(self) -> int:
        return self.linear.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.counting:
            self.seen += x.numel()
        if self.input_order is not None:
            x = x[..., self.input_order]
        if self.input_scale is not None:
            x = x * self.input_scale
        elif self.rotation is not None:
            x = x @ self.rotation
        correction = self.correction
        if self._dense or (
            self.pattern.is_dense() and self.shift is None and self._recording is None and correction is None
        ):
            return F.linear(x, self.linear.weight, self.linear.bias)
        if self.shift == "static":
            eta = self.shift_vector
        elif self.shift == "mean":
            eta = x.mean(-1, keepdim=True)
        elif self.shift == "median":
            eta = x.median(-1, keepdim=True).values
        else:
            eta = None
        centred = x if eta is None else x - eta
        if correction is not None and correction.shift is not None:
            centred = centred - correction.shift.to(x.dtype)
        channel_weight = self.channel_weight
        scale = None if correction is None else correction.channel_scale()
        if scale is not None:
            channel_weight = scale.to(x.dtype) if channel_weight is None else channel_weight * scale.to(x.dtype)
        y = dispatch.decode(self, centred, channel_weight) if self.backend == "kernel" else None
        if y is None:
            keep, dropped = self.keep_mask(centred, channel_weight)
            self.count(keep, dropped)
            # a gradient for the learned scale, which only moves the mask: while the scale is trained only
            trained = scale is not None and correction.log_scale.requires_grad
            if trained and torch.is_grad_enabled() and self.threshold is None:
                scores = pooled_scores(weighted_scores(centred, self.score, channel_weight), self.pool)
                pruned = centred * straight_through(keep, scores, self.pattern)
            else:
                pruned = centred * keep
            if self.variance:
                ratio = centred.float().var(-1, keepdim=True) / pruned.float().var(-1, keepdim=True).clamp_min(1e-12)
                pruned = pruned * ratio.sqrt().to(pruned.dtype)
            y = self._matmul(pruned, source=None if self.variance else (centred, keep))
        back = self.shift_output if self.shift == "static" else None if eta is None else eta * self.weight_rowsum
        if back is not None:
            y = y + back
        if self._moments is not None:  # refit: the dense output this pruned input should give, less add-back and bias
            target = F.linear(x, self.linear.weight)
            self._moments.add(pruned, target if back is None else target - back)
        if correction is not None:
            y = correction.output(y, centred * ~keep, self.linear.weight)
        return y

    def _matmul(self, pruned: torch.Tensor, source: tuple | None = None) -> torch.Tensor:
        """`pruned Wᵀ + b`; with the kernel backend, 2:4 prefill where it applies (`kernels.dispatch`)."""
        y = dispatch.prefill(self, pruned, source) if self.backend == "kernel" else None
        return F.linear(pruned, self.pruned_weight, self.pruned_bias) if y is None else y

    def positions_of(self, x: torch.Tensor) -> torch.Tensor:
        return (self.positions or TokenPositions()).of(x)

    def keep_mask(self, x: torch.Tensor, channel_weight: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The mask of the (centred) input `x`, and how many entries it zeroes."""
        if self._recording is not None:  # calibrating a threshold: stay dense, remember some scores
            self._recording.add(weighted_scores(x, self.score, channel_weight).detach())
            keep = torch.ones_like(x, dtype=torch.bool)
        elif self.threshold is not None:
            keep = (pooled_scores(weighted_scores(x, self.score, channel_weight), self.pool) >= self.threshold).expand(
                x.shape
            )
        else:
            keep, dropped = _last_mask.get(x, self.pattern, self.score, channel_weight, self.pool)
            if not self.dense_tokens:
                return keep, dropped
        if self.dense_tokens and x.dim() < 3:
            raise ValueError(
                f"pruning.dense_tokens={self.dense_tokens} needs inputs shaped (batch, tokens, features): "
                f"this layer got one of shape {tuple(x.shape)}, whose first tokens cannot be told"
            )
        if self.dense_tokens:  # attention sinks: a sequence's first tokens stay dense
            keep = keep | (self.positions_of(x) < self.dense_tokens)
        return keep, keep.numel() - keep.sum()

    def measured_sparsity(self) -> float | None:
        seen = int(self.seen)
        return int(self.zeroed) / seen if seen else None

    def measured_rows_read(self) -> float | None:
        """The fraction of weight rows a decode step of the calls' rows must read, over the calls counted."""
        total = int(self.rows_total)
        return int(self.rows_kept) / total if total else None

    def extra_repr(self) -> str:
        options = [f"shift={self.shift}"] * (self.shift is not None) + ["variance"] * self.variance
        options += ["permuted"] * (self.input_order is not None) + ["scaled"] * (self.input_scale is not None)
        options += ["rotated"] * (self.rotation is not None)
        options += [f"mask_scope=step, mask_pool={self.mask_pool}"] * (self.mask_scope == "step")
        options += [f"backend={self.backend}"] * (self.backend != "emulate")
        return ", ".join(
            [f"in_features={self.in_features}, out_features={self.out_features}, sparsity={self.pattern}", *options]
        )


@contextmanager
def not_counting(model: nn.Module):
    """The wrappers of `model` launch no counting work (a few small kernels per call): for timed decoding."""
    with contextlib.ExitStack() as stack:
        for module in model.modules():
            if isinstance(module, ActSparseLinear):
                stack.enter_context(module.uncounted())
        yield


@contextmanager
def computing_dense(wrappers):
    """The wrapped layers computing their dense output (in their own basis: exact)."""
    with contextlib.ExitStack() as stack:
        for wrapper in wrappers:
            stack.enter_context(wrapper.computing_dense())
        yield


@contextmanager
def unwrapped(model: nn.Module):
    """`model` with each ActSparseLinear's own `nn.Linear` in its place: the dense model's compute,
    same shapes, layout and device (its outputs are the dense model's only where no change of basis
    was absorbed into the weight); the wrappers return on exit. A weight the kernel backend laid out
    (in, out) gets a row-major copy meanwhile, as the dense model has it: the matmul libraries take
    other paths for the two layouts."""
    swapped = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, ActSparseLinear)
    ]
    laid_out = {wrapper: wrapper.linear.weight.data for _, _, wrapper in swapped if wrapper.backend == "kernel"}
    for parent, name, wrapper in swapped:
        setattr(parent, name, wrapper.linear)
    for wrapper, weight in laid_out.items():
        wrapper.linear.weight.data = weight.contiguous()
    try:
        yield
    finally:
        for wrapper, weight in laid_out.items():
            wrapper.linear.weight.data = weight
        for parent, name, wrapper in swapped:
            setattr(parent, name, wrapper)
