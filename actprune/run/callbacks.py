"""Hydra callbacks: what happens when a multirun ends."""

from __future__ import annotations

from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from .. import reuse
from . import results, table


class SweepEnd(Callback):
    """At the end of a multirun: free what its jobs shared in this process, print the table of this
    command's jobs, write report.md/report.csv/plots of the sweep folder, log them to W&B when on,
    and exit non-zero, naming them, when any job of this command is not ok (failed, refused, left
    no record, or runs in another process)."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        from . import report

        reuse.release()
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = results.read_jobs(sweep_dir)
        if rows is None:
            rows = [(str(path.parent.relative_to(sweep_dir)), record) for path, record in results.read_all(sweep_dir)]
        print(f"\nSweep {sweep_dir}: {len(rows)} jobs\n{table.table(rows)}", flush=True)
        if results.read_all(sweep_dir):  # the report covers every job the folder holds
            written = report.report([sweep_dir], sweep_dir)
            print("Report: " + ", ".join(str(path) for path in written.values()), flush=True)
            logger = config.logger
            if logger.name == "wandb" and logger.mode != "disabled":
                report.log_to_wandb(written, sweep_dir.name, logger.project, logger.entity, logger.mode, sweep_dir)
        bad = [(name, record.get("status")) for name, record in rows if record.get("status") != "ok"]
        if bad:  # the sweep went on past them; its exit status must not say ok
            counts = ", ".join(f"{sum(s == status for _, s in bad)} {status}" for status in sorted({s for _, s in bad}))
            raise SystemExit(f"Sweep {sweep_dir}: {len(bad)} of {len(rows)} jobs not ok ({counts}): "
                             + ", ".join(name for name, _ in bad))
