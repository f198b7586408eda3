"""Helpers shared by the tests: the command line in a subprocess, and composed job configs."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from actprune.app import CONF_DIR

REPO = Path(__file__).resolve().parent.parent
WINDOWS = "benchmark.ppl_wikitext2.max_windows=3"

# Scores and transforms of activation pruning, alone and combined: tests run each.
VARIANTS = [
    {"score": "magnitude"},
    {"score": "weight_norm"},
    {"score": "clact"},
    {"transforms": ["shift"]},
    {"transforms": [{"name": "shift", "mode": "mean"}]},
    {"transforms": [{"name": "shift", "mode": "static"}]},
    {"transforms": ["variance"]},
    {"score": "clact", "transforms": [{"name": "shift", "mode": "static"}, "variance"]},
    {"score": "amber"},
    {"transforms": ["scaling"]},
    {"transforms": [{"name": "scaling", "alpha": 0.8}, "shift"]},
    {"transforms": ["hadamard"]},
    {"transforms": ["pca"]},
    {"score": "clact", "transforms": ["scaling", "pca", {"name": "shift", "mode": "static"}]},
    {"score": "weight_norm", "transforms": ["hadamard", "variance"]},
]


def random_windows():
    """Calibration windows of random tokens: statistics come from them through the dense model."""
    return torch.randint(0, 256, (3, 16))


def actprune(*args, cwd=REPO):
    return subprocess.run(
        [sys.executable, "-m", "actprune", *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=600
    )


def _default_sigint() -> None:
    """In the child: Ctrl-C as a terminal delivers it, whatever the test process inherited or set
    (an ignored or blocked SIGINT would be inherited by the job, which then never sees it)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def measuring(args) -> tuple[subprocess.Popen, bytes]:
    """A job started in a subprocess, returned once it is measuring perplexity (past plan and load),
    with what it printed so far (tqdm writes no newline, so the output is read as it comes)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "actprune", *map(str, args)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        preexec_fn=_default_sigint,
    )
    seen = b""
    while b"wikitext2 windows" not in seen:
        chunk = os.read(process.stdout.fileno(), 4096)
        if not chunk:
            process.wait()
            raise AssertionError(seen.decode()[-3000:])
        seen += chunk
    return process, seen


def common(setup, sweep_dir):
    return [
        f"model.path={setup['model']}",
        "model.seqlen=32",
        f"paths.data_dir={setup['data']}",
        f"paths.cache_dir={setup['root'] / 'cache'}",
        "logger=none",
        f"hydra.sweep.dir={sweep_dir}",
        f"hydra.run.dir={sweep_dir}/run",
    ]


def results_in(folder: Path) -> dict:
    return {path.parent.name: json.loads(path.read_text()) for path in folder.rglob("results.json")}


def job_config(setup, tmp_path, *overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                f"model.path={setup['model']}",
                "model.seqlen=32",
                f"paths.data_dir={setup['data']}",
                f"paths.cache_dir={tmp_path / 'cache'}",
                "logger=none",
                *([WINDOWS] if not any(o.startswith("benchmark=") for o in overrides) else []),
                *overrides,
            ],
        )
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
    return cfg


def offline_wandb_log(folder: Path) -> bytes:
    """The `.wandb` file of the one offline W&B run under folder (the record `wandb sync` uploads), complete.

    W&B's service process writes that file on its own: `run.finish()` in this process returns before it has
    flushed, so the service is shut down first, which waits for it to exit. A run logged by a command line
    that has exited is complete already (its own service exited with it)."""
    import wandb

    wandb.teardown()
    (path,) = folder.glob("wandb/offline-run-*/*.wandb")
    return path.read_bytes()
