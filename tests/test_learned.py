"""Learned corrections: exact at initialisation, trained layer by layer, saved and reused."""

import copy
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from actprune import calibration, plan, reuse, sparsify_
from actprune.activation import ActSparseLinear, learned, refit
from actprune.calibration import Calibration
from actprune.run import job

from .helpers import job_config, offline_wandb_log
from .tiny import llama, qwen2

IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
BATCHES = torch.randint(0, 256, (6, 16), generator=torch.Generator().manual_seed(2))
ALL = {"name": "learnable", "forms": list(learned.FORMS), "rank": 4, "lr": 0.001, "steps": 30, "batch_size": 2}


def the_tiny_model():
    """The one model that `model_id="tiny"` names: the learned cache keys its weights too."""
    return (torch.manual_seed(0), llama())[1]


def wrappers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, ActSparseLinear)}


@pytest.mark.parametrize("transforms", [[ALL], [{"name": "shift", "mode": "median"}, ALL], ["hadamard", ALL]])
def test_with_nothing_pruned_the_initial_correction_is_exact(transforms):
    model = qwen2()
    with torch.no_grad():
        dense = model(IDS).logits
    sparsify_(model, {"method": "act_magnitude", "sparsity": 0.0, "transforms": transforms}, BATCHES)
    assert all(w.correction is not None for w in wrappers(model).values())
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, dense, rtol=1e-5, atol=1e-5)


def test_training_lowers_every_layers_error_and_the_scale_gets_a_gradient():
    model = llama()
    report = sparsify_(model, {"method": "act_magnitude", "sparsity": "2:4", "transforms": [ALL]}, BATCHES)
    losses = report.learned["mse"]
    assert set(losses) == {"0", "1"} and report.learned["cache"] is None  # no cache folder given: not saved
    assert all(value["after"] < value["before"] for value in losses.values()), losses
    assert all(p.requires_grad for p in model.parameters())  # as before training
    first = next(iter(report.layers.values()))
    x = torch.randn(3, first.in_features)
    first(x).square().sum().backward()  # the mask is discrete: the scale learns through the surrogate
    assert first.correction.log_scale.grad is not None and first.correction.log_scale.grad.abs().sum() > 0


def test_a_saved_correction_loads_into_bit_identical_outputs(tmp_path):
    torch.manual_seed(0)
    model = llama()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    config = {"method": "act_magnitude", "sparsity": "2:4", "transforms": [ALL]}
    calibration = Calibration(BATCHES, model_id="tiny", cache_dir=str(tmp_path))
    report = sparsify_(model, config, calibration, keep_dense=True)
    path = tmp_path / "learned" / report.learned["file"].rsplit("/", 1)[-1]
    assert report.learned["cache"] == "miss" and path.is_file()
    with torch.no_grad():
        trained = model(IDS).logits
    report.restore_(model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())

    report = sparsify_(model, {**config, "transforms": []}, keep_dense=True)
    with torch.no_grad():
        assert not torch.equal(model(IDS).logits, trained)  # the corrections change the outputs...
    report.restore_(model)
    report = sparsify_(model, config, Calibration(BATCHES, model_id="tiny", cache_dir=str(tmp_path)), keep_dense=True)
    assert report.learned == {"file": str(path), "cache": "hit"}
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, trained)  # ...and loaded ones give the very same outputs
    report.restore_(model)
    other = sparsify_(model, config, Calibration(BATCHES, model_id="other", cache_dir=str(tmp_path)), keep_dense=True)
    assert other.learned["cache"] == "miss"  # another model's corrections are never read


def test_bad_learnable_options_are_clear_errors():
    with pytest.raises(ValueError, match="learnable forms=\\['gain'\\]: allowed values are"):
        sparsify_(
            llama(),
            {"method": "act_magnitude", "sparsity": "2:4", "transforms": [{"name": "learnable", "forms": ["gain"]}]},
        )
    with pytest.raises(ValueError, match="learnable has no option \\['learning_rate'\\]"):
        sparsify_(
            llama(),
            {"method": "act_magnitude", "sparsity": "2:4", "transforms": [{"name": "learnable", "learning_rate": 1}]},
        )
    with pytest.raises(ValueError, match="learnable schedule='linear': allowed values are \\['cosine', 'constant'\\]"):
        sparsify_(
            llama(),
            {"method": "act_magnitude", "sparsity": "2:4", "transforms": [{"name": "learnable", "schedule": "linear"}]},
        )
    with pytest.raises(ValueError, match="learnable e2e_steps=-1: allowed values are integers >= 0"):
        sparsify_(
            llama(),
            {"method": "act_magnitude", "sparsity": "2:4", "transforms": [{"name": "learnable", "e2e_steps": -1}]},
        )


@pytest.mark.cli
def test_a_job_trains_on_calibration_text_only_and_a_second_job_reuses_the_correction(
    tiny_setup, tmp_path, monkeypatch
):
    seen = []
    train = learned.train_

    def spy(model, layers, batches, options):
        seen.append(batches.clone())
        return train(model, layers, batches, options)

    monkeypatch.setattr(learned, "train_", spy)
    overrides = [
        "pruning=act_magnitude",
        "pruning.sparsity=2:4",
        "calibration.windows=4",
        "calibration.seqlen=16",
        "pruning.transforms=[{name:learnable,steps:5,rank:2}]",
    ]
    reuse.release()
    first = job.run_job(job_config(tiny_setup, tmp_path, *overrides), tmp_path / "first", "g", "first")
    assert first["status"] == "ok", first.get("traceback")
    assert first["learned"]["cache"] == "miss" and first["learned"]["seconds"] > 0 and "learn" in first["timings"]
    assert first["calibration"]["corpus"] == "wikitext2_validation"
    # The windows trained on are the calibration windows of the validation split, nothing else.
    model, tokenizer = next(value for key, value in reuse._cache.items() if key[0] == "model")
    text, corpus = calibration.corpus_text("auto", str(tiny_setup["data"]))
    assert corpus == "wikitext2_validation" and len(seen) == 1
    assert torch.equal(seen[0], calibration.sample_windows(tokenizer, text, 4, 16, 0))

    second = job.run_job(job_config(tiny_setup, tmp_path, *overrides), tmp_path / "second", "g", "second")
    assert second["learned"] == {"file": first["learned"]["file"], "cache": "hit"} and len(seen) == 1
    assert second["metrics"] == first["metrics"]
    assert json.loads((tmp_path / "second" / "results.json").read_text())["learned"]["cache"] == "hit"
    reuse.release()


def test_the_saved_correction_is_logged_as_a_wandb_artifact(tmp_path):
    from omegaconf import OmegaConf

    from actprune.run.tracking import Tracker

    path = tmp_path / "learned" / "abc.safetensors"
    path.parent.mkdir()
    path.write_bytes(b"weights")
    logger = OmegaConf.create({"name": "wandb", "project": "actprune", "entity": None, "mode": "offline", "tags": []})
    tracker = Tracker(logger, tmp_path / "job", group="g", name="n", config={})
    tracker.log_results({"status": "ok", "metrics": {}, "sparsity": {}, "timings": {}, "learned": {"file": str(path)}})
    tracker.finish("ok")
    log = offline_wandb_log(tmp_path / "job")
    assert b"learned-correction" in log and b"correction-abc" in log

    tuned = tmp_path / "learned" / "tuned.safetensors"
    tuned.write_bytes(b"tuned weights")
    tracker = Tracker(logger, tmp_path / "tuned_job", group="g", name="n", config={})
    tracker.log_results(
        {
            "status": "ok",
            "metrics": {},
            "sparsity": {},
            "timings": {},
            "learned": {"file": str(path), "end_to_end": {"file": str(tuned)}},
        }
    )
    tracker.finish("ok")
    log = offline_wandb_log(tmp_path / "tuned_job")
    assert b"correction-tuned" in log and b"correction-abc" not in log  # the end-to-end tuned ones, which the model ran


def test_a_trained_correction_keeps_each_tokens_output_independent_of_the_batch():
    model = llama()
    sparsify_(model, {"method": "act_magnitude", "sparsity": "2:4", "transforms": ["shift", ALL]}, BATCHES)
    with torch.no_grad():
        together = model(IDS).logits
        alone = torch.cat([model(IDS[i : i + 1]).logits for i in range(len(IDS))])
    torch.testing.assert_close(alone, together, rtol=1e-5, atol=1e-5)


def test_a_corrupt_correction_file_is_set_aside_and_trained_again(tmp_path, caplog):
    config = {"method": "act_magnitude", "sparsity": "2:4", "transforms": [ALL]}
    first = sparsify_(the_tiny_model(), config, Calibration(BATCHES, model_id="tiny", cache_dir=str(tmp_path)))
    path = tmp_path / "learned" / first.learned["file"].rsplit("/", 1)[-1]
    path.write_bytes(path.read_bytes()[:200])
    again = sparsify_(the_tiny_model(), config, Calibration(BATCHES, model_id="tiny", cache_dir=str(tmp_path)))
    assert again.learned["cache"] == "miss" and again.learned["mse"] and "set aside" in caplog.text
    assert str(path) in caplog.text and len(list(path.parent.glob("*.corrupt.*"))) == 1


def test_the_learning_rate_warms_up_then_decays_to_zero_on_a_cosine():
    from actprune.activation.learned import TRAINING, rate

    options = {**TRAINING, "warmup": 4}
    assert [rate(s, 20, options) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert rate(4, 20, options) == 1.0 and rate(12, 20, options) == pytest.approx(0.5) and rate(20, 20, options) == 0.0
    assert rate(12, 20, {**options, "schedule": "constant"}) == 1.0


def test_early_stopping_keeps_each_layers_best_state_when_the_rate_is_far_too_high():
    model = llama()
    config = {
        "method": "act_magnitude",
        "sparsity": "2:4",
        "transforms": [
            {
                **ALL,
                "forms": ["affine", "lowrank"],
                "lr": 3.0,
                "steps": 40,
                "evals": 8,
                "patience": 1,
                "schedule": "constant",
            }
        ],
    }
    losses = sparsify_(model, config, BATCHES).learned["mse"]
    for value in losses.values():
        assert value["after"] <= value["before"] and value["after"] <= value["last"]
    assert any(value["steps"] < 40 for value in losses.values()), losses  # stopped early where it diverged


def test_end_to_end_tuning_brings_the_next_token_distribution_closer_to_the_dense_model():
    model = llama()
    config = {
        "method": "act_magnitude",
        "sparsity": "2:4",
        "transforms": [{**ALL, "steps": 5, "warmup": 1, "e2e_steps": 10, "e2e_lr": 1e-3, "e2e_batch_size": 3}],
    }
    # Random tokens have nothing to generalise from: the held-out windows (the last two) repeat tuned ones.
    learned = sparsify_(model, config, torch.cat([BATCHES[:2]] * 4)).learned
    tuned = learned["end_to_end"]
    assert tuned["guard_windows"] == [6, 7] and not tuned["diverged"]
    assert tuned["steps"] == 10 and tuned["kl_after"] < tuned["kl_before"] and tuned["kl_after"] == tuned["kl_trained"]
    assert all(p.requires_grad for p in model.parameters())


def test_end_to_end_tuning_that_raises_the_kl_is_undone():
    layerwise = {"method": "act_magnitude", "sparsity": "2:4", "transforms": [{**ALL, "steps": 5, "warmup": 1}]}
    wrecked = {**layerwise, "transforms": [{**layerwise["transforms"][0], "e2e_steps": 3, "e2e_lr": 1.0}]}
    plain_model, tuned_model = (torch.manual_seed(0), llama())[1], (torch.manual_seed(0), llama())[1]
    sparsify_(plain_model, layerwise, BATCHES)
    tuned = sparsify_(tuned_model, wrecked, BATCHES).learned["end_to_end"]
    assert tuned["kl_trained"] > tuned["kl_before"] and tuned["kl_after"] == tuned["kl_before"]
    with torch.no_grad():
        assert torch.equal(tuned_model(IDS).logits, plain_model(IDS).logits)  # the layer-wise corrections, put back


def test_jobs_that_differ_only_in_end_to_end_options_share_the_layer_wise_fit(tmp_path):
    layerwise = {"method": "act_magnitude", "sparsity": "2:4", "transforms": [{**ALL, "steps": 5, "warmup": 1}]}
    tuned = {
        **layerwise,
        "transforms": [{**layerwise["transforms"][0], "e2e_steps": 4, "e2e_lr": 1e-3, "e2e_batch_size": 2}],
    }
    calibration = lambda: Calibration(BATCHES, model_id="tiny", cache_dir=str(tmp_path))  # noqa: E731
    model = lambda: (torch.manual_seed(0), llama())[1]  # noqa: E731  the one model "tiny" names
    first = sparsify_(model(), layerwise, calibration()).learned
    tuned_model = model()
    second = sparsify_(tuned_model, tuned, calibration()).learned
    assert first["cache"] == "miss" and second["file"] == first["file"] and second["cache"] == "hit"
    assert second["end_to_end"]["cache"] == "miss" and second["end_to_end"]["steps"] == 4
    assert second["end_to_end"]["file"] != first["file"]
    with torch.no_grad():
        expected = tuned_model(IDS).logits
    other = {**tuned, "transforms": [{**tuned["transforms"][0], "e2e_lr": 3e-3}]}
    assert (
        sparsify_(model(), other, calibration()).learned["end_to_end"]["cache"] == "miss"
    )  # other options: tuned again
    loaded = model()
    third = sparsify_(loaded, tuned, calibration()).learned
    assert third["end_to_end"] == {"file": second["end_to_end"]["file"], "cache": "hit"}
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, expected)  # the tuned corrections loaded, not the layer-wise ones


def meta_llama():
    with torch.device("meta"):  # no weight is loaded: options are checked before a job loads its model
        return llama()


def learnable_config(**options):
    return {"method": "act_magnitude", "sparsity": "2:4", "transforms": [{"name": "learnable", **options}]}


BAD_OPTIONS = [
    ("epochs", 0),
    ("epochs", -1),
    ("epochs", 2.5),
    ("epochs", "4"),
    ("steps", -5),
    ("steps", 0),
    ("steps", 2.5),
    ("batch_size", 0),
    ("batch_size", 1.5),
    ("batch_size", True),
    ("e2e_batch_size", 0),
    ("e2e_steps", 2.5),
    ("e2e_steps", -1),
    ("lr", "abc"),
    ("lr", 0),
    ("lr", -1e-3),
    ("lr", float("inf")),
    ("lr", float("nan")),
    ("e2e_lr", 0),
    ("e2e_lr", "abc"),
    ("grad_clip", -1),
    ("grad_clip", 0),
    ("weight_decay", -0.1),
    ("warmup", -1),
    ("warmup", 1.5),
    ("evals", 0),
    ("patience", 0),
    ("patience", -1),
    ("seed", -1),
    ("seed", 1.5),
    ("rank", 0),
    ("rank", -2),
    ("rank", 2.5),
    ("forms", "affine"),
    ("forms", []),
    ("forms", ["lowrank", "lowrank"]),
    ("forms", ["affine", "shift", "affine"]),
    ("schedule", "linear"),
    ("objective", "l1"),
]


@pytest.mark.parametrize(("key", "value"), BAD_OPTIONS)
def test_every_bad_learnable_option_is_refused_before_the_model_loads(key, value):
    with pytest.raises(ValueError, match=f"learnable {key}=.*: allowed values are"):
        plan(meta_llama(), learnable_config(**{key: value}))


def test_good_learnable_options_pass_the_check():
    options = {
        "forms": ["affine", "lowrank"],
        "rank": 4,
        "lr": 1,
        "epochs": 1,
        "steps": None,
        "batch_size": 1,
        "warmup": 0,
        "grad_clip": 0.5,
        "weight_decay": 0,
        "seed": 0,
        "schedule": "constant",
        "objective": "relative",
        "evals": 1,
        "patience": 1,
        "e2e_steps": 0,
        "e2e_lr": 1e-4,
        "e2e_batch_size": 1,
    }
    assert list(plan(meta_llama(), learnable_config(**options)).transforms) == [("learnable", options)]


def test_the_plan_carries_every_learnable_and_refit_option_with_its_default():
    transforms = plan(
        meta_llama(),
        {
            "method": "act_magnitude",
            "sparsity": "2:4",
            "transforms": [{"name": "refit", "ridge": 1.0}, {"name": "learnable", "lr": 0.5}],
        },
    ).transforms
    assert transforms.names == ["refit", "learnable"]
    assert transforms.learnable == {"forms": list(learned.FORMS), "rank": learned.RANK, **learned.TRAINING, "lr": 0.5}
    assert transforms.refit == {**refit.DEFAULTS, "ridge": [1.0]}


def test_a_rank_that_reaches_a_layers_full_rank_is_refused_before_loading():
    # The narrowest target is k_proj, 32 x 64: at rank 32 its low-rank term is W, the dense layer back.
    for rank in (32, 100000):
        with pytest.raises(
            ValueError, match=f"learnable rank={rank} reaches the full rank of .*k_proj.*allowed values are 1..31"
        ):
            plan(meta_llama(), learnable_config(rank=rank))
    plan(meta_llama(), learnable_config(rank=31))
    plan(meta_llama(), learnable_config(rank=100000, forms=["affine"]))  # no low-rank term: the rank is unused


def never_improving(monkeypatch):
    """`_mse` as it is, except that every measurement over all windows gives 1.0: no new best ever;
    returns the count of those measurements."""
    measured = []
    mse = learned._mse

    def constant_on_all_windows(walk, index, hidden, targets, windows, channel_weight=None):
        if isinstance(windows, range):
            measured.append(index)
            return torch.tensor(1.0)
        return mse(walk, index, hidden, targets, windows, channel_weight)

    monkeypatch.setattr(learned, "_mse", constant_on_all_windows)
    return measured


def initial_corrections(monkeypatch):
    """The corrections as `train_` receives them, filled in when it is called."""
    states = {}
    train = learned.train_

    def spy(model, layers, windows, options):
        states.update(
            {name: {k: v.clone() for k, v in w.correction.state_dict().items()} for name, w in layers.items()}
        )
        return train(model, layers, windows, options)

    monkeypatch.setattr(learned, "train_", spy)
    return states


def test_early_stopping_waits_patience_measurements_and_keeps_the_initial_state_when_nothing_improves(monkeypatch):
    measured, initial = never_improving(monkeypatch), initial_corrections(monkeypatch)
    model = llama()
    config = {
        "method": "act_magnitude",
        "sparsity": "2:4",
        "transforms": [{**ALL, "lr": 0.01, "steps": 40, "evals": 8, "patience": 2, "schedule": "constant"}],
    }
    losses = sparsify_(model, config, BATCHES).learned["mse"]
    # every 40 // 8 = 5 steps a measurement; the one before training, then two without a new best
    assert measured == [0, 0, 0, 1, 1, 1] and all(value["steps"] == 10 for value in losses.values()), losses
    assert all(value["after"] == value["before"] == 1.0 and not value["diverged"] for value in losses.values())
    for name, layer in wrappers(model).items():  # the steps taken are undone: the best state is the initial one
        for key, value in layer.correction.state_dict().items():
            assert torch.equal(value, initial[name][key]), (name, key)


@pytest.mark.parametrize("e2e_steps", [0, 3])
def test_no_gradient_is_left_on_the_corrections_after_training(e2e_steps):
    model = llama()
    config = {
        "method": "act_magnitude",
        "sparsity": "2:4",
        "transforms": [{**ALL, "steps": 5, "e2e_steps": e2e_steps, "e2e_batch_size": 2}],
    }
    learned_report = sparsify_(model, config, BATCHES).learned
    assert ("end_to_end" in learned_report) == bool(e2e_steps)
    params = [p for layer in wrappers(model).values() for p in layer.correction.parameters()]
    assert params and all(p.grad is None for p in params)


def test_layer_wise_training_that_diverges_keeps_each_layers_best_state():
    model = llama()
    config = {
        "method": "act_magnitude",
        "sparsity": "2:4",
        "transforms": [{**ALL, "lr": 1e6, "steps": 20, "warmup": 1}],
    }
    losses = sparsify_(model, config, BATCHES).learned["mse"]
    assert any(value["diverged"] for value in losses.values()), losses
    assert all(value["after"] <= value["before"] for value in losses.values()), losses
    assert all(torch.isfinite(p).all() for layer in wrappers(model).values() for p in layer.correction.parameters())
    with torch.no_grad():
        assert torch.isfinite(model(IDS).logits).all()


def test_end_to_end_tuning_that_diverges_is_undone():
    layerwise = {"method": "act_magnitude", "sparsity": "2:4", "transforms": [{**ALL, "steps": 5, "warmup": 1}]}
    diverging = {
        **layerwise,
        "transforms": [{**layerwise["transforms"][0], "e2e_steps": 5, "e2e_lr": 1e8, "warmup": 1}],
    }
    plain_model, tuned_model = (torch.manual_seed(0), llama())[1], (torch.manual_seed(0), llama())[1]
    sparsify_(plain_model, layerwise, BATCHES)
    tuned = sparsify_(tuned_model, diverging, BATCHES).learned["end_to_end"]
    assert tuned["diverged"] and tuned["steps"] < 5 and tuned["kl_after"] == tuned["kl_before"]
    with torch.no_grad():
        assert torch.equal(tuned_model(IDS).logits, plain_model(IDS).logits)  # the layer-wise corrections, put back


def test_a_correction_file_of_other_settings_under_this_settings_name_is_not_a_hit(tmp_path, caplog):
    calibration = lambda: Calibration(BATCHES, model_id="tiny", cache_dir=str(tmp_path))  # noqa: E731
    config = {"method": "act_magnitude", "sparsity": "2:4", "transforms": [{**ALL, "steps": 5}]}
    other = {**config, "transforms": [{**ALL, "steps": 5, "lr": 0.002}]}  # same shapes, another fit
    mine = Path(sparsify_(the_tiny_model(), config, calibration()).learned["file"])
    theirs = Path(sparsify_(the_tiny_model(), other, calibration()).learned["file"])
    assert mine != theirs and sparsify_(the_tiny_model(), config, calibration()).learned["cache"] == "hit"
    shutil.copyfile(theirs, mine)
    again = sparsify_(the_tiny_model(), config, calibration()).learned
    assert again["cache"] == "miss" and "set aside" in caplog.text and theirs.stem in caplog.text
    assert (
        sparsify_(the_tiny_model(), config, calibration()).learned["cache"] == "hit"
    )  # saved again, under its own key


class OneLayerLogits(torch.nn.Module):
    """Logits of one 2:4 layer on a fixed input: dense, a peaked distribution; pruned, the uniform one
    (the entry carrying the peak is the smallest kept in its group, so it is pruned away)."""

    def __init__(self):
        super().__init__()
        from actprune.masks import parse_sparsity

        linear = torch.nn.Linear(4, 4, bias=False)
        with torch.no_grad():
            linear.weight.zero_()
            linear.weight[0, 2] = 2.0  # logit 0 is twice input 2
        self.layer = ActSparseLinear(linear, parse_sparsity("2:4"))
        self.register_buffer("x", torch.tensor([8.0, 7.0, 6.0, 0.0]))

    def forward(self, batch, use_cache=False):
        return type("Output", (), {"logits": self.layer(self.x.expand(*batch.shape, 4))})


def test_the_kl_is_of_the_dense_model_against_the_pruned_one():
    """Dense logits (12, 0, 0, 0), pruned ones uniform: KL(dense ‖ pruned) = log 4 − H(dense) ≈ 1.39,
    the reverse ≈ 7.6, a factor above 5 that no rounding closes."""
    model = OneLayerLogits()
    dense = torch.log_softmax(torch.tensor([12.0, 0, 0, 0], dtype=torch.float64), -1)
    pruned = torch.full((4,), -math.log(4), dtype=torch.float64)
    forward = float((dense.exp() * (dense - pruned)).sum())
    backward = float((pruned.exp() * (pruned - dense)).sum())
    assert backward > 5 * forward > 5  # the two directions differ by far here
    with torch.no_grad():
        kl = learned._kl(model, BATCHES, [0, 1], [model.layer])
    assert float(kl) == pytest.approx(forward, rel=1e-4)


def test_end_to_end_tuning_tunes_on_the_first_three_quarters_and_guards_on_held_out_windows(monkeypatch):
    calls = []
    kl = learned._kl

    def spy(model, windows, chosen, layers):
        calls.append((list(chosen), torch.is_grad_enabled()))
        return kl(model, windows, chosen, layers)

    monkeypatch.setattr(learned, "_kl", spy)
    windows = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(3))
    config = {
        "method": "act_magnitude",
        "sparsity": "2:4",
        "transforms": [{**ALL, "steps": 3, "e2e_steps": 6, "e2e_batch_size": 2}],
    }
    tuned = sparsify_(llama(), config, windows).learned["end_to_end"]
    assert tuned["guard_windows"] == [6, 7]  # the last quarter
    tuning = [call for call in calls if call[1]]
    guarding = [call for call in calls if not call[1]]
    assert len(tuning) == 6 and all(set(chosen) <= set(range(6)) for chosen, _ in tuning)
    assert sorted(chosen for chosen, _ in guarding) == [[6], [6], [7], [7]]  # before and after


def test_the_straight_through_surrogate_runs_only_while_the_score_scale_is_trained():
    """The scale moves only the mask: while it is trained, the surrogate gives it (and, through the
    scores, the shift) a gradient; while it is not (end-to-end tuning), the gradient is that of the
    hard-masked output, here computed on its own with the mask fixed beforehand."""
    from actprune.masks import parse_sparsity

    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 8)
    correction = learned.Correction(linear.weight, forms=["shift", "scale"])
    layer = ActSparseLinear(linear, parse_sparsity("2:4"), correction=correction)
    with torch.no_grad():
        correction.shift.normal_()
        correction.log_scale.normal_()
    x = torch.randn(5, 16)

    def shift_gradient():
        correction.shift.grad = None
        layer(x).square().sum().backward()
        return correction.shift.grad.clone()

    with_surrogate = shift_gradient()
    assert correction.log_scale.grad.abs().sum() > 0
    correction.log_scale.requires_grad_(False)
    hard = shift_gradient()
    shift = correction.shift.detach().clone().requires_grad_(True)
    with torch.no_grad():
        keep = layer.keep_mask(x - shift, correction.log_scale.exp())[0]
    (
        (torch.nn.functional.linear((x - shift) * keep, linear.weight, linear.bias) + linear(shift) - linear.bias)
        .square()
        .sum()
        .backward()
    )
    torch.testing.assert_close(hard, shift.grad, rtol=1e-5, atol=1e-6)
    assert (with_surrogate - hard).abs().max() > 0.1 * hard.abs().max()  # the surrogate's share is no rounding


def test_end_to_end_tuning_moves_every_correction_but_the_score_scale():
    layerwise = {"method": "act_magnitude", "sparsity": "2:4", "transforms": [{**ALL, "steps": 5, "warmup": 1}]}
    tuned = {**layerwise, "transforms": [{**layerwise["transforms"][0], "e2e_steps": 10, "e2e_lr": 1e-3}]}
    windows = torch.cat([BATCHES[:2]] * 4)  # the held-out windows repeat tuned ones: the tuning is kept
    plain_model, tuned_model = (torch.manual_seed(0), llama())[1], (torch.manual_seed(0), llama())[1]
    sparsify_(plain_model, layerwise, windows)
    report = sparsify_(tuned_model, tuned, windows).learned["end_to_end"]
    assert report["kl_after"] < report["kl_before"]
    plain, after = wrappers(plain_model), wrappers(tuned_model)
    moved = {
        key
        for name in plain
        for key, value in after[name].correction.state_dict().items()
        if not torch.equal(value, plain[name].correction.state_dict()[key])
    }
    assert moved == {"a", "b", "shift", "u", "v"}


def test_the_last_quarter_of_the_windows_is_held_out_for_the_guard_and_a_lone_window_serves_as_both():
    assert learned.split_windows(8) == ([0, 1, 2, 3, 4, 5], [6, 7])
    assert learned.split_windows(2) == ([0], [1])
    assert learned.split_windows(1) == ([0], [0])


def test_each_layer_is_trained_towards_the_dense_models_own_output_of_that_layer(monkeypatch):
    """The teacher stream stays dense through the layers before: its targets at layer i are what the
    unpruned model computes there, while the student stream runs through the corrected layers."""
    model = llama()
    outputs = []  # each decoder layer's output, in the order they run
    hooks = [
        layer.register_forward_hook(lambda module, args, out: outputs.append(out[0] if isinstance(out, tuple) else out))
        for layer in model.model.layers
    ]
    with torch.no_grad():
        for window in BATCHES:
            model(window[None])
    for hook in hooks:
        hook.remove()
    layers = len(model.model.layers)
    dense = [outputs[w * layers : (w + 1) * layers] for w in range(len(BATCHES))]
    seen = {}
    mse = learned._mse

    def record(walk, index, hidden, targets, windows, channel_weight=None):
        seen[index] = (list(hidden), list(targets))
        return mse(walk, index, hidden, targets, windows, channel_weight)

    monkeypatch.setattr(learned, "_mse", record)
    sparsify_(model, {"method": "act_magnitude", "sparsity": "2:4", "transforms": [{**ALL, "steps": 2}]}, BATCHES)
    for index, (student, targets) in seen.items():
        for window, target in enumerate(targets):
            torch.testing.assert_close(target, dense[window][index], rtol=1e-4, atol=1e-4)
    # the second layer's student inputs come from the pruned, corrected first layer, not the dense one
    assert not torch.allclose(seen[1][0][0], dense[0][0], atol=1e-3)


def test_the_relative_objective_weighs_each_output_channel_by_its_own_scale():
    """An error of 1% of every channel's size costs the same in a channel a thousand times larger."""
    targets = [torch.randn(1, 16, 4) * torch.tensor([1000.0, 1.0, 1.0, 1.0]) for _ in range(3)]
    weight = learned.relative_weight(targets)
    square = torch.cat([t.flatten(0, 1) for t in targets]).square().mean(0)
    torch.testing.assert_close(weight, 1 / square)
    error_big = sum(((t * 0.01) * torch.tensor([1.0, 0, 0, 0])).square().mean(0) for t in targets) / 3
    error_small = sum(((t * 0.01) * torch.tensor([0, 1.0, 0, 0])).square().mean(0) for t in targets) / 3
    torch.testing.assert_close((error_big * weight).sum(), (error_small * weight).sum(), rtol=1e-5, atol=0)
    silent = learned.relative_weight([torch.zeros(1, 4, 2) + torch.tensor([1.0, 0.0])])
    assert torch.isfinite(silent).all() and silent[1] == 1 / (1e-6 * 0.5)


def test_the_relative_objective_is_what_each_layer_records_and_lowers():
    """Layer 0's recorded starting error is the relative error of the pruned layer against the dense
    one, measured here independently; training lowers it in every layer."""
    options = {**ALL, "forms": ["affine"], "objective": "relative"}
    config = {"method": "act_magnitude", "sparsity": "2:4"}
    dense = llama()
    pruned, trained = copy.deepcopy(dense), copy.deepcopy(dense)
    sparsify_(pruned, {**config, "transforms": []}, BATCHES)
    with torch.no_grad():
        target = [dense(w[None], output_hidden_states=True).hidden_states[1] for w in BATCHES]
        output = [pruned(w[None], output_hidden_states=True).hidden_states[1] for w in BATCHES]
    square = torch.cat([t.flatten(0, 1) for t in target]).square().mean(0)
    expected = sum(((o - t).square() / square).mean() for o, t in zip(output, target)) / len(BATCHES)
    losses = sparsify_(trained, {**config, "transforms": [options]}, BATCHES).learned
    assert "mse" not in losses and set(losses["relative_mse"]) == {"0", "1"}
    assert losses["relative_mse"]["0"]["before"] == pytest.approx(float(expected), rel=1e-4)
    assert all(value["after"] < value["before"] for value in losses["relative_mse"].values())


def test_a_form_listed_twice_is_refused_naming_the_forms_given():
    with pytest.raises(
        ValueError, match=r"learnable forms=\['lowrank', 'lowrank'\] names \['lowrank'\] more than once"
    ):
        plan(meta_llama(), learnable_config(forms=["lowrank", "lowrank"]))
