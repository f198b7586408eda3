"""Caches are keyed by everything their contents are computed from: a change in any of it is a miss."""

import inspect

import pytest
import torch

from actprune import calibration, masks, sparsify_
from actprune.activation import allocation, refit, thresholds
from actprune.calibration import Calibration
from actprune.methods import act_magnitude

from .tiny import llama

BATCHES = torch.randint(0, 256, (6, 16), generator=torch.Generator().manual_seed(2))
LEARN = {"name": "learnable", "forms": ["affine"], "lr": 0.001, "steps": 2, "batch_size": 2}
SHIFTED = {"method": "act_magnitude", "sparsity": "2:4", "transforms": [{"name": "shift", "mode": "static"}, LEARN]}


def tiny():
    """The one model `model_id="tiny"` names."""
    return (torch.manual_seed(0), llama())[1]


def run(tmp_path, config):
    report = sparsify_(tiny(), config, Calibration(BATCHES, model_id="tiny", cache_dir=str(tmp_path)))
    return report.learned["cache"], report.calibration.get("cache") if report.calibration else None


def edit_source(monkeypatch, module):
    """`inspect.getsource` as if `module`'s file had been edited since."""
    source = inspect.getsource
    monkeypatch.setattr(inspect, "getsource", lambda piece: source(piece) + ("# edited" if piece is module else ""))


@pytest.mark.parametrize("module", [refit, allocation, thresholds, masks], ids=lambda m: m.__name__)
def test_learned_corrections_are_trained_again_when_code_they_build_on_changes(module, tmp_path, monkeypatch):
    """Refit, allocation, thresholds and the masks shape what the corrections are trained on: a job
    started after an edit to any of them (a process that reads the edited file) must not load
    corrections trained before it."""
    config = {"method": "act_magnitude", "sparsity": "2:4", "transforms": ["refit", LEARN]}
    assert run(tmp_path, config)[0] == "miss"
    assert run(tmp_path, config)[0] == "hit"
    edit_source(monkeypatch, module)
    monkeypatch.setattr(calibration, "_SOURCES", {})  # a new process: it reads the sources afresh
    assert run(tmp_path, config)[0] == "miss"


def test_a_file_edited_after_the_process_read_it_does_not_key_the_code_that_runs(tmp_path, monkeypatch):
    """A job that started before an edit runs the code it imported: its keys are that code's, and so
    are the corrections and statistics it saves."""
    assert run(tmp_path, SHIFTED) == ("miss", "miss")
    edit_source(monkeypatch, masks)
    edit_source(monkeypatch, calibration.collect)
    assert run(tmp_path, SHIFTED) == ("hit", "hit")


def scaled_mean(collect):
    def collect_scaled(*args, **kwargs):
        stats = collect(*args, **kwargs)
        return {name: {**values, "mean": values["mean"] * 1.5} for name, values in stats.items()}

    return collect_scaled


def scaled_shift(wrapper_options):
    def wrapper_options_scaled(*args, **kwargs):
        options = wrapper_options(*args, **kwargs)
        return {**options, "shift_vector": options["shift_vector"] * 1.5}

    return wrapper_options_scaled


@pytest.mark.parametrize(
    ("module", "name", "change"),
    [(calibration, "collect", scaled_mean), (act_magnitude, "wrapper_options", scaled_shift)],
    ids=["statistics", "wrapper"],
)
def test_learned_corrections_are_trained_again_when_the_layers_they_start_from_change(
    module, name, change, tmp_path, monkeypatch
):
    """Statistics collected otherwise (the mean 1.5 times), or a wrapper built otherwise from the same
    statistics: the static shift the corrections would be trained around moves, so the file saved
    before must not load. Neither edit is in the code the learned key hashes."""
    assert run(tmp_path, SHIFTED) == ("miss", "miss")
    assert run(tmp_path, SHIFTED) == ("hit", "hit")
    monkeypatch.setattr(module, name, change(getattr(module, name)))
    assert run(tmp_path, SHIFTED)[0] == "miss"


def test_both_caches_miss_under_another_transformers_version(tmp_path, monkeypatch):
    """The model's forward is transformers' code: another version may compute other statistics."""
    import transformers

    assert run(tmp_path, SHIFTED) == ("miss", "miss")
    monkeypatch.setattr(transformers, "__version__", transformers.__version__ + ".post1")
    assert run(tmp_path, SHIFTED) == ("miss", "miss")
