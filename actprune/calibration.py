"""Calibration: token windows of a corpus that is never evaluated, and what methods learn from them.

A `Calibration` tokenizes its windows once; statistics of the targeted layers' inputs (one pass
with forward pre-hooks: per input channel count, mean, variance, L2 norm, absolute maximum, and the
second moment where asked) are computed when a method first asks for them, cached on disk keyed by
everything they depend on, and reused by later jobs. Learned corrections are cached beside them.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import time
import weakref
from pathlib import Path

import torch
from torch import nn

from .files import cache_write, jsonl_text, set_aside
from .walk import feed

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
        return jsonl_text(Path(data_dir) / local, cache_dir), corpus
    if hub is None:
        raise FileNotFoundError(
            f"calibration.corpus={corpus}: {Path(data_dir or '<paths.data_dir>') / local} not found"
        )
    try:
        return "\n\n".join(datasets.load_dataset(hub[0], hub[1], split=hub[2])["text"]), corpus
    except Exception as error:  # offline and not cached
        where = f"{Path(data_dir or '<paths.data_dir>') / local} or " if local else ""
        raise FileNotFoundError(
            f"calibration.corpus={corpus}: neither {where}datasets' {'/'.join(hub)} is available "
            f"({type(error).__name__}); offline, use calibration.corpus=wikitext2_validation or c4 with "
            f"paths.data_dir laid out like ../shared/data"
        ) from error


def check_settings(count: int, seqlen: int, max_positions: int | None = None) -> None:
    if count < 1 or seqlen < 2:
        raise ValueError(
            f"calibration.windows={count}, calibration.seqlen={seqlen}: allowed values are windows >= 1, seqlen >= 2"
        )
    if max_positions is not None and seqlen > max_positions:
        raise ValueError(
            f"calibration.seqlen={seqlen} is longer than the model's context, max_position_embeddings={max_positions}"
        )


def check_text(text: str, count: int, seqlen: int) -> None:
    """Before the tokenizer is loaded: a text whose bytes (a token covers one at least; a few special
    tokens aside) cannot hold `count` non-overlapping windows is refused."""
    most = len(text.encode("utf-8")) + 2
    if count * seqlen > most:
        raise ValueError(
            f"calibration.windows={count} x calibration.seqlen={seqlen} = {count * seqlen} tokens: "
            f"more than the calibration text can hold (at most {most}), and windows do not overlap: "
            f"lower calibration.windows or calibration.seqlen"
        )


def window_starts(tokens: int, count: int, seqlen: int, seed: int) -> list[int]:
    """Where `count` windows of `seqlen` tokens start in a text of `tokens` tokens: distinct slots
    `phase + k × seqlen` (phase and slots seeded, in seeded order), so that no two windows share a
    token: a subset held out (refit's) is never also fitted on."""
    if count * seqlen > tokens:
        raise ValueError(
            f"calibration.windows={count} x calibration.seqlen={seqlen} = {count * seqlen} tokens: "
            f"more than the calibration text's {tokens}, and windows do not overlap: lower "
            f"calibration.windows or calibration.seqlen"
        )
    generator = torch.Generator().manual_seed(seed)
    phase = int(torch.randint(0, min(seqlen, tokens - count * seqlen + 1), (), generator=generator))
    slots = torch.randperm((tokens - phase) // seqlen, generator=generator)[:count]
    return [phase + slot * seqlen for slot in slots.tolist()]


def sample_windows(tokenizer, text: str, count: int, seqlen: int, seed: int) -> torch.Tensor:
    """`count` windows of `seqlen` tokens, none overlapping another, at random offsets (seeded) in
    the tokenized corpus."""
    check_settings(count, seqlen)
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    return torch.stack([ids[s : s + seqlen] for s in window_starts(ids.numel(), count, seqlen, seed)])


@torch.no_grad()
def collect(
    model: nn.Module, layers: dict[str, nn.Linear], batches: torch.Tensor, second_moment: bool = False
) -> dict[str, dict[str, torch.Tensor]]:
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
            acc = sums.setdefault(
                name,
                {
                    "count": 0,
                    "sum": 0,
                    "sumsq": 0,
                    "absmax": torch.zeros(x.shape[-1], dtype=torch.float64, device=x.device),
                },
            )
            acc["count"] += x.shape[0]
            acc["sum"] = acc["sum"] + x.sum(0)
            acc["sumsq"] = acc["sumsq"] + (x * x).sum(0)
            acc["absmax"] = torch.maximum(acc["absmax"], x.abs().amax(0))
            if second_moment:
                acc["second_moment"] = acc.get("second_moment", 0) + x.T @ x

        return record

    handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in layers.items()]
    handles.append(model.register_forward_pre_hook(lambda module, args: last.update(input=None)))
    try:
        feed(model, batches, desc="calibration windows")
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


def model_fingerprint(source: str, gguf_file: str | None = None) -> str:
    """A hub id, or a local folder with the size and time of each weight file (edits change it);
    with a GGUF file, that file alone (a folder may hold several quantizations)."""
    folder = Path(source)
    if not folder.is_dir():
        return source if gguf_file is None else f"{source}/{gguf_file}"
    if gguf_file is not None:
        files = [folder / gguf_file]
    else:
        files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf", ".json"))
    return str(folder.resolve()) + "".join(f"|{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)


_SOURCES: dict = {}  # function or module -> its source, as this process first read it


def code_digest(*pieces) -> str:
    """The source of the functions or modules that compute a cached result: a change makes a new key.
    Each piece's source is read once per process, and the modules read theirs at import (below and in
    `actprune.activation.pipeline`): a file edited while a job runs does not key the code it runs."""
    for piece in pieces:
        if piece not in _SOURCES:
            _SOURCES[piece] = inspect.getsource(piece)
    return hashlib.sha1("".join(_SOURCES[piece] for piece in pieces).encode()).hexdigest()[:12]


def libraries() -> str:
    """The versions of the libraries whose code computes the model's forward, for cache keys."""
    import transformers

    return f"torch {torch.__version__}, transformers {transformers.__version__}"


def _digest(parts: dict) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _check_statistics(stats, layers, second_moment: bool) -> None:
    """A cached file holds every layer's statistics, of the layer's width; else it raises."""
    keys = {"count", "mean", "var", "l2", "absmax", *(["second_moment"] if second_moment else [])}
    for name, layer in layers.items():
        missing = keys - set(stats[name])
        if missing or stats[name]["mean"].shape != (layer.in_features,):
            raise ValueError(f"{name}: missing {sorted(missing)} or a width other than {layer.in_features}")


class Calibration:
    """Calibration windows, tokenized once, and what is computed from them on demand.

    `Calibration(windows)` wraps token windows given by the caller (a notebook, a test); a job
    builds one with `from_text`, which also names the corpus and settings for `results.json` and
    a cache folder (with `model_id`, the model's fingerprint) where statistics and learned
    corrections are kept for later jobs.
    """

    def __init__(
        self,
        windows: torch.Tensor,
        corpus: str = "given",
        seed: int | None = None,
        model_id: str | None = None,
        cache_dir: str | None = None,
    ):
        self.windows = windows
        self.corpus, self.seed = corpus, seed
        self.model_id, self.cache_dir = model_id, cache_dir
        self.tokens_digest = hashlib.sha1(windows.cpu().numpy().tobytes()).hexdigest()
        self.used: dict = {}  # what was read or computed, for results.json
        self.seconds = 0.0  # spent tokenizing and on statistics (read from the cache or collected)

    @classmethod
    def from_text(
        cls,
        tokenizer,
        text: str,
        corpus: str,
        calibration_cfg,
        model_id: str | None = None,
        cache_dir: str | None = None,
    ) -> Calibration:
        c, tic = calibration_cfg, time.perf_counter()
        calibration = cls(
            sample_windows(tokenizer, text, c.windows, c.seqlen, c.seed), corpus, c.seed, model_id, cache_dir
        )
        calibration.seconds = time.perf_counter() - tic  # tokenizing counts as calibration time
        return calibration

    def record(self) -> dict:
        """What `results.json` says about the calibration a job used."""
        count, seqlen = self.windows.shape
        return {
            "corpus": self.corpus,
            "windows": count,
            "seqlen": seqlen,
            "seed": self.seed,
            "tokens": self.windows.numel(),
            **self.used,
        }

    def cache_file(self, kind: str, parts: dict, suffix: str) -> Path | None:
        """Where something computed from these windows for this model is kept; None without a cache."""
        if self.cache_dir is None or self.model_id is None:
            return None
        key = _digest({"model": self.model_id, "corpus": self.corpus, "tokens": self.tokens_digest, **parts})
        return Path(self.cache_dir) / kind / f"{key}{suffix}"

    def statistics(self, model: nn.Module, layers: dict[str, nn.Linear], second_moment: bool = False) -> dict:
        """Per layer input statistics (see `collect`), from the cache where an earlier job left them;
        a cached file that cannot be read is set aside, with a warning, and computed again."""
        tic = time.perf_counter()
        try:
            return self._statistics(model, layers, second_moment)
        finally:
            self.seconds += time.perf_counter() - tic

    def _statistics(self, model: nn.Module, layers: dict[str, nn.Linear], second_moment: bool) -> dict:
        dtype = str(next(model.parameters()).dtype)
        parts = {
            "layers": sorted(layers),
            "second_moment": second_moment,
            "dtype": dtype,
            "code": code_digest(collect, feed),
            "libraries": libraries(),
        }
        path = self.cache_file("calibration", parts, ".pt")
        if path is not None and path.is_file():
            try:
                stats = torch.load(path, weights_only=True)
                _check_statistics(stats, layers, second_moment)
            except Exception as error:  # truncated, another format, another model's: never trusted
                kept = set_aside(path, "corrupt")
                log.warning(
                    "calibration cache %s is unreadable (%s: %s): set aside as %s, computing again",
                    path,
                    type(error).__name__,
                    error,
                    kept,
                )
            else:
                log.info("calibration cache hit: %s", path)
                self.used.update(cache_file=str(path), cache="hit")
                return stats
        stats = collect(model, layers, self.windows, second_moment)
        if path is not None:
            log.info("calibration cache miss: statistics collected into %s", path)
            cache_write(path, lambda file: torch.save(stats, file))  # concurrent jobs: whole file or nothing
            self.used.update(cache_file=str(path), cache="miss")
        return stats


code_digest(collect, feed)  # read at import: the code this process runs
