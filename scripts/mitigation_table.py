"""Markdown tables of mitigation sweeps.

    python scripts/mitigation_table.py outputs/multiruns/<time> [more sweep folders]
    python scripts/mitigation_table.py --gap outputs/<sweep> [more sweep folders]
    python scripts/mitigation_table.py --scope outputs/<sweep> [more sweep folders]

The first: one row per method, one column per sparsity pattern, cells WikiText-2 perplexities;
where a method ran at several batch sizes, the largest relative difference between them is shown
in its own column (0 means batch-size invariant). With `--gap`, one table per model: per pattern,
each method's calibration corpus (in-domain: WikiText-2 said so), perplexity, ΔNLL = ln(ppl/dense),
the share of the plain-vs-dense gap it closes, its paired per-window NLL gain over plain, its mean
zero-shot accuracy and the share of dense's it keeps, and its wall time (as in docs/results.md).
With `--scope`, per model, pattern, setting and batch size: the `token` row and the `mask_scope=step`
rows, what step costs over token window by window, and the share of the weight a decode step reads.
"""

import sys
from pathlib import Path

from actprune.run.compare import gap_table, pivot, scope_table
from actprune.run.results import read_all

if __name__ == "__main__":
    tables = {"--gap": gap_table, "--scope": scope_table}
    chosen = [tables[arg] for arg in sys.argv[1:] if arg in tables]
    folders = [arg for arg in sys.argv[1:] if arg not in tables]
    results = [result for folder in folders for _, result in read_all(Path(folder), refusals=False)]
    print(chosen[0](results) if chosen else pivot(results))
