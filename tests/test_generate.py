"""Cached decoding and the `generate` benchmark: a decode step prunes as a full forward does."""

import copy
import json

import pytest
import torch
from torch import nn
from transformers import AutoTokenizer

from actprune import sparsify_
from actprune.activation import ActSparseLinear
from actprune.activation.wrapper import unwrapped
from actprune.eval import build
from actprune.eval.generate import PROMPTS, _cache_of, greedy, measure
from actprune.run.job import run_job

from .conftest import SHARED_DATA, STORIES, needs_shared
from .helpers import VARIANTS, actprune, job_config, random_windows
from .tiny import gemma3_text, llama

LEARNABLE = {
    "transforms": [
        {"name": "shift", "mode": "static"},
        {"name": "learnable", "forms": ["affine", "scale", "lowrank"], "rank": 2, "steps": 3, "batch_size": 2},
    ]
}


def cached_logits(model, ids, prefill: int) -> torch.Tensor:
    """The logits of `ids` from a prefill of its first tokens, then one cached forward per token."""
    output = model(ids[:, :prefill], use_cache=True)
    logits = [output.logits]
    for t in range(prefill, ids.shape[1]):
        output = model(ids[:, t : t + 1], use_cache=True, **_cache_of(output))
        logits.append(output.logits)
    return torch.cat(logits, 1)


REFIT = {"name": "refit", "min_tokens_per_dim": 0}  # the tiny calibration is too small for the default guard
FITTED = [
    {"transforms": [REFIT]},
    {"allocation": "calibrated"},
    {
        "allocation": "calibrated",
        "transforms": [{"name": "shift", "mode": "static"}, REFIT, LEARNABLE["transforms"][1]],
    },
]


@pytest.mark.parametrize(
    "variant", [*VARIANTS, LEARNABLE, *FITTED, {"dense_tokens": 3}, {"dense_tokens": 3, "transforms": ["shift"]}]
)
@pytest.mark.parametrize("sparsity,selection", [("2:4", "topk"), (0.5, "topk"), (0.5, "threshold")])
def test_cached_decoding_gives_the_logits_of_a_full_forward(variant, sparsity, selection):
    """float64, so that the order of a sum cannot flip a mask: any difference is a different mask."""
    model = llama().double()
    sparsify_(
        model, {"method": "act_magnitude", "sparsity": sparsity, "selection": selection, **variant}, random_windows()
    )
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        for prefill in (2, 7):  # with dense_tokens=3, position 2 is decoded on its own: it stays dense
            torch.testing.assert_close(cached_logits(model, ids, prefill), full, rtol=1e-9, atol=1e-9)
        with unwrapped(model):
            assert not torch.allclose(model(ids).logits[:, 3:], full[:, 3:])  # it was pruned


def test_dense_tokens_count_absolute_positions_in_cached_decoding():
    """A decode step's one token is index 0 of its chunk: it must not be kept dense as a first token."""
    base = llama().double()
    ids = torch.randint(0, 256, (1, 9))
    model = copy.deepcopy(base)
    sparsify_(model, {"method": "act_magnitude", "sparsity": "2:4", "dense_tokens": 3})
    with torch.no_grad():
        dense, pruned = base(ids).logits, cached_logits(model, ids, 1)
    torch.testing.assert_close(pruned[:, :3], dense[:, :3], rtol=1e-9, atol=1e-9)  # positions 1, 2 decoded, dense
    assert all(not torch.allclose(pruned[:, t], dense[:, t]) for t in range(3, 9))  # decoded, pruned


def test_sliding_window_layers_decode_as_they_forward():
    model = gemma3_text(num_hidden_layers=2).double()
    sparsify_(model, {"method": "act_magnitude", "sparsity": "8:16", "dense_tokens": 2})
    ids = torch.randint(0, 256, (2, 14))  # longer than the sliding window of 8
    with torch.no_grad():
        torch.testing.assert_close(
            cached_logits(model, ids, 3), model(ids, use_cache=False).logits, rtol=1e-9, atol=1e-9
        )


def test_restore_removes_the_position_hooks():
    model = llama()
    report = sparsify_(model, {"method": "act_magnitude", "sparsity": "2:4", "dense_tokens": 2}, keep_dense=True)
    assert report.hooks and all(len(layer._forward_pre_hooks) == 1 for layer in model.model.layers)
    report.restore_(model)
    assert all(not layer._forward_pre_hooks for layer in model.model.layers)
    assert not any(isinstance(m, ActSparseLinear) for m in model.modules())


def test_unwrapped_runs_the_dense_layers_and_puts_the_wrappers_back():
    base = llama()
    model = copy.deepcopy(base)
    sparsify_(model, {"method": "act_magnitude", "sparsity": "2:4"})
    wrappers = [m for m in model.modules() if isinstance(m, ActSparseLinear)]
    ids = torch.randint(0, 256, (1, 6))
    with torch.no_grad():
        with unwrapped(model):
            assert not any(isinstance(m, ActSparseLinear) for m in model.modules())
            torch.testing.assert_close(model(ids).logits, base(ids).logits)
        assert [m for m in model.modules() if isinstance(m, ActSparseLinear)] == wrappers


def test_greedy_decoding_continues_with_the_argmax_of_a_full_forward():
    model = llama()
    sparsify_(model, {"method": "act_magnitude", "sparsity": "2:4"})
    ids = torch.randint(0, 256, (1, 5))
    run = greedy(model, ids, 6)
    sequence = torch.cat([ids, torch.tensor([run["tokens"]])], 1)
    with torch.no_grad():
        expected = model(sequence).logits[0, 4:-1].argmax(-1)
    assert run["tokens"] == expected.tolist() and run["decode_steps"] == 5
    assert run["ttft_s"] >= run["prefill_s"] > 0 and run["decode_s"] > 0


def test_measure_times_pruned_and_dense_and_writes_the_pruned_text(tiny_setup):
    tokenizer = AutoTokenizer.from_pretrained(tiny_setup["model"])
    model = llama()
    sparsify_(model, {"method": "act_magnitude", "sparsity": "2:4"})
    result = measure(model, tokenizer, ["The game began", "It retained"], 5, repeats=2)
    assert result["decode_tokens"] == result["dense"]["decode_tokens"] == 2 * 2 * 4
    assert result["decode_speedup"] == pytest.approx(
        result["decode_tokens_per_s"] / result["dense"]["decode_tokens_per_s"]
    )
    expected = greedy(model, tokenizer("It retained", return_tensors="pt").input_ids, 5)["tokens"]
    with unwrapped(model):
        dense = greedy(model, tokenizer("It retained", return_tensors="pt").input_ids, 5)["tokens"]
    assert result["samples"][1] == {
        "prompt": "It retained",
        "completion": tokenizer.decode(expected, skip_special_tokens=True),
        "dense_completion": tokenizer.decode(dense, skip_special_tokens=True),
    }
    assert any(isinstance(m, ActSparseLinear) for m in model.modules())  # wrapped again after the dense runs
    plain = measure(llama(), tokenizer, ["The game began"], 3)
    assert "dense" not in plain and plain["decode_speedup"] == 1.0 and "no layer is wrapped" in plain["baseline"]


def test_a_dense_baseline_that_would_not_fit_is_refused_naming_the_setting():
    from actprune.eval.generate import check_baseline_memory

    model = llama()
    sparsify_(model, {"method": "act_magnitude", "sparsity": "2:4", "backend": "kernel"})
    laid_out = sum(m.linear.weight.numel() * 4 for m in model.modules() if isinstance(m, ActSparseLinear))
    check_baseline_memory(model, 2 * laid_out)
    with pytest.raises(MemoryError, match="benchmark.generate.dense_baseline=false"):
        check_baseline_memory(model, laid_out // 2)
    emulated = llama()
    sparsify_(emulated, {"method": "act_magnitude", "sparsity": "2:4"})
    check_baseline_memory(emulated, 0)  # the emulation's dense baseline copies nothing


def test_timed_decoding_launches_no_counting_work(tiny_setup):
    """Counting zeroed inputs costs small kernels (a threshold layer recomputes its scores) on every call:
    the timed runs count nothing, the untimed warm-up does, so the sparsity is still measured."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_setup["model"])
    model = llama()
    report = sparsify_(model, {"method": "act_magnitude", "sparsity": "2:4"})
    seen = []
    for repeats in (1, 3):
        report.reset()
        measure(model, tokenizer, ["The game began", "It retained"], 5, repeats=repeats, dense_baseline=False)
        seen.append([int(layer.seen) for layer in report.layers.values()])
    assert seen[0] == seen[1] and all(seen[0])
    assert report.summary()["measured"] == pytest.approx(0.5)
    assert all(layer.counting for layer in report.layers.values())  # on again after the timed runs


@pytest.mark.parametrize(
    "options,words",
    [
        ({"max_new_tokens": 1}, "max_new_tokens >= 2"),
        ({"repeats": 0}, "repeats >= 1"),
        ({"prompts": ["a"], "prompts_file": "p.txt"}, "prompts or prompts_file, not both"),
        ({"prompts_file": "/nonexistent/prompts.txt"}, "prompts_file=/nonexistent/prompts.txt: no such file"),
        ({"prompts": [""]}, "non-empty strings"),
        ({"max_prompts": 0}, "max_prompts >= 1 or null"),
        ({"max_tokens": 3}, "benchmark.generate"),
    ],
)
def test_bad_generate_options_fail_before_loading(options, words, tmp_path):
    from actprune.eval import Env

    with pytest.raises((ValueError, FileNotFoundError), match=words):
        build("generate", options).prepare(Env(job_dir=tmp_path))


def test_a_prompt_too_long_for_the_context_is_refused_in_the_plan_before_the_weights_load(
    tiny_setup, tmp_path, monkeypatch
):
    """The tokenizer alone counts each prompt's tokens, before the weights (and the perplexity) run."""
    from actprune import models
    from actprune.run.job import plan_job

    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("loaded"))
    prompt = "The game began development in 2010"
    length = len(AutoTokenizer.from_pretrained(tiny_setup["model"])(prompt).input_ids)
    (tmp_path / "prompts.txt").write_text(f"It retained\n{' '.join([prompt] * (1024 // length + 1))}\n")
    overrides = ["benchmark=[ppl_wikitext2,generate]", f"benchmark.generate.prompts_file={tmp_path / 'prompts.txt'}"]
    with pytest.raises(ValueError, match=r"\(\d+ tokens\) plus max_new_tokens=32 exceeds the model's context, max_pos"):
        plan_job(job_config(tiny_setup, tmp_path, *overrides), tmp_path / "job")
    # At the limit it fits: the prompt's tokens plus max_new_tokens reach max_position_embeddings exactly.
    (tmp_path / "prompts.txt").write_text(f"{prompt}\n")
    plan_job(
        job_config(tiny_setup, tmp_path, *overrides, f"benchmark.generate.max_new_tokens={1024 - length}"), tmp_path
    )
    with pytest.raises(ValueError, match=rf"\({length} tokens\) plus max_new_tokens={1025 - length} exceeds"):
        plan_job(
            job_config(tiny_setup, tmp_path, *overrides, f"benchmark.generate.max_new_tokens={1025 - length}"), tmp_path
        )


def test_more_prompts_than_max_prompts_are_refused_with_the_work_they_would_be(tmp_path, caplog):
    from actprune.eval import Env

    path = tmp_path / "prompts.txt"
    path.write_text("a prompt\n" * 1001)
    with pytest.raises(ValueError) as error:
        build("generate", {"prompts_file": str(path)}).prepare(Env())
    assert str(error.value) == (
        "benchmark.generate: 1001 prompts × max_new_tokens=32 × repeats=1 = 32032 tokens generated by the pruned "
        "model, as many by the dense baseline; allowed are at most benchmark.generate.max_prompts=1000 prompts: "
        "give fewer, or raise max_prompts (null: no limit)"
    )
    with caplog.at_level("INFO", logger="actprune.eval.generate"):
        build("generate", {"prompts_file": str(path), "max_prompts": None, "repeats": 2}).prepare(Env())
    assert "1001 prompts × max_new_tokens=32 × repeats=2 = 64064 tokens generated" in caplog.text


def test_prompts_come_from_a_file_or_the_built_in_list(tmp_path):
    from actprune.eval import Env

    path = tmp_path / "prompts.txt"
    path.write_text("first prompt\n\n second one\n")
    benchmark = build("generate", {"prompts_file": str(path)})
    benchmark.prepare(Env(job_dir=tmp_path))
    assert benchmark.prompts == ["first prompt", " second one"]
    default = build("generate", {})
    default.prepare(Env(job_dir=tmp_path))
    assert default.prompts == PROMPTS


@pytest.mark.cli
def test_a_job_records_decode_speed_and_samples(tiny_setup, tmp_path):
    cfg = job_config(
        tiny_setup,
        tmp_path,
        "benchmark=[ppl_wikitext2,generate]",
        "benchmark.ppl_wikitext2.max_windows=2",
        "benchmark.generate.max_new_tokens=4",
        "pruning=act_magnitude",
        "pruning.sparsity=2:4",
    )
    record = run_job(cfg, tmp_path, "group", "job")
    assert record["status"] == "ok", record.get("traceback")
    metrics = record["metrics"]
    for key in (
        "generate/decode_tokens_per_s",
        "generate/dense_decode_tokens_per_s",
        "generate/decode_speedup",
        "generate/prefill_ms",
        "generate/ttft_ms",
    ):
        assert metrics[key] > 0, key
    assert "generate/peak_memory_mb" not in metrics  # CUDA only
    details = record["generate"]
    assert details["backend"] == "emulate" and details["device"] == "cpu" and len(details["samples"]) == len(PROMPTS)
    assert record["timings"]["generate"] > 0
    # The decoded tokens count in the measured sparsity: 2:4 zeroes half of every token's inputs.
    assert record["sparsity"]["measured"] == pytest.approx(0.5)


def test_the_dense_model_is_nn_linear_again_after_unwrapped_errors():
    model = llama()
    sparsify_(model, {"method": "act_magnitude", "sparsity": "2:4"})
    with pytest.raises(RuntimeError, match="inside"):
        with unwrapped(model):
            raise RuntimeError("inside")
    assert isinstance(model.model.layers[0].self_attn.q_proj, ActSparseLinear)
    assert isinstance(model.model.layers[0].self_attn.q_proj.linear, nn.Linear)


@needs_shared
@pytest.mark.cli
def test_stories260k_generates_text_and_logs_speed_and_samples_to_wandb(tmp_path):
    done = actprune(
        f"model.path={STORIES}",
        "model.seqlen=256",
        f"paths.data_dir={SHARED_DATA}",
        "logger=wandb",
        "benchmark=[ppl_wikitext2,generate]",
        "benchmark.ppl_wikitext2.max_windows=2",
        "benchmark.generate.max_new_tokens=12",
        "pruning=act_magnitude",
        "pruning.sparsity=2:4",
        f"hydra.run.dir={tmp_path}",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["status"] == "ok" and record["metrics"]["generate/decode_speedup"] > 0
    samples = record["generate"]["samples"]
    assert [s["prompt"] for s in samples] == PROMPTS and all(s["completion"].strip() for s in samples)
    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    table = json.loads(next(run.rglob("generate/samples*.table.json")).read_text())
    assert all(s["dense_completion"].strip() for s in samples)
    assert any(s["dense_completion"] != s["completion"] for s in samples)  # 2:4 changes the text
    assert table["columns"] == ["prompt", "completion", "dense_completion"]
    assert table["data"] == [[s["prompt"], s["completion"], s["dense_completion"]] for s in samples]
    assert b"generate/decode_tokens_per_s" in next(run.glob("*.wandb")).read_bytes()
