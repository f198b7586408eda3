"""Activation magnitude: per token, keep the inputs with the largest |x| (times `pruning.score`'s
per-channel weight), in the basis `pruning.transforms` chose."""

from ..activation.recipe import wrapper_options
from ..activation.wrapper import ActSparseLinear, magnitude
from . import activation_method


@activation_method("act_magnitude")
def act_magnitude(linear, plan, stats):
    options = wrapper_options(linear, plan.config.score, plan.transforms, stats, plan.pattern)
    return ActSparseLinear(
        linear,
        plan.pattern,
        score=magnitude,
        dense_tokens=plan.config.dense_tokens,
        mask_scope=plan.config.mask_scope,
        mask_pool=plan.config.mask_pool,
        backend=plan.config.backend,
        **options,
    )
