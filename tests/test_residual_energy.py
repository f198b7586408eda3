"""scripts/residual_energy.py: the share of each layer's output held by its largest channels."""

import sys
from pathlib import Path

import torch

from .tiny import llama

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import residual_energy  # noqa: E402

WINDOWS = torch.randint(0, 256, (3, 10), generator=torch.Generator().manual_seed(0))


def test_the_shares_are_each_layers_output_energy_in_its_largest_channels_bos_left_out():
    model = llama()
    shares = residual_energy.energy_shares(model, WINDOWS, top=2)
    with torch.no_grad():
        states = [model(w[None], output_hidden_states=True).hidden_states for w in WINDOWS]
    assert len(shares) == len(states[0]) - 1  # one per decoder layer, the embeddings left out
    for index, share in enumerate(shares):
        energy = sum(s[index + 1][0, 1:].square().sum(0) for s in states)
        largest = energy.sort(descending=True).values
        torch.testing.assert_close(share["top1"], float(largest[0] / energy.sum()))
        torch.testing.assert_close(share["top2"], float(largest[:2].sum() / energy.sum()))
        assert share["channels"][0] == int(energy.argmax())


def test_one_massive_channel_holds_nearly_all_of_it():
    model = llama()
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 5] = 300.0  # every token carries it: a massive activation
    first = residual_energy.energy_shares(model, WINDOWS)[0]
    assert first["top1"] > 0.99 and first["channels"][0] == 5
