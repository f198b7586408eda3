"""One `results.json` per job, written atomically and never over a finished job's file."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

RESULTS = "results.json"
REPO = Path(__file__).resolve().parent.parent


def versions() -> dict:
    found = {"python": platform.python_version()}
    for package in ("torch", "transformers", "actprune"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    try:
        done = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--verify", "HEAD"], capture_output=True, text=True, timeout=10
        )
        found["git_commit"] = done.stdout.strip() if done.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        found["git_commit"] = None
    return found


def claim(job_dir: Path) -> Path:
    """The results path of a job that has not finished before; refuse to overwrite one that has."""
    path = Path(job_dir) / RESULTS
    if path.exists():
        raise FileExistsError(
            f"{path} already exists: a finished job is never overwritten; choose another "
            f"hydra.run.dir / hydra.sweep.dir or move the old results away"
        )
    return path


def write(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(handle, "w") as file:
        json.dump(results, file, indent=2, default=str)
        file.write("\n")
    os.replace(staging, path)


def read_all(folder: Path) -> list[tuple[Path, dict]]:
    """Every results.json under `folder`, sorted by path."""
    found = []
    for path in sorted(Path(folder).rglob(RESULTS)):
        try:
            found.append((path, json.loads(path.read_text())))
        except (OSError, json.JSONDecodeError):
            continue
    return found


def label(result: dict) -> str:
    """The method as a reader names it: `act_magnitude`, `act_magnitude score=clact [pca,shift:static]`."""
    pruning = (result.get("config") or {}).get("pruning") or {}
    parts = [str(pruning.get("method", "?"))]
    if pruning.get("method", "").startswith("act_"):
        if pruning.get("score", "magnitude") != "magnitude":
            parts.append(f"score={pruning['score']}")
        transforms = [t if isinstance(t, str) else ":".join([t.get("name", "?"), *map(str, (v for k, v in t.items() if k != "name"))])
                      for t in pruning.get("transforms") or []]
        if transforms:
            parts.append(f"[{','.join(transforms)}]")
        if pruning.get("selection", "topk") != "topk":
            parts.append(pruning["selection"])
        if pruning.get("skip_layers"):
            parts.append(f"skip={','.join(pruning['skip_layers'])}")
    return " ".join(parts)


def table(rows: list[tuple[str, dict]]) -> str:
    """A plain-text table of jobs: name, method, sparsity, perplexity (and on which text), status."""
    header = ("job", "method", "sparsity", "perplexity", "text", "mean_acc", "measured", "layers", "status")
    lines = [header]
    for name, result in rows:
        sparsity = result.get("sparsity") or {}
        ppl_key = next((key for key in result.get("metrics") or {} if key.startswith("ppl/")), None)
        ppl = result["metrics"][ppl_key] if ppl_key else None
        measured = sparsity.get("measured")
        lines.append((
            name,
            label(result),
            str(sparsity.get("pattern", "?")),
            f"{ppl:.4f}" if isinstance(ppl, float) else "-",
            ppl_key.removeprefix("ppl/") if ppl_key else "-",
            f"{mean_acc:.4f}" if isinstance(mean_acc := (result.get("metrics") or {}).get("lm_eval/mean_acc"), float) else "-",
            f"{measured:.4f}" if isinstance(measured, float) else "-",
            str(result.get("replaced_layers", "-")),
            result.get("status", "?"),
        ))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    rendered = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines]
    rendered.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(rendered)
