"""Hydra callbacks: what happens when a multirun ends."""

from __future__ import annotations

import errno
import time
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from .. import reuse
from . import results, table, tracking

READ_ONLY = (errno.EACCES, errno.EPERM, errno.EROFS)
UNJUDGED = (
    "the end of the sweep did not judge its jobs: its callback (actprune.run.callbacks.SweepEnd) "
    "failed (the warning above says why) or is not in hydra.callbacks"
)


class Sweep:
    """This command's sweep, handed on in-process: the sweeper names its job folders (a sweep folder
    may hold other commands' jobs), `SweepEnd` judges them, and `actprune.app.main` exits with the
    verdict (Hydra turns an exception in a callback, SystemExit aside, into a warning)."""

    def __init__(self) -> None:
        self.jobs: list[str] | None = None  # this command's job folders within the sweep folder; None: not told
        self.failure: str | None = None  # why the command exits non-zero; None: it may exit 0
        self.launched = 0  # jobs this command ran (the others were done before)
        self.finished: list[float] = []  # seconds each job of this command took, in this process
        self.job_started = 0.0

    def start(self, jobs: list[str] | None, launched: int = 0) -> None:
        self.jobs, self.failure, self.launched = jobs, UNJUDGED, launched  # until the callback says otherwise
        self.finished = []

    def progress(self) -> str:
        """`job i/N took ...; about ... left`, from the mean time of the jobs done so far."""
        done, mean = len(self.finished), sum(self.finished) / len(self.finished)
        left = f"; about {_minutes(mean * (self.launched - done))} left" if done < self.launched else ""
        return f"job {done}/{self.launched} took {_minutes(self.finished[-1])}{left}"

    def verdict(self) -> str | None:
        """Why the command must exit non-zero, or None; once: the next sweep starts afresh."""
        failure, self.failure = self.failure, None
        return failure


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


SWEEP = Sweep()


class SweepEnd(Callback):
    """At the end of a multirun: free what its jobs shared in this process, judge this command's
    jobs, print their table, write report.md/report.csv/plots of the sweep folder and log them to
    W&B when on; the command exits non-zero, naming them, when any job of this command is not ok
    (failed, refused, left no record, or runs in another process), or the report cannot be written."""

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        if SWEEP.launched:  # jobs in this process (the basic launcher): say where the sweep is
            SWEEP.job_started = time.perf_counter()
            print(f"\nSweep: job {len(SWEEP.finished) + 1}/{SWEEP.launched}", flush=True)

    def on_job_end(self, config: DictConfig, job_return, **kwargs) -> None:
        if SWEEP.launched and SWEEP.job_started:
            SWEEP.finished.append(time.perf_counter() - SWEEP.job_started)
            print(f"Sweep: {SWEEP.progress()}", flush=True)

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
                print(
                    f"{problem} (the folder is read-only; this command ran no job, so the report it holds is current)",
                    flush=True,
                )
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
        if logger.mode == "offline":  # once per sweep: its jobs' runs and its summary run
            print(tracking.sync_hint(sweep_dir), flush=True)
