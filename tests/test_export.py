"""`actprune-export`: the folder it writes, loaded by stock transformers (`trust_remote_code`), computes
what the pruned model computed; a job's folder gives back the job's perplexity and lm_eval scores in
processes where actprune cannot be imported."""

import copy
import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from actprune import sparsify_
from actprune.export import export_, write_folder

from .helpers import REPO, common, random_windows, results_in
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
