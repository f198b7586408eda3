"""Calibration: per-channel statistics of each target layer's input, from text that is never evaluated.

One pass with forward pre-hooks over windows of a calibration corpus collects, per targeted
projection and input channel: token count, mean, variance, L2 norm and absolute maximum. The
result is cached on disk, keyed by everything it depends on, and reused by later jobs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import weakref
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

# Calibration corpora: none of them is the evaluation split.
CORPORA = {
    "wikitext2_validation": ("wikitext-2-raw-v1/validation.jsonl", ("wikitext", "wikitext-2-raw-v1", "validation")),
    "wikitext2_train": (None, ("wikitext", "wikitext-2-raw-v1", "train")),
    "c4": ("c4-sample/documents.jsonl", None),
}


def corpus_text(corpus: str, data_dir: str | None, cache_dir: str | None = None) -> tuple[str, str]:
    """The calibration text and the corpus it came from (`auto`: WikiText-2 train where datasets
    can reach it, else the validation split)."""
    import datasets

    if corpus == "auto":
        try:
            return corpus_text("wikitext2_train", data_dir, cache_dir)
        except FileNotFoundError:
            return corpus_text("wikitext2_validation", data_dir, cache_dir)
    if corpus not in CORPORA:
        raise ValueError(f"calibration.corpus={corpus!r}: allowed values are {['auto', *sorted(CORPORA)]}")
    local, hub = CORPORA[corpus]
    if local and data_dir and (Path(data_dir) / local).is_file():
        rows = datasets.load_dataset("json", data_files=str(Path(data_dir) / local), split="train", cache_dir=cache_dir)
        return "\n\n".join(rows["text"]), corpus
    if hub is None:
        raise FileNotFoundError(f"calibration.corpus={corpus}: {Path(data_dir or '<paths.data_dir>') / local} not found")
    try:
        return "\n\n".join(datasets.load_dataset(hub[0], hub[1], split=hub[2])["text"]), corpus
    except Exception as error:  # offline and not cached
        where = f"{Path(data_dir or '<paths.data_dir>') / local} or " if local else ""
        raise FileNotFoundError(
            f"calibration.corpus={corpus}: neither {where}datasets' {'/'.join(hub)} is available "
            f"({type(error).__name__}); offline, use calibration.corpus=wikitext2_validation or c4 with "
            f"paths.data_dir laid out like ../shared/data"
        ) from error


def windows(tokenizer, text: str, count: int, seqlen: int, seed: int) -> torch.Tensor:
    """`count` windows of `seqlen` tokens at random offsets (seeded) in the tokenized corpus."""
    if count < 1 or seqlen < 2:
        raise ValueError(f"calibration.windows={count}, calibration.seqlen={seqlen}: allowed values are windows >= 1, seqlen >= 2")
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if ids.numel() <= seqlen:
        raise ValueError(f"calibration.seqlen={seqlen} is longer than the calibration text ({ids.numel()} tokens)")
    starts = torch.randint(0, ids.numel() - seqlen, (count,), generator=torch.Generator().manual_seed(seed))
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


@torch.no_grad()
def collect(model: nn.Module, layers: dict[str, nn.Linear], batches: torch.Tensor,
            second_moment: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    """Run the (dense) model over `batches`; per layer and input channel: count, mean, var, l2,
    absmax, and with `second_moment` the matrix Σ x xᵀ. Layers fed the very same tensor (q/k/v,
    gate/up) share one set of statistics."""
    sums, alias, last = {}, {}, {"input": None, "name": None}

    def hook(name):
        def record(module, args):
            x = args[0]
            if name in alias:
                return
            if last["input"] is not None and last["input"]() is x:
                alias[name] = last["name"]
                return
            last["input"], last["name"] = weakref.ref(x), name
            x = x.detach().reshape(-1, x.shape[-1]).double()
            acc = sums.setdefault(name, {"count": 0, "sum": 0, "sumsq": 0, "absmax": torch.zeros(x.shape[-1], dtype=torch.float64, device=x.device)})
            acc["count"] += x.shape[0]
            acc["sum"] = acc["sum"] + x.sum(0)
            acc["sumsq"] = acc["sumsq"] + (x * x).sum(0)
            acc["absmax"] = torch.maximum(acc["absmax"], x.abs().amax(0))
            if second_moment:
                acc["second_moment"] = acc.get("second_moment", 0) + x.T @ x

        return record

    handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in layers.items()]
    device = next(model.parameters()).device
    try:
        for window in tqdm(batches, desc="calibration windows", unit="window"):
            last["input"] = None
            model(window[None].to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    stats = {}
    for name, acc in sums.items():
        mean = acc["sum"] / acc["count"]
        stats[name] = {
            "count": torch.tensor(acc["count"]),
            "mean": mean.float().cpu(),
            "var": (acc["sumsq"] / acc["count"] - mean * mean).clamp_min(0).float().cpu(),
            "l2": acc["sumsq"].sqrt().float().cpu(),
            "absmax": acc["absmax"].float().cpu(),
        }
        if second_moment:
            stats[name]["second_moment"] = acc["second_moment"].float().cpu()
    for name, source in alias.items():
        stats[name] = stats[source]
    return stats


def cache_key(model_id: str, corpus: str, calibration_cfg, layer_names: list[str], batches: torch.Tensor, second_moment: bool) -> str:
    """Everything the statistics depend on: model, corpus, windows (their very tokens), layers."""
    fingerprint = {
        "model": model_id,
        "corpus": corpus,
        "windows": calibration_cfg.windows,
        "seqlen": calibration_cfg.seqlen,
        "seed": calibration_cfg.seed,
        "tokens": hashlib.sha1(batches.numpy().tobytes()).hexdigest(),
        "layers": sorted(layer_names),
        "second_moment": second_moment,
        "version": 1,
    }
    return hashlib.sha1(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]


def model_fingerprint(source: str) -> str:
    """A hub id, or a local folder with the size and time of each weight file (edits change it)."""
    folder = Path(source)
    if not folder.is_dir():
        return source
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf", ".json"))
    return str(folder.resolve()) + "".join(f"|{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)


def statistics(model, tokenizer, layers: dict[str, nn.Linear], calibration_cfg, model_id: str, text: str,
               corpus: str, cache_dir: str, second_moment: bool = False) -> tuple[dict, dict]:
    """Calibration statistics for `layers` over `text`, from the cache where present; and a record of how."""
    batches = windows(tokenizer, text, calibration_cfg.windows, calibration_cfg.seqlen, calibration_cfg.seed)
    key = cache_key(model_id, corpus, calibration_cfg, list(layers), batches, second_moment)
    path = Path(cache_dir) / "calibration" / f"{key}.pt"
    record = {"corpus": corpus, "windows": calibration_cfg.windows, "seqlen": calibration_cfg.seqlen,
              "seed": calibration_cfg.seed, "tokens": batches.numel(), "cache_file": str(path)}
    if path.is_file():
        log.info("calibration cache hit: %s", path)
        return torch.load(path, weights_only=True), {**record, "cache": "hit"}
    log.info("calibration cache miss: collecting statistics into %s", path)
    stats = collect(model, layers, batches, second_moment)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(handle)
    torch.save(stats, staging)
    os.replace(staging, path)  # concurrent jobs of a sweep: whole file or nothing
    return stats, {**record, "cache": "miss"}
