"""Integration on the real pretrained stories260k and the shared WikiText-2 (skipped without ../shared)."""

import json
import math
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .conftest import REPO, SHARED_DATA, SHARED_MARKS, STORIES

pytestmark = [*SHARED_MARKS, pytest.mark.cli]  # both tests run the command line
SEQLEN, WINDOWS = 512, 50


def reference_perplexity(sparsity) -> float:
    """The protocol written out independently: plain json, naive sort+scatter masks in pre-hooks
    (a stable sort: ties go to the lower index, as actprune promises; GQA makes real ties at a
    window's first token), and the model's own shifted loss per window."""
    model = AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(STORIES)

    def mask_input(module, args):
        (x,) = args
        if isinstance(sparsity, str):
            n, m = map(int, sparsity.split(":"))
            groups = x.unflatten(-1, (-1, m))
            index = groups.abs().argsort(dim=-1, descending=True, stable=True)[..., :n]
            return (torch.zeros_like(groups).scatter(-1, index, groups.gather(-1, index)).flatten(-2),)
        keep = x.shape[-1] - round(sparsity * x.shape[-1])
        index = x.abs().argsort(dim=-1, descending=True, stable=True)[..., :keep]
        return (torch.zeros_like(x).scatter(-1, index, x.gather(-1, index)),)

    for name, module in model.model.layers.named_modules():
        if name.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
            module.register_forward_pre_hook(mask_input)
    with open(SHARED_DATA / "wikitext-2-raw-v1" / "test.jsonl") as file:
        text = "\n\n".join(json.loads(line)["text"] for line in file)
    ids = tokenizer(text, return_tensors="pt").input_ids
    losses = []
    with torch.no_grad():
        for i in range(min(ids.shape[1] // SEQLEN, WINDOWS)):
            window = ids[:, i * SEQLEN : (i + 1) * SEQLEN]
            losses.append(model(window, labels=window).loss.item())
    return math.exp(sum(losses) / len(losses))


def test_cli_perplexities_match_an_independent_implementation(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "actprune",
            "-m",
            f"model.path={STORIES}",
            f"model.seqlen={SEQLEN}",
            f"paths.data_dir={SHARED_DATA}",
            f"benchmark.ppl_wikitext2.max_windows={WINDOWS}",
            "logger=none",
            "pruning=act_magnitude",
            "pruning.sparsity=2:4,0.5",
            f"hydra.sweep.dir={tmp_path}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found = [json.loads(p.read_text()) for p in tmp_path.rglob("results.json")]
    assert len(found) == 2
    for result in found:
        assert result["status"] == "ok", result["error"]
        assert result["replaced_layers"] == 5 * 7
        sparsity = result["config"]["pruning"]["sparsity"]
        ours, reference = result["metrics"]["ppl/wikitext2"], reference_perplexity(sparsity)
        assert ours == pytest.approx(reference, rel=5e-5), (sparsity, ours, reference)
        assert ours > 122  # worse than dense (about 122 at this seqlen)


def test_mlp_width_172_is_rejected_for_8_16_with_the_layer_named(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "actprune",
            f"model.path={STORIES}",
            f"paths.data_dir={SHARED_DATA}",
            "logger=none",
            "pruning=act_magnitude",
            "pruning.sparsity=8:16",
            f"hydra.run.dir={tmp_path}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode != 0
    error = json.loads((tmp_path / "results.json").read_text())["error"]
    assert "mlp.down_proj has input width 172" in error and "multiple of 16" in error
