"""`actprune-report PATH...`: every results.json below the given folders as one table and plots.

Writes `report.md` (a Markdown table as in a paper's README), `report.csv`, and PNG plots of
perplexity and mean accuracy against sparsity (one line per method, dense as a reference line)
into `--out`; with `--wandb` it also logs them to a summary run grouped with the sweep's jobs.
"""

from __future__ import annotations

import argparse
import csv
import logging
from pathlib import Path

from .masks import parse_sparsity
from .results import label, read_all, transform_names

log = logging.getLogger(__name__)
FIXED = ["model", "method", "sparsity", "transforms", "perplexity", "text"]
TAIL = ["mean_acc", "measured_sparsity", "runtime_s", "replaced_layers", "status", "folder"]


def rows(folders: list[Path]) -> list[dict]:
    """One row per job, sorted by model, method and sparsity."""
    found = []
    for folder in folders:
        for path, result in read_all(folder):
            metrics = result.get("metrics") or {}
            pruning = (result.get("config") or {}).get("pruning") or {}
            ppl_key = next((key for key in metrics if key.startswith("ppl/")), None)
            row = {
                "model": result.get("model", "?"),
                "method": label(result, transforms=False),
                "sparsity": "dense" if (result.get("sparsity") or {}).get("kind") == "dense" else str(pruning.get("sparsity", "?")),
                "transforms": ",".join(transform_names(pruning)),
                "perplexity": metrics.get(ppl_key) if ppl_key else None,
                "text": ppl_key.removeprefix("ppl/") if ppl_key else None,
                "mean_acc": metrics.get("lm_eval/mean_acc"),
                "measured_sparsity": (result.get("sparsity") or {}).get("measured"),
                "runtime_s": (result.get("timings") or {}).get("total"),
                "replaced_layers": result.get("replaced_layers"),
                "status": result.get("status", "?"),
                "folder": str(path.parent),
            }
            for key, value in metrics.items():
                if key.startswith("lm_eval/") and key.endswith("/acc"):
                    row[key.removeprefix("lm_eval/").removesuffix("/acc")] = value
            found.append(row)
    return sorted(found, key=lambda r: (r["model"], r["method"] != "dense", r["method"], r["transforms"],
                                        zeroed_fraction(r["sparsity"]), r["sparsity"]))


def columns(table: list[dict]) -> list[str]:
    tasks = sorted({key for row in table for key in row} - set(FIXED) - set(TAIL))
    return FIXED + tasks + TAIL


def zeroed_fraction(sparsity: str) -> float:
    if sparsity == "dense":
        return 0.0
    try:
        return parse_sparsity(sparsity).target()
    except ValueError:
        return float("nan")


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:.1f}"
    return "" if value is None else str(value)


def markdown(table: list[dict]) -> str:
    names = [c for c in columns(table) if c != "folder"]
    lines = ["| " + " | ".join(names) + " |", "|" + " --- |" * len(names)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in names) + " |" for row in table]
    return "\n".join(lines) + "\n"


def write_csv(table: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns(table))
        writer.writeheader()
        writer.writerows(table)


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
            if row["sparsity"] == "dense" or row["method"] == "dense":
                ax.axhline(row[metric], linestyle="--", color="gray", linewidth=1, label="dense")
                break
        lines: dict[tuple, list] = {}
        for row in mine:
            if row["sparsity"] == "dense" or row["method"] == "dense":
                continue
            kind = "N:M" if ":" in row["sparsity"] else "per token" if row["method"].startswith("act_") else "ratio"
            key = (row["method"], row["transforms"], kind)
            lines.setdefault(key, []).append((zeroed_fraction(row["sparsity"]), row[metric], row["sparsity"]))
        for key, points in sorted(lines.items()):
            points.sort()
            # N:M patterns share one zeroed fraction (2:4, 8:16 are both 0.5): points, not a line.
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=" ".join(filter(None, key)),
                    linestyle="none" if key[-1] == "N:M" else "-")
            for x, y, text in points:
                if ":" in text:
                    ax.annotate(text, (x, y), fontsize=7, textcoords="offset points", xytext=(4, 0))
        ax.set_title(model, fontsize=9)
        ax.set_xlim(-0.02, 1.0)
        ax.set_xlabel("sparsity (fraction zeroed)")
        ax.set_ylabel(ylabel)
        if log_scale:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def report(folders: list[Path], out: Path) -> dict[str, Path]:
    """Write the table (Markdown, CSV) and plots of every job below `folders` into `out`."""
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
    return written


def log_to_wandb(written: dict[str, Path], group: str, project: str, entity: str | None, mode: str,
                 run_dir: Path) -> None:
    """A summary run in the sweep's W&B group: the table and the plots."""
    import wandb

    with open(written["csv"]) as file:
        data = list(csv.reader(file))
    run = wandb.init(project=project, entity=entity, mode=mode, group=group, name=f"{group}-summary",
                     job_type="summary", dir=str(run_dir), reinit="finish_previous")
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


if __name__ == "__main__":
    main()
