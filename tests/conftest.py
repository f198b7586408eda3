import json
import os
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from .tiny import llama

# No test may reach the network: the libraries fail fast instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_SILENT", "true")
# The models here are tiny: one thread is as fast as two, and does not spin against other processes for the
# cores (two threads on a busy two-core machine made single tests 15 to 40 times slower). The command lines
# the tests run inherit the setting.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
# Without a GPU, Triton runs the kernels of pruning.backend=kernel on CPU tensors in its interpreter (read when
# a kernel is defined, so set before anything imports actprune.kernels).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# W&B's own service process, never one inherited: tearing it down must wait for its writes (see below).
os.environ.pop("WANDB_SERVICE", None)

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
STORIES = SHARED / "models" / "stories260k"
SHARED_DATA = SHARED / "data"

# Every test that reads ../shared is an integration test, and is skipped (with the reason) where ../shared is absent.
SHARED_MARKS = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not (STORIES / "config.json").is_file() or not (SHARED_DATA / "wikitext-2-raw-v1" / "test.jsonl").is_file(),
        reason="../shared (stories260k and WikiText-2) is absent: integration tests need it",
    ),
]


def needs_shared(test):
    """`@needs_shared` on a test: both marks of SHARED_MARKS (a module takes `pytestmark = [*SHARED_MARKS, ...]`)."""
    for mark in SHARED_MARKS:
        test = mark(test)
    return test


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _no_wandb_service_left():
    """A test that ran W&B in this process leaves no W&B service behind: otherwise the command lines of later
    tests would inherit its address (WANDB_SERVICE) and log through it, and their `.wandb` files would not be
    complete when they exit."""
    yield
    if "wandb" in sys.modules:
        sys.modules["wandb"].teardown()


# A tiny random Llama, its tokenizer and WikiText-2-shaped data, for the command-line tests.
TEXT = [
    " = Valkyria Chronicles III = ",
    "",
    " The game began development in 2010 , carrying over a large portion of the work done on Valkyria Chronicles II .",
    " While it retained the standard features of the series , it also underwent multiple adjustments .",
] * 60


@pytest.fixture
def kernel_calls(monkeypatch):
    """How many rows each call of the decode kernel from a wrapper had (pruning.backend=kernel)."""
    from actprune.kernels import dispatch

    calls = []
    real = dispatch.sparse_linear

    def spy(x, *args, **kwargs):
        calls.append(x.shape[0])
        return real(x, *args, **kwargs)

    monkeypatch.setattr(dispatch, "sparse_linear", spy)
    return calls


@pytest.fixture(scope="session")
def tiny_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    data_dir = root / "data"
    (data_dir / "wikitext-2-raw-v1").mkdir(parents=True)
    with open(data_dir / "wikitext-2-raw-v1" / "test.jsonl", "w") as file:
        for row in TEXT:
            file.write(json.dumps({"text": row}) + "\n")
    with open(data_dir / "wikitext-2-raw-v1" / "validation.jsonl", "w") as file:
        for row in reversed(TEXT):
            file.write(json.dumps({"text": row}) + "\n")
    (data_dir / "lm_eval" / "piqa").mkdir(parents=True)
    with open(data_dir / "lm_eval" / "piqa" / "validation.jsonl", "w") as file:
        for i in range(6):
            file.write(
                json.dumps(
                    {
                        "goal": f"How to start the game {i}?",
                        "sol1": "Press start.",
                        "sol2": "Carry over the work.",
                        "label": i % 2,
                    }
                )
                + "\n"
            )
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"]))
    model_dir = root / "tiny-llama"
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    ).save_pretrained(model_dir)
    llama(vocab_size=256, intermediate_size=96, max_position_embeddings=1024).save_pretrained(model_dir)
    return {"model": model_dir, "data": data_dir, "root": root}
