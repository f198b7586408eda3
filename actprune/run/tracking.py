"""Weights & Biases: one run per job, grouped by sweep; offline by default, under the job folder."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

log = logging.getLogger(__name__)
LOGGERS = ("wandb", "none")
MODES = ("offline", "online", "disabled")


def settings(mode: str):
    """Offline, W&B's own lines (about 25 a run) are left out: a job says where its run went, and a
    command says once how to upload them all (`sync_hint`). Online, W&B's lines hold the run's link."""
    import wandb

    return wandb.Settings(silent=mode == "offline")


def sync_hint(folder: Path) -> str | None:
    """`wandb sync` of every offline run below `folder` (a job's; a sweep's jobs and its summary run),
    None where there is none."""
    folder = Path(folder)
    depths = sorted({len(run.relative_to(folder).parts) - 2 for run in folder.rglob("wandb/offline-run-*")})
    if not depths:
        return None
    patterns = [str(folder.joinpath(*["*"] * depth, "wandb", "offline-run-*")) for depth in depths]
    return "W&B runs are offline; upload them with: wandb sync " + " ".join(patterns)


def check(logger_cfg) -> None:
    if logger_cfg.name not in LOGGERS:
        raise ValueError(f"logger.name={logger_cfg.name!r}: allowed values are {list(LOGGERS)}")
    if logger_cfg.mode not in MODES:
        raise ValueError(f"logger.mode={logger_cfg.mode!r}: allowed values are {list(MODES)}")


class Tracker:
    """Thin handle over a wandb run; with `logger=none` every call does nothing."""

    def __init__(self, logger_cfg, job_dir: Path, group: str, name: str, config: dict):
        check(logger_cfg)
        self.run = None
        self.offline = logger_cfg.mode == "offline"
        if logger_cfg.name != "wandb":
            return
        import wandb

        # The run id lives in the job folder: a job run again (failed, preempted) continues its run.
        id_file = Path(job_dir) / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        try:
            id_file.parent.mkdir(parents=True, exist_ok=True)
            id_file.write_text(run_id + "\n")
            self.run = wandb.init(
                id=run_id,
                resume="allow",
                project=logger_cfg.project,
                entity=logger_cfg.entity,
                mode=logger_cfg.mode,
                dir=str(job_dir),
                group=group,
                name=name,
                job_type="prune-eval",
                tags=list(logger_cfg.tags),
                config=config,
                reinit="finish_previous",
                settings=settings(logger_cfg.mode),
            )
        except Exception as error:  # an unwritable folder, a bad key: say how to go on without W&B
            raise RuntimeError(
                f"W&B could not start a run in {job_dir} ({type(error).__name__}: {error}); "
                f"logger=none runs the job without W&B"
            ) from error

    def log_results(self, results: dict) -> None:
        if self.run is None:
            return
        import wandb

        metrics = dict(results.get("metrics", {}))
        sparsity = results.get("sparsity", {})
        metrics["sparsity/target"] = sparsity.get("target")
        metrics["sparsity/measured"] = sparsity.get("measured")
        metrics["replaced_layers"] = results.get("replaced_layers")
        metrics.update({f"time/{key}": value for key, value in results.get("timings", {}).items()})
        self.run.log(metrics)
        self.run.summary.update(metrics)
        self.run.summary["status"] = results["status"]
        per_layer = sparsity.get("per_layer") or {}
        if per_layer:
            table = wandb.Table(columns=["layer", "measured_sparsity"], data=[[k, v] for k, v in per_layer.items()])
            self.run.log({"sparsity/per_layer": table})
        learned = results.get("learned") or {}
        learned_file = (learned.get("end_to_end") or learned).get("file")  # the corrections the model ran with
        if learned_file and Path(learned_file).is_file():  # reusable by others
            artifact = wandb.Artifact(f"correction-{Path(learned_file).stem}", type="learned-correction")
            artifact.add_file(learned_file)
            self.run.log_artifact(artifact)
        samples = (results.get("generate") or {}).get("samples") or []
        if samples:  # what the pruning does to the text, prompt by prompt
            table = wandb.Table(
                columns=["prompt", "completion", "dense_completion"],
                data=[[s["prompt"], s["completion"], s.get("dense_completion")] for s in samples],
            )
            self.run.log({"generate/samples": table})
        per_task = (results.get("lm_eval") or {}).get("per_task") or []
        if per_task:
            columns = ["task", "acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "samples"]
            table = wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in per_task])
            self.run.log({"lm_eval/per_task": table})

    def finish(self, status: str, error: str | None = None) -> None:
        if self.run is None:
            return
        self.run.summary["status"] = status
        if error:
            self.run.summary["error"] = error
        folder = self.run.settings.sync_dir
        self.run.finish(exit_code=0 if status == "ok" else 1)
        self.run = None
        if self.offline:
            log.info("W&B offline run: %s", folder)
