"""Hydra callbacks: a table over every job of a multirun when it ends."""

from __future__ import annotations

from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from . import results


class SweepTable(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = [(str(path.parent.relative_to(sweep_dir)), record) for path, record in results.read_all(sweep_dir)]
        print(f"\nSweep {sweep_dir}: {len(rows)} jobs\n{results.table(rows)}", flush=True)
