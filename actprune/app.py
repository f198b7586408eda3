"""The Hydra app: a thin shell over `actprune.run.job.run_job`."""

from __future__ import annotations

import hashlib
import logging
import re
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from .config import register_configs

log = logging.getLogger(__name__)
# The configs: inside the package where it was installed from a wheel, else the checkout's conf/.
CONF_DIR = next(
    (
        d
        for d in (Path(__file__).resolve().parent / "conf", Path(__file__).resolve().parent.parent / "conf")
        if (d / "config.yaml").is_file()
    ),
    Path(__file__).resolve().parent / "conf",
)

# Overrides that say where or how a job logs, not what it computes, stay out of its name.
UNNAMED = re.compile(r"^(hydra\.|paths\.|logger\b|device$|experiment$|overwrite$)")


def job_name(overrides) -> str:
    """A folder and W&B name from a job's overrides, e.g. `pruning=act_magnitude,pruning.sparsity=2:4`.

    Path values are shortened to their last part, with a hash of the named overrides in full
    appended so two different paths never share a folder. Where or how a job logs (and
    `overwrite`) never changes its name, so a later run finds the folder again.
    """
    named = []
    for override in sorted(str(o) for o in overrides):
        key, _, value = override.lstrip("+~").replace("\\", "").partition("=")
        if not UNNAMED.match(key):
            named.append((key, value))
    parts = [
        re.sub(r"[^\w.:=+,\[\]-]", "_", f"{key}={Path(value.rstrip('/')).name if '/' in value else value}")
        for key, value in named
    ]
    name = ",".join(parts) or "default"
    if any("/" in value for _, value in named) or len(name) > 200:
        digest = hashlib.sha1("\n".join(f"{key}={value}" for key, value in named).encode()).hexdigest()[:8]
        name = f"{name[:190]}-{digest}"
    return name


def sweep_name(overrides) -> str:
    """A sweep folder name that the same command line gives again (so re-running it resumes):
    the experiment, if any, and a hash of the overrides that decide what the jobs compute. Like a
    job's name it leaves out `paths.*`: `make demo` passes paths.data_dir only where ../shared
    exists, and the same rows elsewhere are the same job; resume compares the data files' sha256
    (`job.inputs`), so a job that read other data is still not done."""
    kept = sorted(str(o) for o in overrides if not re.match(r"^[+~]?(logger\b|overwrite$|paths\.)", str(o)))
    experiment = next((o.partition("=")[2] for o in kept if re.match(r"^\+?experiment=", o)), "sweep")
    digest = hashlib.sha1("\n".join(kept).encode()).hexdigest()[:10]
    return re.sub(r"[^\w.-]", "_", experiment) + "-" + digest


OmegaConf.register_new_resolver("actprune_job_name", job_name, replace=True)
OmegaConf.register_new_resolver("actprune_sweep_name", sweep_name, replace=True)
register_configs()


def _names(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        return [name for item in value for name in _names(item)]
    return [name for item in getattr(value, "list", None) or [] for name in _names(item)]  # a sweep of lists


def check_benchmarks(arguments: list[str]) -> None:
    """`benchmark=[nope]`: Hydra says only that it could not load it; name the benchmarks there are."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if any(a.startswith("hydra.searchpath") for a in arguments):
        return  # configs of one's own: Hydra looks there too
    try:
        overrides = OverridesParser.create().parse_overrides(
            [a for a in arguments if "=" in a and not a.startswith("-")]
        )
    except Exception:  # Hydra reports its own syntax errors
        return
    available = sorted(path.stem for path in (CONF_DIR / "benchmark").glob("*.yaml"))
    for override in overrides:
        if override.key_or_group == "benchmark":
            unknown = [name for name in _names(override.value()) if name not in available]
            if unknown:
                raise SystemExit(f"benchmark: unknown {unknown}; available benchmarks are {available}")


def main() -> None:
    check_benchmarks(sys.argv[1:])
    try:
        run()
    except KeyboardInterrupt:  # the job recorded itself as interrupted; no traceback, the usual status
        print("actprune: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    from .run.callbacks import SWEEP

    failure = SWEEP.verdict()  # a sweep's, set in-process: Hydra would turn an exception in its callback into a warning
    if failure:
        raise SystemExit(failure)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def run(cfg: DictConfig) -> None:
    from .run.job import run_job  # heavy imports after Hydra has parsed the command line
    from .run.lock import Busy
    from .run.tracking import sync_hint

    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    job_dir = Path(hydra_cfg.runtime.output_dir)
    group = Path(hydra_cfg.sweep.dir).name if multirun else job_dir.name
    name = job_name(hydra_cfg.overrides.task)
    slot = hydra_cfg.job.num if multirun else None
    try:
        record = run_job(cfg, job_dir, group=group, name=name, slot=slot)
    except (FileExistsError, Busy) as error:  # a finished job with other settings, or a job running elsewhere
        if not multirun:
            raise SystemExit(f"{type(error).__name__}: {error}") from None
        log.error("%s", error)  # the sweep's table shows the refusal; a busy job is its runner's
        return
    if not multirun and cfg.logger.name == "wandb" and cfg.logger.mode == "offline" and sync_hint(job_dir):
        print(sync_hint(job_dir), flush=True)  # a sweep's is said once, at its end (run.callbacks)
    if record["status"] != "ok" and not multirun:
        raise SystemExit(f"job failed: {record['error']}")
