"""`actprune-export`: the folder it writes, loaded by stock transformers (`trust_remote_code`), computes
what the pruned model computed; a job's folder gives back the job's perplexity and lm_eval scores in
processes where actprune cannot be imported."""

import copy
import errno
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from actprune import sparsify_
from actprune.export import export_, write_folder
from actprune.run import job
from actprune.run.job import run_job

from .conftest import STORIES, needs_shared
from .helpers import REPO, common, job_config, random_windows, results_in
from .test_generate import cached_logits
from .tiny import llama, qwen2

REFIT = {"name": "refit", "min_tokens_per_dim": 0}  # the tiny calibration is too small for the default guard
CONFIGS = [
    {"sparsity": "2:4"},
    {"sparsity": "8:16", "score": "weight_norm", "transforms": ["permute", "variance"]},
    {"sparsity": "8:16", "score": "weight_norm", "transforms": ["permute", "variance"], "mask_scope": "step"},
    {"sparsity": 0.5, "transforms": [{"name": "shift", "mode": "median"}], "mask_scope": "step", "mask_pool": "rms"},
    {"sparsity": 0.5, "selection": "threshold", "score": "clact", "dense_tokens": 2},
    {"sparsity": "2:4", "transforms": ["hadamard", {"name": "shift", "mode": "static"}, REFIT]},
    {"sparsity": "2:4", "transforms": ["scaling", "shift", REFIT], "allocation": "calibrated"},
    {
        "sparsity": "2:4",
        "transforms": [
            {"name": "shift", "mode": "mean"},
            {"name": "learnable", "forms": ["affine", "shift", "scale", "lowrank"], "rank": 2, "steps": 3},
        ],
    },
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: json.dumps(c, separators=(",", ":")))
def test_the_exported_folder_computes_what_the_pruned_model_computes(config, tmp_path):
    torch.manual_seed(0)
    model = qwen2(intermediate_size=128)  # biases on q/k/v
    pruned = copy.deepcopy(model)
    report = sparsify_(pruned, {"method": "act_magnitude", **config}, random_windows())
    write_folder(pruned, report, None, tmp_path, {"pruning": config})
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
    assert type(loaded).__name__ == "ActPruneForCausalLM" and type(loaded).__mro__[1].__name__ == "Qwen2ForCausalLM"
    ids = torch.randint(0, 256, (3, 12))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, pruned(ids).logits)
        assert torch.equal(cached_logits(loaded, ids, 6), cached_logits(pruned, ids, 6))
        assert not torch.allclose(loaded(ids).logits, model(ids).logits)  # it is pruned


def test_the_exported_folder_does_not_load_without_its_modelling_code(tmp_path):
    pruned = llama()
    report = sparsify_(pruned, {"method": "act_magnitude", "sparsity": "2:4"})
    write_folder(pruned, report, None, tmp_path / "out", {"pruning": {}})
    # Stock Llama would take the folder and its pruned projections (`*.linear.weight`) at random.
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=False)


@needs_shared
def test_a_folder_read_from_its_file_gives_the_logits_of_learned_corrections_bit_for_bit(tmp_path):
    # Read from the file, stories260k's tensors sit at offsets whose alignment rounds a learned shift's add-back
    # otherwise (1.3e-5 in the logits, 1.4e-3 in a job's perplexity), unless the folder's model copies them.
    model = AutoModelForCausalLM.from_pretrained(STORIES).eval()
    transforms = [{"name": "shift", "mode": "static"}, "variance", {"name": "learnable", "steps": 2}]
    config = {"method": "act_magnitude", "sparsity": "2:4", "transforms": transforms}
    report = sparsify_(model, config, torch.randint(0, 512, (4, 64)))
    write_folder(model, report, None, tmp_path / "out", {"pruning": config})
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    ids = torch.randint(0, 512, (2, 64))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_a_weight_method_exports_plain_weights_with_their_zeros(tmp_path):
    pruned = llama()
    report = sparsify_(pruned, {"method": "weight_magnitude", "sparsity": "2:4"})
    write_folder(pruned, report, None, tmp_path, {"pruning": {"method": "weight_magnitude"}})
    config = json.loads((tmp_path / "config.json").read_text())
    assert "auto_map" not in config and not (tmp_path / "modeling_actprune.py").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded).__name__ == "LlamaForCausalLM"
    weight = loaded.model.layers[0].mlp.up_proj.weight
    assert (weight == 0).float().mean() == 0.5
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, pruned(ids).logits)


def run(*args, cwd=REPO):
    return subprocess.run([*map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=900)


# The stock lm_eval command line, in a process where `import actprune` fails.
LM_EVAL = "import sys; sys.modules['actprune'] = None; from lm_eval.__main__ import cli_evaluate; sys.argv[0] = 'lm_eval'; cli_evaluate()"


@pytest.mark.cli
def test_a_jobs_folder_gives_its_perplexity_and_lm_eval_scores_without_actprune(tiny_setup, tmp_path):
    sweep = tmp_path / "sweep"
    job = run(
        sys.executable,
        "-m",
        "actprune",
        *common(tiny_setup, sweep),
        "pruning=act_magnitude",
        "pruning.sparsity=2:4",
        "pruning.score=weight_norm",
        "pruning.transforms=[{name:shift,mode:static},variance,{name:learnable,steps:2}]",
        "calibration.windows=4",
        "calibration.seqlen=32",
        "benchmark=[ppl_wikitext2,lm_eval]",
        "benchmark.ppl_wikitext2.max_windows=3",
        "benchmark.ppl_wikitext2.batch_size=2",
        "benchmark.lm_eval.tasks=[piqa]",
    )
    assert job.returncode == 0, job.stderr[-3000:]
    (record,) = results_in(sweep).values()
    job_dir = sweep / "run"
    out = tmp_path / "exported"
    exported = run(sys.executable, "-m", "actprune.export", job_dir, out)
    assert exported.returncode == 0, exported.stderr[-3000:]
    check = run(sys.executable, "scripts/check_export.py", out, tiny_setup["data"] / "wikitext-2-raw-v1" / "test.jsonl")
    assert check.returncode == 0, check.stdout + check.stderr[-3000:]
    measured = json.loads(check.stdout.strip().splitlines()[-1])
    assert measured["ppl"] == pytest.approx(record["metrics"]["ppl/wikitext2"], rel=1e-4)
    assert measured["model"] == "ActPruneForCausalLM"
    scores = tmp_path / "lm_eval"
    stock = run(
        sys.executable,
        "-c",
        LM_EVAL,
        "--model",
        "hf",
        "--model_args",
        f"pretrained={out},trust_remote_code=True",
        "--tasks",
        "piqa",
        "--include_path",
        job_dir / "lm_eval_tasks",
        "--batch_size",
        record["lm_eval"]["batch_size"],
        "--output_path",
        scores,
    )
    assert stock.returncode == 0, stock.stderr[-3000:]
    (path,) = scores.rglob("results_*.json")
    piqa = json.loads(path.read_text())["results"]["piqa"]
    assert piqa["acc,none"] == record["metrics"]["lm_eval/piqa/acc"]
    assert piqa["acc_norm,none"] == record["metrics"]["lm_eval/piqa/acc_norm"]
    # The export refuses to write over anything, and says why.
    again = run(sys.executable, "-m", "actprune.export", job_dir, out)
    assert again.returncode == 2 and "is not empty" in again.stderr


def test_what_cannot_be_exported_is_refused_before_loading(tmp_path):
    job = tmp_path / "job"
    job.mkdir()
    with pytest.raises(FileNotFoundError, match="no results.json"):
        export_(job, tmp_path / "out")
    record = {"status": "failed", "config": {"pruning": {"method": "act_magnitude"}}}
    (job / "results.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="status is 'failed'"):
        export_(job, tmp_path / "out")
    record.update(status="ok", config={"pruning": {"method": "act_mine"}, "model": {"path": "/nonexistent"}})
    (job / "results.json").write_text(json.dumps(record))
    with pytest.raises(
        ValueError, match=r"pruning.method=act_mine: actprune-export writes the layers of \['act_magnitude'\]"
    ):
        export_(job, tmp_path / "out")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="not empty"):
        export_(job, tmp_path / "full")


def threshold_config(setup, folder, *overrides):
    return job_config(
        setup,
        folder,
        "pruning=act_magnitude",
        "pruning.sparsity=0.5",
        "pruning.selection=threshold",
        "calibration.windows=4",
        "calibration.seqlen=32",
        *overrides,
    )


def finished_job(cfg, folder):
    """The job of `cfg` run in this process into `folder / "job"`."""
    record = run_job(cfg, folder / "job", group="g", name="n")
    assert record["status"] == "ok", record.get("error")
    return folder / "job"


@pytest.fixture(scope="module")
def threshold_job(tiny_setup, tmp_path_factory):
    folder = tmp_path_factory.mktemp("threshold")
    return finished_job(threshold_config(tiny_setup, folder), folder)


def test_a_job_whose_calibration_file_changed_is_refused_as_resume_refuses_it(tiny_setup, tmp_path):
    data = shutil.copytree(tiny_setup["data"], tmp_path / "data")
    cfg = threshold_config(tiny_setup, tmp_path, f"paths.data_dir={data}")
    job_dir = finished_job(cfg, tmp_path)
    split = data / "wikitext-2-raw-v1"
    shutil.copy(split / "test.jsonl", split / "validation.jsonl")  # other calibration rows
    shutil.rmtree(tmp_path / "cache")
    with pytest.raises(ValueError, match=r"other settings \(inputs differ\)"):
        export_(job_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(FileExistsError, match=r"other settings \(inputs differ\)"):
        run_job(cfg, job_dir, group="g", name="n")


def test_a_job_whose_benchmark_data_are_gone_still_exports(tiny_setup, tmp_path):
    """The rebuild reads the calibration rows and the model, not the benchmarks' data: a machine that
    holds only those exports the job (refused once as `inputs differ`, 'its data ... changed')."""
    data = shutil.copytree(tiny_setup["data"], tmp_path / "data")
    job_dir = finished_job(threshold_config(tiny_setup, tmp_path, f"paths.data_dir={data}"), tmp_path)
    split = data / "wikitext-2-raw-v1"
    benchmark_files = [path for path in split.iterdir() if path.name != "validation.jsonl"]
    assert benchmark_files and (split / "validation.jsonl").is_file()
    for path in benchmark_files:
        path.unlink()
    export_(job_dir, tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").is_file()


def rewrite_record(job_dir: Path, change) -> None:
    path = job_dir / "results.json"
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record))


def test_a_record_of_an_earlier_version_exports_where_it_lists_its_inputs_and_ran_what_is_allowed_now(
    tiny_setup, tmp_path
):
    """results_version 3 records list the files they read and rebuild to the model they measured: they
    export; older ones, and a version-3 threshold job under shared masks at batch 2 (refused since 4), do not."""
    job_dir = finished_job(threshold_config(tiny_setup, tmp_path), tmp_path)

    def version(number):
        def change(record):
            record["results_version"] = record["config"]["inputs"]["version"] = number

        return change

    rewrite_record(job_dir, version(3))
    export_(job_dir, tmp_path / "v3")
    assert (tmp_path / "v3" / "model.safetensors").is_file()
    rewrite_record(job_dir, version(2))
    with pytest.raises(ValueError, match="results_version 2, which did not record the data and model files"):
        export_(job_dir, tmp_path / "v2")

    def shared_batched(record):
        version(3)(record)
        record["config"]["pruning"]["mask_scope"] = "step"
        record["config"]["benchmark"]["ppl_wikitext2"]["batch_size"] = 2

    rewrite_record(job_dir, shared_batched)
    with pytest.raises(ValueError, match=r"selection=threshold with pruning.mask_scope=step and .*batch_size=2"):
        export_(job_dir, tmp_path / "step")
    assert not any(tmp_path.glob("v2*")) and not any(tmp_path.glob("step*"))


# `actprune-export JOB OUT`, SIGKILLed once its weights are written (`kill`), or held before it writes
# anything until the file GO exists (it touches GO.waiting when held).
HOOKED = """
import os, signal, sys, time
from pathlib import Path
import transformers
import transformers.modeling_utils as modeling_utils
mode, sys.argv[1:] = sys.argv[1], sys.argv[2:]
if mode == "kill":
    save = modeling_utils.safe_save_file
    def killed(*args, **kwargs):
        save(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)
    modeling_utils.safe_save_file = killed
else:
    go, write = Path(mode), transformers.PreTrainedModel.save_pretrained
    def held(*args, **kwargs):
        go.with_suffix(".waiting").touch()
        while not go.exists():
            time.sleep(0.05)
        return write(*args, **kwargs)
    transformers.PreTrainedModel.save_pretrained = held
from actprune.export import main
main()
"""


@pytest.mark.cli
def test_an_export_killed_while_writing_leaves_no_folder_and_a_second_one_succeeds(threshold_job, tmp_path):
    out = tmp_path / "exported"
    killed = run(sys.executable, "-c", HOOKED, "kill", threshold_job, out)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert list(tmp_path.rglob("model.safetensors")) and not out.exists()  # its weights, in staging only
    with pytest.raises(OSError):
        AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    again = run(sys.executable, "-m", "actprune.export", threshold_job, out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [p.name for p in tmp_path.iterdir()] == ["exported"]  # the dead export's staging went with it
    assert type(AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)).__name__ == "ActPruneForCausalLM"


@pytest.mark.cli
def test_of_two_exports_into_one_folder_the_second_fails_naming_it(threshold_job, tmp_path):
    out = tmp_path / "exported"
    out.mkdir()  # an empty folder may be given
    go = tmp_path / "go"
    first = subprocess.Popen(
        [sys.executable, "-c", HOOKED, go, threshold_job, out], cwd=REPO, stderr=subprocess.PIPE, text=True
    )
    while not go.with_suffix(".waiting").exists():
        assert first.poll() is None, first.stderr.read()[-3000:]
        time.sleep(0.05)
    second = run(sys.executable, "-m", "actprune.export", threshold_job, out)
    go.touch()
    assert first.wait(timeout=900) == 0, first.stderr.read()[-3000:]
    assert second.returncode != 0 and f"{out}: another export (pid {first.pid} on " in second.stderr
    assert "is writing it" in second.stderr and "delete the lock" not in second.stderr  # a dead one's is taken over
    loaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert loaded.config.actprune["job"]["name"] == json.loads((threshold_job / "results.json").read_text())["job"]
    assert str(threshold_job.resolve()) not in (out / "config.json").read_text()  # no path of this machine


def test_an_unwritable_folder_is_refused_before_loading(threshold_job, tmp_path, monkeypatch):
    def load(*args):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(job, "load", load)
    (tmp_path / "file").touch()
    with pytest.raises(OSError, match=f"{tmp_path / 'file' / 'out'}: cannot write in"):
        export_(threshold_job, tmp_path / "file" / "out")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(free=100))
    with pytest.raises(OSError, match="100 bytes free, the weights need"):
        export_(threshold_job, tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


def test_a_write_that_fails_leaves_nothing(threshold_job, tmp_path, monkeypatch):
    import transformers.modeling_utils as modeling_utils

    def full(state, filename, **kwargs):
        with open(filename, "wb") as file:
            file.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(modeling_utils, "safe_save_file", full)
    with pytest.raises(OSError, match="No space left"):
        export_(threshold_job, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
