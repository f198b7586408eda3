"""Speed of activation sparsity per layer: dense F.linear vs the sparse kernels, side by side in one run.

Decode: for each projection of SmolLM2-135M, Llama-2-7B and Llama-3-8B (random weights) × pattern × batch
of rows × mask scope (`token`: each row its own mask; `step`: the rows share one, on their mean score), one JSON line with dense_ms (F.linear, cuBLAS), sparse_ms (`actprune.kernels.sparse_linear`,
selection included), the speed-up, and the fraction of the device's memory bandwidth each reached: the
bytes it must read (the weight columns some row keeps, and x) over its time, against the bandwidth of a
large device-to-device copy measured in the same run. The weights rotate through copies larger than the
L2 cache, so every call reads them from memory as a decode step does. Prefill: 2:4 at 2048 tokens per
shape, dense F.linear vs mask + `semi_structured_linear` (compression included), or why it cannot run.
End to end: SmolLM2-135M-Instruct greedy decoding with the KV cache (the `generate` benchmark's `measure`:
the built-in prompts, the pruned model and its dense layers interleaved), pruned by activation magnitude
at each N:M pattern and, where calibration text is at hand (`--data-dir`), a 50% threshold; through the
kernels on CUDA, emulated on CPU.

End to end with random weights (`--parts end_to_end_random`, no model files needed: what a bare GPU machine
can run): SmolLM2-135M's architecture, random weights, greedy decoding of `--new-tokens` after 32 random
tokens for each batch and scope, dense (cuBLAS) vs `backend=kernel` vs `backend=emulate` interleaved, and how
close the kernel's logits are to the emulation's over a prefill and 8 decode steps.

Without CUDA the kernels cannot run: the decode lines time the emulation instead (`ActSparseLinear` vs
F.linear, "backend": "emulate"), and a line says that kernel times need a GPU. Nothing is estimated.

    python scripts/bench_speed.py --quick                   # SmolLM2-135M shapes only
    python scripts/bench_speed.py --shapes llama-3-8b --patterns dense,2:4 --batches 1
    python scripts/bench_speed.py --parts end_to_end --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from actprune.activation import ActSparseLinear
from actprune.kernels import decode_unavailable, layout_weight, sparse_linear
from actprune.kernels.prefill import semi_structured_linear, semi_structured_unavailable
from actprune.masks import parse_sparsity, pooled_scores, topk_keep_mask

MODELS = {  # hidden, intermediate, key/value width (grouped-query attention)
    "smollm2-135m": (576, 1536, 192),
    "llama-2-7b": (4096, 11008, 4096),
    "llama-3-8b": (4096, 14336, 1024),
}
PATTERNS = "dense,0.5,2:4,8:16,16:32"  # 0.5: a threshold at the median score (TEAL-like), not a per-token top-k
MAX_COPIES = 512


def projections(hidden: int, intermediate: int, kv: int) -> dict[str, tuple[int, int]]:
    """(in, out) of the seven projections of a decoder layer."""
    return {
        "q_proj": (hidden, hidden),
        "k_proj": (hidden, kv),
        "v_proj": (hidden, kv),
        "o_proj": (hidden, hidden),
        "gate_proj": (hidden, intermediate),
        "up_proj": (hidden, intermediate),
        "down_proj": (intermediate, hidden),
    }


SCOPE_POOL = {
    "token": None,
    "step": "mean",
}  # mask_scope -> the pool of sparse_linear (step: pruning.mask_pool's default)


def selection(pattern: str, x: torch.Tensor, scope: str = "token") -> tuple[dict, torch.Tensor]:
    """sparse_linear's arguments for `pattern` on x at `scope`, and the keep mask they give."""
    pool = SCOPE_POOL[scope] if x.shape[0] > 1 else None
    scores = pooled_scores(x.abs(), pool)
    if pattern == "dense":
        return {}, torch.ones_like(x, dtype=torch.bool)
    extra = {"pool": pool} if pool else {}
    if ":" in pattern:
        n, m = map(int, pattern.split(":"))
        return {"n": n, "m": m, **extra}, topk_keep_mask(scores, n, m).expand(x.shape)
    threshold = scores.float().flatten().quantile(float(pattern)).to(x.dtype)
    return {"threshold": threshold, **extra}, (scores >= threshold).expand(x.shape)


class GraphTimer:
    """Per-call GPU time of `calls` run back to back: replayed as one CUDA graph (no Python launch cost, as in
    a graph-captured decode step) when capture works, else launched eagerly; `mode` says which."""

    def __init__(self, calls):
        self.calls = calls
        for call in calls:  # warm-up: compiles the Triton kernels before any capture
            call()
        torch.cuda.synchronize()
        try:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                for call in calls:
                    call()
            self.mode = "cuda_graph"
        except RuntimeError:
            self.graph, self.mode = None, "eager"

    def __call__(self) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        if self.graph is not None:
            self.graph.replay()
        else:
            for call in self.calls:
                call()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / len(self.calls)


class Eager:
    """GPU time of one eager call: prefill calls are long enough that launching costs little."""

    def __init__(self, call):
        self.call = call
        call()

    def __call__(self) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        self.call()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)


def cpu_ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000


def interleaved(timers, repeats: int) -> list[float]:
    """Median of each timer over `repeats` rounds that run them in turn, so clock drifts hit all alike."""
    times = [[] for _ in timers]
    for _ in range(repeats):
        for timer, series in zip(timers, times):
            series.append(timer())
    return [statistics.median(series) for series in times]


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second of a 1 GiB device-to-device copy (each byte read once and written once)."""
    source = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    timer = GraphTimer([lambda: target.copy_(source)])
    seconds = interleaved([timer], 10)[0] / 1000
    return 2 * source.numel() / seconds


def runs(args):
    """(pattern, batch, scope) of each decode measurement: `step` only where it differs (several rows, a pattern)."""
    return [
        (pattern, batch, scope)
        for pattern in args.patterns
        for batch in args.batches
        for scope in args.scopes
        if scope == "token" or (batch > 1 and pattern != "dense")
    ]


def emit(**line) -> None:
    print(json.dumps(line), flush=True)


def bench_decode_cuda(args, device, dtype, base: dict) -> None:
    bandwidth = copy_bandwidth(device)
    emit(**base, part="bandwidth", reference="device-to-device copy of 1 GiB", gb_per_s=round(bandwidth / 1e9, 1))
    reason = decode_unavailable(device, dtype)
    if reason is not None:
        emit(**base, part="decode", unavailable=reason)
        return
    flush_bytes = 4 * torch.cuda.get_device_properties(device).L2_cache_size
    size = torch.finfo(dtype).bits // 8
    for model in args.shapes:
        for projection, (width, out) in projections(*MODELS[model]).items():
            copies = min(MAX_COPIES, max(2, math.ceil(flush_bytes / (width * out * size))))
            weights = [torch.randn(out, width, device=device, dtype=dtype) / width**0.5 for _ in range(copies)]
            laid_out = [layout_weight(weight) for weight in weights]
            for pattern, batch, scope in runs(args):
                x = torch.randn(batch, width, device=device, dtype=dtype)
                kwargs, keep = selection(pattern, x, scope)
                dense = GraphTimer([lambda w=w: F.linear(x, w) for w in weights])
                sparse = GraphTimer([lambda w=w: sparse_linear(x, w, **kwargs) for w in laid_out])
                dense_ms, sparse_ms = interleaved([dense, sparse], args.repeats)
                x_bytes = x.numel() * size
                sparse_bytes = int(keep.any(0).sum()) * out * size + x_bytes
                dense_bytes = width * out * size + x_bytes
                emit(
                    **base,
                    part="decode",
                    backend="triton",
                    model=model,
                    projection=projection,
                    shape={"in": width, "out": out},
                    pattern=pattern,
                    batch=batch,
                    mask_scope=scope,
                    kept_columns=round(float(keep.any(0).float().mean()), 4),
                    dense_ms=round(dense_ms, 5),
                    sparse_ms=round(sparse_ms, 5),
                    speedup=round(dense_ms / sparse_ms, 3),
                    bandwidth_fraction=round(sparse_bytes / (sparse_ms / 1000) / bandwidth, 3),
                    dense_bandwidth_fraction=round(dense_bytes / (dense_ms / 1000) / bandwidth, 3),
                    timing=dense.mode if dense.mode == sparse.mode else f"{dense.mode}/{sparse.mode}",
                )
            del weights, laid_out


def bench_decode_emulated(args, device, dtype, base: dict) -> None:
    emit(
        **base,
        part="decode",
        note="kernel times need a CUDA GPU: these lines time the emulation "
        "(ActSparseLinear) against F.linear on this device, not the Triton kernels",
    )
    for model in args.shapes:
        for projection, (width, out) in projections(*MODELS[model]).items():
            linear = nn.Linear(width, out, bias=False, device=device, dtype=dtype)
            for pattern, batch, scope in runs(args):
                wrapped = ActSparseLinear(
                    linear, parse_sparsity(0.0 if pattern == "dense" else pattern), mask_scope=scope
                )
                x = torch.randn(batch, width, device=device, dtype=dtype)  # an inference tensor: no mask reuse
                kwargs, keep = selection(pattern, x, scope)
                wrapped.set_threshold(kwargs.get("threshold"))
                wrapped(x)  # warm-up
                dense_ms, sparse_ms = interleaved(
                    [lambda: cpu_ms(lambda: F.linear(x, linear.weight)), lambda: cpu_ms(lambda: wrapped(x))],
                    args.repeats,
                )
                emit(
                    **base,
                    part="decode",
                    backend="emulate",
                    model=model,
                    projection=projection,
                    shape={"in": width, "out": out},
                    pattern=pattern,
                    batch=batch,
                    mask_scope=scope,
                    kept_columns=round(float(keep.any(0).float().mean()), 4),
                    dense_ms=round(dense_ms, 4),
                    sparse_ms=round(sparse_ms, 4),
                    speedup=round(dense_ms / sparse_ms, 3),
                )


def bench_prefill(args, device, dtype, base: dict) -> None:
    tokens = args.prefill_tokens
    for model in args.shapes:
        for projection, (width, out) in projections(*MODELS[model]).items():
            line = dict(
                base,
                part="prefill",
                pattern="2:4",
                model=model,
                projection=projection,
                shape={"in": width, "out": out},
                tokens=tokens,
            )
            reason = semi_structured_unavailable(tokens, width, out, dtype, device)
            if reason is not None:
                emit(**line, unavailable=reason)
                continue
            x = torch.randn(tokens, width, device=device, dtype=dtype)
            weight = torch.randn(out, width, device=device, dtype=dtype) / width**0.5
            pruned = x * topk_keep_mask(x.abs(), 2, 4)
            timers = [
                Eager(lambda: F.linear(x, weight)),
                Eager(lambda: semi_structured_linear(x * topk_keep_mask(x.abs(), 2, 4), weight)),
                Eager(lambda: semi_structured_linear(pruned, weight)),
            ]
            dense_ms, sparse_ms, compressed_mm_ms = interleaved(timers, args.repeats)
            emit(
                **line,
                dense_ms=round(dense_ms, 4),
                sparse_ms=round(sparse_ms, 4),
                compressed_mm_ms=round(compressed_mm_ms, 4),
                speedup=round(dense_ms / sparse_ms, 3),
            )


def bench_end_to_end(args, device, dtype, base: dict) -> None:
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from actprune.app import CONF_DIR
    from actprune.eval.generate import PROMPTS, measure
    from actprune.run.job import calibrate, load, plan_job, prune

    backend = "kernel" if device.type == "cuda" else "emulate"  # the interpreter would time Python, not a kernel
    settings = [{"sparsity": p} for p in args.patterns if ":" in p]
    if args.data_dir:
        settings += [
            {"sparsity": float(p), "selection": "threshold"} for p in args.patterns if p[0].isdigit() and ":" not in p
        ]
    for setting in settings:
        overrides = [
            f"device={device}",
            f"model.dtype={str(dtype).removeprefix('torch.')}",
            "logger=none",
            "pruning=act_magnitude",
            f"pruning.backend={backend}",
            *[f"pruning.{k}={v}" for k, v in setting.items()],
            *([f"paths.data_dir={args.data_dir}", "calibration.corpus=wikitext2_validation"] if args.data_dir else []),
        ]
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=overrides)
        with open_dict(cfg):
            cfg.paths.output_dir = None  # no job folder: nothing is written
        job = plan_job(cfg, Path.cwd())
        loaded = load(job, cfg)  # loaded once: later settings reuse it
        report = prune(job, loaded, calibrate(job, loaded, cfg))
        try:
            result = measure(loaded.model, loaded.tokenizer, PROMPTS, args.new_tokens, args.e2e_repeats)
        finally:
            report.restore_(loaded.model)
        emit(
            **base,
            part="end_to_end",
            backend=backend,
            model="SmolLM2-135M-Instruct",
            pattern=str(setting["sparsity"]),
            selection=setting.get("selection", "topk"),
            prompts=len(PROMPTS),
            new_tokens=args.new_tokens,
            dense_tokens_per_s=round(result["dense"]["decode_tokens_per_s"], 2),
            pruned_tokens_per_s=round(result["decode_tokens_per_s"], 2),
            speedup=round(result["decode_speedup"], 3),
        )


# SmolLM2-135M-Instruct's shape (conf/model/smollm2_135m.yaml's GGUF; its 98 MB do not travel to a bare machine).
SMOLLM2_SHAPE = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=8192,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)


def bench_end_to_end_random(args, device, dtype, base: dict) -> None:
    import contextlib
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    from actprune import sparsify_
    from actprune.activation.wrapper import not_counting
    from actprune.eval.generate import _cache_of, greedy

    backend = "kernel" if device.type == "cuda" else "emulate"
    dense = LlamaForCausalLM(LlamaConfig(**SMOLLM2_SHAPE)).to(device, dtype).eval()
    for pattern, batch, scope in runs(args):
        if ":" not in pattern:
            continue
        pruned = {}
        for name in dict.fromkeys([backend, "emulate"]):
            pruned[name] = copy.deepcopy(dense)
            sparsify_(
                pruned[name], {"method": "act_magnitude", "sparsity": pattern, "backend": name, "mask_scope": scope}
            )
        ids = torch.randint(0, SMOLLM2_SHAPE["vocab_size"], (batch, 32), device=device)
        with torch.no_grad():  # the logits of a prefill and 8 cached decode steps, each backend
            logits = {}
            for name, model in pruned.items():
                output = model(ids, use_cache=True)
                steps = [output.logits[:, -1]]
                for _ in range(8):
                    output = model(output.logits[:, -1:].argmax(-1), use_cache=True, **_cache_of(output))
                    steps.append(output.logits[:, -1])
                logits[name] = torch.stack(steps).float()
        reference = logits["emulate"]
        timed = {"dense": lambda: greedy(dense, ids, args.new_tokens)}
        timed |= {name: (lambda m=model: greedy(m, ids, args.new_tokens)) for name, model in pruned.items()}
        for run in timed.values():  # warm-up: compiles the kernels
            with not_counting(pruned[backend]):
                run()
        seconds = {name: [] for name in timed}
        for _ in range(args.e2e_repeats):
            for name, run in timed.items():
                with not_counting(pruned[name]) if name != "dense" else contextlib.nullcontext():
                    seconds[name].append(run()["decode_s"])
        per_s = {name: batch * (args.new_tokens - 1) / statistics.median(values) for name, values in seconds.items()}
        emit(
            **base,
            part="end_to_end_random",
            model="SmolLM2-135M shape, random weights",
            pattern=pattern,
            batch=batch,
            mask_scope=scope,
            new_tokens=args.new_tokens,
            tokens_per_s={name: round(value, 1) for name, value in per_s.items()},
            speedup=round(per_s[backend] / per_s["dense"], 3),
            backend=backend,
            logits_max_relative_difference=round(
                float((logits[backend] - reference).abs().max() / reference.abs().max()), 5
            ),
            same_argmax=round(float((logits[backend].argmax(-1) == reference.argmax(-1)).float().mean()), 4),
        )
        del pruned


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--shapes", default=",".join(MODELS), help=f"models among {', '.join(MODELS)}")
    parser.add_argument("--patterns", default=PATTERNS, help="dense, N:M, or a fraction (threshold at that quantile)")
    parser.add_argument("--batches", default="1,4,8", help="rows per decode call, 1 to 8")
    parser.add_argument("--scopes", default="token,step", help="mask scopes: token (a mask per row), step (shared)")
    parser.add_argument("--repeats", type=int, default=None, help="default: 30 on CUDA, 10 on CPU")
    parser.add_argument("--prefill-tokens", type=int, default=2048)
    parser.add_argument("--quick", action="store_true", help="SmolLM2-135M shapes only")
    parser.add_argument("--parts", default="decode,prefill,end_to_end", help="which parts to run")
    parser.add_argument("--data-dir", default=None, help="laid out like ../shared/data: calibration for the threshold")
    parser.add_argument("--new-tokens", type=int, default=32, help="end to end: tokens generated per prompt")
    parser.add_argument("--e2e-repeats", type=int, default=2, help="end to end: timed runs of every prompt")
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    args.shapes = ["smollm2-135m"] if args.quick else args.shapes.split(",")
    args.patterns = args.patterns.split(",")
    args.batches = [int(batch) for batch in args.batches.split(",")]
    args.scopes = args.scopes.split(",")
    args.repeats = args.repeats or (30 if cuda else 10)
    base = {"device": torch.cuda.get_device_name(device) if cuda else "cpu", "dtype": str(dtype).removeprefix("torch.")}
    torch.manual_seed(0)
    parts = args.parts.split(",")
    with torch.inference_mode():
        if "decode" in parts:
            (bench_decode_cuda if cuda else bench_decode_emulated)(args, device, dtype, base)
        if "prefill" in parts:
            bench_prefill(args, device, dtype, base)
    if "end_to_end" in parts:
        bench_end_to_end(args, device, dtype, base)
    if "end_to_end_random" in parts:
        bench_end_to_end_random(args, device, dtype, base)


if __name__ == "__main__":
    main()
