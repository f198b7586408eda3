"""The unpruned reference: no layer changes, whatever `pruning.sparsity` a sweep crosses it with."""

from . import Method, register

register(Method("dense", "dense", apply=None))
