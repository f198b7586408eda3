"""Selection scores, transforms and calibration: exact when nothing is pruned, causal, cached."""

import copy
import itertools
import re
import statistics
from unittest import mock

import pytest
import torch
from torch import nn

from actprune import calibration, plan, sparsify_
from actprune.activation import ActSparseLinear
from actprune.activation.transforms import parse_transforms
from actprune.calibration import Calibration
from actprune.masks import parse_sparsity

from .conftest import SHARED_DATA, needs_shared
from .helpers import VARIANTS, random_windows
from .tiny import llama, qwen2


def targets_of(model, config):
    return {name: model.get_submodule(name) for name in plan(model, config).targets}


@pytest.mark.parametrize("variant", VARIANTS)
def test_nothing_pruned_reproduces_the_dense_model(variant):
    model = qwen2()
    ids = torch.randint(0, 256, (2, 12))
    config = {"method": "act_magnitude", "sparsity": 0.0, **variant}
    calibration_windows = random_windows()
    with torch.no_grad():
        dense = model(ids).logits
        sparsify_(model, config, calibration_windows)
        torch.testing.assert_close(model(ids).logits, dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("sparsity", ["2:4", 0.5])
def test_a_token_output_does_not_depend_on_the_batch(variant, sparsity):
    model = llama()
    config = {"method": "act_magnitude", "sparsity": sparsity, **variant}
    sparsify_(model, config, random_windows())
    ids = torch.randint(0, 256, (4, 10))
    with torch.no_grad():
        together = model(ids).logits
        for row in range(4):
            torch.testing.assert_close(model(ids[row : row + 1]).logits, together[row : row + 1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS[1:])
def test_every_score_and_transform_changes_the_pruned_output(variant):
    ids = torch.randint(0, 256, (2, 12))
    base, outputs = llama(), []
    for chosen in ({}, variant):
        model = copy.deepcopy(base)
        config = {"method": "act_magnitude", "sparsity": "2:4", **chosen}
        sparsify_(model, config, random_windows())
        with torch.no_grad():
            outputs.append(model(ids).logits)
    assert not torch.allclose(*outputs)


@pytest.mark.parametrize("transforms", [["hadamard"], ["pca"], ["scaling", "hadamard"]])
def test_nm_keeps_exactly_n_per_group_after_a_rotation(transforms):
    model = llama()
    config = {"method": "act_magnitude", "sparsity": "2:4", "transforms": transforms}
    report = sparsify_(model, config, random_windows())
    layer = report.layers["model.layers.0.self_attn.q_proj"]
    seen = []
    linear = torch.nn.functional.linear

    def spy(x, weight, bias=None):
        if weight is layer.linear.weight:
            seen.append(x)
        return linear(x, weight, bias)

    with mock.patch("actprune.activation.wrapper.F.linear", spy), torch.no_grad():
        model(torch.randint(0, 256, (2, 7)))
    groups = (seen[0] != 0).unflatten(-1, (-1, 4)).sum(-1)
    assert len(seen) == 1 and (groups == 2).all()


def test_scaling_changes_only_which_entries_are_kept():
    from actprune.activation.recipe import wrapper_options

    linear, x = nn.Linear(16, 4), torch.randn(6, 16)
    layer = copy.deepcopy(linear)
    options = wrapper_options(
        layer, "magnitude", parse_transforms(["scaling"]), {"absmax": torch.rand(16) * 5 + 0.1}, parse_sparsity("2:4")
    )
    scaled = ActSparseLinear(layer, parse_sparsity("2:4"), **options)
    keep = (x * options["input_scale"].float()).abs().unflatten(-1, (-1, 4)).argsort(-1, descending=True).argsort(
        -1
    ).flatten(-2) < 2
    torch.testing.assert_close(scaled(x), (x * keep) @ linear.weight.T + linear.bias)  # the original W


def test_scores_keep_exactly_n_per_group():
    linear = nn.Linear(32, 8)
    wrapper = ActSparseLinear(linear, parse_sparsity("2:4"), channel_weight=torch.rand(32) * 10, shift="median")
    x = torch.randn(5, 32)
    wrapper(x)
    assert int(wrapper.zeroed) == 5 * 16


def test_shift_adds_eta_back_through_the_layer():
    linear = nn.Linear(8, 3)
    wrapper = ActSparseLinear(linear, parse_sparsity("2:4"), shift="mean")
    x = torch.randn(2, 8) + 5
    eta = x.mean(-1, keepdim=True)
    centred = x - eta
    keep = centred.abs().unflatten(-1, (-1, 4)).argsort(-1, descending=True).argsort(-1).flatten(-2) < 2
    expected = (centred * keep) @ linear.weight.T + linear.bias + eta * linear.weight.sum(1)
    torch.testing.assert_close(wrapper(x), expected)


def test_calibration_statistics_are_the_channel_statistics_of_the_inputs():
    model = llama()
    layer = model.model.layers[1].mlp.down_proj
    seen = []
    layer.register_forward_pre_hook(lambda module, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    stats = calibration.collect(model, {"down": layer}, torch.randint(0, 256, (3, 16)))["down"]
    inputs = torch.cat(seen).double()
    torch.testing.assert_close(stats["mean"], inputs.mean(0).float())
    torch.testing.assert_close(stats["var"], inputs.var(0, unbiased=False).float(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(stats["l2"], inputs.norm(dim=0).float())
    torch.testing.assert_close(stats["absmax"], inputs.abs().amax(0).float())
    assert int(stats["count"]) == 48


class WordTokenizer:
    def __call__(self, text, return_tensors="pt"):
        return type("Encoding", (), {"input_ids": torch.tensor([[hash(w) % 256 for w in text.split()]])})


def test_statistics_are_cached_and_keyed_by_their_inputs(tmp_path):
    model = llama()
    config = {"method": "act_magnitude", "sparsity": "2:4", "score": "clact"}
    targets = targets_of(model, config)
    options = type("Calibration", (), {"corpus": "c4", "windows": 2, "seqlen": 8, "seed": 0})
    text = "the quick brown fox jumps over the lazy dog " * 20

    def statistics(model_id):
        found = Calibration.from_text(WordTokenizer(), text, "c4", options, model_id, str(tmp_path))
        return found.statistics(model, targets), found.record()

    first, record = statistics("tiny")
    again, record_again = statistics("tiny")
    assert (
        record["cache"] == "miss"
        and record_again["cache"] == "hit"
        and record["cache_file"] == record_again["cache_file"]
    )
    assert record["corpus"] == "c4" and record["windows"] == 2 and record["seqlen"] == 8 and record["tokens"] == 16
    assert all(torch.equal(first[n]["l2"], again[n]["l2"]) for n in first)
    options.seed = 1
    _, other_seed = statistics("tiny")
    _, other_model = statistics("other")
    assert other_seed["cache"] == other_model["cache"] == "miss"
    assert len({record["cache_file"], other_seed["cache_file"], other_model["cache_file"]}) == 3


@needs_shared
def test_calibration_corpora_never_read_the_test_split():
    test_text = "\n\n".join(
        __import__("json").loads(row)["text"] for row in open(SHARED_DATA / "wikitext-2-raw-v1" / "test.jsonl")
    )
    for corpus, expected in (
        ("wikitext2_validation", "wikitext2_validation"),
        ("c4", "c4"),
        ("auto", "wikitext2_validation"),
    ):
        text, source = calibration.corpus_text(corpus, str(SHARED_DATA))  # auto: the hub is offline here
        assert source == expected and len(text) > 100_000 and text[:5000] not in test_text


@pytest.mark.parametrize(
    "config,words",
    [
        ({"score": "wanda"}, ["pruning.score='wanda'", "clact", "weight_norm"]),
        ({"transforms": ["rotate"]}, ["pruning.transforms", "'rotate'", "shift", "variance"]),
        ({"transforms": [{"name": "shift", "mode": "mode"}]}, ["shift mode='mode'", "median, mean, static"]),
        ({"score": "clact"}, ["score=clact", "pass calibration="]),
    ],
)
def test_bad_scores_and_transforms_are_clear_errors(config, words):
    with pytest.raises(ValueError) as error:
        sparsify_(llama(), {"method": "act_magnitude", "sparsity": "2:4", **config})
    for word in words:
        assert word in str(error.value)


def test_unknown_calibration_corpus_is_a_clear_error():
    with pytest.raises(ValueError, match="calibration.corpus='wikitext2_test'.*c4"):
        calibration.corpus_text("wikitext2_test", None)


def test_threshold_selection_reaches_the_target_on_calibration_text_and_is_causal():
    model = llama()
    batches = torch.randint(0, 256, (6, 24))
    report = sparsify_(model, {"method": "act_magnitude", "sparsity": 0.6, "selection": "threshold"}, batches)
    thresholds = report.thresholds
    assert len(thresholds) == 14 and "thresholds" in report.seconds and all(t > 0 for t in thresholds.values())
    report.reset()
    with torch.no_grad():
        together = model(batches).logits
        alone = model(batches[2:3]).logits
    torch.testing.assert_close(together[2:3], alone, rtol=1e-5, atol=1e-5)
    assert report.summary()["measured"] == pytest.approx(0.6, abs=0.05)  # the calibration text itself
    assert report.summary()["selection"] == "threshold"
    with pytest.raises(ValueError, match="pruning.selection=threshold.*N:M"):
        sparsify_(llama(), {"method": "act_magnitude", "sparsity": "2:4", "selection": "threshold"})


def test_dense_tokens_keep_the_first_tokens_of_each_sequence_exact():
    base = llama()
    ids = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        dense = base(ids).logits
        model = copy.deepcopy(base)
        report = sparsify_(model, {"method": "act_magnitude", "sparsity": "2:4", "dense_tokens": 3})
        pruned = model(ids).logits
    torch.testing.assert_close(pruned[:, :3], dense[:, :3])
    assert not torch.allclose(pruned[:, 3:], dense[:, 3:])
    assert report.summary()["measured"] == pytest.approx(0.5 * 7 / 10)
    assert report.summary()["dense_tokens"] == 3


def test_skip_layers_stay_dense_and_are_counted():
    model = llama(num_hidden_layers=3)
    report = sparsify_(
        model, {"method": "act_magnitude", "sparsity": "2:4", "skip_layers": ["*.layers.1.*", "*.down_proj"]}
    )
    assert report.replaced_layers == 3 * 7 - 7 - 2
    assert len(report.summary()["skipped_layers"]) == 9
    assert isinstance(model.model.layers[1].self_attn.q_proj, nn.Linear)
    with pytest.raises(ValueError, match="pruning.skip_layers: 'mlp' matches no targeted layer"):
        sparsify_(llama(), {"method": "act_magnitude", "sparsity": "2:4", "skip_layers": ["mlp"]})


def test_bad_calibration_and_sparsegpt_settings_name_the_key():
    with pytest.raises(ValueError, match="calibration.windows=0"):
        calibration.sample_windows(WordTokenizer(), "a b c d e f g h", 0, 4, seed=0)
    with pytest.raises(ValueError, match="pruning.blocksize=0"):
        sparsify_(llama(), {"method": "weight_sparsegpt", "sparsity": 0.5, "blocksize": 0})


@pytest.mark.parametrize("rotation", ["pca", "hadamard", "scaling"])
def test_a_static_shift_is_the_calibration_mean_in_the_final_basis(rotation):
    """[pca, shift static] once subtracted the mean of an intermediate basis in the final one."""
    base, calibration_windows = llama(), random_windows()
    config = {
        "method": "act_magnitude",
        "sparsity": "2:4",
        "transforms": [rotation, {"name": "shift", "mode": "static"}],
    }
    report = sparsify_(copy.deepcopy(base), config, calibration_windows)
    # ...and it is the mean of what the mask sees: the layer's calibration inputs in the final basis.
    seen = []
    dense = copy.deepcopy(base)
    dense.model.layers[1].mlp.down_proj.register_forward_pre_hook(
        lambda m, args: seen.append(args[0].reshape(-1, args[0].shape[-1]))
    )
    with torch.no_grad():
        for window in calibration_windows:
            dense(window[None])
    wrapper = report.layers["model.layers.1.mlp.down_proj"]
    x = torch.cat(seen)
    final = x * wrapper.input_scale if wrapper.input_scale is not None else x @ wrapper.rotation
    torch.testing.assert_close(wrapper.shift_vector, final.mean(0), rtol=1e-4, atol=1e-5)


FIXED_PLACES = ["shift", "variance", "refit", "learnable"]  # after the basis transforms, in this order, once


@pytest.mark.parametrize(
    "transforms,name",
    [
        (["shift", {"name": "shift", "mode": "static"}], "shift"),
        (["pca", "variance", "variance"], "variance"),
        (["refit", "refit"], "refit"),
        (["refit", "learnable", {"name": "learnable", "lr": 0.1}], "learnable"),
    ],
)
def test_a_step_that_runs_once_listed_twice_is_refused_before_loading(transforms, name):
    with pytest.raises(ValueError, match=f"pruning.transforms=.*: {name} is listed 2 times but runs once"):
        plan(llama(), {"method": "act_magnitude", "sparsity": "2:4", "transforms": transforms})


@pytest.mark.parametrize(
    "later,earlier",
    [
        *itertools.combinations(reversed(FIXED_PLACES), 2),
        *((name, basis) for name in FIXED_PLACES for basis in ("pca", "permute")),
    ],
)
def test_steps_listed_out_of_the_order_they_run_are_refused_naming_that_order(later, earlier):
    """[learnable, refit] ran as [refit, learnable]: the same model under a second label."""
    config = {"method": "act_magnitude", "sparsity": "2:4"}
    with pytest.raises(ValueError, match=re.escape(f"runs as {[earlier, later]} whatever the order listed")):
        plan(llama(), {**config, "transforms": [later, earlier]})
    assert plan(llama(), {**config, "transforms": [earlier, later]}).transforms.names == [earlier, later]


def test_a_job_that_would_prune_nothing_is_refused():
    for config in ({"layers": []}, {"skip_layers": ["*"]}):
        with pytest.raises(ValueError, match="no layer is left to prune with pruning.method=act_magnitude"):
            plan(llama(), {"method": "act_magnitude", "sparsity": "2:4", **config})
    assert plan(llama(), {"method": "dense", "layers": []}).targets == []  # the dense reference is fine


def test_sparsegpt_blocks_must_hold_whole_groups():
    with pytest.raises(ValueError, match="pruning.blocksize=10 with pruning.sparsity=2:4.*multiple of 4"):
        plan(llama(), {"method": "weight_sparsegpt", "sparsity": "2:4", "blocksize": 10})
    assert plan(llama(), {"method": "weight_sparsegpt", "sparsity": 0.5, "blocksize": 10}).targets


def test_a_corrupt_statistics_file_is_set_aside_and_computed_again(tmp_path, caplog):
    model = llama()
    targets = targets_of(model, {"method": "act_magnitude", "sparsity": "2:4", "score": "clact"})
    windows = random_windows()
    first = Calibration(windows, model_id="tiny", cache_dir=str(tmp_path))
    expected = first.statistics(model, targets)
    path = tmp_path / "calibration" / first.used["cache_file"].rsplit("/", 1)[-1]
    for damage in (
        lambda: path.write_bytes(path.read_bytes()[:100]),  # truncated
        lambda: torch.save({name: {"mean": torch.zeros(3)} for name in targets}, path),
    ):  # another format
        damage()
        again = Calibration(windows, model_id="tiny", cache_dir=str(tmp_path))
        stats = again.statistics(model, targets)
        assert again.used["cache"] == "miss" and all(torch.equal(stats[n]["l2"], expected[n]["l2"]) for n in targets)
        assert "set aside" in caplog.text and str(path) in caplog.text
    assert len(list(path.parent.glob("*.corrupt.*"))) == 2
    hit = Calibration(windows, model_id="tiny", cache_dir=str(tmp_path))
    hit.statistics(model, targets)
    assert hit.used["cache"] == "hit"


def test_statistics_are_keyed_by_the_models_dtype():
    model, windows = llama(), random_windows()
    targets = targets_of(model, {"method": "act_magnitude", "sparsity": "2:4", "score": "clact"})
    calibration = Calibration(windows, model_id="tiny", cache_dir="/nonexistent")
    fp32 = calibration.cache_file("calibration", {"dtype": str(next(model.parameters()).dtype)}, ".pt")
    bf16 = calibration.cache_file("calibration", {"dtype": "torch.bfloat16"}, ".pt")
    assert fp32 != bf16 and targets


def test_the_model_fingerprint_names_the_gguf_file_it_reads(tmp_path):
    (tmp_path / "a.Q4.gguf").write_bytes(b"q4")
    (tmp_path / "a.Q8.gguf").write_bytes(b"q8 weights")
    fingerprints = {calibration.model_fingerprint(str(tmp_path), name) for name in ("a.Q4.gguf", "a.Q8.gguf")}
    assert len(fingerprints) == 2


def test_dense_tokens_need_a_token_axis_and_nan_scores_fail_clearly():
    layer = ActSparseLinear(nn.Linear(8, 4), parse_sparsity("2:4"), dense_tokens=2)
    with pytest.raises(ValueError, match="pruning.dense_tokens=2 needs inputs shaped"):
        layer(torch.randn(5, 8))
    layer(torch.randn(1, 5, 8))
    plain = ActSparseLinear(nn.Linear(8, 4), parse_sparsity("2:4"))
    x = torch.randn(3, 8)
    x[1, 2] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN scores"):
        plain(x)


def test_threshold_calibration_samples_every_channel():
    """Every 8th entry of a (1, 512, 64) input is channel 0, 8, 16...: those alone once set the threshold."""
    from actprune.activation.wrapper import ScoreSample

    layer = ActSparseLinear(nn.Linear(64, 4), parse_sparsity(0.5))
    scale = torch.where(torch.arange(64) % 8 == 0, 100.0, 1.0)
    x = torch.randn(1, 512, 64) * scale
    with torch.no_grad(), layer.recording_scores(ScoreSample()) as sample:
        layer(x)
    layer.set_threshold(sample.quantile(0.5))
    layer.reset_counts()
    with torch.no_grad():
        layer(x)
    assert layer.measured_sparsity() == pytest.approx(0.5, abs=0.02)


def test_non_finite_calibration_statistics_fail_the_layer_by_name():
    model, windows = llama(), random_windows()
    calibration = Calibration(windows)
    targets = targets_of(model, {"method": "act_magnitude", "sparsity": "2:4", "score": "clact"})
    stats = calibration.statistics(model, targets)
    stats["model.layers.0.self_attn.q_proj"]["l2"][3] = float("nan")
    calibration.statistics = lambda *args, **kwargs: stats
    with pytest.raises(
        FloatingPointError, match=r"model.layers.0.self_attn.q_proj: pruning.score=clact.*\['channel_weight'\]"
    ):
        sparsify_(model, {"method": "act_magnitude", "sparsity": "2:4", "score": "clact"}, calibration)


def test_the_gap_table_measures_each_row_against_plain_and_dense_window_by_window():
    import math

    from actprune.run.compare import gap_table

    def job(method, sparsity, nll, kind="activation", status="ok", minutes=2.0, acc=None, corpus=None, **pruning):
        mean = sum(nll) / len(nll)
        return {
            "status": status,
            "model": "m",
            "sparsity": {"kind": kind},
            "metrics": {"ppl/wikitext2": math.exp(mean), **({"lm_eval/mean_acc": acc} if acc is not None else {})},
            "ppl_wikitext2": {"window_nll": nll},
            "timings": {"total": minutes * 60},
            "config": {"pruning": {"method": method, "sparsity": sparsity, **pruning}},
            **({"calibration": {"corpus": corpus}} if corpus else {}),
        }

    dense = job("dense", 0.0, [2.0, 2.0, 2.0], kind="dense", acc=0.6)
    plain = job("act_magnitude", "8:16", [3.0, 3.2, 2.8], acc=0.5)
    better = job("act_magnitude", "8:16", [2.5, 2.5, 2.9], score="weight_norm", minutes=30.0, acc=0.57, corpus="c4")
    per_task = {"lm_eval/a/acc": 0.5, "lm_eval/a/acc_stderr": 0.03, "lm_eval/b/acc": 0.64, "lm_eval/b/acc_stderr": 0.04}
    better["metrics"].update(per_task)  # the standard error of the mean of two tasks: sqrt(0.03² + 0.04²) / 2
    allocated = job("act_magnitude", "8:16", [2.9, 3.0, 2.9], allocation="calibrated", corpus="wikitext2_validation")
    failed = job("act_magnitude", "2:4", [9.0, 9.0, 9.0], status="failed")
    lines = gap_table([plain, better, failed, allocated, dense]).splitlines()
    assert lines[2] == f"| dense | dense | - | {math.exp(2):.2f} | 0 | | | 0.600 (100.0%) | 2.0 |"
    gap = (math.exp(3.0) - math.exp(2.6333333333333333)) / (math.exp(3.0) - math.exp(2.0))
    gains = [0.5, 0.7, -0.1]
    se = statistics.stdev(gains) / math.sqrt(3)
    assert lines[3] == (
        f"| 8:16 | act_magnitude score=weight_norm | c4 | {math.exp(2.6333333333333333):.2f} | 0.633 | {gap:.1%} | "
        f"+0.367 ± {se:.3f} (2/3) | 0.570 ± 0.025 (95.0%) | 30.0 |"
    )
    assert lines[4].startswith("| 8:16 mean | act_magnitude | wikitext2_validation (in-domain) | ")
    assert "(2/3)" in lines[4]  # allocated: not the plain row
    assert lines[5] == f"| 8:16 | act_magnitude (plain) | - | {math.exp(3.0):.2f} | 1.000 |  |  | 0.500 (83.3%) | 2.0 |"
    assert len(lines) == 6 and "2:4" not in "\n".join(lines)  # the failed job is left out
    two_models = gap_table([dense, plain, {**dense, "model": "other"}]).splitlines()
    assert [line for line in two_models if line.startswith("**")] == ["**m**", "**other**"]
    assert sum(line.startswith("| dense |") for line in two_models) == 2  # each model against its own dense

    skipping = [
        {**r, "config": {"pruning": {**r["config"]["pruning"], "skip_layers": ["*.down_proj"]}}}
        for r in (dense, plain, better)
    ]
    lines = gap_table(skipping).splitlines()
    assert (
        lines[3].split(" | ")[5] == f"{gap:.1%}" and "(plain)" in lines[4]
    )  # a sweep that skips layers has its plain row


def test_the_scope_table_puts_each_step_row_beside_its_token_row_at_the_same_batch():
    import math

    from actprune.run.compare import scope_table

    def job(nll, batch, scope="token", pool="mean", rows_read=0.5, kind="activation", method="act_magnitude"):
        return {
            "status": "ok",
            "model": "m",
            "sparsity": {"kind": kind, "rows_read": rows_read},
            "metrics": {"ppl/wikitext2": math.exp(sum(nll) / len(nll))},
            "ppl_wikitext2": {"window_nll": nll},
            "timings": {"total": 60.0},
            "config": {
                "pruning": {"method": method, "sparsity": "8:16", "mask_scope": scope, "mask_pool": pool},
                "benchmark": {"ppl_wikitext2": {"batch_size": batch}},
            },
        }

    dense = job([2.0, 2.0, 2.0], 1, kind="dense", method="dense", rows_read=None)
    token = job([3.0, 3.0, 3.0], 4, rows_read=0.92)
    repeated = job([3.0, 3.0, 3.0], 4, pool="max", rows_read=0.92)  # a pool sweep repeats the token row
    step = job([3.5, 3.1, 2.9], 4, scope="step")
    lines = scope_table([step, repeated, token, dense]).splitlines()
    costs = [0.5, 0.1, -0.1]
    se = statistics.stdev(costs) / math.sqrt(3)
    assert lines[3] == f"| 8:16 | act_magnitude | 4 | token | {math.exp(3.0):.2f} | 1.000 |  | 0.920 | 1.0 |"
    assert lines[4] == (
        f"| 8:16 | act_magnitude | 4 | step (mean) | {math.exp(3.1666666666666665):.2f} | 1.167 "
        f"| +0.167 ± {se:.3f} (2/3) | 0.500 | 1.0 |"
    )
    assert len(lines) == 5
