"""actprune: post-training activation sparsity for LLMs, as a library and a Hydra sweep app."""

from .masks import Pattern, parse_sparsity, pattern_keep_mask, topk_keep_mask
from .methods import METHODS, register
from .perplexity import perplexity
from .sparsify import SparsityReport, sparsify_

__all__ = [
    "METHODS",
    "Pattern",
    "SparsityReport",
    "parse_sparsity",
    "pattern_keep_mask",
    "perplexity",
    "register",
    "sparsify_",
    "topk_keep_mask",
]
