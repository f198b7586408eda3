import json
import os
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


# A tiny random Llama, its tokenizer and WikiText-2-shaped data, for the command-line tests.
TEXT = [
    " = Valkyria Chronicles III = ",
    "",
    " The game began development in 2010 , carrying over a large portion of the work done on Valkyria Chronicles II .",
    " While it retained the standard features of the series , it also underwent multiple adjustments .",
] * 60


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
            file.write(json.dumps({"goal": f"How to start the game {i}?", "sol1": "Press start.", "sol2": "Carry over the work.", "label": i % 2}) + "\n")
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"]))
    model_dir = root / "tiny-llama"
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(model_dir)
    llama(vocab_size=256, intermediate_size=96).save_pretrained(model_dir)
    return {"model": model_dir, "data": data_dir, "root": root}
