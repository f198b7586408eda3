"""WikiText-2 perplexity under the SparseGPT/Wanda protocol."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


def windows(token_ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of `seqlen` tokens; the remainder is dropped."""
    count = token_ids.numel() // seqlen
    if count == 0:
        raise ValueError(f"benchmark.ppl_wikitext2.seqlen={seqlen} is longer than the text ({token_ids.numel()} tokens)")
    if max_windows is not None:
        count = min(count, max_windows)
    return token_ids[: count * seqlen].view(count, seqlen)


def tokenize(tokenizer, text: str) -> torch.Tensor:
    return tokenizer(text, return_tensors="pt").input_ids[0]


@torch.no_grad()
def perplexity(model, tokenizer, text: str | torch.Tensor, seqlen: int, batch_size: int = 1,
               max_windows: int | None = None) -> dict:
    """exp(mean next-token negative log-likelihood) over the windows, summed in float64.

    The text is tokenized once with the tokenizer's defaults (a BOS at the very start where the
    tokenizer adds one), as in the reference protocol; `text` may be those token ids already.
    """
    if batch_size < 1:
        raise ValueError(f"benchmark.ppl_wikitext2.batch_size={batch_size}: must be >= 1")
    ids = text if isinstance(text, torch.Tensor) else tokenize(tokenizer, text)
    batches = windows(ids, seqlen, max_windows)
    device = next(model.parameters()).device
    window_nll = []  # summed per window, so that two methods can be compared window by window
    for start in tqdm(range(0, len(batches), batch_size), desc="wikitext2 windows", unit="batch"):
        batch = batches[start : start + batch_size].to(device)
        logits = model(batch, use_cache=False).logits[:, :-1]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1), reduction="none")
        window_nll.append(nll.double().view(len(batch), -1).sum(dim=1))
    window_nll = torch.cat(window_nll)
    tokens = len(batches) * (seqlen - 1)
    mean_nll = window_nll.sum().item() / tokens
    ppl = math.exp(mean_nll) if math.isfinite(mean_nll) and mean_nll < 700 else math.inf
    if not math.isfinite(ppl):
        raise FloatingPointError(f"WikiText-2 perplexity is not finite (mean NLL {mean_nll}): the pruned model diverged")
    return {"ppl": ppl, "windows": len(batches), "tokens": tokens, "mean_nll": mean_nll,
            "window_nll": (window_nll / (seqlen - 1)).tolist()}
