"""`export_(job_dir, out_dir)`, or `actprune-export JOB_DIR OUT_DIR`: a finished job's pruned model as a
Hugging Face folder that stock transformers and lm_eval load, with only torch and transformers.

The model is rebuilt from the job's record as the job built it (its config; calibration statistics and
learned corrections from the job's cache where they are, recomputed where not), then written:
safetensors weights (changes of basis, scalings and refit folded in), the tokenizer, and a `config.json`
whose `auto_map` points at `modeling_actprune.py` (copied beside it) and whose `actprune` entry holds, per
pruned layer, what that file applies at run time. Weight methods write plain weights, zeros included.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ..activation.wrapper import ActSparseLinear
from ..run import results
from ..walk import decoder_layers

log = logging.getLogger(__name__)

RUNTIME = Path(__file__).with_name("modeling_actprune.py")
FORMAT = 1  # of config.actprune; modeling_actprune.py reads this one
EXPORTABLE_METHODS = ("act_magnitude",)  # activation methods whose layers modeling_actprune.py computes


def finished_record(job_dir: Path) -> dict:
    """The job's results.json, which must say ok."""
    path = Path(job_dir) / results.RESULTS
    if not path.is_file():
        raise FileNotFoundError(f"{job_dir}: no {results.RESULTS}; give the folder of a finished job")
    record = json.loads(path.read_text())
    if record.get("status") != "ok":
        raise ValueError(f"{job_dir}: the job's status is {record.get('status')!r}, not 'ok': export a finished job")
    return record


def check_exportable(pruning: dict) -> None:
    """Refuse, before anything is loaded, what modeling_actprune.py cannot compute."""
    from ..methods import METHODS

    method = pruning["method"]
    known = METHODS.get(method)  # a method of your own (config `imports`) is not registered here
    if method not in EXPORTABLE_METHODS and (known is None or known.kind == "activation"):
        raise ValueError(
            f"pruning.method={method}: actprune-export writes the layers of {list(EXPORTABLE_METHODS)} (and "
            f"weight methods, as plain weights); a method of your own needs its own modelling code"
        )


def export_(job_dir: str | Path, out_dir: str | Path) -> Path:
    """Write the pruned model of the finished job in `job_dir` to `out_dir` (new, or empty) and return it."""
    from ..run.job import calibrate, load, plan_job
    from ..sparsify import sparsify_

    job_dir, out_dir = Path(job_dir), Path(out_dir)
    record = finished_record(job_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} is not empty: export into a new folder (nothing is overwritten)")
    config = {key: value for key, value in record["config"].items() if key != "inputs"}
    cfg = OmegaConf.create({**config, "benchmark": {}})  # nothing to evaluate: no benchmark data read
    check_exportable(config["pruning"])
    threads = (record.get("host") or {}).get("threads")
    if threads:  # the job's CPU sums (statistics, refit) rounded as the job's did: the same model, bit for bit
        torch.set_num_threads(threads)
    else:
        log.warning("%s does not record its CPU threads: rebuilt with %d", job_dir, torch.get_num_threads())
    job = plan_job(cfg, job_dir)
    loaded = load(job, cfg)
    torch.manual_seed(cfg.seed)
    report = sparsify_(loaded.model, job.pruning, calibrate(job, loaded, cfg))
    about = {
        "folder": str(job_dir.resolve()),
        "name": record.get("job"),
        "metrics": record.get("metrics"),
        "benchmark": config.get("benchmark"),  # how the metrics were measured (scripts/check_export.py)
        "threads": threads,
    }
    write_folder(loaded.model, report, loaded.tokenizer, out_dir, {"job": about, "pruning": config["pruning"]})
    log.info("Exported %s to %s", job_dir, out_dir)
    return out_dir


def write_folder(model, report, tokenizer, out_dir: str | Path, about: dict) -> None:
    """Write `model`, pruned by `sparsify_` (its `report`), as a Hugging Face folder; `about` (what made
    it) goes into config.actprune beside the layers."""
    out_dir = Path(out_dir)
    wrapped = {name: layer for name, layer in report.layers.items() if isinstance(layer, ActSparseLinear)}
    out_dir.mkdir(parents=True, exist_ok=True)
    # Safetensors holds row-major tensors: a column-major matrix of a pruned layer (an SVD factor) is
    # stored transposed, and modeling_actprune.py reads it back as the same view, so that the matmuls take
    # the paths the job's took (another layout rounds otherwise); the kernel's (in, out) weight is copied.
    state = {key: stored(key, value, wrapped) for key, value in model.state_dict().items()}
    model.save_pretrained(out_dir, state_dict=state)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    settings = json.loads((out_dir / "config.json").read_text())
    settings["actprune"] = {
        "format": FORMAT,
        **about,
        "decoder_layers": decoder_layers(model)[0],
        "layers": {name: layer_spec(layer, report.thresholds.get(name)) for name, layer in wrapped.items()},
    }
    if wrapped:  # activation sparsity runs at run time, in the modelling file
        base = type(model).__name__
        runtime = RUNTIME.read_text().replace('BASE = "LlamaForCausalLM"', f'BASE = "{base}"', 1)
        (out_dir / RUNTIME.name).write_text(runtime)
        settings["auto_map"] = {"AutoModelForCausalLM": f"{RUNTIME.stem}.ActPruneForCausalLM"}
        settings["architectures"] = ["ActPruneForCausalLM"]
    (out_dir / "config.json").write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")


def column_major(tensor) -> bool:
    return tensor.dim() == 2 and not tensor.is_contiguous() and tensor.t().is_contiguous()


def stored(key: str, tensor, wrapped: dict):
    """A state-dict entry as the folder stores it: a pruned layer's own column-major matrix transposed."""
    owner = key.rpartition(".")[0].removesuffix(".correction")  # a wrapper's own tensor, or its correction's
    if owner in wrapped and column_major(tensor):
        return tensor.t().contiguous()
    return tensor.contiguous()


def layer_spec(layer: ActSparseLinear, threshold: float | None) -> dict:
    """What modeling_actprune.SparseLinear needs of one layer: its tensors' shapes as stored, dtypes and
    whether stored transposed (their values travel with the weights), and its options."""
    pattern = layer.pattern
    tensors = {
        name: [
            list(tensor.t().shape if column_major(tensor) else tensor.shape),
            str(tensor.dtype).removeprefix("torch."),
            column_major(tensor),
        ]
        for name, tensor in layer.state_dict().items()
        if not name.startswith("linear.")
    }
    return {
        "pattern": {"n": pattern.n, "m": pattern.m} if pattern.is_nm else {"ratio": pattern.ratio},
        **({"dense": True} if pattern.is_dense() else {}),
        "threshold": threshold,
        "shift": layer.shift,
        "variance": layer.variance,
        "dense_tokens": layer.dense_tokens,
        "mask_scope": layer.mask_scope,
        "mask_pool": layer.mask_pool,
        "tensors": tensors,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="actprune-export",
        description="Write a finished job's pruned model as a Hugging Face folder "
        "(AutoModelForCausalLM.from_pretrained(OUT_DIR, trust_remote_code=True)).",
    )
    parser.add_argument("job_dir", type=Path, help="a finished job's folder (its results.json says ok)")
    parser.add_argument("out_dir", type=Path, help="a new (or empty) folder for the model")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        export_(args.job_dir, args.out_dir)
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        parser.exit(2, f"actprune-export: {error}\n")
    print(args.out_dir)
