"""Results as a reader sees them: the method's label, a row per job, and the tables built from
rows (the job log, the sweep's end, `actprune-report`)."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

from ..masks import parse_sparsity
from .results import read_all

FIXED = ["model", "method", "sparsity", "transforms", "perplexity", "text", "seqlen", "windows", "batch", "calibration"]
SPEED = ["decode_tok_s", "speedup", "backend"]  # the generate benchmark's; shown where a job has them
TAIL = ["mean_acc", "measured_sparsity", "rows_read", "runtime_s", "replaced_layers", "status", "folder"]
KNOWN = ("ppl/", "lm_eval/", "generate/")  # the built-in benchmarks' metrics, shown in the columns above


def other_metrics(metrics: dict) -> dict:
    """The metrics of benchmarks the tables do not know (one's own, e.g. `toy/accuracy`): a column each."""
    return {key: value for key, value in metrics.items() if not key.startswith(KNOWN)}


def transform_names(pruning: dict) -> list[str]:
    """`[shift, {name: shift, mode: static}, {name: refit, ridge: 0.1}, {name: learnable, lr: 0.01, epochs: 8}]`
    as `["shift", "shift:static", "refit(ridge=0.1)", "learnable(lr=0.01,epochs=8)"]`: a lone word
    (a mode) reads on its own, a number or a list needs the name of its option."""
    names = []
    for t in pruning.get("transforms") or []:
        options = {} if isinstance(t, str) else {k: v for k, v in t.items() if k != "name"}
        name = t if isinstance(t, str) else t.get("name", "?")
        if len(options) == 1 and isinstance(next(iter(options.values())), str):
            name += f":{next(iter(options.values()))}"
        elif options:
            name += "(" + ",".join(f"{k}={v}" for k, v in options.items()) + ")"
        names.append(name)
    return names


def pattern_label(result: dict, pattern) -> str:
    """The sparsity as the tables show it: "8:16", or "8:16 mean (w 0.500)" where N was chosen per
    layer, with the fraction of weight entries kept (a mean over inputs may keep more of the weights)."""
    pruning = (result.get("config") or {}).get("pruning") or {}
    if pruning.get("allocation", "uniform") == "uniform":
        return str(pattern)
    kept = (result.get("sparsity") or {}).get("kept_by_weight")
    return f"{pattern} mean" if kept is None else f"{pattern} mean (w {kept:.3f})"


def label(result: dict, transforms: bool = True) -> str:
    """The method as a reader names it: `act_magnitude`, `act_magnitude score=clact [pca,shift:static]`."""
    pruning = (result.get("config") or {}).get("pruning") or {}
    parts = [str(pruning.get("method", "?"))]
    if pruning.get("method", "").startswith("act_"):
        if pruning.get("score", "magnitude") != "magnitude":
            parts.append(f"score={pruning['score']}")
        names = transform_names(pruning)
        if names and transforms:
            parts.append(f"[{','.join(names)}]")
        if pruning.get("selection", "topk") != "topk":
            parts.append(pruning["selection"])
        if pruning.get("dense_tokens"):
            parts.append(f"dense_tokens={pruning['dense_tokens']}")
        if pruning.get("mask_scope", "token") != "token":
            parts.append(f"mask_scope={pruning['mask_scope']}:{pruning.get('mask_pool', 'mean')}")
        if pruning.get("skip_layers"):
            parts.append(f"skip={','.join(pruning['skip_layers'])}")
    return " ".join(parts)


def overrides_of(name: str) -> list[str]:
    """A job name's overrides: split at the commas between them, not those inside [...] or {...}."""
    parts, depth, start = [], 0, 0
    for index, char in enumerate(name):
        depth += (char in "[{") - (char in "]}")
        if char == "," and depth == 0:
            parts.append(name[start:index])
            start = index + 1
    return [*parts, name[start:]]


def shared_overrides(names: list[str]) -> list[str]:
    """The overrides every one of several job names has (a table shows them once, above it)."""
    if len(names) < 2:
        return []
    common = set.intersection(*(set(overrides_of(name)) for name in names))
    return [part for part in overrides_of(names[0]) if part in common]


def table(rows: list[tuple[str, dict]]) -> str:
    """A plain-text table of jobs: name, method, sparsity, perplexity (and on which text), decode
    speed where a job measured it, status. The overrides every job shares are said once, above it,
    and left out of the names (they would wrap every line)."""
    shared = shared_overrides([name for name, _ in rows])
    if shared:
        rows = [
            (",".join(part for part in overrides_of(name) if part not in shared) or "-", result)
            for name, result in rows
        ]
    found = [(name, result, row(result)) for name, result in rows]
    speed = any(cells["decode_tok_s"] is not None or cells["speedup"] is not None for _, _, cells in found)
    batched = any((cells["batch"] or 1) > 1 for _, _, cells in found)  # shared masks and rows read depend on it
    others = sorted({key for _, result, _ in found for key in other_metrics(result.get("metrics") or {})})
    header = (
        "job",
        "method",
        "sparsity",
        "perplexity",
        "text",
        *(("batch",) if batched else ()),
        "mean_acc",
        *others,
        *(("tok/s", "speedup", "backend") if speed else ()),
        "measured",
        "layers",
        "status",
    )
    number = lambda value, spec=".4f": format(float(value), spec) if isinstance(value, (int, float)) else "-"  # noqa: E731
    lines = [header]
    for name, result, cells in found:
        lines.append(
            (
                name,
                label(result),
                # a job that failed before pruning has no measured pattern: the one it was asked for
                pattern_label(
                    result,
                    (result.get("sparsity") or {}).get("pattern")
                    or ((result.get("config") or {}).get("pruning") or {}).get("sparsity", "-"),
                ),
                number(cells["perplexity"]),
                cells["text"] or "-",
                *((str(cells["batch"] or "-"),) if batched else ()),
                number(cells["mean_acc"]),
                *(number(cells.get(key)) for key in others),
                *(
                    (number(cells["decode_tok_s"], ".1f"), number(cells["speedup"], ".2f"), cells["backend"] or "-")
                    if speed
                    else ()
                ),
                number(cells["measured_sparsity"]),
                "-" if result.get("replaced_layers") is None else str(result["replaced_layers"]),
                cells["status"],
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    rendered = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines]
    rendered.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join([*(["every job: " + ",".join(shared)] if shared else []), *rendered])


def row(result: dict, folder: str | None = None) -> dict:
    """One job as a row of the report: model, method, sparsity, transforms, the metrics, status."""
    metrics = result.get("metrics") or {}
    generate = result.get("generate") or {}
    config = result.get("config") or {}
    pruning = config.get("pruning") or {}
    ppl_key = next((key for key in metrics if key.startswith("ppl/")), None)
    calibration = result.get("calibration") or {}
    model = config.get("model") or {}
    found = {
        "model": result.get("model", "?"),
        "method": label(result, transforms=False),
        "sparsity": "dense"
        if (result.get("sparsity") or {}).get("kind") == "dense"
        else pattern_label(result, pruning.get("sparsity", "?")),
        "transforms": ",".join(transform_names(pruning)),
        "perplexity": metrics.get(ppl_key) if ppl_key else None,
        "text": ppl_key.removeprefix("ppl/") if ppl_key else None,
        "seqlen": ((config.get("benchmark") or {}).get("ppl_wikitext2") or {}).get("seqlen") if ppl_key else None,
        "windows": (result.get("ppl_wikitext2") or {}).get("windows"),
        # the windows of one forward: with mask_scope=step they share masks, and rows_read depends on it
        "batch": ((config.get("benchmark") or {}).get("ppl_wikitext2") or {}).get("batch_size") if ppl_key else None,
        "calibration": f"{calibration['corpus']} {calibration['windows']}x{calibration['seqlen']}"
        if calibration
        else None,
        "mean_acc": metrics.get("lm_eval/mean_acc"),
        "decode_tok_s": metrics.get("generate/decode_tokens_per_s"),
        "speedup": metrics.get("generate/decode_speedup"),  # pruned over dense: > 1 is faster
        "backend": generate.get("backend") or pruning.get("backend"),
        "measured_sparsity": (result.get("sparsity") or {}).get("measured"),
        "rows_read": (result.get("sparsity") or {}).get("rows_read"),
        "runtime_s": (result.get("timings") or {}).get("total"),
        "replaced_layers": result.get("replaced_layers"),
        "status": result.get("status", "?"),
        "folder": folder,
        "_error": result.get("error") if result.get("status") != "ok" else None,
        "_model_files": f"{model.get('path')}/{model.get('gguf_file') or ''}",  # told apart from the name alone
        # Where decode speed was measured (the GPU's name where recorded): two devices' speeds differ.
        "_device": generate.get("device_name") or generate.get("device"),
    }
    for key, value in metrics.items():
        if key.startswith("lm_eval/") and key.endswith("/acc"):
            found[key.removeprefix("lm_eval/").removesuffix("/acc")] = value
    found.update({key: value for key, value in other_metrics(metrics).items() if key not in found})
    return found


def rows(folders: list[Path]) -> list[dict]:
    """One row per job below `folders`, sorted by model, method and sparsity."""
    found = [row(result, str(path.parent)) for folder in folders for path, result in read_all(folder)]
    for name in {r["model"] for r in found}:  # two models whose folders share a name stay apart
        same = [r for r in found if r["model"] == name]
        if len({r["_model_files"] for r in same}) > 1:
            for r in same:
                r["model"] = f"{name}#{hashlib.sha1(r['_model_files'].encode()).hexdigest()[:6]}"
    return sorted(
        found,
        key=lambda r: (
            r["model"],
            r["method"] != "dense",
            r["method"],
            r["transforms"],
            zeroed_fraction(r["sparsity"]),
            r["sparsity"],
        ),
    )


def columns(table: list[dict]) -> list[str]:
    named = {key for row in table for key in row if not key.startswith("_")}
    tasks = sorted(named - set(FIXED) - set(SPEED) - set(TAIL))
    # The speed columns only where some job measured speed: reports of sweeps without the benchmark stay
    # as they were (every job's config names a backend, so it alone does not count).
    timed = any(row.get("decode_tok_s") is not None or row.get("speedup") is not None for row in table)
    speed = SPEED if timed else []
    return FIXED + tasks + speed + TAIL


def zeroed_fraction(sparsity: str) -> float:
    if sparsity == "dense":
        return 0.0
    try:
        return parse_sparsity(sparsity.split(" ")[0]).target()  # "8:16 mean (w 0.500)": the target's
    except ValueError:
        return float("nan")


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:.1f}"
    return "" if value is None else str(value)


def markdown(table: list[dict]) -> str:
    """The table, then why each job that is not ok is not (its error, one line)."""
    names = [c for c in columns(table) if c != "folder"]
    lines = ["| " + " | ".join(names) + " |", "|" + " --- |" * len(names)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in names) + " |" for row in table]
    failed = [row for row in table if row["status"] != "ok"]
    if failed:
        lines += ["", "Jobs not ok:", ""]
        lines += [
            f"- {row['folder'] or row['method']} ({row['status']}): {(row['_error'] or 'no error recorded').splitlines()[0]}"
            for row in failed
        ]
    return "\n".join(lines) + "\n"


def write_csv(table: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns(table), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(table)
