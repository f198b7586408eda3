"""In-process reuse: a 6-job sweep in one process against the same six jobs as separate runs.

    python scripts/bench_sweep.py [--windows 2] [--data-dir ../shared/data] [--out /tmp/bench_sweep]

Both sides run the demo model (SmolLM2-135M, embedded) through the `actprune` command line,
activation and weight magnitude at 0, 8:16 and 2:4, and must give the same perplexities. The
ratio is the sweep's wall time over the sum of the single runs'.
"""

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
JOBS = [(method, sparsity) for method in ("act_magnitude", "weight_magnitude") for sparsity in ("0.0", "8:16", "2:4")]


def actprune(*args: str) -> float:
    tic = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "actprune", *args], cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(done.stdout[-2000:] + done.stderr[-3000:])
    return time.perf_counter() - tic


def perplexities(folder: Path) -> dict:
    found = {}
    for path in folder.rglob("results.json"):
        record = json.loads(path.read_text())
        pruning = record["config"]["pruning"]
        found[(pruning["method"], str(pruning["sparsity"]))] = next(
            value for key, value in record["metrics"].items() if key.startswith("ppl/")
        )
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=2, help="WikiText-2 windows of 512 tokens per job")
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench_sweep"))
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    common = [
        "logger=none",
        "model.seqlen=512",
        f"paths.data_dir={args.data_dir}",
        "benchmark.ppl_wikitext2.fallback_text=true",
        f"benchmark.ppl_wikitext2.max_windows={args.windows}",
    ]

    sweep = actprune(
        "-m",
        *common,
        "pruning=" + ",".join(sorted({m for m, _ in JOBS})),
        "pruning.sparsity=" + ",".join(dict.fromkeys(s for _, s in JOBS)),
        f"hydra.sweep.dir={args.out / 'sweep'}",
    )
    singles = [
        actprune(
            *common,
            f"pruning={method}",
            f"pruning.sparsity={sparsity}",
            f"hydra.run.dir={args.out / 'single' / f'{method}-{sparsity}'}",
        )
        for method, sparsity in JOBS
    ]

    same = perplexities(args.out / "sweep") == perplexities(args.out / "single")
    print(f"{len(JOBS)} jobs, {args.windows} windows of 512 tokens each, SmolLM2-135M on CPU")
    print(f"one sweep (model, data, tokenized text loaded once): {sweep:7.1f} s")
    print(
        f"six single runs:                                   {sum(singles):7.1f} s  ({', '.join(f'{s:.1f}' for s in singles)})"
    )
    print(f"ratio sweep / single runs: {sweep / sum(singles):.2f}   (goal <= 0.5); same perplexities: {same}")
    if not same:
        raise SystemExit("the sweep and the single runs disagree")


if __name__ == "__main__":
    main()
