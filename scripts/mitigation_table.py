"""Markdown tables of mitigation sweeps.

    python scripts/mitigation_table.py outputs/multiruns/<time> [more sweep folders]
    python scripts/mitigation_table.py --gap outputs/<sweep> [more sweep folders]

The first: one row per method, one column per sparsity pattern, cells WikiText-2 perplexities;
where a method ran at several batch sizes, the largest relative difference between them is shown
in its own column (0 means batch-size invariant). With `--gap`, one table per model: per pattern,
each method's calibration corpus (in-domain: WikiText-2 said so), perplexity, ΔNLL = ln(ppl/dense),
the share of the plain-vs-dense gap it closes, its paired per-window NLL gain over plain, its mean
zero-shot accuracy and the share of dense's it keeps, and its wall time (as in docs/results.md).
"""

import sys
from pathlib import Path

from actprune.run.compare import gap_table, pivot
from actprune.run.results import read_all

if __name__ == "__main__":
    gap = "--gap" in sys.argv[1:]
    folders = [arg for arg in sys.argv[1:] if arg != "--gap"]
    results = [result for folder in folders for _, result in read_all(Path(folder), refusals=False)]
    print(gap_table(results) if gap else pivot(results))
