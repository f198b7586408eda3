"""One job as a pipeline of stages: plan, load, calibrate, prune, evaluate, record.

Each stage returns a small value; `run_job` assembles `results.json` from them. Everything that can
be checked without the weights is checked by `plan`, once, before anything is loaded.
"""

from __future__ import annotations

import importlib
import logging
import time
import traceback
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from .. import models, reuse
from ..activation.refit import check_tokens
from ..calibration import CORPORA, Calibration, check_settings, check_text, corpus_text, model_fingerprint
from ..eval import BENCHMARKS, Env, build
from ..files import digest
from ..planning import PruningPlan, plan
from ..sparsify import SparsityReport, sparsify_
from . import results, table, tracking
from .lock import JobLock

log = logging.getLogger(__name__)


@dataclass
class JobPlan:
    """What a job will do, checked against the model's config (no weights loaded)."""

    device: torch.device
    dtype: torch.dtype
    source: str  # where the model loads from (a folder, a hub id or a dequantized GGUF cache)
    gguf_file: str | None
    fingerprint: str  # the model's files, for cache keys
    pruning: PruningPlan
    benchmarks: dict  # name -> prepared benchmark
    env: Env
    calibration_text: tuple[str, str] | None  # (text, corpus) where the method learns from calibration
    record: dict = field(default_factory=dict)  # what results.json says of the plan


def plan_job(cfg: DictConfig, job_dir: Path, slot: int | None = None) -> JobPlan:
    """Check every setting and read the data the job needs; fail early, naming the key."""
    for module in cfg.get("imports") or []:  # they register their methods and benchmarks
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise ValueError(f"imports: cannot import {module!r} ({error}); is its folder on PYTHONPATH?") from error
    device = models.resolve_device(cfg.device, slot if cfg.model.device_map is None else None)
    dtype = models.resolve_dtype(cfg.model.dtype, device)
    models.check_device_map(cfg.model.device_map)
    benchmarks = {name: build(name, options) for name, options in cfg.benchmark.items() if options is not None}
    resolved = models.resolve_source(cfg.model)
    models.check_sha256(cfg.model, *resolved, cfg.paths.cache_dir)
    source, gguf_file = models.locate(cfg.model, cfg.paths.cache_dir, resolved)
    fingerprint = model_fingerprint(*resolved)  # the model's own files, never the dequantized cache: one key
    config = models.load_config(source, gguf_file, cfg.model.trust_remote_code)
    max_positions = getattr(config.get_text_config(), "max_position_embeddings", None)
    skeleton = models.skeleton(config, cfg.model.trust_remote_code)
    pruning = plan(skeleton, cfg.pruning)
    check_shared_masks(pruning, benchmarks)
    if pruning.config.backend == "kernel" and pruning.targets:
        from ..kernels import decode_unavailable

        reason = decode_unavailable(device, dtype)
        if reason is not None:
            raise ValueError(
                f"pruning.backend=kernel on {device} in {str(dtype).removeprefix('torch.')}: {reason}; "
                f"pruning.backend=emulate runs everywhere"
            )
    text = None
    if pruning.needs:
        check_settings(cfg.calibration.windows, cfg.calibration.seqlen, max_positions)
        refit = pruning.transforms.refit
        if refit is not None and pruning.targets:
            widths = [skeleton.get_submodule(name).in_features for name in pruning.targets]
            check_tokens(refit, cfg.calibration.windows, cfg.calibration.seqlen, widths)
        text = reuse.cached(
            ("calibration text", cfg.calibration.corpus, cfg.paths.data_dir),
            lambda: corpus_text(
                cfg.calibration.corpus, cfg.paths.data_dir, str(Path(cfg.paths.cache_dir) / "datasets")
            ),
        )
        check_text(text[0], cfg.calibration.windows, cfg.calibration.seqlen)
    model_key = ("model", source, gguf_file, str(device), dtype, cfg.model.trust_remote_code, cfg.model.device_map)
    # The tokenizer alone, where a benchmark asks (the generate prompts' lengths), before the weights are loaded.
    tokenizer = partial(models.load_tokenizer, source, gguf_file, cfg.model.trust_remote_code)
    env = Env(cfg.paths.data_dir, cfg.paths.cache_dir, Path(job_dir), cfg.seed, model_key, max_positions, tokenizer)
    record = {}
    for name, benchmark in benchmarks.items():
        prepared = benchmark.prepare(env)
        taken = sorted(set(prepared) & results.RESERVED)
        if taken:
            raise ValueError(f"benchmark {name}: prepare() returned {taken}, keys results.json keeps for itself")
        record.update(prepared)
    record["model"] = model_name(*resolved)  # the model's own files: one name whether or not a cache was read
    record["device"] = str(device)
    record["dtype"] = str(dtype).removeprefix("torch.")
    return JobPlan(device, dtype, source, gguf_file, fingerprint, pruning, benchmarks, env, text, record)


def check_shared_masks(pruning: PruningPlan, benchmarks: dict) -> None:
    """Where the rows of a call share one mask (`mask_scope=step`), what cannot be honest: a calibrated
    threshold compared with the pooled scores of a batch (it was calibrated on per-token scores, one
    window per forward, and pooled scores spread otherwise: it zeroes another fraction than its label),
    and perplexity windows that leave a last batch of fewer rows than the others share."""
    if pruning.config.mask_scope != "step" or not pruning.targets:
        return
    batched = {name: b.options.batch_size for name, b in benchmarks.items() if getattr(b.options, "batch_size", 1) > 1}
    if pruning.config.selection == "threshold" and batched:
        settings = ", ".join(f"benchmark.{name}.batch_size={size}" for name, size in batched.items())
        raise ValueError(
            f"pruning.selection=threshold with pruning.mask_scope=step and {settings}: the thresholds are "
            f"calibrated on per-token scores, and a batch's pooled scores spread otherwise, so the masks would "
            f"zero another fraction than pruning.sparsity={pruning.pattern}; allowed: batch_size=1 (one row "
            f"keeps its own mask), pruning.mask_scope=token, or pruning.selection=topk"
        )
    ppl = benchmarks.get("ppl_wikitext2")
    if ppl is not None and ppl.options.max_windows is not None and ppl.options.max_windows % ppl.options.batch_size:
        o = ppl.options
        raise ValueError(
            f"benchmark.ppl_wikitext2.max_windows={o.max_windows} with batch_size={o.batch_size} and "
            f"pruning.mask_scope=step: the last batch would share its masks over "
            f"{o.max_windows % o.batch_size} windows, not {o.batch_size}; allowed: a multiple of {o.batch_size}"
        )


def model_name(path: str, gguf_file: str | None) -> str:
    """A model's name in tables: its GGUF file, its folder, or its hub id."""
    return Path(gguf_file).stem if gguf_file else Path(path).name if Path(path).is_dir() else path


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    seconds: float


def load(job: JobPlan, cfg: DictConfig) -> Loaded:
    """The model and tokenizer, or those an earlier job of this process loaded with the same settings."""
    tic = time.perf_counter()
    model, tokenizer = reuse.cached(
        job.env.model_key,
        lambda: models.load_model(
            job.source,
            job.gguf_file,
            job.device,
            job.dtype,
            cfg.paths.cache_dir,
            cfg.model.trust_remote_code,
            cfg.model.device_map,
        ),
    )
    return Loaded(model, tokenizer, time.perf_counter() - tic)


def calibrate(job: JobPlan, loaded: Loaded, cfg: DictConfig) -> Calibration | None:
    """The calibration windows (tokenized once) where the method learns from them; statistics
    follow on demand when the method asks."""
    if job.calibration_text is None:
        return None
    text, corpus = job.calibration_text
    return Calibration.from_text(loaded.tokenizer, text, corpus, cfg.calibration, job.fingerprint, cfg.paths.cache_dir)


def prune(job: JobPlan, loaded: Loaded, calibration: Calibration | None) -> SparsityReport:
    # keep_dense: restore_ after the benchmarks gives the next job of this process the dense model back.
    return sparsify_(loaded.model, job.pruning, calibration, keep_dense=True)


@dataclass
class Evaluation:
    metrics: dict = field(default_factory=dict)
    details: dict = field(default_factory=dict)  # name -> what results.json records of it
    seconds: dict = field(default_factory=dict)


def evaluate(job: JobPlan, loaded: Loaded, report: SparsityReport, evaluation: Evaluation) -> None:
    """Every benchmark on the pruned model, into `evaluation` as each one ends (a later one that
    fails leaves what the earlier ones measured); the sparsity the masks reach is counted over them only."""
    report.reset()
    for name, benchmark in job.benchmarks.items():
        tic = time.perf_counter()
        measured = benchmark.run(loaded.model, loaded.tokenizer, job.env)
        evaluation.seconds[name] = time.perf_counter() - tic
        evaluation.seconds.update(measured.timings)
        evaluation.metrics.update(measured.metrics)
        if measured.details is not None:
            evaluation.details[name] = measured.details


# What a job computes; a finished job counts as done for a later run only if these agree.
SETTINGS = ("model", "pruning", "benchmark", "calibration", "seed", "device")


def settings(cfg) -> dict:
    """The parts of a job's config that determine its numbers (not where or how it logs), and the
    `inputs` it reads (a job records them in its config)."""
    found = {
        key: OmegaConf.to_container(cfg[key], resolve=True) if OmegaConf.is_config(cfg[key]) else cfg[key]
        for key in SETTINGS
        if key in cfg
    }
    return {**found, "inputs": inputs(cfg)}


def inputs(cfg) -> dict:
    """What a job reads, beyond its settings: the sha256 of each local data file (the same rows in
    another paths.data_dir are the same), the model's files (`model_fingerprint`: their folder, sizes
    and times) and VERSION. From the config alone, before any model is loaded; a model.path that
    cannot be resolved is left out (None), and the job's plan fails on it, naming it. Data read from
    the hub (datasets) are named by the settings only."""
    data_dir = cfg.paths.data_dir
    files = {}
    for name, options in cfg.benchmark.items():
        if options is not None and hasattr(BENCHMARKS.get(name), "data_files"):
            files.update(BENCHMARKS[name].data_files(options, data_dir))
    corpus = "wikitext2_validation" if cfg.calibration.corpus == "auto" else cfg.calibration.corpus  # auto, offline
    local = CORPORA.get(corpus, (None, None))[0]
    if local and data_dir and (Path(data_dir) / local).is_file():
        files["calibration"] = Path(data_dir) / local
    try:
        model = model_fingerprint(*models.resolve_source(cfg.model))
    except ValueError:
        model = None
    return {
        "data": {key: digest(path) for key, path in sorted(files.items())},
        "model": model,
        "version": results.VERSION,
    }


def new_record(cfg: DictConfig, name: str, group: str, read: dict) -> dict:
    """A running job's record, its config with the `inputs` it reads."""
    return results.new({**OmegaConf.to_container(cfg, resolve=True), "inputs": read}, name, group)


def stages(cfg: DictConfig, job: JobPlan, record: dict) -> None:
    """Load, calibrate, prune, evaluate the planned job; each stage's value goes into `record` as it comes."""
    torch.manual_seed(cfg.seed)
    loaded = load(job, cfg)
    record["timings"]["load"] = loaded.seconds
    try:
        record["parameters"] = sum(p.numel() for p in loaded.model.parameters())
        report = prune(job, loaded, calibrate(job, loaded, cfg))
        results.add_pruning(record, report)
        evaluation = Evaluation()
        try:
            evaluate(job, loaded, report, evaluation)
        finally:  # a failed job still records what its earlier benchmarks measured
            results.add_evaluation(record, evaluation.metrics, evaluation.details, evaluation.seconds, report.summary())
        report.restore_(loaded.model)
    except BaseException:
        reuse.forget(job.env.model_key)  # a job that failed part way may have left the model altered
        raise


def run_job(cfg: DictConfig, job_dir: Path, group: str, name: str, slot: int | None = None) -> dict:
    """Run one configured job in `job_dir` and return what it wrote to its results.json.

    A job that finished before with the same settings is not run again: its record is returned.
    A folder that another live process is running raises `Busy`; one that holds a finished job
    with other settings raises FileExistsError and keeps a refusal record beside it.
    `slot` (the job's number in a sweep) picks its GPU when several are visible and `device=auto`.
    """
    with JobLock(job_dir):
        current = settings(cfg)
        try:
            path = results.claim(job_dir, current, cfg.get("overwrite", False))
        except results.AlreadyDone as done:
            log.info("Skipping %s: %s", name, done)
            return done.record
        except FileExistsError as error:
            results.refuse(job_dir, {**new_record(cfg, name, group, current["inputs"]), "error": f"refused: {error}"})
            raise
        return _run(cfg, job_dir, group, name, slot, path, current["inputs"])


def _run(cfg: DictConfig, job_dir: Path, group: str, name: str, slot: int | None, path: Path, read: dict) -> dict:
    started = time.perf_counter()
    record = new_record(cfg, name, group, read)
    tracker = None
    try:
        job = plan_job(cfg, job_dir, slot)
        record.update(job.record)
        # W&B starts once every setting and the data are checked: a job its plan refuses fails in seconds.
        tracker = tracking.Tracker(cfg.logger, job_dir, group=group, name=name, config=record["config"])
        stages(cfg, job, record)
        record["status"] = "ok"
    except Exception as error:
        record["status"] = "failed"
        record["error"] = f"{type(error).__name__}: {error}"
        record["traceback"] = traceback.format_exc()
        log.error("Job %s failed: %s", name, record["error"])
    except BaseException as error:  # Ctrl-C, SystemExit: recorded as such, then passed on
        record["status"], record["error"] = "interrupted", f"{type(error).__name__}: {error}"
        raise
    finally:
        record["timings"]["total"] = time.perf_counter() - started
        results.write(path, record)
        if tracker is not None:
            tracker.log_results(record)
            tracker.finish(record["status"], record["error"])
    log.info("%s\n%s", f"results: {path}", table.table([(name, record)]))
    return record
