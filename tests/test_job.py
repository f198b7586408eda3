"""The plan stage of a job: every setting checked before any weight is loaded."""

import pytest

from actprune.run.job import plan_job

from .helpers import job_config


@pytest.mark.parametrize(
    "overrides,words",
    [
        (["model.seqlen=1"], ["benchmark.ppl_wikitext2.seqlen=1", "seqlen >= 2"]),
        (["benchmark.ppl_wikitext2.max_windows=0"], ["max_windows=0", "max_windows >= 1 or null"]),
        (["benchmark.ppl_wikitext2.batch_size=0"], ["batch_size=0", "batch_size >= 1"]),
        (["model.seqlen=4096"], ["seqlen=4096", "max_position_embeddings=1024"]),
        (
            ["benchmark=[lm_eval]", "benchmark.lm_eval.batch_size=0"],
            ["benchmark.lm_eval.batch_size=0", "batch_size >= 1"],
        ),
        (
            ["pruning=act_magnitude", "pruning.score=clact", "calibration.seqlen=2000"],
            ["calibration.seqlen=2000", "max_position_embeddings=1024"],
        ),
        (["pruning=weight_wanda", "calibration.windows=0"], ["calibration.windows=0", "windows >= 1"]),
        (
            ["pruning=weight_sparsegpt", "pruning.sparsity=2:4", "pruning.blocksize=6"],
            ["pruning.blocksize=6", "multiple of 4"],
        ),
        (["pruning=act_magnitude", "pruning.layers=[]"], ["no layer is left to prune"]),
        (["+benchmark.ppl_wikitext2.windows=3"], ["benchmark.ppl_wikitext2", "windows"]),
        (
            ["benchmark=[lm_eval]", "benchmark.lm_eval.tasks=[piqa]", "benchmark.lm_eval.num_fewshot=-1"],
            ["num_fewshot=-1"],
        ),
        (
            ["pruning=act_magnitude", "pruning.sparsity=0.5", "pruning.selection=threshold", "pruning.mask_scope=step"]
            + ["benchmark.ppl_wikitext2.batch_size=2", "benchmark.ppl_wikitext2.max_windows=4"],
            ["pruning.selection=threshold with pruning.mask_scope=step", "benchmark.ppl_wikitext2.batch_size=2"],
        ),
        (
            ["benchmark=[lm_eval]", "pruning=act_magnitude", "pruning.sparsity=0.5", "pruning.selection=threshold"]
            + ["pruning.mask_scope=step"],
            ["pruning.selection=threshold with pruning.mask_scope=step", "benchmark.lm_eval.batch_size=8"],
        ),
        (
            ["pruning=act_magnitude", "pruning.sparsity=8:16", "pruning.mask_scope=step"]
            + ["benchmark.ppl_wikitext2.batch_size=2", "benchmark.ppl_wikitext2.max_windows=5"],
            ["max_windows=5 with batch_size=2", "mask_scope=step", "over 1 windows, not 2", "a multiple of 2"],
        ),
        (["imports=[no_such_module_here]"], ["imports: cannot import 'no_such_module_here'", "PYTHONPATH"]),
        (
            ["pruning=weight_wanda", "calibration.windows=40", "calibration.seqlen=1000"],
            ["calibration.windows=40 x calibration.seqlen=1000", "windows do not overlap"],
        ),
    ],
)
def test_bad_settings_fail_in_the_plan(tiny_setup, tmp_path, overrides, words):
    with pytest.raises(ValueError) as error:
        plan_job(job_config(tiny_setup, tmp_path, *overrides), tmp_path / "job")
    for word in words:
        assert word in str(error.value)


@pytest.mark.parametrize(
    "overrides",
    [
        ["pruning.selection=threshold", "pruning.mask_scope=step", "benchmark.ppl_wikitext2.batch_size=1"],
        ["pruning.selection=threshold", "benchmark.ppl_wikitext2.batch_size=2"],  # per-token masks
        ["pruning.mask_scope=step", "benchmark.ppl_wikitext2.batch_size=2", "benchmark.ppl_wikitext2.max_windows=4"],
        ["pruning.mask_scope=step", "benchmark.ppl_wikitext2.batch_size=2", "benchmark.ppl_wikitext2.max_windows=null"],
    ],
)
def test_what_shared_masks_can_measure_honestly_is_planned(tiny_setup, tmp_path, overrides):
    small = ["calibration.windows=4", "calibration.seqlen=16"]
    cfg = job_config(tiny_setup, tmp_path, "pruning=act_magnitude", "pruning.sparsity=0.5", *small, *overrides)
    assert plan_job(cfg, tmp_path / "job").pruning.config.mask_scope == cfg.pruning.mask_scope


def test_a_plan_records_where_its_data_and_model_come_from(tiny_setup, tmp_path):
    cfg = job_config(tiny_setup, tmp_path, "pruning=weight_wanda", "pruning.sparsity=2:4", "calibration.windows=8")
    job = plan_job(cfg, tmp_path / "job")
    assert job.record["model"] == "tiny-llama" and job.record["device"] == "cpu" and job.record["dtype"] == "float32"
    assert job.record["data_source"].endswith("test.jsonl") and job.env.max_positions == 1024
    assert job.pruning.needs.windows and job.calibration_text[1] == "wikitext2_validation"
    assert list(job.benchmarks) == ["ppl_wikitext2"]


@pytest.mark.parametrize(
    "arguments", [["benchmark=[nope,ppl_wikitext2]"], ["-m", "benchmark=[lm_eval],[nope]"], ["+benchmark=[nope]"]]
)
def test_an_unknown_benchmark_names_those_there_are(arguments):
    from actprune.app import check_benchmarks

    with pytest.raises(
        SystemExit, match=r"unknown \['nope'\]; available benchmarks are \['generate', 'lm_eval', 'ppl_wikitext2'\]"
    ):
        check_benchmarks(arguments)
    check_benchmarks(["benchmark=[ppl_wikitext2,lm_eval]", "pruning=dense"])


@pytest.mark.parametrize(
    "content,words",
    [
        ("", "holds no rows"),
        ('{"text": "a"}\n{"text": \n', "line 2: not JSON"),
        ('{"text": "a"}\n{"body": "b"}\n', "line 2: a row needs a 'text' field"),
    ],
)
def test_a_broken_wikitext_file_is_named_with_its_line(tiny_setup, tmp_path, content, words):
    data = tmp_path / "data" / "wikitext-2-raw-v1"
    data.mkdir(parents=True)
    (data / "test.jsonl").write_text(content)
    with pytest.raises(ValueError) as error:
        plan_job(job_config(tiny_setup, tmp_path, f"paths.data_dir={tmp_path / 'data'}"), tmp_path / "job")
    assert str(data / "test.jsonl") in str(error.value) and words in str(error.value)


def test_a_model_read_from_its_cache_is_recorded_under_its_own_name(tiny_setup, tmp_path, monkeypatch):
    """A GGUF model is dequantized into a cache folder (`<file>-<hash>`) by the first job and read from
    there by the next: both record the model by its own name, so tables and plots show one model."""
    import shutil

    from actprune import models

    cached = tmp_path / "cache" / "gguf" / "tiny-llama-8cc1ba99b305"
    shutil.copytree(tiny_setup["model"], cached)
    monkeypatch.setattr(models, "locate", lambda model_cfg, cache_dir, resolved=None: (str(cached), None))
    job = plan_job(job_config(tiny_setup, tmp_path, "pruning=dense"), tmp_path / "job")
    assert job.source == str(cached) and job.record["model"] == "tiny-llama"
