"""The Hydra command line end to end, on a tiny random model and tokenizer built here."""

import glob
import json
from pathlib import Path

import pytest

from .helpers import actprune, common, results_in

pytestmark = pytest.mark.cli


def test_multirun_mixes_methods_and_sparsities_and_survives_a_bad_job(tiny_setup, tmp_path):
    sweep = tmp_path / "sweep"
    done = actprune(
        "-m",
        *common(tiny_setup, sweep),
        "pruning=dense,act_magnitude,weight_magnitude",
        "pruning.sparsity=2:4,1.5",
        "benchmark.ppl_wikitext2.max_windows=4",
    )
    # Every job ran; the sweep then says which failed and exits non-zero.
    assert done.returncode == 1, done.stderr[-3000:]
    assert "3 of 6 jobs not ok (3 failed)" in done.stderr and "pruning.sparsity=1.5,pruning=dense" in done.stderr
    found = results_in(sweep)
    assert len(found) == 6
    assert any("pruning.sparsity=2:4,pruning=act_magnitude" in name for name in found)
    failed = {n: r for n, r in found.items() if r["status"] == "failed"}
    assert len(failed) == 3 and all("1.5" in n for n in failed)
    assert all("pruning.sparsity" in r["error"] and "[0, 1)" in r["error"] for r in failed.values())
    assert all("replaced_layers" in r and r["timings"]["total"] > 0 for r in failed.values())
    ok = {r["config"]["pruning"]["method"]: r for r in found.values() if r["status"] == "ok"}
    assert set(ok) == {"dense", "act_magnitude", "weight_magnitude"}
    assert ok["dense"]["replaced_layers"] == 0 and ok["act_magnitude"]["replaced_layers"] == 14
    assert ok["act_magnitude"]["sparsity"]["measured"] == 0.5
    assert ok["weight_magnitude"]["sparsity"]["measured"] == pytest.approx(0.5)
    ppl = {m: r["metrics"]["ppl/wikitext2"] for m, r in ok.items()}
    assert len(set(ppl.values())) == 3
    assert "Sweep" in done.stdout and "act_magnitude" in done.stdout and "failed" in done.stdout


def test_results_json_content(tiny_setup, tmp_path):
    sweep = tmp_path / "one"
    done = actprune(
        *common(tiny_setup, sweep),
        "pruning=act_magnitude",
        "pruning.sparsity=0.25",
        "benchmark.ppl_wikitext2.max_windows=3",
        "benchmark.ppl_wikitext2.batch_size=2",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((sweep / "run" / "results.json").read_text())
    assert result["status"] == "ok" and result["error"] is None
    expected = {
        "method": "act_magnitude",
        "sparsity": 0.25,
        "layers": None,
        "score": "magnitude",
        "transforms": [],
        "selection": "topk",
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    }
    assert {key: result["config"]["pruning"][key] for key in expected} == expected
    assert result["config"]["benchmark"]["ppl_wikitext2"]["seqlen"] == 32
    assert result["ppl_wikitext2"]["windows"] == 3 and result["ppl_wikitext2"]["tokens"] == 3 * 31
    assert result["metrics"]["ppl/wikitext2"] > 1
    sparsity = result["sparsity"]
    assert sparsity["target"] == 0.25 and sparsity["pattern"] == "0.25" and len(sparsity["per_layer"]) == 14
    assert sparsity["measured"] == pytest.approx(0.25, abs=0.01)
    assert set(result["timings"]) == {"load", "prune", "ppl_wikitext2", "total"}
    assert result["parameters"] > 0 and result["device"] == "cpu" and result["dtype"] == "float32"
    assert set(result["versions"]) >= {"python", "torch", "transformers", "actprune", "git_commit"}
    assert result["data_source"].endswith("test.jsonl")
    # A finished job is never overwritten by accident. The same job again is skipped...
    path = sweep / "run" / "results.json"
    written = path.read_bytes()
    args = [
        "pruning=act_magnitude",
        "pruning.sparsity=0.25",
        "benchmark.ppl_wikitext2.max_windows=3",
        "benchmark.ppl_wikitext2.batch_size=2",
    ]
    again = actprune(*common(tiny_setup, sweep), *args)
    assert again.returncode == 0 and "Skipping" in again.stdout and path.read_bytes() == written
    # ...another job in its folder is refused, naming what differs...
    other = actprune(*common(tiny_setup, sweep), "pruning=dense")
    assert (
        other.returncode != 0
        and "other settings (benchmark, pruning differ)" in other.stderr
        and "overwrite=true" in other.stderr
    )
    assert path.read_bytes() == written
    # ...and overwrite=true runs it, keeping the old record beside the new one.
    forced = actprune(
        *common(tiny_setup, sweep), "pruning=dense", "overwrite=true", "benchmark.ppl_wikitext2.max_windows=3"
    )
    assert forced.returncode == 0, forced.stderr[-3000:]
    assert json.loads(path.read_text())["config"]["pruning"]["method"] == "dense"
    assert (sweep / "run" / "results.ok.1.json").read_bytes() == written


@pytest.mark.parametrize(
    "override,words",
    [
        ("pruning=magnitude", ["Could not find 'pruning/magnitude'", "act_magnitude", "weight_magnitude"]),
        ("pruning.sparsty=0.5", ["sparsty"]),
        ("model.seqlen=long", ["model.seqlen", "long"]),
    ],
)
def test_bad_group_option_or_key_fails_at_startup(tiny_setup, tmp_path, override, words):
    done = actprune(*common(tiny_setup, tmp_path), override)
    assert done.returncode != 0
    for word in words:
        assert word in done.stderr
    assert not list(tmp_path.rglob("results.json"))


@pytest.mark.parametrize(
    "override,words",
    [
        ("model.path=/nonexistent/model", ["model.path", "no such folder"]),
        ("model.path=models/not-a-model", ["model.path", "no model config"]),
        ("pruning.target_modules=[q_proj,wq]", ["pruning.target_modules", "wq", "down_proj"]),
        ("device=tpu", ["device", "auto, cpu, cuda, cuda:N"]),
        ("model.dtype=int8", ["model.dtype", "bfloat16"]),
        ("logger.mode=sometimes", ["logger.mode", "offline"]),
    ],
)
def test_bad_values_fail_before_loading_and_are_recorded(tiny_setup, tmp_path, override, words):
    done = actprune(*common(tiny_setup, tmp_path), "pruning=act_magnitude", override)
    assert done.returncode != 0
    result = json.loads((tmp_path / "run" / "results.json").read_text())
    assert result["status"] == "failed" and "load" not in result["timings"]
    for word in words:
        assert word in result["error"]


def test_missing_wikitext_is_a_clear_error(tiny_setup, tmp_path):
    done = actprune(*common(tiny_setup, tmp_path), f"paths.data_dir={tmp_path / 'empty'}")
    assert done.returncode != 0
    error = json.loads((tmp_path / "run" / "results.json").read_text())["error"]
    assert "WikiText-2 test split not found" in error and "paths.data_dir" in error


def synced(printed: str) -> set[Path]:
    """The run folders the `wandb sync` hint a command printed (once) names."""
    (hint,) = [line for line in printed.splitlines() if "wandb sync " in line]
    return {Path(path) for pattern in hint.partition("wandb sync ")[2].split() for path in glob.glob(pattern)}


def test_wandb_offline_run_is_written_under_the_job_folder(tiny_setup, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_SILENT", raising=False)  # what a user sees
    args = [a for a in common(tiny_setup, tmp_path) if a != "logger=none"]
    done = actprune(
        *args, "logger=wandb", "pruning=act_magnitude", "pruning.sparsity=2:4", "benchmark.ppl_wikitext2.max_windows=2"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    # Offline, W&B's own lines are left out: one says where the run went, one how to upload it.
    printed = done.stdout + done.stderr
    assert (
        "wandb:" not in printed and printed.count(f"W&B offline run: {runs[0]}") == 1 and synced(printed) == set(runs)
    )
    result = json.loads((tmp_path / "run" / "results.json").read_text())
    assert result["status"] == "ok"
    log = next(runs[0].glob("*.wandb")).read_bytes()  # what `wandb sync` will upload
    for expected in ("ppl/wikitext2", "sparsity/measured", result["job"], result["group"], "act_magnitude"):
        assert expected.encode() in log, expected
    table = json.loads(next(runs[0].rglob("per_layer*.table.json")).read_text())
    assert table["columns"] == ["layer", "measured_sparsity"] and len(table["data"]) == 14


# A benchmark that passes the plan and fails as it runs, after the perplexity.
FAILING_BENCHMARK = """
from dataclasses import dataclass

from actprune.eval import benchmark


@benchmark("fails")
class Fails:
    @dataclass
    class Options:
        pass

    def __init__(self, options):
        pass

    def prepare(self, env):
        return {}

    def run(self, model, tokenizer, env):
        raise RuntimeError("this benchmark fails as it runs")
"""


def test_a_failed_job_still_finishes_its_wandb_run_and_one_its_plan_refuses_starts_none(
    tiny_setup, tmp_path, monkeypatch
):
    args = [a for a in common(tiny_setup, tmp_path) if a != "logger=none"]
    (tmp_path / "ext").mkdir()
    (tmp_path / "ext" / "failing_benchmark.py").write_text(FAILING_BENCHMARK)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "ext"))
    done = actprune(
        *args,
        "logger=wandb",
        "pruning=act_magnitude",
        "pruning.sparsity=2:4",
        "imports=[failing_benchmark]",
        "benchmark.ppl_wikitext2.max_windows=2",
        "+benchmark.fails={}",
    )
    assert done.returncode != 0
    result = json.loads((tmp_path / "run" / "results.json").read_text())
    assert result["status"] == "failed" and "this benchmark fails as it runs" in result["error"]
    assert result["metrics"]["ppl/wikitext2"] > 1  # it ran first
    log = next((tmp_path / "run" / "wandb").glob("offline-run-*/*.wandb")).read_bytes()
    assert b"failed" in log and b"2:4" in log
    # A fresh clone without WikiText-2: the plan fails before W&B starts and before the model loads.
    fresh = [a for a in common(tiny_setup, tmp_path / "fresh") if a != "logger=none"]
    done = actprune(
        *fresh, "logger=wandb", f"paths.data_dir={tmp_path / 'empty'}", "pruning=act_magnitude", "pruning.sparsity=2:4"
    )
    result = json.loads((tmp_path / "fresh" / "run" / "results.json").read_text())
    assert (
        done.returncode != 0
        and "WikiText-2 test split not found" in result["error"]
        and "load" not in result["timings"]
    )
    assert not (tmp_path / "fresh" / "run" / "wandb").exists()


def test_an_offline_sweep_says_where_each_run_went_and_once_how_to_upload_them_all(tiny_setup, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_SILENT", raising=False)
    args = [a for a in common(tiny_setup, tmp_path / "sweep") if a != "logger=none"]
    done = actprune(
        "-m",
        *args,
        "logger=wandb",
        "pruning=act_magnitude",
        "pruning.sparsity=0.5,2:4",
        "benchmark.ppl_wikitext2.max_windows=2",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    printed = done.stdout + done.stderr
    jobs = set((tmp_path / "sweep").glob("*/wandb/offline-run-*"))
    assert (
        "wandb:" not in printed
        and len(jobs) == 2
        and all(printed.count(f"W&B offline run: {run}") == 1 for run in jobs)
    )
    summary = set((tmp_path / "sweep").glob("wandb/offline-run-*"))
    assert len(summary) == 1 and synced(printed) == jobs | summary


def test_only_an_explicit_fallback_measures_other_text_and_says_so(tiny_setup, tmp_path):
    done = actprune(
        *common(tiny_setup, tmp_path),
        f"paths.data_dir={tmp_path / 'empty'}",
        "benchmark.ppl_wikitext2.fallback_text=true",
        "benchmark.ppl_wikitext2.max_windows=2",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "run" / "results.json").read_text())
    assert "not WikiText-2" in result["data_source"]
    assert set(result["metrics"]) == {"ppl/python_docs"}
    assert "falls back" in done.stderr + done.stdout and "python_docs" in done.stderr + done.stdout
    assert "python_docs windows" in done.stderr and "wikitext2 windows" not in done.stderr  # the progress bar too


def test_ppl_and_lm_eval_in_one_job_reach_results_and_wandb(tiny_setup, tmp_path):
    args = [a for a in common(tiny_setup, tmp_path) if a != "logger=none"]
    done = actprune(
        *args,
        "logger=wandb",
        "pruning=act_magnitude",
        "pruning.sparsity=2:4",
        "benchmark=[ppl_wikitext2,lm_eval]",
        "benchmark.ppl_wikitext2.max_windows=2",
        "benchmark.lm_eval.tasks=[piqa]",
        "benchmark.lm_eval.batch_size=3",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "run" / "results.json").read_text())
    assert {"ppl/wikitext2", "lm_eval/piqa/acc", "lm_eval/piqa/acc_norm", "lm_eval/mean_acc"} <= set(result["metrics"])
    assert result["lm_eval"]["batch_size"] == 3 and result["lm_eval"]["per_task"][0]["samples"] == 6
    assert {"load", "ppl_wikitext2", "lm_eval"} <= set(result["timings"])
    run = next((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert b"lm_eval/piqa/acc" in next(run.glob("*.wandb")).read_bytes()
    table = json.loads(next(run.rglob("per_task*.table.json")).read_text())
    assert table["data"][0][0] == "piqa" and table["data"][0][1] == result["metrics"]["lm_eval/piqa/acc"]


def test_calibration_is_computed_once_per_sweep_and_read_by_later_jobs(tiny_setup, tmp_path):
    done = actprune(
        "-m",
        *common(tiny_setup, tmp_path),
        "pruning=act_magnitude",
        "pruning.sparsity=2:4,0.5",
        "pruning.transforms=[{name:shift,mode:static}]",
        "pruning.score=clact",
        "calibration.windows=4",
        "calibration.seqlen=16",
        "benchmark.ppl_wikitext2.max_windows=2",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found = sorted(results_in(tmp_path).values(), key=lambda r: r["config"]["pruning"]["sparsity"] != "2:4")
    assert [r["status"] for r in found] == ["ok", "ok"]
    assert [r["calibration"]["cache"] for r in found] == ["miss", "hit"]
    assert found[0]["calibration"]["cache_file"] == found[1]["calibration"]["cache_file"]
    assert found[0]["calibration"]["corpus"] == "wikitext2_validation" and found[0]["timings"]["calibration"] > 0
    assert "CLACT" not in done.stdout and "score=clact [shift:static]" in done.stdout


def test_the_command_line_explains_itself_without_tracebacks(tiny_setup, tmp_path):
    unselected = actprune(*common(tiny_setup, tmp_path), "benchmark=[lm_eval]", "benchmark.ppl_wikitext2.max_windows=3")
    assert unselected.returncode != 0 and "benchmark.ppl_wikitext2.max_windows" in unselected.stderr
    assert "Traceback" not in unselected.stderr
    resolved = actprune(*common(tiny_setup, tmp_path), "benchmark=[lm_eval]", "--cfg", "job", "--resolve")
    assert resolved.returncode == 0 and "output_dir: null" in resolved.stdout, resolved.stderr[-2000:]
    unknown = actprune(*common(tiny_setup, tmp_path), "benchmark=[ppl_wikitxt2]")
    assert (
        unknown.returncode != 0
        and "available benchmarks are ['generate', 'lm_eval', 'ppl_wikitext2']" in unknown.stderr
    )
    helped = actprune("--help")
    assert helped.returncode == 0 and "post-training activation sparsity" in helped.stdout
    assert "pruning: act_magnitude, dense" in helped.stdout and "exits non-zero" in helped.stdout
