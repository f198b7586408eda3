"""One `results.json` per job, written atomically and never over a finished job's file: the one
module that knows its keys (`SCHEMA`), writes a record (`new`, `add_pruning`, `add_evaluation`,
`write`) and reads records back (`previous`, `read_all`, `read_jobs`)."""

from __future__ import annotations

import json
import logging
import os
import platform
import socket
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from ..files import atomic_write, set_aside

log = logging.getLogger(__name__)
RESULTS = "results.json"
REFUSED = "refused.json"  # a later command that this folder's finished job refused (other settings)
# Raised when a fix changes what earlier records measured (2: threshold sampling, a static shift
# before a change of basis, each layer's own inputs in layer-by-layer passes), or what a record
# must show to be resumed (3: the data and model files it read, `inputs`; 4: `kept_by_weight` counted
# from the masks, not the target; thresholds under shared masks at batch > 1 refused): older ok records
# are run again instead of being resumed as done.
VERSION = 4
REPO = Path(__file__).resolve().parents[2]  # the checkout, where the package is installed editable


# The top-level keys of results.json and what each holds (docs/outputs.md says each at length). Beside
# them: one key per benchmark (its details) and the keys its `prepare()` returned, which may take none of these.
SCHEMA = {
    "status": "ok, failed, interrupted (Ctrl-C) or, while it runs, running (refused.json: refused)",
    "results_version": "the VERSION of the code that wrote it",
    "error": "why it failed, in one line",
    "traceback": "of a failed job",
    "job": "its name, from its overrides",
    "group": "its sweep folder",
    "config": "the resolved config, with `inputs`: the data and model files it read",
    "metrics": "what the benchmarks measured, by name (a failed job keeps those that ran before)",
    "sparsity": "what was pruned and the sparsity measured (SparsityReport.summary)",
    "replaced_layers": "how many projections the method was applied to",
    "timings": "seconds: load, calibration, prune, each step and benchmark, total",
    "versions": "python, torch, transformers, actprune, git commit",
    "host": "name, pid, SLURM job id, torch's CPU threads (CPU sums round by thread count: actprune-export uses it)",
    "model": "the model's name",
    "device": "where it ran",
    "dtype": "its weights' dtype",
    "parameters": "the model's parameter count",
    "calibration": "the calibration used, where the method learns from it",
    "refit": "closed-form weights: per layer the held-out errors and the ridge chosen",
    "learned": "learned corrections: trained (with their losses) or loaded, and where",
}
RESERVED = frozenset(SCHEMA)


def new(config: dict, name: str, group: str) -> dict:
    """A running job's record; `config` (resolved) holds the `inputs` it reads, which a later run compares."""
    return {
        "status": "running",
        "results_version": VERSION,
        "error": None,
        "job": name,
        "group": group,
        "config": config,
        "metrics": {},
        "sparsity": {},
        "replaced_layers": None,
        "timings": {},
        "versions": versions(),
        "host": {
            "name": socket.gethostname(),
            "pid": os.getpid(),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "threads": torch.get_num_threads(),
        },
    }


def add_pruning(record: dict, report) -> None:
    """What `sparsify_` did (a SparsityReport), as far as it is known before the benchmarks run."""
    record["replaced_layers"] = report.replaced_layers
    record["timings"].update(report.seconds)
    for key in ("calibration", "refit", "learned"):
        if getattr(report, key) is not None:
            record[key] = getattr(report, key)


def add_evaluation(record: dict, metrics: dict, details: dict, seconds: dict, sparsity: dict) -> None:
    """What the benchmarks measured (each one's details under its name) and the sparsity they saw."""
    record["timings"].update(seconds)
    record["metrics"] = metrics
    record.update(details)
    record["sparsity"] = sparsity


def versions() -> dict:
    found = {"python": platform.python_version()}
    for package in ("torch", "transformers", "actprune"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    try:
        found["git_commit"] = None
        if (REPO / ".git").exists() and (REPO / "pyproject.toml").is_file():  # a checkout, not site-packages
            done = subprocess.run(
                ["git", "-C", str(REPO), "rev-parse", "--verify", "HEAD"], capture_output=True, text=True, timeout=10
            )
            found["git_commit"] = done.stdout.strip() if done.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        found["git_commit"] = None
    return found


def same_settings(recorded: dict, current: dict) -> bool:
    """Whether a recorded config agrees with the current settings (only their keys are compared)."""
    return all(key in recorded and _agree(recorded[key], value) for key, value in current.items())


EMPTY = (None, [], {}, False)


def _agree(recorded, current) -> bool:
    # A key with an empty value (null, [], false) on one side only counts as absent, so that
    # results of an earlier version (a key added since, or one that was always null) still resume.
    if isinstance(recorded, dict) and isinstance(current, dict):
        return all(
            _agree(recorded[key], current[key])
            if key in recorded and key in current
            else (recorded.get(key) if key in recorded else current.get(key)) in EMPTY
            for key in {*recorded, *current}
        )
    return recorded == current


def previous(job_dir: Path) -> dict | None:
    """The record a job left in `job_dir`, None if there is none; an unreadable one reads as failed."""
    path = Path(job_dir) / RESULTS
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        return {"status": "failed", "error": f"unreadable {path}: {error}"}
    if not isinstance(record, dict):
        return {"status": "failed", "error": f"unreadable {path}: JSON {type(record).__name__}, not an object"}
    return record


class AlreadyDone(Exception):
    """The job finished before with the same settings: nothing to do."""

    def __init__(self, path: Path, record: dict):
        super().__init__(f"{path} says ok: skipped (overwrite=true re-runs it)")
        self.path, self.record = path, record


def state(record: dict | None, current: dict | None, overwrite: bool = False) -> str:
    """What a job finds in its folder: `missing`, `overwrite`, `failed` (or unfinished),
    `outdated` (ok, by a version whose numbers a fix has changed since), `done` (ok, same
    settings: skip it) or `changed` (ok, other settings: refuse)."""
    if record is None:
        return "missing"
    if overwrite:
        return "overwrite"
    if record.get("status") != "ok":
        return "failed"
    if record.get("results_version", 1) < VERSION:
        return "outdated"
    return "done" if current is None or same_settings(record.get("config") or {}, current) else "changed"


def differences(record: dict, current: dict) -> str:
    """What of `current` a finished job's record disagrees on, as resume and actprune-export say it:
    `other settings (inputs differ)`."""
    recorded = record.get("config") or {}
    changed = sorted(key for key, value in current.items() if not same_settings(recorded, {key: value}))
    return f"other settings ({', '.join(changed)} differ)"


def claim(job_dir: Path, current: dict | None = None, overwrite: bool = False) -> Path:
    """The results path for a job about to run in `job_dir`.

    A finished job (`ok`) with the same settings raises AlreadyDone, with other settings a clear
    error, unless `overwrite`. A failed or overwritten record is renamed, never deleted.
    """
    path = Path(job_dir) / RESULTS
    record = previous(job_dir)
    found = state(record, current, overwrite)
    if found == "done":
        void_refusal(job_dir)
        raise AlreadyDone(path, record)
    if found == "changed":
        raise FileExistsError(
            f"{path} holds a finished job with {differences(record, current)}: it is never "
            f"overwritten by accident; set overwrite=true, or choose another hydra.run.dir / hydra.sweep.dir"
        )
    void_refusal(job_dir)  # this command runs here: an older refusal is void
    if record is not None:
        set_aside(path, record.get("status", "unknown"))
    return path


def write(path: Path, results: dict) -> None:
    text = json.dumps(results, indent=2, default=str) + "\n"
    atomic_write(path, lambda staging: Path(staging).write_text(text))


def refuse(job_dir: Path, record: dict) -> None:
    """Leave the refusal of a command beside the finished job it would have overwritten."""
    write(Path(job_dir) / REFUSED, {**record, "status": "refused"})


def void_refusal(job_dir: Path) -> None:
    """Remove the refusal left in `job_dir`, if any: only then, since a folder that has none may be
    read-only (where even a missing file's unlink fails)."""
    path = Path(job_dir) / REFUSED
    if path.exists():
        path.unlink(missing_ok=True)


def read_jobs(sweep_dir: Path, subdirs: list[str]) -> list[tuple[str, dict]]:
    """A sweep command's jobs (their folders within `sweep_dir`) and what each left: its record, or
    a `missing` one (it did not finish: killed, or it failed before it could write) or `busy`
    (another process runs it)."""
    found = {job_dir.parent.relative_to(sweep_dir).as_posix(): record for job_dir, record in read_all(sweep_dir)}
    rows = []
    for subdir in subdirs:
        record = found.get(subdir)
        if record is None:
            busy = (Path(sweep_dir) / subdir / ".lock").exists()
            record = {
                "status": "busy" if busy else "missing",
                "error": "another process holds its lock" if busy else "no results.json: the job did not finish",
            }
        rows.append((subdir, record))
    return rows


def read_all(folder: Path, refusals: bool = True) -> list[tuple[Path, dict]]:
    """Each job's record under `folder`, sorted by path: its results.json, or (with `refusals`) the
    refusal of the last command that reached it. An unreadable file is a row that says so (and a
    warning)."""
    found = []
    paths = {p.parent: p for p in Path(folder).rglob(RESULTS)}
    if refusals:
        paths |= {p.parent: p for p in Path(folder).rglob(REFUSED)}
    for job_dir, path in sorted(paths.items()):
        try:
            record = json.loads(path.read_text())
            if not isinstance(record, dict):
                raise ValueError(f"JSON {type(record).__name__}, not an object")
            found.append((job_dir / RESULTS, record))
        except (OSError, ValueError) as error:  # json.JSONDecodeError is a ValueError
            log.warning("unreadable %s: %s", path, error)
            found.append((job_dir / RESULTS, {"status": "unreadable", "error": f"unreadable {path}: {error}"}))
    return found
