"""`export_(job_dir, out_dir)`, or `actprune-export JOB_DIR OUT_DIR`: a finished job's pruned model as a
Hugging Face folder that stock transformers and lm_eval load, with only torch and transformers.

The model is rebuilt from the job's record as the job built it (its config; calibration statistics and
learned corrections from the job's cache where they are, recomputed where not), then written:
safetensors weights (changes of basis, scalings and refit folded in), the tokenizer, and a `config.json`
whose `auto_map` points at `modeling_actprune.py` (copied beside it), whose `model_type` is its own (loaded
only with trust_remote_code) and whose `actprune` entry holds, per pruned layer, what that file applies at run
time; all of it in a staging folder renamed into place once complete. Weight methods write plain weights,
zeros included.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import shutil
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ..activation.wrapper import ActSparseLinear
from ..files import UMASK
from ..run import results
from ..run.lock import Busy, JobLock
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
    from ..eval import build
    from ..run.job import calibrate, check_shared_masks, inputs, load, plan_job
    from ..sparsify import sparsify_

    job_dir, out_dir = Path(job_dir), Path(out_dir)
    record = finished_record(job_dir)
    check_empty(out_dir)
    config = {key: value for key, value in record["config"].items() if key != "inputs"}
    cfg = OmegaConf.create({**config, "benchmark": {}})  # nothing to evaluate: no benchmark data read
    check_exportable(config["pruning"])
    threads = (record.get("host") or {}).get("threads")
    if threads:  # the job's CPU sums (statistics, refit) rounded as the job's did: the same model, bit for bit
        torch.set_num_threads(threads)
    else:
        log.warning("%s does not record its CPU threads: rebuilt with %d", job_dir, torch.get_num_threads())
    job = plan_job(cfg, job_dir)
    # What the planner refuses of the job's own benchmarks (their options only: no data read), for
    # records of a version that ran it (thresholds under shared masks at batch > 1, before 4).
    check_shared_masks(
        job.pruning, {name: build(name, o) for name, o in (config.get("benchmark") or {}).items() if o is not None}
    )
    check_inputs(job_dir, record, inputs(cfg))  # without benchmarks: the calibration data and the model files
    with staging(out_dir, weights_size(record)) as folder:
        loaded = load(job, cfg)
        torch.manual_seed(cfg.seed)
        report = sparsify_(loaded.model, job.pruning, calibrate(job, loaded, cfg))
        about = {
            "name": record.get("job"),  # not its folder: a path on the machine that exported it
            "metrics": record.get("metrics"),
            "benchmark": config.get("benchmark"),  # how the metrics were measured (scripts/check_export.py)
            "threads": threads,
        }
        write_into(folder, loaded.model, report, loaded.tokenizer, {"job": about, "pruning": config["pruning"]})
    log.info("Exported %s to %s", job_dir, out_dir)
    return out_dir


REBUILT_FROM = ("calibration",)  # the data files of `inputs` that the rebuild reads (not the benchmarks')
INPUTS_RECORDED = 3  # the results_version from which a record lists the data and model files it read


def check_empty(out_dir: Path) -> None:
    if out_dir.is_file() or (out_dir.is_dir() and any(out_dir.iterdir())):
        what = "is a file" if out_dir.is_file() else "is not empty"
        raise FileExistsError(f"{out_dir} {what}: export into a new folder (nothing is overwritten)")


def weights_size(record: dict) -> int:
    """The bytes of the job's weights (its parameters in its dtype), which the folder holds at least."""
    dtype = getattr(torch, record.get("dtype") or "", None)
    return (record.get("parameters") or 0) * dtype.itemsize if isinstance(dtype, torch.dtype) else 0


def check_inputs(job_dir: Path, record: dict, current: dict) -> None:
    """Refuse what resume refuses: a job whose calibration data or model files (`current`: the inputs the
    rebuild reads) are not the ones it recorded (the rebuild would be another model than the one its
    metrics measured), or whose record is too old to say. The benchmarks' data files, which the rebuild
    does not read, need not be there; nor need the record be of this results_version: from
    INPUTS_RECORDED on, a job rebuilds to the model it measured (what later versions changed, the
    planner refuses: `check_shared_masks`)."""
    version = record.get("results_version", 1)
    if version < INPUTS_RECORDED:
        raise ValueError(
            f"{job_dir}: written by results_version {version}, which did not record the data and model files "
            f"it read (from {INPUTS_RECORDED} on); run the job again to export it"
        )

    def rebuilt_from(inputs: dict) -> dict:  # the version is checked above
        data = {key: value for key, value in (inputs.get("data") or {}).items() if key in REBUILT_FROM}
        return {**{key: value for key, value in inputs.items() if key != "version"}, "data": data}

    recorded = (record.get("config") or {}).get("inputs") or {}
    record = {**record, "config": {**record.get("config", {}), "inputs": rebuilt_from(recorded)}}
    current = {"inputs": rebuilt_from(current)}
    if not results.same_settings(record["config"], current):
        raise ValueError(
            f"{job_dir} holds a finished job with {results.differences(record, current)}: its calibration data or model "
            f"files changed since it ran, and a model rebuilt from them is not the one it measured; run it again"
        )


@contextmanager
def staging(out_dir: Path, needed: int = 0):
    """A folder to write into, renamed to `out_dir` once complete and removed where the write fails:
    `.<name>.export/model` beside it, held by one writer at a time (the lock of `.<name>.export`, which
    a writer that died leaves stale). Checked writable, with `needed` bytes free, on entry."""
    out_dir = out_dir.absolute()  # "." has a name and a parent too
    root = out_dir.parent / f".{out_dir.name}.export"
    with ExitStack() as stack:
        stack.callback(remove_empty, root)  # last, once the lock is gone
        try:
            stack.enter_context(JobLock(root))
        except Busy as error:  # a dead writer's lock is taken over instead
            who = f"pid {error.holder['pid']} on {error.holder.get('host')}" if "pid" in error.holder else "a process"
            raise FileExistsError(f"{out_dir}: another export ({who}) is writing it; try again once it ends") from None
        except OSError as error:
            raise OSError(f"{out_dir}: cannot write in {out_dir.parent} ({error})") from None
        check_empty(out_dir)  # a writer that held the lock before this one may have written it
        folder = root / "model"
        shutil.rmtree(folder, ignore_errors=True)  # what a writer that died left
        folder.mkdir()
        stack.callback(shutil.rmtree, folder, ignore_errors=True)
        free = shutil.disk_usage(folder).free
        if free < needed:
            raise OSError(errno.ENOSPC, f"{out_dir.parent}: {free} bytes free, the weights need {needed}")
        yield folder
        for path in folder.rglob("*"):  # safetensors writes its files 0600: teammates read them too
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~UMASK)
        try:
            os.rename(folder, out_dir)  # atomic; onto an empty folder too, never onto a non-empty one
        except OSError as error:
            raise FileExistsError(f"{out_dir} is not empty or cannot be written ({error}): nothing written") from None


def remove_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:  # another export holds it now
        pass


def write_folder(model, report, tokenizer, out_dir: str | Path, about: dict) -> None:
    """Write `model`, pruned by `sparsify_` (its `report`), as a Hugging Face folder `out_dir` (new, or
    empty); `about` (what made it) goes into config.actprune beside the layers."""
    with staging(Path(out_dir)) as folder:
        write_into(folder, model, report, tokenizer, about)


def write_into(out_dir: Path, model, report, tokenizer, about: dict) -> None:
    wrapped = {name: layer for name, layer in report.layers.items() if isinstance(layer, ActSparseLinear)}
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
        # A model type of its own: without trust_remote_code transformers refuses the folder instead of
        # loading the base class with the pruned projections (stored as `*.linear.weight`) at random.
        settings["model_type"] = f"actprune_{settings['model_type']}"
        settings["auto_map"] = {
            "AutoConfig": f"{RUNTIME.stem}.ActPruneConfig",
            "AutoModelForCausalLM": f"{RUNTIME.stem}.ActPruneForCausalLM",
        }
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
    except (OSError, ValueError) as error:
        parser.exit(2, f"actprune-export: {error}\n")
    print(args.out_dir)
