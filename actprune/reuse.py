"""In-process reuse: jobs run one after another in one process (Hydra's basic launcher) share
what is expensive to load (model, tokenizer, texts, token ids); `release()` frees it."""

from __future__ import annotations

import gc
import logging

import torch

log = logging.getLogger(__name__)
_cache: dict = {}


def cached(key: tuple, load):
    """The object kept under `key`, or `load()` kept there. One model at a time: loading a model
    (a key starting with "model") drops the one before."""
    if key in _cache:
        log.info("Reusing %s loaded earlier in this process", key[0])  # an earlier job, or this job's plan
        return _cache[key]
    if key[0] == "model":
        for other in [k for k in _cache if k[0] == "model"]:
            del _cache[other]
        gc.collect()
    _cache[key] = load()
    return _cache[key]


def forget(key: tuple) -> None:
    """Drop one object (a model a failed job may have left altered)."""
    _cache.pop(key, None)


def release() -> None:
    """Free everything kept for later jobs of this process."""
    _cache.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
