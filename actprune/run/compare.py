"""Research comparisons of finished jobs, for the scripts and docs/results.md: a pivot of
perplexity per method and pattern, the gap table (share of the plain-vs-dense gap a method
closes, its NLL gain over plain window by window) and the scope table (what sharing masks over a
batch costs against a mask per token)."""

from __future__ import annotations

import math
from collections import defaultdict

from .table import label, pattern_label


def pivot(results: list[dict]) -> str:
    """Markdown: a row per method label, a column of WikiText-2 perplexity per sparsity pattern.
    Where a method ran at several batch sizes, the largest relative difference between them is
    shown in its own column (0 means batch-size invariant)."""
    cells, batch_spread, patterns = defaultdict(dict), defaultdict(list), []
    for result in results:
        if result.get("status") != "ok" or "ppl/wikitext2" not in result["metrics"]:
            continue
        pattern = (
            pattern_label(result, result["config"]["pruning"]["sparsity"])
            if result["sparsity"]["kind"] != "dense"
            else "dense"
        )
        method = label(result)
        ppl = result["metrics"]["ppl/wikitext2"]
        batch_spread[(method, pattern)].append(ppl)
        cells[method].setdefault(pattern, ppl)
        if pattern not in patterns:
            patterns.append(pattern)
    order = {p: i for i, p in enumerate(["dense", "2:4", "4:8", "8:16", "16:32", "0.5"])}
    patterns.sort(key=lambda p: order.get(p, len(order)))
    spread = {}
    for (method, _), values in batch_spread.items():
        if len(values) > 1:
            spread[method] = max(spread.get(method, 0.0), (max(values) - min(values)) / min(values))
    lines = ["| method | " + " | ".join(patterns) + " | batch-size spread |", "|" + " --- |" * (len(patterns) + 2)]
    for method in sorted(cells, key=lambda m: [cells[m].get(p, float("inf")) for p in patterns]):
        values = [f"{cells[method][p]:.2f}" if p in cells[method] else "" for p in patterns]
        lines.append(
            f"| {method} | " + " | ".join(values) + f" | {f'{spread[method]:.1e}' if method in spread else '-'} |"
        )
    return "\n".join(lines)


def paired_gain(base: list[float], other: list[float]) -> tuple[float, float, int]:
    """`other`'s mean NLL gain over `base`, window by window: the mean, its standard error, and on
    how many windows `other` is lower."""
    gains = [b - o for b, o in zip(base, other, strict=True)]
    mean = sum(gains) / len(gains)
    se = math.sqrt(sum((g - mean) ** 2 for g in gains) / (len(gains) - 1) / len(gains)) if len(gains) > 1 else math.nan
    return mean, se, sum(g > 0 for g in gains)


def _is_plain(result: dict) -> bool:
    """Uniform `act_magnitude` with no score, transform or selection of its own (layers a whole
    sweep skips may be skipped)."""
    pruning = result["config"]["pruning"]
    return (
        label({"config": {"pruning": {**pruning, "skip_layers": []}}}) == "act_magnitude"
        and pruning.get("allocation", "uniform") == "uniform"
    )


IN_DOMAIN = ("wikitext2_validation", "wikitext2_train")  # calibration text from the evaluated corpus


def calibration_label(result: dict) -> str:
    """The calibration corpus a row learned from, in-domain (WikiText-2, the evaluated corpus) said so."""
    corpus = (result.get("calibration") or {}).get("corpus")
    return "-" if corpus is None else f"{corpus} (in-domain)" if corpus in IN_DOMAIN else corpus


def mean_accuracy_se(metrics: dict) -> float | None:
    """Standard error of the mean zero-shot accuracy, from lm_eval's per-task standard errors (tasks
    are independent samples): with 100 rows a task, about ±0.025, which decides what a difference
    in accuracy between two rows can mean."""
    tasks = [key.removesuffix("/acc") for key in metrics if key.startswith("lm_eval/") and key.endswith("/acc")]
    errors = [metrics.get(f"{task}/acc_stderr") for task in tasks]
    if not tasks or any(not isinstance(e, (int, float)) or math.isnan(e) for e in errors):
        return None
    return math.sqrt(sum(e * e for e in errors)) / len(tasks)


def gap_table(results: list[dict]) -> str:
    """Markdown, one table per model: per sparsity pattern, each method's calibration corpus, its
    WikiText-2 perplexity and ΔNLL = ln(ppl / dense) (nats per token), the share of the gap between
    plain activation pruning (uniform `act_magnitude`, no transforms) and dense it closes, its NLL
    gain over plain window by window (mean ± SE, windows won), its mean zero-shot accuracy and the
    share of dense's it keeps, and the job's wall time."""
    return _per_model(results, _gap_table)


def _per_model(results: list[dict], render) -> str:
    """`render` of each model's finished jobs that measured WikiText-2, titled by model where there are several."""
    done = [r for r in results if r.get("status") == "ok" and "ppl/wikitext2" in r.get("metrics", {})]
    models = sorted({r.get("model", "?") for r in done})
    tables = [render([r for r in done if r.get("model", "?") == model]) for model in models]
    if len(models) > 1:
        tables = [f"**{model}**\n\n{table}" for model, table in zip(models, tables)]
    return "\n\n".join(tables)


def _gap_table(done: list[dict]) -> str:
    dense = next((r for r in done if r["sparsity"]["kind"] == "dense"), None)
    order = {p: i for i, p in enumerate(["2:4", "4:8", "8:16", "16:32", "0.5"])}
    patterns = sorted(
        {str(r["config"]["pruning"]["sparsity"]) for r in done if r is not dense},
        key=lambda p: (order.get(p, len(order)), p),
    )
    lines = [
        "| sparsity | method | calibration | perplexity | ΔNLL | gap closed | NLL gain over plain (windows lower) "
        "| mean acc ± SE (of dense) | minutes |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    ppl = lambda r: r["metrics"]["ppl/wikitext2"]  # noqa: E731
    minutes = lambda r: f"{r['timings']['total'] / 60:.1f}" if "total" in r.get("timings", {}) else ""  # noqa: E731
    dense_acc = (dense or {}).get("metrics", {}).get("lm_eval/mean_acc")

    def delta(result):
        return f"{math.log(ppl(result) / ppl(dense)):.3f}" if dense is not None else ""

    def accuracy(result):
        acc = result["metrics"].get("lm_eval/mean_acc")
        if acc is None:
            return ""
        se = mean_accuracy_se(result["metrics"])
        text = f"{acc:.3f}" + (f" ± {se:.3f}" if se is not None else "")
        return f"{text} ({acc / dense_acc:.1%})" if dense_acc else text

    if dense is not None:
        lines.append(
            f"| dense | {label(dense)} | - | {ppl(dense):.2f} | 0 | | | {accuracy(dense)} | {minutes(dense)} |"
        )
    for pattern in patterns:
        mine = sorted(
            (r for r in done if r is not dense and str(r["config"]["pruning"]["sparsity"]) == pattern), key=ppl
        )
        plain = next((r for r in mine if _is_plain(r)), None)
        for result in mine:
            gap, gain = "", ""
            if plain is not None and result is not plain:
                if dense is not None:
                    gap = f"{(ppl(plain) - ppl(result)) / (ppl(plain) - ppl(dense)):.1%}"
                windows = [(r.get("ppl_wikitext2") or {}).get("window_nll") for r in (plain, result)]
                if all(windows) and len(windows[0]) == len(windows[1]):
                    mean, se, wins = paired_gain(*windows)
                    gain = f"{mean:+.3f} ± {se:.3f} ({wins}/{len(windows[0])})"
            name = f"{label(result)} (plain)" if result is plain else label(result)
            lines.append(
                f"| {pattern_label(result, pattern)} | {name} | {calibration_label(result)} | {ppl(result):.2f} "
                f"| {delta(result)} | {gap} | {gain} | {accuracy(result)} | {minutes(result)} |"
            )
    return "\n".join(lines)


def scope_table(results: list[dict]) -> str:
    """Markdown, one table per model: per pattern and setting, each batch size's `token` row (a mask
    per token) and its `mask_scope=step` rows (the batch's windows share a mask at each position), with
    the perplexity, ΔNLL = ln(ppl / dense), what step costs over token at the same batch window by
    window (mean ± SE nats per token, windows worse), the share of the weight a decode step reads
    (`sparsity.rows_read`) and the job's wall time."""
    return _per_model(results, _scope_table)


def _scope_table(done: list[dict]) -> str:
    dense = next((r for r in done if r["sparsity"]["kind"] == "dense"), None)
    pruning = lambda r: r["config"]["pruning"]  # noqa: E731
    batch = lambda r: r["config"]["benchmark"]["ppl_wikitext2"]["batch_size"]  # noqa: E731
    ppl = lambda r: r["metrics"]["ppl/wikitext2"]  # noqa: E731
    setting = lambda r: label({"config": {"pruning": {**pruning(r), "mask_scope": "token"}}})  # noqa: E731
    groups = defaultdict(list)
    for r in done:
        if r is not dense:
            groups[(str(pruning(r)["sparsity"]), setting(r))].append(r)
    lines = [
        "| sparsity | setting | batch | mask scope | perplexity | ΔNLL | step over token (windows worse) "
        "| rows read | minutes |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    if dense is not None:
        lines.append(
            f"| dense | | {batch(dense)} | | {ppl(dense):.2f} | 0 | | 1.000 | {dense['timings']['total'] / 60:.1f} |"
        )
    for (pattern, name), rows in sorted(groups.items()):
        rows.sort(key=lambda r: (batch(r), pruning(r).get("mask_scope", "token") != "token", pruning(r)["mask_pool"]))
        shown = set()  # a token row once per batch: a sweep over mask_pool repeats it (the pool is unused there)
        for r in rows:
            step = pruning(r).get("mask_scope", "token") == "step"
            if not step and batch(r) in shown:
                continue
            if not step:
                shown.add(batch(r))
            token = next(
                (t for t in rows if batch(t) == batch(r) and pruning(t).get("mask_scope", "token") == "token"), None
            )
            cost = ""
            if step and token is not None:
                windows = [t["ppl_wikitext2"]["window_nll"] for t in (r, token)]
                mean, se, worse = paired_gain(*windows)  # token's gain over step: what step costs
                cost = f"{mean + 0.0:+.3f} ± {se:.3f} ({worse}/{len(windows[0])})"  # + 0.0: no -0.000
            scope = f"step ({pruning(r)['mask_pool']})" if step else "token"
            delta = f"{math.log(ppl(r) / ppl(dense)):.3f}" if dense is not None else ""
            rows_read = r["sparsity"].get("rows_read")
            lines.append(
                f"| {pattern} | {name} | {batch(r)} | {scope} | {ppl(r):.2f} | {delta} | {cost} "
                f"| {'' if rows_read is None else f'{rows_read:.3f}'} | {r['timings']['total'] / 60:.1f} |"
            )
    return "\n".join(lines)
