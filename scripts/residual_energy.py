"""How much of each decoder layer's output (the residual stream) lies in its largest channels.

    python scripts/residual_energy.py model=gemma3_270m paths.data_dir=../shared/data [calibration.corpus=c4]

Takes the job's Hydra overrides (model, paths, calibration), runs the dense model over `--windows`
(4) windows of the calibration corpus, drawn as calibration draws them, and prints, per layer, the share of the mean square of its
output held by the largest channel and by the five largest, and which channels they are. A layer
whose output is mostly one channel makes an MSE against it mostly that channel's error (learned
corrections' `objective`, docs/methods.md). The first token of each window (BOS) is left out;
the last entry is after the final norm, as transformers returns it.
"""

import argparse
from pathlib import Path

import torch


@torch.no_grad()
def energy_shares(model, windows: torch.Tensor, top: int = 5) -> list[dict]:
    """Per hidden state after the embeddings (each decoder layer's output), the share of its mean
    square over tokens held by its largest channel and by its `top` largest."""
    device = next(model.parameters()).device
    totals = None
    for window in windows:
        states = model(window[None].to(device), output_hidden_states=True, use_cache=False).hidden_states[1:]
        squares = [h[0, 1:].float().square().sum(0).cpu() for h in states]
        totals = squares if totals is None else [a + b for a, b in zip(totals, squares)]
    shares = []
    for energy in totals:
        order = energy.argsort(descending=True)
        shares.append(
            {
                "top1": float(energy[order[0]] / energy.sum()),
                f"top{top}": float(energy[order[:top]].sum() / energy.sum()),
                "channels": order[:3].tolist(),
            }
        )
    return shares


def main() -> None:
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from actprune.app import CONF_DIR
    from actprune.calibration import corpus_text, sample_windows
    from actprune.run.job import load, plan_job

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=4, help="calibration windows to average over")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the job (model=..., paths.data_dir=...)")
    args = parser.parse_args()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[*args.overrides, "logger=none"])
    with open_dict(cfg):
        cfg.paths.output_dir = None  # no job folder: nothing is written
    loaded = load(plan_job(cfg, Path.cwd()), cfg)
    text, corpus = corpus_text(cfg.calibration.corpus, cfg.paths.data_dir, cfg.paths.cache_dir)
    windows = sample_windows(loaded.tokenizer, text, args.windows, cfg.calibration.seqlen, cfg.calibration.seed)
    print(f"{cfg.model.path}: {args.windows} windows of {cfg.calibration.seqlen} tokens of {corpus}")
    shares = energy_shares(loaded.model, windows)
    for index, share in enumerate(shares):
        where = " (after the final norm)" if index == len(shares) - 1 else ""
        print(f"layer {index}{where}: top1 {share['top1']:.2f}, top5 {share['top5']:.2f}, channels {share['channels']}")


if __name__ == "__main__":
    main()
