"""Check an exported folder without actprune: its WikiText-2 perplexity against the job's.

    python scripts/check_export.py OUT_DIR path/to/wikitext-2-raw-v1/test.jsonl

Loads OUT_DIR with stock transformers (`trust_remote_code=True`: its modeling_actprune.py) in this
process, where actprune cannot be imported, measures perplexity as the job did (the test rows joined
with a blank line, tokenized once, non-overlapping windows of the job's seqlen, its batch size, window
count and CPU threads, mean next-token NLL summed in float64), prints both figures and exits 1 where their
relative difference exceeds --tolerance.
"""

import argparse
import json
import math
import sys
from pathlib import Path

sys.modules["actprune"] = None  # an import of actprune fails here: the folder must stand alone

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seqlen: int, batch_size: int, max_windows: int | None) -> float:
    count = ids.numel() // seqlen if max_windows is None else min(ids.numel() // seqlen, max_windows)
    windows = ids[: count * seqlen].view(count, seqlen)
    total = 0.0
    for start in range(0, count, batch_size):
        batch = windows[start : start + batch_size]
        logits = model(batch, use_cache=False).logits[:, :-1]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1), reduction="none")
        total += nll.double().sum().item()
    return math.exp(total / (count * (seqlen - 1)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="what actprune-export wrote")
    parser.add_argument("wikitext", type=Path, help="WikiText-2 raw test split, one {'text': ...} per line")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest relative difference accepted")
    args = parser.parse_args()
    job = json.loads((args.folder / "config.json").read_text())["actprune"]["job"]
    options, expected = job["benchmark"]["ppl_wikitext2"], job["metrics"]["ppl/wikitext2"]
    if job.get("threads"):  # CPU sums round by thread count: the job's
        torch.set_num_threads(job["threads"])
    model = AutoModelForCausalLM.from_pretrained(args.folder, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.folder, trust_remote_code=True)  # it reads the config too
    rows = [json.loads(line)["text"] for line in args.wikitext.read_text(encoding="utf-8").splitlines() if line]
    ids = tokenizer("\n\n".join(rows), return_tensors="pt").input_ids[0]
    ppl = perplexity(model, ids, options["seqlen"], options["batch_size"], options["max_windows"])
    difference = abs(ppl - expected) / expected
    print(
        json.dumps({"ppl": ppl, "job_ppl": expected, "relative_difference": difference, "model": type(model).__name__})
    )
    sys.exit(0 if difference <= args.tolerance else 1)


if __name__ == "__main__":
    main()
