import os
from pathlib import Path

import pytest
import torch

# No test may reach the network: the libraries fail fast instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_SILENT", "true")

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
STORIES = SHARED / "models" / "stories260k"
SHARED_DATA = SHARED / "data"

needs_shared = pytest.mark.skipif(
    not (STORIES / "config.json").is_file() or not (SHARED_DATA / "wikitext-2-raw-v1" / "test.jsonl").is_file(),
    reason="../shared (stories260k and WikiText-2) is absent: integration tests need it",
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
