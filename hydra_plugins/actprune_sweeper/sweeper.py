"""Hydra's basic grid sweeper, plus resume and a union of grids.

- Resume: a job whose folder holds a `results.json` that says `ok` for the same settings is not
  launched again (unless `overwrite=true`); failed, missing and unfinished jobs are. The count is
  logged before anything is launched.
- `grids`: a list of parameter grids whose jobs are joined, for tables in which methods sweep
  different values (activation at 0.2..0.9, weight pruning at 0.25..0.75).
- The sweep folder is resolved once and pinned for every job, so a folder named from the command
  line is the same for all of them.
- Jobs that would share a folder (they differ only in overrides left out of folder names, such as
  `device`) are refused before anything runs.
- The end-of-sweep callback is handed this command's job folders in-process; a sweep whose jobs
  are all done writes nothing (its folder may be read-only).
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from actprune.run import callbacks, results
from actprune.run.job import settings

log = logging.getLogger(__name__)


class ResumingSweeper(BasicSweeper):
    def __init__(
        self,
        max_batch_size: Optional[int] = None,
        params: Optional[Dict[str, str]] = None,
        grids: Optional[List[Dict[str, str]]] = None,
    ) -> None:
        super().__init__(max_batch_size=max_batch_size, params=params)
        self.grids = [dict(grid) for grid in grids] if grids else [{}]

    def jobs(self, arguments: List[str]) -> List[List[str]]:
        """Every job's overrides: each grid's product, with the preset's params and the command line on top."""
        parser = OverridesParser.create(config_loader=getattr(self.hydra_context, "config_loader", None))
        jobs, seen = [], set()
        for grid in self.grids:
            lines = [*self._parse_config(), *(f"{key}={value}" for key, value in grid.items()), *arguments]
            for job in self.split_arguments(parser.parse_overrides(lines), None)[0]:
                if tuple(sorted(job)) not in seen:  # two grids may give one job its overrides in another order
                    seen.add(tuple(sorted(job)))
                    jobs.append(job)
        return jobs

    def job_state(self, overrides: List[str]) -> tuple[str, Optional[str]]:
        """`done` (skip it), or why it is launched: `missing`, `failed`, `outdated`, `overwrite`,
        `changed` (the job refuses, naming what differs), `unknown` (the job decides); and the
        job's folder within the sweep's."""
        try:
            config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
            subdir = str(config.hydra.sweep.subdir)
            job_dir = Path(str(config.hydra.sweep.dir)) / subdir
            found = results.state(results.previous(job_dir), settings(config), bool(config.get("overwrite")))
        except (HydraException, OmegaConfBaseException, ValueError, OSError) as error:  # the job decides and says why
            log.debug("cannot tell whether %s is done: %s", overrides, error)
            return "unknown", None
        return found, subdir

    def batch_size(self, jobs: int) -> int:
        if self.max_batch_size:
            return self.max_batch_size
        launcher = self.config.hydra.launcher
        if str(launcher.get("_target_", "")).endswith("LocalLauncher") and launcher.get("gpus_per_node"):
            return int(launcher.gpus_per_node)  # a job per GPU at a time; the job picks its GPU by number
        return jobs or 1

    def sweep(self, arguments: List[str]) -> Any:
        sweep_dir = str(self.config.hydra.sweep.dir)
        pin = "hydra.sweep.dir='" + sweep_dir.replace("\\", "\\\\").replace("'", "\\'") + "'"
        jobs = [[*job, pin] for job in self.jobs(arguments)]
        states, subdirs = zip(*[self.job_state(job) for job in jobs]) if jobs else ((), ())
        refuse_shared_folders(sweep_dir, jobs, subdirs)
        for state, subdir in zip(states, subdirs):
            if state == "done":  # this command's job is there: a refusal of another command is void
                results.void_refusal(Path(sweep_dir) / subdir)
        counts = Counter(states)
        todo = [job for job, state in zip(jobs, states) if state != "done"]
        log.info(
            "Sweep %s: %d jobs; %d done before (results.json says ok, same settings) and skipped%s. "
            "overwrite=true re-runs every job.",
            sweep_dir,
            len(jobs),
            counts["done"],
            "".join(
                f"; {counts[s]} {s}"
                for s in ("failed", "missing", "outdated", "changed", "overwrite", "unknown")
                if counts[s]
            ),
        )
        # The end of the sweep judges this command's jobs, records or not (all of the folder's where one is unknown).
        callbacks.SWEEP.start(None if None in subdirs else sorted(subdirs), launched=len(todo))
        if todo:  # a sweep whose jobs are all done writes nothing: its folder may be read-only
            Path(sweep_dir).mkdir(parents=True, exist_ok=True)
            OmegaConf.save(self.config, Path(sweep_dir) / "multirun.yaml")
        size = self.batch_size(len(todo))
        self.overrides = [todo[i : i + size] for i in range(0, len(todo), size)]
        returns, index = [], 0
        while not self.is_done():
            batch = self.get_job_batch()
            self.validate_batch_is_legal(batch)
            returns.append(self.launcher.launch(batch, initial_job_idx=index))
            index += len(batch)
        return returns


def refuse_shared_folders(sweep_dir: str, jobs: List[List[str]], subdirs: tuple) -> None:
    """Refuse a sweep two of whose jobs would share a folder, before anything runs: one would
    resume, overwrite or refuse the other, and the table would count one record twice."""
    by_folder: Dict[str, List[List[str]]] = {}
    for job, subdir in zip(jobs, subdirs):
        if subdir is not None:
            by_folder.setdefault(subdir, []).append(job)
    for subdir, group in by_folder.items():
        if len(group) > 1:
            differ = sorted({o for job in group for o in job} - set.intersection(*(set(job) for job in group)))
            key = differ[0].lstrip("+~").partition("=")[0] if differ else "device"
            raise SystemExit(
                f"Sweep {sweep_dir}: {len(group)} jobs would share the folder {subdir}: they differ only in "
                f"{', '.join(differ)}, which job folder names leave out (device, experiment, logger.*, paths.*, "
                "overwrite, hydra.*). Nothing was run. Sweep them in separate commands, each with its own "
                "hydra.sweep.dir, or name the job folders by it too: "
                f"'hydra.sweep.subdir=\"${{actprune_job_name:${{hydra.overrides.task}}}}-{key}=${{{key}}}\"'"
            )
