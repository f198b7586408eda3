"""Is one job's perplexity really lower than another's? A paired comparison, window by window.

    python scripts/paired_windows.py BASELINE_JOB OTHER_JOB [OTHER_JOB ...]

Each argument is a job folder (or its results.json). Both jobs must have measured the same
WikiText-2 windows; the gain is the baseline's mean NLL minus the other's, per window. Prints the
perplexities, the mean gain with its standard error and t, and on how many windows the other wins.
"""

import json
import math
import sys
from pathlib import Path

from actprune.run.compare import paired_gain
from actprune.run.table import label, pattern_label


def load(path: str) -> dict:
    path = Path(path)
    record = json.loads((path / "results.json" if path.is_dir() else path).read_text())
    if "window_nll" not in (record.get("ppl_wikitext2") or {}):
        raise SystemExit(f"{path}: no per-window NLL (a job of an earlier version, or without ppl_wikitext2)")
    return record


def main(paths: list[str]) -> None:
    if len(paths) < 2:
        raise SystemExit(__doc__)
    baseline = load(paths[0])
    base = baseline["ppl_wikitext2"]["window_nll"]
    print(
        f"baseline {label(baseline)} {pattern_label(baseline, baseline['sparsity'].get('pattern'))}: ppl {math.exp(sum(base) / len(base)):.2f}"
    )
    for path in paths[1:]:
        other = load(path)
        mine = other["ppl_wikitext2"]["window_nll"]
        if len(mine) != len(base):
            raise SystemExit(f"{path}: {len(mine)} windows, the baseline {len(base)}: not the same text")
        mean, se, wins = paired_gain(base, mine)
        print(
            f"{label(other)} {pattern_label(other, other['sparsity'].get('pattern'))}: ppl {math.exp(sum(mine) / len(mine)):.2f}; "
            f"mean NLL gain {mean:+.4f} ± {se:.4f} (SE), t = {mean / se:.1f}; "
            f"lower on {wins}/{len(mine)} windows"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
