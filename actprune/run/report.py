"""`actprune-report PATH...`: every results.json below the given folders as one table and plots.

Writes `report.md` (a Markdown table as in a paper's README), `report.csv`, and PNG plots of
perplexity and mean accuracy against sparsity (one line per method, dense as a reference line)
and, where jobs ran the generate benchmark, `speed.png`: perplexity against decode speed-up over
dense (a panel per model, backend and device) into `--out`; with `--wandb` it also logs them to a
summary run grouped with the sweep's jobs.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
from pathlib import Path

from . import tracking
from .table import markdown, rows, write_csv, zeroed_fraction


def plot(table: list[dict], metric: str, ylabel: str, path: Path, log_scale: bool = False) -> bool:
    """`metric` against the zeroed fraction: a line per (model, method, transforms) for ratios,
    points for N:M patterns, dense as a dashed line. False when no job measured it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in table if r["status"] == "ok" and isinstance(r.get(metric), (int, float))]
    if not measured:
        return False
    models = sorted({r["model"] for r in measured})
    fig, axes = plt.subplots(1, len(models), figsize=(8 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = [r for r in measured if r["model"] == model]
        for row in mine:
            if is_dense(row):
                ax.axhline(row[metric], linestyle="--", color="gray", linewidth=1, label="dense")
                break
        lines: dict[tuple, list] = {}
        for row in mine:
            if is_dense(row):
                continue
            kind = "N:M" if ":" in row["sparsity"] else "per token" if row["method"].startswith("act_") else "ratio"
            key = (row["method"], row["transforms"], kind)
            lines.setdefault(key, []).append((zeroed_fraction(row["sparsity"]), row[metric], row["sparsity"]))
        for key, points in sorted(lines.items()):
            points.sort()
            # N:M patterns share one zeroed fraction (2:4, 8:16 are both 0.5): points, not a line.
            ax.plot(
                [p[0] for p in points],
                [p[1] for p in points],
                marker="o",
                label=" ".join(filter(None, key)),
                linestyle="none" if key[-1] == "N:M" else "-",
            )
            for x, y, text in points:
                if ":" in text:
                    ax.annotate(text, (x, y), fontsize=7, textcoords="offset points", xytext=(4, 0))
        ax.set_title(model, fontsize=9)
        ax.set_xlim(-0.02, 1.0)
        ax.set_xlabel("sparsity (fraction zeroed)")
        ax.set_ylabel(ylabel)
        if log_scale:
            ax.set_yscale("log")
    _save(fig, axes[0], path)
    return True


def _save(fig, axes, path: Path) -> None:
    """A grid and a legend on every panel, then the file."""
    import matplotlib.pyplot as plt

    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def is_dense(row: dict) -> bool:
    return row["sparsity"] == "dense" or row["method"] == "dense"


def speed_points(table: list[dict]) -> dict[tuple, dict[str, list[tuple[float, float, str]]]]:
    """What `speed.png` shows: {(model, backend, device): {line label: [(speed-up, perplexity,
    pattern)]}}, a panel per model, backend and device, so that emulated and kernel speeds (or two
    devices') are never on one line. Empty when no ok job has both perplexity and speed-up."""
    measured = [r for r in table if r["status"] == "ok" and isinstance(r.get("perplexity"), (int, float))]
    timed = [r for r in measured if isinstance(r.get("speedup"), (int, float))]
    # Panels come from pruned jobs: dense runs no pruning backend, and joins every panel of its model below.
    pruned = [r for r in timed if not is_dense(r)] or timed
    panels: dict[tuple, dict[str, list]] = {(r["model"], r["backend"], r["_device"]): {} for r in pruned}
    for row in timed:
        if not is_dense(row):
            method = " ".join(filter(None, (row["method"], row["transforms"])))
            panels[(row["model"], row["backend"], row["_device"])].setdefault(method, []).append(
                (row["speedup"], row["perplexity"], row["sparsity"])
            )
    for (model, _, device), lines in panels.items():
        for row in measured:
            # Dense runs no pruning backend, so it is every backend's reference; its measured ratio is
            # timing noise around 1 (the same model timed twice), so it sits at exactly 1.0.
            if is_dense(row) and row["model"] == model and row["_device"] in (device, None):
                lines.setdefault("dense", []).append((1.0, row["perplexity"], "dense"))
    return {
        key: {method: sorted(points) for method, points in sorted(panels[key].items())}
        for key in sorted(panels, key=lambda key: [str(part) for part in key])
    }  # None (not recorded) sorts too


def speed_plot(table: list[dict], path: Path) -> bool:
    """WikiText-2 perplexity (log) against decode speed-up over dense: a line per method, its points
    named by sparsity pattern. False when no job measured both."""
    panels = speed_points(table)
    if not panels:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(8 * len(panels), 4.5), squeeze=False)
    for ax, ((model, backend, device), lines) in zip(axes[0], panels.items()):
        ax.axvline(1.0, linestyle="--", color="gray", linewidth=1)
        for method, points in lines.items():
            style = {"color": "black", "marker": "*", "markersize": 10} if method == "dense" else {"marker": "o"}
            ax.plot([p[0] for p in points], [p[1] for p in points], label=method, **style)
            for x, y, pattern in points:
                ax.annotate(pattern, (x, y), fontsize=7, textcoords="offset points", xytext=(4, 0))
        ax.set_title(" ".join(filter(None, (model, backend, device and f"on {device}"))), fontsize=9)
        ax.set_xlabel("decode speed-up over dense (batch 1, > 1 is faster)")
        ax.set_ylabel("WikiText-2 perplexity (log)")
        ax.set_yscale("log")
    _save(fig, axes[0], path)
    return True


def report(folders: list[Path], out: Path) -> dict[str, Path]:
    """Write the table (Markdown, CSV) and plots of every job below `folders` into `out`."""
    for folder in folders:  # else a typo reads as a sweep that wrote nothing
        if not folder.is_dir():
            raise SystemExit(f"{folder}: {'not a folder' if folder.exists() else 'no such folder'}")
    table = rows(folders)
    if not table:
        raise SystemExit(f"no results.json below {', '.join(map(str, folders))}")
    out.mkdir(parents=True, exist_ok=True)
    written = {"markdown": out / "report.md", "csv": out / "report.csv"}
    written["markdown"].write_text(markdown(table))
    write_csv(table, written["csv"])
    if plot(table, "perplexity", "WikiText-2 perplexity (log)", out / "perplexity.png", log_scale=True):
        written["perplexity_plot"] = out / "perplexity.png"
    if plot(table, "mean_acc", "mean zero-shot accuracy", out / "accuracy.png"):
        written["accuracy_plot"] = out / "accuracy.png"
    if speed_plot(table, out / "speed.png"):
        written["speed_plot"] = out / "speed.png"
    return written


def log_to_wandb(
    written: dict[str, Path], group: str, project: str, entity: str | None, mode: str, run_dir: Path
) -> None:
    """A summary run in the sweep's W&B group: the table and the plots."""
    import wandb

    with open(written["csv"]) as file:
        data = list(csv.reader(file))
    # One summary run per sweep folder: a sweep run again updates it instead of adding another.
    run_id = "summary-" + hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:12]
    run = wandb.init(
        id=run_id,
        resume="allow",
        project=project,
        entity=entity,
        mode=mode,
        group=group,
        name=f"{group}-summary",
        job_type="summary",
        dir=str(run_dir),
        reinit="finish_previous",
        settings=tracking.settings(mode),
    )
    media = {"summary/table": wandb.Table(columns=data[0], data=data[1:])}
    media.update({f"summary/{key}": wandb.Image(str(path)) for key, path in written.items() if key.endswith("_plot")})
    run.log(media)
    run.finish()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="actprune-report", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="sweep folders (searched recursively)")
    parser.add_argument("--out", type=Path, help="where to write (default: the folder given, or ./report)")
    parser.add_argument("--wandb", action="store_true", help="also log to a W&B summary run")
    parser.add_argument("--project", default="actprune")
    parser.add_argument("--entity", default=None)
    parser.add_argument("--mode", default="offline", choices=["offline", "online"])
    args = parser.parse_args(argv)
    out = args.out or (args.paths[0] if len(args.paths) == 1 else Path("report"))
    written = report(args.paths, out)
    print(written["markdown"].read_text())
    for path in written.values():
        print(f"wrote {path}")
    if args.wandb:
        log_to_wandb(written, args.paths[0].name, args.project, args.entity, args.mode, out)
        if args.mode == "offline":
            print(tracking.sync_hint(out))


if __name__ == "__main__":
    main()
