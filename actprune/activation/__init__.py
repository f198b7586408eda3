"""Activation sparsity: the wrapper that masks a linear layer's input per token, the scores that
rank the entries, the transforms that correct the error, thresholds and learned corrections."""

from .wrapper import ActSparseLinear, magnitude

__all__ = ["ActSparseLinear", "magnitude"]
