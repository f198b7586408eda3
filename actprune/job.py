"""One job: validate, load, prune, benchmark, record. Callable with any composed config."""

from __future__ import annotations

import gc
import hashlib
import logging
import os
import socket
import time
import traceback
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from . import calibration, learned, models, results, tracking, zeroshot
from .data import FALLBACK_SOURCE, wikitext2_test_text
from .perplexity import perplexity, tokenize
from .methods import get_method
from .mitigation import learnable_options, needed_statistics
from .sparsify import calibrate_thresholds_, pruning_config, select_targets, sparsify_

log = logging.getLogger(__name__)


def selected_benchmarks(cfg: DictConfig) -> dict:
    return {name: options for name, options in cfg.benchmark.items() if options is not None}


# Jobs of one process (Hydra's basic launcher) share what is expensive to load; `release()` frees it.
_reused: dict = {}


def release() -> None:
    """Free the model and data that in-process jobs reuse."""
    _reused.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _reuse(key: tuple, load):
    """The object cached under `key`, or `load()` cached there; one model at a time."""
    if key not in _reused:
        if key[0] == "model":
            for other in [k for k in _reused if k[0] == "model"]:
                del _reused[other]
            gc.collect()
        _reused[key] = load()
    else:
        log.info("Reusing %s loaded by an earlier job of this process", key[0])
    return _reused[key]


def run_job(cfg: DictConfig, job_dir: Path, group: str, name: str, slot: int | None = None) -> dict:
    """Run one configured job in `job_dir` and return what it wrote to its results.json.

    A job that finished before with the same settings is not run again: its record is returned.
    `slot` (the job's number in a sweep) picks its GPU when several are visible and `device=auto`.
    """
    try:
        path = results.claim(job_dir, results.settings(cfg), cfg.get("overwrite", False))
    except results.AlreadyDone as done:
        log.info("Skipping %s: %s", name, done)
        return done.record
    started = time.perf_counter()
    record = {
        "status": "running",
        "error": None,
        "job": name,
        "group": group,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "metrics": {},
        "sparsity": {},
        "replaced_layers": None,
        "timings": {},
        "versions": results.versions(),
        "host": {"name": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID")},
    }
    tracker = None
    try:
        tracker = tracking.Tracker(cfg.logger, job_dir, group=group, name=name, config=record["config"])
        record.update(_run(cfg, record, job_dir, slot))
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
    log.info("%s\n%s", f"results: {path}", results.table([(name, record)]))
    return record


def _run(cfg: DictConfig, record: dict, job_dir: Path, slot: int | None) -> dict:
    timings = record["timings"]
    # Everything that can be checked without the weights is checked first.
    device = models.resolve_device(cfg.device, slot if cfg.model.device_map is None else None)
    dtype = models.resolve_dtype(cfg.model.dtype, device)
    models.check_device_map(cfg.model.device_map)
    benchmarks = selected_benchmarks(cfg)
    source, gguf_file = models.locate(cfg.model, cfg.paths.cache_dir)
    config = models.load_config(source, gguf_file, cfg.model.trust_remote_code)
    select_targets(models.skeleton(config, cfg.model.trust_remote_code), cfg.pruning)
    pruning = pruning_config(cfg.pruning)
    method = get_method(pruning.method)
    activation = method.kind == "activation"
    needed = needed_statistics(pruning) if activation else set()
    thresholds = activation and pruning.selection == "threshold"
    learn = learnable_options(pruning) if activation else None
    calibration_text = corpus = lm_eval_tasks = None
    if needed or thresholds or method.rule or learn is not None:
        calibration_text, corpus = _reuse(
            ("calibration text", cfg.calibration.corpus, cfg.paths.data_dir),
            lambda: calibration.corpus_text(cfg.calibration.corpus, cfg.paths.data_dir,
                                            str(Path(cfg.paths.cache_dir) / "datasets")),
        )
    texts = {}
    if "ppl_wikitext2" in benchmarks:
        options = benchmarks["ppl_wikitext2"]
        texts["ppl_wikitext2"], record["data_source"] = _reuse(
            ("text", cfg.paths.data_dir, options.fallback_text),
            lambda: wikitext2_test_text(cfg.paths.data_dir, options.fallback_text,
                                        cache_dir=str(Path(cfg.paths.cache_dir) / "datasets")),
        )
    if "lm_eval" in benchmarks:
        tic = time.perf_counter()
        lm_eval_tasks, record["lm_eval_data"] = zeroshot.prepare(
            benchmarks["lm_eval"], cfg.paths.data_dir, Path(job_dir) / "lm_eval_tasks"
        )
        timings["lm_eval_tasks"] = time.perf_counter() - tic
    record["model"] = Path(gguf_file).stem if gguf_file else Path(source).name if Path(source).is_dir() else source
    record["device"] = str(device)
    record["dtype"] = str(dtype).removeprefix("torch.")

    torch.manual_seed(cfg.seed)
    tic = time.perf_counter()
    model_key = ("model", source, gguf_file, str(device), dtype, cfg.model.trust_remote_code, cfg.model.device_map)
    model, tokenizer = _reuse(model_key, lambda: models.load_model(
        source, gguf_file, device, dtype, cfg.paths.cache_dir, cfg.model.trust_remote_code, cfg.model.device_map
    ))
    timings["load"] = time.perf_counter() - tic
    try:
        record["parameters"] = sum(p.numel() for p in model.parameters())
        stats = None
        if needed:
            tic = time.perf_counter()
            _, targets = select_targets(model, pruning)
            stats, record["calibration"] = calibration.statistics(
                model, tokenizer, targets, cfg.calibration, calibration.model_fingerprint(source), calibration_text,
                corpus, cfg.paths.cache_dir, second_moment="second_moment" in needed,
            )
            timings["calibration"] = time.perf_counter() - tic

        c = cfg.calibration
        windows_used = {"corpus": corpus, "windows": c.windows, "seqlen": c.seqlen, "seed": c.seed}
        batches = None
        if method.rule:  # Wanda, SparseGPT: calibration windows pass through the layers as they are pruned
            batches = calibration.windows(tokenizer, calibration_text, c.windows, c.seqlen, c.seed)
            record["calibration"] = windows_used

        tic = time.perf_counter()
        # keep_dense: restore_ below gives the next job of this process the dense model back, bit for bit.
        report = sparsify_(model, pruning, stats=stats, batches=batches, keep_dense=True)
        timings["prune"] = time.perf_counter() - tic
        if report.seconds:  # layer-by-layer methods: the calibration passes apart from the pruning itself
            timings["calibration"], timings["prune"] = report.seconds["calibration"], report.seconds["prune"]
        record["replaced_layers"] = report.replaced_layers
        if thresholds:
            tic = time.perf_counter()
            calibrate_thresholds_(model, report, calibration.windows(tokenizer, calibration_text, c.windows, c.seqlen, c.seed))
            timings["thresholds"] = time.perf_counter() - tic
            record.setdefault("calibration", windows_used)

        if learn is not None:
            tic = time.perf_counter()
            windows = calibration.windows(tokenizer, calibration_text, c.windows, c.seqlen, c.seed)
            key = {"model": calibration.model_fingerprint(source), "pruning": OmegaConf.to_container(cfg.pruning, resolve=True),
                   "corpus": corpus, "tokens": hashlib.sha1(windows.numpy().tobytes()).hexdigest(), "dtype": str(dtype)}
            record["learned"] = learned.fit_or_load_(model, report.layers, windows, learn,
                                                     learned.cache_file(cfg.paths.cache_dir, key))
            record.setdefault("calibration", windows_used)
            timings["learn"] = time.perf_counter() - tic

        metrics = {}
        report.reset()  # the measured sparsity covers the benchmarks' text only
        if "ppl_wikitext2" in benchmarks:
            options = benchmarks["ppl_wikitext2"]
            tic = time.perf_counter()
            ids = _reuse(("ids", model_key, cfg.paths.data_dir, options.fallback_text),
                         lambda: tokenize(tokenizer, texts["ppl_wikitext2"]))
            result = perplexity(model, tokenizer, ids, options.seqlen, options.batch_size, options.max_windows)
            timings["ppl_wikitext2"] = time.perf_counter() - tic
            # The demo's offline fallback text must never pass for WikiText-2.
            key = "ppl/python_docs" if record["data_source"] == FALLBACK_SOURCE else "ppl/wikitext2"
            metrics[key] = result["ppl"]
            record["ppl_wikitext2"] = {key: result[key] for key in ("windows", "tokens", "mean_nll", "window_nll")}
        if "lm_eval" in benchmarks:
            tic = time.perf_counter()
            result = zeroshot.evaluate(model, tokenizer, benchmarks["lm_eval"], lm_eval_tasks, cfg.seed)
            timings["lm_eval"] = time.perf_counter() - tic
            metrics.update(result["metrics"])
            record["lm_eval"] = result["details"]
        record["sparsity"] = report.summary()
        report.restore_(model)
        return {"metrics": metrics}
    except BaseException:
        _reused.pop(model_key, None)  # a job that failed part way may have left the model altered
        raise
