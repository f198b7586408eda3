"""Learned corrections: exact at initialisation, trained layer by layer, saved and reused."""

import json

import pytest
import torch

from actprune import calibration, reuse, sparsify_
from actprune.activation import ActSparseLinear, learned
from actprune.calibration import Calibration
from actprune.run import job

from .helpers import job_config, offline_wandb_log
from .tiny import llama, qwen2

IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
BATCHES = torch.randint(0, 256, (6, 16), generator=torch.Generator().manual_seed(2))
ALL = {"name": "learnable", "forms": list(learned.FORMS), "rank": 4, "lr": 0.001, "steps": 30, "batch_size": 2}


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
        sparsify_(llama(), {"method": "act_magnitude", "sparsity": "2:4", "transforms": [{"name": "learnable", "forms": ["gain"]}]})
    with pytest.raises(ValueError, match="learnable has no option \\['learning_rate'\\]"):
        sparsify_(llama(), {"method": "act_magnitude", "sparsity": "2:4", "transforms": [{"name": "learnable", "learning_rate": 1}]})
    with pytest.raises(ValueError, match="learnable schedule='linear': allowed values are \\['cosine', 'constant'\\]"):
        sparsify_(llama(), {"method": "act_magnitude", "sparsity": "2:4", "transforms": [{"name": "learnable", "schedule": "linear"}]})
    with pytest.raises(ValueError, match="allowed values are evals >= 1, patience >= 0, e2e_steps >= 0"):
        sparsify_(llama(), {"method": "act_magnitude", "sparsity": "2:4", "transforms": [{"name": "learnable", "e2e_steps": -1}]})


@pytest.mark.cli
def test_a_job_trains_on_calibration_text_only_and_a_second_job_reuses_the_correction(tiny_setup, tmp_path, monkeypatch):
    seen = []
    train = learned.train_

    def spy(model, layers, batches, options):
        seen.append(batches.clone())
        return train(model, layers, batches, options)

    monkeypatch.setattr(learned, "train_", spy)
    overrides = ["pruning=act_magnitude", "pruning.sparsity=2:4", "calibration.windows=4", "calibration.seqlen=16",
                 "pruning.transforms=[{name:learnable,steps:5,rank:2}]"]
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
    tracker.log_results({"status": "ok", "metrics": {}, "sparsity": {}, "timings": {},
                         "learned": {"file": str(path), "end_to_end": {"file": str(tuned)}}})
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
    first = sparsify_(llama(), config, Calibration(BATCHES, model_id="tiny", cache_dir=str(tmp_path)))
    path = tmp_path / "learned" / first.learned["file"].rsplit("/", 1)[-1]
    path.write_bytes(path.read_bytes()[:200])
    again = sparsify_(llama(), config, Calibration(BATCHES, model_id="tiny", cache_dir=str(tmp_path)))
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
    config = {"method": "act_magnitude", "sparsity": "2:4",
              "transforms": [{**ALL, "forms": ["affine", "lowrank"], "lr": 3.0, "steps": 40, "evals": 8, "patience": 1,
                              "schedule": "constant"}]}
    losses = sparsify_(model, config, BATCHES).learned["mse"]
    for value in losses.values():
        assert value["after"] <= value["before"] and value["after"] <= value["last"]
    assert any(value["steps"] < 40 for value in losses.values()), losses  # stopped early where it diverged


def test_end_to_end_tuning_brings_the_next_token_distribution_closer_to_the_dense_model():
    model = llama()
    config = {"method": "act_magnitude", "sparsity": "2:4",
              "transforms": [{**ALL, "steps": 5, "warmup": 1, "e2e_steps": 10, "e2e_lr": 1e-3, "e2e_batch_size": 3}]}
    learned = sparsify_(model, config, BATCHES).learned
    tuned = learned["end_to_end"]
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
    tuned = {**layerwise, "transforms": [{**layerwise["transforms"][0], "e2e_steps": 4, "e2e_lr": 1e-3, "e2e_batch_size": 2}]}
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
    assert sparsify_(model(), other, calibration()).learned["end_to_end"]["cache"] == "miss"  # other options: tuned again
    loaded = model()
    third = sparsify_(loaded, tuned, calibration()).learned
    assert third["end_to_end"] == {"file": second["end_to_end"]["file"], "cache": "hit"}
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, expected)  # the tuned corrections loaded, not the layer-wise ones
