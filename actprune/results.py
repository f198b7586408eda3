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


# What a job computes; a finished job counts as done for a later run only if these agree.
SETTINGS = ("model", "pruning", "benchmark", "calibration", "seed", "device")


def settings(cfg) -> dict:
    """The parts of a job's config that determine its numbers (not where or how it logs)."""
    from omegaconf import OmegaConf

    return {key: OmegaConf.to_container(cfg[key], resolve=True) if OmegaConf.is_config(cfg[key]) else cfg[key]
            for key in SETTINGS if key in cfg}


def same_settings(recorded: dict, current: dict) -> bool:
    """Whether a recorded config agrees with the current settings (only their keys are compared)."""
    return all(key in recorded and _agree(recorded[key], value) for key, value in current.items())


def _agree(recorded, current) -> bool:
    # A key that a later version added with an empty value (null, [], false) counts as absent,
    # so that results of an earlier version still resume.
    if isinstance(recorded, dict) and isinstance(current, dict):
        return set(recorded) <= set(current) and all(
            _agree(recorded[key], value) if key in recorded else value in (None, [], {}, False)
            for key, value in current.items())
    return recorded == current


def previous(job_dir: Path) -> dict | None:
    """The record a job left in `job_dir`, None if there is none; an unreadable one reads as failed."""
    path = Path(job_dir) / RESULTS
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        return {"status": "failed", "error": f"unreadable {path}: {error}"}


class AlreadyDone(Exception):
    """The job finished before with the same settings: nothing to do."""

    def __init__(self, path: Path, record: dict):
        super().__init__(f"{path} says ok: skipped (overwrite=true re-runs it)")
        self.path, self.record = path, record


def state(record: dict | None, current: dict | None, overwrite: bool = False) -> str:
    """What a job finds in its folder: `missing`, `overwrite`, `failed` (or unfinished), `done`
    (ok, same settings: skip it) or `changed` (ok, other settings: refuse)."""
    if record is None:
        return "missing"
    if overwrite:
        return "overwrite"
    if record.get("status") != "ok":
        return "failed"
    return "done" if current is None or same_settings(record.get("config") or {}, current) else "changed"


def claim(job_dir: Path, current: dict | None = None, overwrite: bool = False) -> Path:
    """The results path for a job about to run in `job_dir`.

    A finished job (`ok`) with the same settings raises AlreadyDone, with other settings a clear
    error, unless `overwrite`. A failed or overwritten record is renamed, never deleted.
    """
    path = Path(job_dir) / RESULTS
    record = previous(job_dir)
    found = state(record, current, overwrite)
    if found == "done":
        raise AlreadyDone(path, record)
    if found == "changed":
        recorded = record.get("config") or {}
        changed = sorted(key for key, value in current.items() if not same_settings(recorded, {key: value}))
        raise FileExistsError(
            f"{path} holds a finished job with other settings ({', '.join(changed)} differ): it is never "
            f"overwritten by accident; set overwrite=true, or choose another hydra.run.dir / hydra.sweep.dir"
        )
    if record is not None:
        set_aside(path, record.get("status", "unknown"))
    return path


def set_aside(path: Path, status: str) -> Path:
    """Rename an earlier record to `results.<status>.<n>.json` beside it."""
    n = 1
    while (kept := path.with_name(f"results.{status}.{n}.json")).exists():
        n += 1
    os.replace(path, kept)
    return kept


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


def transform_names(pruning: dict) -> list[str]:
    """`[shift, {name: shift, mode: static}, {name: learnable, lr: 0.01, epochs: 8}]` as
    `["shift", "shift:static", "learnable(lr=0.01,epochs=8)"]`."""
    names = []
    for t in pruning.get("transforms") or []:
        options = {} if isinstance(t, str) else {k: v for k, v in t.items() if k != "name"}
        name = t if isinstance(t, str) else t.get("name", "?")
        if len(options) == 1:
            name += f":{next(iter(options.values()))}"
        elif options:
            name += "(" + ",".join(f"{k}={v}" for k, v in options.items()) + ")"
        names.append(name)
    return names


def label(result: dict, transforms: bool = True) -> str:
    """The method as a reader names it: `act_magnitude`, `act_magnitude score=clact [pca,shift:static]`."""
    pruning = (result.get("config") or {}).get("pruning") or {}
    parts = [str(pruning.get("method", "?"))]
    if pruning.get("method", "").startswith("act_"):
        if pruning.get("score", "magnitude") != "magnitude":
            parts.append(f"score={pruning['score']}")
        names = transform_names(pruning)
        if names and transforms:
            parts.append(f"[{','.join(names)}]")
        if pruning.get("selection", "topk") != "topk":
            parts.append(pruning["selection"])
        if pruning.get("dense_tokens"):
            parts.append(f"dense_tokens={pruning['dense_tokens']}")
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
