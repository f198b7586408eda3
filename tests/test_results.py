"""Records on disk: readable by teammates, never silently dropped."""

import json
import logging
import os
import stat

import pytest

from actprune.files import atomic_write
from actprune.run import results, table


def test_files_are_written_with_the_umask_not_private(tmp_path):
    previous = os.umask(0o022)
    try:
        path = atomic_write(tmp_path / "a" / "results.json", lambda staging: open(staging, "w").write("{}"))
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # mkstemp alone gives 0600
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]  # no staging file left


def test_an_unreadable_record_is_a_row_that_says_so_and_a_warning(tmp_path, caplog):
    (tmp_path / "good").mkdir()
    results.write(tmp_path / "good" / "results.json", {"status": "ok", "metrics": {"ppl/wikitext2": 3.0}})
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "results.json").write_text('{"status": "ok", "metr')
    with caplog.at_level(logging.WARNING):
        found = dict((path.parent.name, record) for path, record in results.read_all(tmp_path))
    assert found["good"]["status"] == "ok" and found["bad"]["status"] == "unreadable"
    assert str(tmp_path / "bad" / "results.json") in caplog.text
    rows = table.rows([tmp_path])
    assert sorted(row["status"] for row in rows) == ["ok", "unreadable"]


def test_a_refusal_stands_in_the_tables_until_its_folder_runs_again(tmp_path):
    job = tmp_path / "job"
    results.write(job / "results.json", {"status": "ok", "results_version": results.VERSION, "config": {"seed": 0}})
    results.refuse(job, {"status": "running", "config": {"seed": 1}, "error": "refused: other settings"})
    ((path, record),) = results.read_all(tmp_path)
    assert record["status"] == "refused" and path == job / "results.json"
    with pytest.raises(results.AlreadyDone):  # the finished job's own settings again: skipped, the refusal void
        results.claim(job, {"seed": 0})
    assert not (job / "refused.json").exists() and json.loads((job / "results.json").read_text())["status"] == "ok"


def test_the_report_shows_what_makes_rows_comparable_and_keeps_same_named_models_apart(tmp_path):
    def record(path, windows):
        return {
            "status": "ok",
            "model": "llama",
            "metrics": {"ppl/wikitext2": 5.0},
            "ppl_wikitext2": {"windows": windows},
            "calibration": {"corpus": "c4", "windows": 8, "seqlen": 128},
            "config": {
                "model": {"path": path},
                "pruning": {"method": "act_magnitude", "sparsity": "2:4"},
                "benchmark": {"ppl_wikitext2": {"seqlen": 512}},
            },
        }

    results.write(tmp_path / "a" / "results.json", record("/models/a/llama", 8))
    results.write(tmp_path / "b" / "results.json", record("/models/b/llama", 32))
    rows = table.rows([tmp_path])
    assert {r["windows"] for r in rows} == {8, 32} and {r["seqlen"] for r in rows} == {512}
    assert {r["calibration"] for r in rows} == {"c4 8x128"}
    assert len({r["model"] for r in rows}) == 2 and all(r["model"].startswith("llama#") for r in rows)
    markdown = table.markdown(rows)
    assert "| seqlen | windows | batch | calibration |" in markdown and "_model_files" not in markdown
    table.write_csv(rows, tmp_path / "report.csv")


def test_a_sweep_reported_again_updates_its_one_wandb_summary_run(tmp_path):
    from actprune.run import report

    (tmp_path / "report.csv").write_text("model,perplexity\nllama,5.0\n")
    for _ in range(2):
        report.log_to_wandb({"csv": tmp_path / "report.csv"}, "sweep", "actprune", None, "offline", tmp_path)
    runs = sorted((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))  # a folder per session, named for its run id
    assert len(runs) == 2 and len({run.name for run in runs}) == 1, runs  # one run, resumed


def test_wandb_mode_from_the_environment_unless_given(monkeypatch):
    from hydra import compose, initialize_config_dir

    from actprune.app import CONF_DIR

    monkeypatch.setenv("WANDB_MODE", "disabled")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        assert compose("config", overrides=["logger=wandb"]).logger.mode == "disabled"
        assert compose("config", overrides=["logger=wandb", "logger.mode=offline"]).logger.mode == "offline"


def test_an_unwritable_wandb_folder_suggests_logger_none(tmp_path):
    from omegaconf import OmegaConf

    from actprune.run.tracking import Tracker

    (tmp_path / "file").write_text("not a folder")
    logger = OmegaConf.create({"name": "wandb", "project": "actprune", "entity": None, "mode": "offline", "tags": []})
    with pytest.raises(RuntimeError, match="logger=none runs the job without W&B"):
        Tracker(logger, tmp_path / "file" / "job", group="g", name="n", config={})


def test_records_of_a_version_whose_numbers_a_fix_changed_run_again(tmp_path):
    job = tmp_path / "job"
    results.write(job / "results.json", {"status": "ok", "config": {"seed": 0}})  # no results_version: before the fixes
    assert results.state(results.previous(job), {"seed": 0}) == "outdated"
    results.claim(job, {"seed": 0})  # runs again; the old record is kept beside
    assert (job / "results.ok.1.json").is_file() and not (job / "results.json").exists()
    results.write(job / "results.json", {"status": "ok", "results_version": results.VERSION, "config": {"seed": 0}})
    with pytest.raises(results.AlreadyDone):
        results.claim(job, {"seed": 0})


def test_a_benchmark_cannot_take_a_key_of_results_json():
    from actprune.eval import benchmark

    with pytest.raises(ValueError, match="'metrics' is a key results.json keeps"):
        benchmark("metrics")(type("Metrics", (), {}))


def test_a_transforms_options_are_named_unless_a_lone_word():
    pruning = {
        "method": "act_magnitude",
        "transforms": [
            "variance",
            {"name": "shift", "mode": "static"},
            {"name": "refit", "ridge": [0.1, 1.0]},
            {"name": "refit", "ridge": 0.01},
            {"name": "learnable", "lr": 0.01, "epochs": 4},
        ],
    }
    assert table.transform_names(pruning) == [
        "variance",
        "shift:static",
        "refit(ridge=[0.1, 1.0])",
        "refit(ridge=0.01)",
        "learnable(lr=0.01,epochs=4)",
    ]


def test_a_benchmark_of_ones_own_has_a_column_in_the_sweeps_table_and_the_report(tmp_path):
    """docs/extending.md's `toy_accuracy` records `toy/accuracy`: no table knows it, every table shows it."""

    def record(metrics):
        return {
            "status": "ok",
            "results_version": results.VERSION,
            "model": "llama",
            "metrics": metrics,
            "config": {"model": {"path": "/models/llama"}, "pruning": {"method": "act_magnitude", "sparsity": "2:4"}},
        }

    own = record(
        {
            "ppl/wikitext2": 8.0,
            "toy/accuracy": 0.25,
            "toy/tokens": 12,
            "generate/prefill_ms": 3.0,
            "lm_eval/piqa/acc_stderr": 0.1,
        }
    )
    plain = record({"ppl/wikitext2": 9.0})
    header, _, first, second = table.table([("own", own), ("plain", plain)]).splitlines()
    assert header.split() == [
        "job",
        "method",
        "sparsity",
        "perplexity",
        "text",
        "mean_acc",
        "toy/accuracy",
        "toy/tokens",
        "measured",
        "layers",
        "status",
    ]
    assert first.split()[6:8] == ["0.2500", "12.0000"] and second.split()[6:8] == ["-", "-"]
    results.write(tmp_path / "own" / "results.json", own)
    results.write(tmp_path / "plain" / "results.json", plain)
    rows = table.rows([tmp_path])
    assert {"toy/accuracy", "toy/tokens"} <= set(table.columns(rows)) and "generate/prefill_ms" not in table.columns(
        rows
    )
    assert "| toy/accuracy | toy/tokens |" in table.markdown(rows) and "| 0.2500 | 12 |" in table.markdown(rows)


def test_every_key_a_job_writes_is_in_the_schema_and_the_docs(tiny_setup, tmp_path):
    """results.py owns the keys: a job writes no top-level key it does not list, besides each
    benchmark's details (under its name) and what its prepare() returned; docs/outputs.md names each."""
    from pathlib import Path

    from actprune.run.job import plan_job, run_job

    from .helpers import job_config

    overrides = (
        "pruning=act_magnitude",
        "pruning.sparsity=2:4",
        "pruning.score=weight_norm",
        "pruning.transforms=[variance,{name:refit,ridge:1.0,min_tokens_per_dim:0}]",
        "calibration.windows=4",
        "calibration.seqlen=32",
        "benchmark=[ppl_wikitext2,lm_eval]",
        "benchmark.lm_eval.tasks=[piqa]",
        "benchmark.lm_eval.limit=2",
        "benchmark.ppl_wikitext2.max_windows=2",
    )
    cfg = job_config(tiny_setup, tmp_path, *overrides)
    record = run_job(cfg, tmp_path / "job", "g", "job")
    assert record["status"] == "ok", record["error"]
    prepared = plan_job(cfg, tmp_path / "plan").record
    extra = set(record) - set(results.SCHEMA) - set(cfg.benchmark) - set(prepared)
    assert not extra, extra
    assert {"refit", "calibration", "parameters", "model"} <= set(record)
    docs = (Path(__file__).resolve().parent.parent / "docs" / "outputs.md").read_text()
    assert [key for key in results.SCHEMA if f"`{key}`" not in docs] == []


def test_the_report_of_a_folder_that_does_not_exist_says_so(tmp_path):
    from actprune.run import report

    (tmp_path / "file").touch()
    for path, said in [(tmp_path / "typo", "no such folder"), (tmp_path / "file", "not a folder")]:
        with pytest.raises(SystemExit) as exit:
            report.main([str(path)])
        assert str(exit.value) == f"{path}: {said}"  # a message: the exit status is 1
