"""Markdown table of a mitigation sweep: one row per method, one column per sparsity pattern.

    python scripts/mitigation_table.py outputs/multiruns/<time> [more sweep folders]

Cells are WikiText-2 perplexities. Where a method ran at several batch sizes, the largest relative
difference between them is shown in its own column (0 means batch-size invariant).
"""

import sys
from collections import defaultdict
from pathlib import Path

from actprune.results import label, read_all


def main(folders: list[str]) -> None:
    cells, batch_spread, patterns = defaultdict(dict), defaultdict(list), []
    for folder in folders:
        for _, result in read_all(Path(folder)):
            if result.get("status") != "ok" or "ppl/wikitext2" not in result["metrics"]:
                continue
            pattern = str(result["config"]["pruning"]["sparsity"]) if result["sparsity"]["kind"] != "dense" else "dense"
            row = label(result)
            ppl = result["metrics"]["ppl/wikitext2"]
            batch_spread[(row, pattern)].append(ppl)
            cells[row].setdefault(pattern, ppl)
            if pattern not in patterns:
                patterns.append(pattern)
    order = {p: i for i, p in enumerate(["dense", "2:4", "4:8", "8:16", "16:32", "0.5"])}
    patterns.sort(key=lambda p: order.get(p, len(order)))
    spread = {}
    for (row, _), values in batch_spread.items():
        if len(values) > 1:
            spread[row] = max(spread.get(row, 0.0), (max(values) - min(values)) / min(values))
    print("| method | " + " | ".join(patterns) + " | batch-size spread |")
    print("|" + " --- |" * (len(patterns) + 2))
    for row in sorted(cells, key=lambda r: [cells[r].get(p, float("inf")) for p in patterns]):
        values = [f"{cells[row][p]:.2f}" if p in cells[row] else "" for p in patterns]
        print(f"| {row} | " + " | ".join(values) + f" | {f'{spread[row]:.1e}' if row in spread else '-'} |")


if __name__ == "__main__":
    main(sys.argv[1:])
