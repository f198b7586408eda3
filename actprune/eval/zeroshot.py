"""Zero-shot accuracy through lm-evaluation-harness, on the pruned model in memory.

Where `paths.data_dir` holds `lm_eval/<task>/<split>.jsonl`, a task reads its rows from there: a
small task YAML *includes* lm_eval's own definition of the task (prompt, choices, target, metrics)
and only swaps the dataset for those files, so scores equal the built-in task's on the same rows.
"""

from __future__ import annotations

import difflib
import functools
import logging
import time
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import List, Optional

import yaml

from ..files import quiet_datasets
from . import Env, Measured, benchmark

log = logging.getLogger(__name__)

SPLITS = ("training_split", "validation_split", "test_split", "fewshot_split")


def local_rows(data_dir: str | None, task: str) -> dict[str, str]:
    """{split: file} for `data_dir/lm_eval/<task>/<split>.jsonl`."""
    folder = Path(data_dir) / "lm_eval" / task if data_dir else None
    if folder is None or not folder.is_dir():
        return {}
    return {path.stem: str(path.resolve()) for path in sorted(folder.glob("*.jsonl"))}


def _check_reachable(task: str, config: dict, data_dir: str | None) -> None:
    import datasets

    try:
        datasets.load_dataset_builder(config["dataset_path"], config.get("dataset_name"))
    except Exception as error:  # offline and not cached: datasets raises several types
        evaluated = config.get("test_split") or config.get("validation_split")
        raise FileNotFoundError(
            f"lm_eval task {task!r}: no local rows in {Path(data_dir or '<paths.data_dir>') / 'lm_eval' / task}/ "
            f"(it evaluates on {evaluated}.jsonl, one row per line, laid out like ../shared/data/lm_eval), "
            f"and datasets cannot load {config['dataset_path']!r} ({type(error).__name__}). Put the rows "
            f"there (paths.data_dir=DIR) or run once online so that datasets caches them."
        ) from error


def fewshot_split(splits: dict) -> str | None:
    """The split lm_eval draws few-shot examples from: its `fewshot_split`, else the first of
    training, validation and test that the task has (lm_eval's own order)."""
    return next(
        (
            splits[key]
            for key in ("fewshot_split", "training_split", "validation_split", "test_split")
            if splits.get(key)
        ),
        None,
    )


@functools.cache
def task_index():
    """lm_eval's own index of its ~14,700 tasks, built once per process: it takes about 40 s."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


def prepare(options, data_dir: str | None, work_dir: Path) -> tuple[list, dict, dict]:
    """Build lm_eval's Task objects (data loaded) before any model is: bad names fail here.

    Returns the tasks, a record of where each one's rows came from and, with few-shot examples,
    the split each task draws them from (a warning where that is the very split it scores).
    """
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    tasks = list(options.tasks)
    if not tasks:
        raise ValueError("benchmark.lm_eval.tasks is empty: name at least one lm_eval task")
    manager = task_index()
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        hints = {task: difflib.get_close_matches(task, manager.all_tasks, n=4) for task in unknown}
        raise ValueError(
            "benchmark.lm_eval.tasks: unknown lm_eval task(s) "
            + "; ".join(f"{task!r} (close: {', '.join(close) or 'none'})" for task, close in hints.items())
            + ". `lm-eval ls tasks` lists them all"
        )
    overrides, sources, fewshot = {}, {}, {}
    for task in tasks:
        entry = manager.task_index[task]
        if entry.yaml_path is None:  # a Python-defined task: lm_eval's own data only
            sources[task] = "lm_eval"
            fewshot[task] = "lm_eval's choice"
            continue
        config = load_yaml(entry.yaml_path, resolve_func=False)
        rows = local_rows(data_dir, task)
        if not rows:
            if "dataset_path" in config:
                _check_reachable(task, config, data_dir)
            sources[task] = f"datasets:{config.get('dataset_path')}"
            fewshot[task] = fewshot_split(config)
            continue
        override = {
            "include": str(entry.yaml_path),
            "task": task,
            "dataset_path": "json",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": rows},
        }
        # Splits the local folder does not have are switched off, so lm_eval never asks for them.
        override.update({key: config[key] if config.get(key) in rows else None for key in SPLITS})
        if not (override["validation_split"] or override["test_split"]):
            raise FileNotFoundError(
                f"lm_eval task {task!r}: {Path(data_dir) / 'lm_eval' / task} has {sorted(rows)} but the task "
                f"evaluates on {config.get('test_split') or config.get('validation_split')!r}: add that .jsonl"
            )
        overrides[task] = override
        fewshot[task] = fewshot_split(override)
        scored = override["test_split"] or override["validation_split"]
        if options.num_fewshot and fewshot[task] == scored:
            log.warning(
                "lm_eval task %s: few-shot examples come from %s, the rows it scores (no other split in %s)",
                task,
                scored,
                Path(data_dir) / "lm_eval" / task,
            )
        sources[task] = next(
            path for split, path in rows.items() if split in (override["test_split"], override["validation_split"])
        )
    if overrides:
        work_dir.mkdir(parents=True, exist_ok=True)
        for task, override in overrides.items():
            (work_dir / f"{task}.yaml").write_text(yaml.safe_dump(override, sort_keys=False))
    # Tasks read from local rows are indexed from the overrides alone (each includes lm_eval's own
    # config by path), not by indexing lm_eval's tasks again; the others load from its index.
    loaded = (
        manager.load_task_or_group([task for task in tasks if task not in overrides])
        if len(overrides) < len(tasks)
        else {}
    )
    if overrides:
        local = TaskManager(include_path=str(work_dir), include_defaults=False)
        with quiet_datasets():  # local rows: no `Generating validation split` bars
            loaded |= local.load_task_or_group(list(overrides))
    return list(loaded.values()), sources, fewshot


class Truncations(logging.Filter):
    """Counts lm_eval's `... Truncating N tokens from the left.` warnings instead of letting each
    through (one per request longer than the model's context: BoolQ passages on a 512-token model
    gave 89, each printed twice); every other record passes."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.WARNING and "tokens from the left" in record.getMessage():
            self.count += 1
            return False
        return True


def evaluate(model, tokenizer, options, tasks: list, seed: int) -> dict:
    """lm_eval on the model object; returns metrics and what to record about the run."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    # lm_eval ignores simple_evaluate's batch_size for a model object: it belongs to HFLM.
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=options.batch_size)
    truncations, lm_log = Truncations(), logging.getLogger(HFLM.__module__)
    lm_log.addFilter(truncations)
    try:
        output = lm_eval.simple_evaluate(
            model=lm,
            tasks=tasks,
            num_fewshot=options.num_fewshot,
            limit=options.limit,
            apply_chat_template=options.apply_chat_template,
            log_samples=False,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    finally:
        lm_log.removeFilter(truncations)
    if truncations.count:
        log.warning(
            "lm_eval cut %d requests longer than the model's context (%d tokens) from the left",
            truncations.count,
            lm.max_length,
        )
    metrics, rows = {}, []
    for task, scores in output["results"].items():
        row = {"task": task}
        for metric in ("acc", "acc_norm"):
            if f"{metric},none" in scores:
                row[metric] = scores[f"{metric},none"]
                row[f"{metric}_stderr"] = scores.get(f"{metric}_stderr,none")
                metrics[f"lm_eval/{task}/{metric}"] = row[metric]
                metrics[f"lm_eval/{task}/{metric}_stderr"] = row[f"{metric}_stderr"]
        row["samples"] = output.get("n-samples", {}).get(task, {}).get("effective")
        rows.append(row)
        log.info(
            "lm_eval %s: %s on %s rows",
            task,
            ", ".join(
                f"{metric} {_number(row[metric])} ± {_number(row[f'{metric}_stderr'])}"
                for metric in ("acc", "acc_norm")
                if metric in row
            ),
            row["samples"],
        )
    accuracies = [row["acc"] for row in rows if "acc" in row]
    if accuracies:
        metrics["lm_eval/mean_acc"] = sum(accuracies) / len(accuracies)
    details = {
        "lm_eval_version": version("lm_eval"),
        "task_versions": output.get("versions", {}),
        "num_fewshot": options.num_fewshot,
        "apply_chat_template": options.apply_chat_template,
        "limit": options.limit,
        "batch_size": lm.batch_size,
        "per_task": rows,
    }
    return {"metrics": metrics, "details": details}


def _number(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)  # lm_eval may give "N/A"


@dataclass
class LmEvalOptions:
    tasks: List[str] = field(default_factory=lambda: ["boolq", "winogrande", "piqa", "arc_easy"])
    num_fewshot: int = 0
    batch_size: int = 8
    apply_chat_template: bool = False  # the config sets ${model.apply_chat_template}
    limit: Optional[int] = None  # null: every row of each task


@benchmark("lm_eval")
class LmEval:
    """Zero-shot accuracy with lm-evaluation-harness on the pruned model in memory."""

    Options = LmEvalOptions

    def __init__(self, options: LmEvalOptions):
        self.options = options
        self.tasks = None

    @staticmethod
    def data_files(options, data_dir: str | None) -> dict[str, str]:
        """The local files a job with these options reads (actprune.run.job.inputs digests them)."""
        return {
            f"lm_eval/{task}/{split}": path
            for task in options.get("tasks") or []
            for split, path in local_rows(data_dir, str(task)).items()
        }

    def prepare(self, env: Env) -> dict:
        o = self.options
        if o.batch_size < 1 or o.num_fewshot < 0 or (o.limit is not None and o.limit < 1):
            raise ValueError(
                f"benchmark.lm_eval.batch_size={o.batch_size}, num_fewshot={o.num_fewshot}, limit={o.limit}: "
                f"allowed values are batch_size >= 1, num_fewshot >= 0, limit >= 1 or null"
            )
        tic = time.perf_counter()
        self.tasks, sources, fewshot = prepare(self.options, env.data_dir, Path(env.job_dir) / "lm_eval_tasks")
        self.seconds = time.perf_counter() - tic
        return {"lm_eval_data": sources, **({"lm_eval_fewshot_split": fewshot} if self.options.num_fewshot else {})}

    def run(self, model, tokenizer, env: Env) -> Measured:
        result = evaluate(model, tokenizer, self.options, self.tasks, env.seed)
        return Measured(result["metrics"], result["details"], {"lm_eval_tasks": self.seconds})
