"""One job: validate, load, prune, benchmark, record. Callable with any composed config."""

from __future__ import annotations

import logging
import time
import traceback
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from . import calibration, models, results, tracking, zeroshot
from .data import FALLBACK_SOURCE, wikitext2_test_text
from .perplexity import perplexity
from .methods import get_method
from .mitigation import needed_statistics
from .sparsify import calibrate_thresholds_, pruning_config, select_targets, sparsify_

log = logging.getLogger(__name__)


def selected_benchmarks(cfg: DictConfig) -> dict:
    return {name: options for name, options in cfg.benchmark.items() if options is not None}


def run_job(cfg: DictConfig, job_dir: Path, group: str, name: str) -> dict:
    """Run one configured job in `job_dir` and return what it wrote to its results.json."""
    path = results.claim(job_dir)
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
    }
    tracker = None
    try:
        tracker = tracking.Tracker(cfg.logger, job_dir, group=group, name=name, config=record["config"])
        record.update(_run(cfg, record, job_dir))
        record["status"] = "ok"
    except Exception as error:
        record["status"] = "failed"
        record["error"] = f"{type(error).__name__}: {error}"
        record["traceback"] = traceback.format_exc()
        log.error("Job %s failed: %s", name, record["error"])
    finally:
        record["timings"]["total"] = time.perf_counter() - started
        results.write(path, record)
        if tracker is not None:
            tracker.log_results(record)
            tracker.finish(record["status"], record["error"])
    log.info("%s\n%s", f"results: {path}", results.table([(name, record)]))
    return record


def _run(cfg: DictConfig, record: dict, job_dir: Path) -> dict:
    timings = record["timings"]
    # Everything that can be checked without the weights is checked first.
    device = models.resolve_device(cfg.device)
    dtype = models.resolve_dtype(cfg.model.dtype, device)
    benchmarks = selected_benchmarks(cfg)
    source, gguf_file = models.locate(cfg.model, cfg.paths.cache_dir)
    config = models.load_config(source, gguf_file, cfg.model.trust_remote_code)
    select_targets(models.skeleton(config, cfg.model.trust_remote_code), cfg.pruning)
    pruning = pruning_config(cfg.pruning)
    method = get_method(pruning.method)
    activation = method.kind == "activation"
    needed = needed_statistics(pruning) if activation else set()
    thresholds = activation and pruning.selection == "threshold"
    if needed or thresholds or method.rule:
        calibration_text, corpus = calibration.corpus_text(
            cfg.calibration.corpus, cfg.paths.data_dir, str(Path(cfg.paths.cache_dir) / "datasets")
        )
    texts = {}
    if "ppl_wikitext2" in benchmarks:
        options = benchmarks["ppl_wikitext2"]
        texts["ppl_wikitext2"], record["data_source"] = wikitext2_test_text(
            cfg.paths.data_dir, options.fallback_text, cache_dir=str(Path(cfg.paths.cache_dir) / "datasets")
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
    model, tokenizer = models.load_model(
        source, gguf_file, device, dtype, cfg.paths.cache_dir, cfg.model.trust_remote_code
    )
    timings["load"] = time.perf_counter() - tic
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

    batches = None
    if method.rule:  # Wanda, SparseGPT: calibration windows pass through the layers as they are pruned
        c = cfg.calibration
        batches = calibration.windows(tokenizer, calibration_text, c.windows, c.seqlen, c.seed)
        record["calibration"] = {"corpus": corpus, "windows": c.windows, "seqlen": c.seqlen, "seed": c.seed}

    tic = time.perf_counter()
    report = sparsify_(model, pruning, stats=stats, batches=batches)
    timings["prune"] = time.perf_counter() - tic
    if report.seconds:  # layer-by-layer methods: the calibration passes apart from the pruning itself
        timings["calibration"], timings["prune"] = report.seconds["calibration"], report.seconds["prune"]
    record["replaced_layers"] = report.replaced_layers
    if thresholds:
        tic = time.perf_counter()
        c = cfg.calibration
        calibrate_thresholds_(model, report, calibration.windows(tokenizer, calibration_text, c.windows, c.seqlen, c.seed))
        timings["thresholds"] = time.perf_counter() - tic
        record.setdefault("calibration", {"corpus": corpus, "windows": c.windows, "seqlen": c.seqlen, "seed": c.seed})

    metrics = {}
    report.reset()  # the measured sparsity covers the benchmarks' text only
    if "ppl_wikitext2" in benchmarks:
        options = benchmarks["ppl_wikitext2"]
        tic = time.perf_counter()
        result = perplexity(model, tokenizer, texts["ppl_wikitext2"], options.seqlen, options.batch_size, options.max_windows)
        timings["ppl_wikitext2"] = time.perf_counter() - tic
        # The demo's offline fallback text must never pass for WikiText-2.
        key = "ppl/python_docs" if record["data_source"] == FALLBACK_SOURCE else "ppl/wikitext2"
        metrics[key] = result["ppl"]
        record["ppl_wikitext2"] = {key: result[key] for key in ("windows", "tokens", "mean_nll")}
    if "lm_eval" in benchmarks:
        tic = time.perf_counter()
        result = zeroshot.evaluate(model, tokenizer, benchmarks["lm_eval"], lm_eval_tasks, cfg.seed)
        timings["lm_eval"] = time.perf_counter() - tic
        metrics.update(result["metrics"])
        record["lm_eval"] = result["details"]
    record["sparsity"] = report.summary()
    return {"metrics": metrics}
