"""Pruned vs dense forward of a 7B-shaped stack of the seven projections, side by side in one run.

Each setting times the same linears on the same inputs, dense and wrapped, interleaved, and prints
one JSON line: setting, device, dtype, shape, dense_ms, pruned_ms, ratio (pruned / dense).

    python scripts/bench_forward.py                 # CPU (fp32, 256 tokens), then CUDA if present (bf16, 2048)
    python scripts/bench_forward.py --device cuda   # one device only
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

from actprune.activation import ActSparseLinear
from actprune.masks import parse_sparsity


def stack(hidden: int, intermediate: int, device, dtype) -> dict[str, nn.Linear]:
    shapes = {
        "q_proj": (hidden, hidden),
        "k_proj": (hidden, hidden),
        "v_proj": (hidden, hidden),
        "o_proj": (hidden, hidden),
        "gate_proj": (hidden, intermediate),
        "up_proj": (hidden, intermediate),
        "down_proj": (intermediate, hidden),
    }
    return {name: nn.Linear(i, o, bias=False, device=device, dtype=dtype) for name, (i, o) in shapes.items()}


def forward(layers: dict[str, nn.Module], x_attn, x_o, x_mlp, x_down) -> None:
    """Inputs as in a decoder layer: q/k/v share one input, gate/up another."""
    for name in ("q_proj", "k_proj", "v_proj"):
        layers[name](x_attn)
    layers["o_proj"](x_o)
    layers["gate_proj"](x_mlp)
    layers["up_proj"](x_mlp)
    layers["down_proj"](x_down)


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", action="append", help="default: cpu, and cuda when present")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--tokens", type=int, default=None, help="default: 2048 on CUDA, 256 on CPU")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--repeats", type=int, default=None, help="default: 50 on CUDA, 7 on CPU")
    parser.add_argument("--settings", default="8:16,2:4,0.5")
    args = parser.parse_args()
    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    for device in devices:
        bench(torch.device(device), args)


@torch.no_grad()
def bench(device: torch.device, args) -> None:
    cuda = device.type == "cuda"
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    tokens = args.tokens or (2048 if cuda else 256)
    repeats = args.repeats or (50 if cuda else 7)
    torch.manual_seed(0)
    dense = stack(args.hidden, args.intermediate, device, dtype)
    inputs = [
        torch.randn(tokens, width, device=device, dtype=dtype)
        for width in (args.hidden, args.hidden, args.hidden, args.intermediate)
    ]
    for setting in args.settings.split(","):
        pattern = parse_sparsity(setting)
        pruned = {name: ActSparseLinear(linear, pattern) for name, linear in dense.items()}
        for _ in range(2):  # warm-up: allocator, kernels, caches
            forward(dense, *inputs)
            forward(pruned, *inputs)
        dense_ms, pruned_ms = [], []
        for _ in range(repeats):  # interleaved, so drifts in clock speed hit both alike
            dense_ms.append(timed(lambda: forward(dense, *inputs), device))
            pruned_ms.append(timed(lambda: forward(pruned, *inputs), device))
        dense_median, pruned_median = statistics.median(dense_ms), statistics.median(pruned_ms)
        print(
            json.dumps(
                {
                    "setting": setting,
                    "device": torch.cuda.get_device_name(device) if cuda else "cpu",
                    "dtype": str(dtype).removeprefix("torch."),
                    "shape": {
                        "tokens": tokens,
                        "hidden": args.hidden,
                        "intermediate": args.intermediate,
                        "projections": 7,
                    },
                    "threads": torch.get_num_threads(),
                    "dense_ms": round(dense_median, 3),
                    "pruned_ms": round(pruned_median, 3),
                    "ratio": round(pruned_median / dense_median, 3),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
