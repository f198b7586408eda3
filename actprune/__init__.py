"""actprune: post-training activation sparsity for LLMs, as a library and a Hydra sweep app."""

from .calibration import Calibration
from .eval.perplexity import perplexity
from .masks import Pattern, parse_sparsity, pattern_keep_mask, topk_keep_mask
from .methods import METHODS, activation_method, weight_method
from .planning import PruningPlan, plan
from .sparsify import SparsityReport, sparsify_

__all__ = [
    "METHODS",
    "Calibration",
    "Pattern",
    "PruningPlan",
    "SparsityReport",
    "activation_method",
    "parse_sparsity",
    "pattern_keep_mask",
    "perplexity",
    "plan",
    "sparsify_",
    "topk_keep_mask",
    "weight_method",
]
