"""Hydra callbacks: what happens when a multirun ends."""

from __future__ import annotations

import errno
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from .. import reuse
from . import results, table

READ_ONLY = (errno.EACCES, errno.EPERM, errno.EROFS)
UNJUDGED = ("the end of the sweep did not judge its jobs: its callback (actprune.run.callbacks.SweepEnd) "
            "failed (the warning above says why) or is not in hydra.callbacks")


class Sweep:
    """This command's sweep, handed on in-process: the sweeper names its job folders (a sweep folder
    may hold other commands' jobs), `SweepEnd` judges them, and `actprune.app.main` exits with the
    verdict (Hydra turns an exception in a callback, SystemExit aside, into a warning)."""

    def __init__(self) -> None:
        self.jobs: list[str] | None = None  # this command's job folders within the sweep folder; None: not told
        self.failure: str | None = None  # why the command exits non-zero; None: it may exit 0
        self.launched = 0  # jobs this command ran (the others were done before)

    def start(self, jobs: list[str] | None, launched: int = 0) -> None:
        self.jobs, self.failure, self.launched = jobs, UNJUDGED, launched  # until the callback says otherwise

    def verdict(self) -> str | None:
        """Why the command must exit non-zero, or None; once: the next sweep starts afresh."""
        failure, self.failure = self.failure, None
        return failure


SWEEP = Sweep()


class SweepEnd(Callback):
    """At the end of a multirun: free what its jobs shared in this process, judge this command's
    jobs, print their table, write report.md/report.csv/plots of the sweep folder and log them to
    W&B when on; the command exits non-zero, naming them, when any job of this command is not ok
    (failed, refused, left no record, or runs in another process), or the report cannot be written."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        reuse.release()
        sweep_dir = Path(config.hydra.sweep.dir)
        if SWEEP.jobs is not None:
            rows = results.read_jobs(sweep_dir, SWEEP.jobs)
        else:
            rows = [(str(path.parent.relative_to(sweep_dir)), record) for path, record in results.read_all(sweep_dir)]
        failures = [not_ok(sweep_dir, rows)] if any(record.get("status") != "ok" for _, record in rows) else []
        try:
            print(f"\nSweep {sweep_dir}: {len(rows)} jobs\n{table.table(rows)}", flush=True)
            if results.read_all(sweep_dir):  # the report covers every job the folder holds
                write_report(config, sweep_dir)
        except Exception as error:  # the jobs are judged already: this adds to the verdict
            problem = f"Sweep {sweep_dir}: the report was not written: {type(error).__name__}: {error}"
            if SWEEP.launched == 0 and isinstance(error, OSError) and error.errno in READ_ONLY:
                print(f"{problem} (the folder is read-only; this command ran no job, so the report it holds is current)",
                      flush=True)
            else:
                failures.append(problem)
        SWEEP.failure = "\n".join(failures) or None


def not_ok(sweep_dir: Path, rows: list[tuple[str, dict]]) -> str:
    """`N of M jobs not ok (counts by status): their names`."""
    bad = [(name, str(record.get("status"))) for name, record in rows if record.get("status") != "ok"]
    counts = ", ".join(f"{sum(s == status for _, s in bad)} {status}" for status in sorted({s for _, s in bad}))
    return f"Sweep {sweep_dir}: {len(bad)} of {len(rows)} jobs not ok ({counts}): " + ", ".join(name for name, _ in bad)


def write_report(config: DictConfig, sweep_dir: Path) -> None:
    from . import report

    written = report.report([sweep_dir], sweep_dir)
    print("Report: " + ", ".join(str(path) for path in written.values()), flush=True)
    logger = config.logger
    if logger.name == "wandb" and logger.mode != "disabled":
        report.log_to_wandb(written, sweep_dir.name, logger.project, logger.entity, logger.mode, sweep_dir)
