"""Caches are keyed by everything their contents are computed from: a change in any of it is a miss."""

import inspect

import pytest
import torch

from actprune import masks, sparsify_
from actprune.activation import allocation, refit, thresholds
from actprune.calibration import Calibration

from .tiny import llama

BATCHES = torch.randint(0, 256, (6, 16), generator=torch.Generator().manual_seed(2))
LEARN = {"name": "learnable", "forms": ["affine"], "lr": 0.001, "steps": 2, "batch_size": 2}


@pytest.mark.parametrize("module", [refit, allocation, thresholds, masks], ids=lambda m: m.__name__)
def test_learned_corrections_are_trained_again_when_code_they_build_on_changes(module, tmp_path, monkeypatch):
    """Refit, allocation, thresholds and the masks shape what the corrections are trained on: an edit
    to any of them must not load corrections trained before it."""
    config = {"method": "act_magnitude", "sparsity": "2:4", "transforms": ["refit", LEARN]}
    calibration = lambda: Calibration(BATCHES, model_id="tiny", cache_dir=str(tmp_path))  # noqa: E731
    first = sparsify_(llama(), config, calibration()).learned
    assert first["cache"] == "miss"
    assert sparsify_(llama(), config, calibration()).learned["cache"] == "hit"
    source = inspect.getsource
    monkeypatch.setattr(inspect, "getsource", lambda piece: source(piece) + ("# edited" if piece is module else ""))
    assert sparsify_(llama(), config, calibration()).learned["cache"] == "miss"
