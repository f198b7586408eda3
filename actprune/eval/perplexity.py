"""WikiText-2 perplexity under the SparseGPT/Wanda protocol, and the `ppl_wikitext2` benchmark."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..files import jsonl_text
from ..reuse import cached
from . import Env, Measured, benchmark

log = logging.getLogger(__name__)


WIKITEXT2_TEST = Path("wikitext-2-raw-v1") / "test.jsonl"
FALLBACK = "python_docs"  # metric suffix when the demo measured the fallback text
FALLBACK_SOURCE = "python-docs (pydoc_data.topics), not WikiText-2"


def wikitext2_test_text(data_dir: str | None, fallback: bool = False, cache_dir: str | None = None) -> tuple[str, str]:
    """The test split's rows joined with "\\n\\n", and where they came from.

    Local rows are cached (as Arrow) under `cache_dir`; hub rows in datasets' own cache.
    With `fallback` (the demo only), an offline machine without WikiText-2 gets real English text
    that ships with every Python: the standard library's documentation topics.
    """
    import datasets

    local = Path(data_dir) / WIKITEXT2_TEST if data_dir else None
    if local is not None and local.is_file():
        return jsonl_text(local, cache_dir), str(local)
    try:
        rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
        return "\n\n".join(rows["text"]), "datasets:wikitext/wikitext-2-raw-v1/test"
    except Exception as error:  # offline, no cache: datasets raises several types
        if fallback:
            from pydoc_data.topics import topics

            log.warning("WikiText-2 is unavailable (%s); the demo falls back to %s", error, FALLBACK_SOURCE)
            return "\n\n".join(topics.values()), FALLBACK_SOURCE
        raise FileNotFoundError(
            f"WikiText-2 test split not found: {local or 'paths.data_dir is unset'} does not exist and "
            f"datasets could not load 'wikitext/wikitext-2-raw-v1' ({type(error).__name__}). Put the "
            f'split there as one {{"text": ...}} per line (paths.data_dir=DIR, laid out like '
            f"../shared/data), or run once with network access so datasets caches it."
        ) from error


def split_windows(token_ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of `seqlen` tokens; the remainder is dropped."""
    count = token_ids.numel() // seqlen
    if count == 0:
        raise ValueError(
            f"benchmark.ppl_wikitext2.seqlen={seqlen} is longer than the text ({token_ids.numel()} tokens)"
        )
    if max_windows is not None:
        count = min(count, max_windows)
    return token_ids[: count * seqlen].view(count, seqlen)


def tokenize(tokenizer, text: str) -> torch.Tensor:
    return tokenizer(text, return_tensors="pt").input_ids[0]


@torch.no_grad()
def perplexity(
    model,
    tokenizer,
    text: str | torch.Tensor,
    seqlen: int,
    batch_size: int = 1,
    max_windows: int | None = None,
    name: str = "wikitext2",
) -> dict:
    """exp(mean next-token negative log-likelihood) over the windows, summed in float64.

    The text is tokenized once with the tokenizer's defaults (a BOS at the very start where the
    tokenizer adds one), as in the reference protocol; `text` may be those token ids already.
    `name` says what the text is, in the progress bar and errors.
    """
    if batch_size < 1:
        raise ValueError(f"benchmark.ppl_wikitext2.batch_size={batch_size}: must be >= 1")
    ids = text if isinstance(text, torch.Tensor) else tokenize(tokenizer, text)
    batches = split_windows(ids, seqlen, max_windows)
    device = next(model.parameters()).device
    window_nll = []  # summed per window, so that two methods can be compared window by window
    for start in tqdm(range(0, len(batches), batch_size), desc=f"{name} windows", unit="batch"):
        batch = batches[start : start + batch_size].to(device)
        logits = model(batch, use_cache=False).logits[:, :-1]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1), reduction="none")
        window_nll.append(nll.double().view(len(batch), -1).sum(dim=1))
    window_nll = torch.cat(window_nll)
    tokens = len(batches) * (seqlen - 1)
    mean_nll = window_nll.sum().item() / tokens
    ppl = math.exp(mean_nll) if math.isfinite(mean_nll) and mean_nll < 700 else math.inf
    if not math.isfinite(ppl):
        raise FloatingPointError(f"{name} perplexity is not finite (mean NLL {mean_nll}): the pruned model diverged")
    return {
        "ppl": ppl,
        "windows": len(batches),
        "tokens": tokens,
        "mean_nll": mean_nll,
        "window_nll": (window_nll / (seqlen - 1)).tolist(),
    }


@dataclass
class PerplexityOptions:
    seqlen: int = 2048  # the config sets ${model.seqlen}
    batch_size: int = 1
    max_windows: Optional[int] = None  # null: every window of the test split
    fallback_text: bool = False  # demo only: offline English text when WikiText-2 is unavailable


@benchmark("ppl_wikitext2")
class WikiText2Perplexity:
    """Token perplexity on the raw WikiText-2 test split, windows of `seqlen` tokens."""

    Options = PerplexityOptions

    def __init__(self, options: PerplexityOptions):
        self.options = options
        self.text = self.source = None

    @staticmethod
    def data_files(options, data_dir: str | None) -> dict[str, Path]:
        """The local files a job with these options reads (actprune.run.job.inputs digests them)."""
        local = Path(data_dir) / WIKITEXT2_TEST if data_dir else None
        return {"wikitext2_test": local} if local is not None and local.is_file() else {}

    def prepare(self, env: Env) -> dict:
        o = self.options
        if o.seqlen < 2 or o.batch_size < 1 or (o.max_windows is not None and o.max_windows < 1):
            raise ValueError(
                f"benchmark.ppl_wikitext2.seqlen={o.seqlen}, batch_size={o.batch_size}, max_windows="
                f"{o.max_windows}: allowed values are seqlen >= 2 (default model.seqlen), batch_size >= 1, "
                f"max_windows >= 1 or null"
            )
        if env.max_positions is not None and o.seqlen > env.max_positions:
            raise ValueError(
                f"benchmark.ppl_wikitext2.seqlen={o.seqlen} (default model.seqlen) is longer than the "
                f"model's context, max_position_embeddings={env.max_positions}"
            )
        self.text, self.source = cached(
            ("text", env.data_dir, self.options.fallback_text),
            lambda: wikitext2_test_text(
                env.data_dir,
                self.options.fallback_text,
                cache_dir=str(Path(env.cache_dir) / "datasets") if env.cache_dir else None,
            ),
        )
        return {"data_source": self.source}

    def run(self, model, tokenizer, env: Env) -> Measured:
        o = self.options
        ids = cached(("ids", env.model_key, env.data_dir, o.fallback_text), lambda: tokenize(tokenizer, self.text))
        # The demo's offline fallback text must never pass for WikiText-2.
        name = FALLBACK if self.source == FALLBACK_SOURCE else "wikitext2"
        result = perplexity(model, tokenizer, ids, o.seqlen, o.batch_size, o.max_windows, name)
        details = {k: result[k] for k in ("windows", "tokens", "mean_nll", "window_nll")}
        short = result["windows"] % o.batch_size
        if short and any(getattr(module, "mask_scope", None) == "step" for module in model.modules()):
            # the plan refuses a max_windows that leaves one; the text's own count is known only here
            log.warning(
                "pruning.mask_scope=step: the last batch of %s shares its masks over %d windows, not "
                "batch_size=%d (%d windows in all); results.json says so in last_batch_windows",
                name,
                short,
                o.batch_size,
                result["windows"],
            )
            details["last_batch_windows"] = short
        return Measured({f"ppl/{name}": result["ppl"]}, details)
