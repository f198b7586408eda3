"""Markdown table of a mitigation sweep: one row per method, one column per sparsity pattern.

    python scripts/mitigation_table.py outputs/multiruns/<time> [more sweep folders]

Cells are WikiText-2 perplexities. Where a method ran at several batch sizes, the largest relative
difference between them is shown in its own column (0 means batch-size invariant).
"""

import sys
from pathlib import Path

from actprune.run.results import read_all
from actprune.run.table import pivot

if __name__ == "__main__":
    print(pivot([result for folder in sys.argv[1:] for _, result in read_all(Path(folder), refusals=False)]))
