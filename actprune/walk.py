"""Where a model's decoder layers are, and how windows of tokens reach them.

`feed` runs the whole model over windows (hooks see every layer's inputs). `layer_by_layer` is the
one sequential loop: it goes decoder layer by decoder layer, letting a caller change each before the
next one runs (Wanda, SparseGPT, refit, learned corrections). `LayerInputs` gives every layer its
own true inputs there: the hidden states a caller chains through plus the attention mask and
position embeddings the model's own forward hands that layer (they differ between layers in
Gemma-3: sliding-window and full attention).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from tqdm.auto import tqdm


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The text decoder's layers and their qualified name (a multimodal model's vision tower excluded)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__}: cannot find its decoder layers (model.get_decoder().layers)")
    prefix = next(name for name, module in model.named_modules() if module is layers)
    return prefix, layers


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def feed(model: nn.Module, windows: torch.Tensor, desc: str | None = None) -> None:
    """Run `model` over each window of token ids in turn, one window per forward."""
    device = device_of(model)
    for window in tqdm(windows, desc=desc, unit="window", disable=desc is None):
        model(window[None].to(device), use_cache=False)


def layer_output(result):
    """A decoder layer's hidden states, whether it returns them alone or first in a tuple."""
    return result[0] if isinstance(result, tuple) else result


class _Stop(Exception):
    pass


class _Catcher(nn.Module):
    """Stands in for a decoder layer while inputs are captured: records them, runs nothing (the
    real layer's hooks do not fire), and answers attribute lookups as the layer would."""

    def __init__(self, layer: nn.Module, record):
        super().__init__()
        self.layer, self.record = layer, record

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("layer"), name)

    def forward(self, *args, **kwargs):
        return self.record(*args, **kwargs)


class LayerInputs:
    """Each decoder layer's inputs for `windows`, as the model's own forward passes them.

    `hidden[w]` is the first layer's input for window `w`; `run(i, hidden)` runs layer `i` on the
    given hidden states with its own other arguments and returns its outputs, the next layer's
    input. Capturing costs the embeddings only: stand-ins take the layers' place while it runs.
    """

    def __init__(self, model: nn.Module, windows: torch.Tensor):
        self.prefix, self.layers = decoder_layers(model)
        self.hidden: list[torch.Tensor] = []
        self.calls: list[list[tuple[bool, tuple, dict]]] = [[] for _ in self.layers]
        last = len(self.layers) - 1

        def recorder(index):
            def record(*args, **kwargs):
                positional = bool(args)
                hidden = args[0] if positional else kwargs.pop("hidden_states")
                if index == 0:
                    self.hidden.append(hidden)
                self.calls[index].append((positional, args[1:], kwargs))
                if index == last:
                    raise _Stop
                return hidden

            return record

        originals = list(self.layers)
        for index, layer in enumerate(originals):
            self.layers[index] = _Catcher(layer, recorder(index))
        try:
            with torch.no_grad():
                for window in windows:
                    try:
                        model(window[None].to(device_of(model)), use_cache=False)
                    except _Stop:
                        pass
        finally:
            for index, layer in enumerate(originals):
                self.layers[index] = layer

    def call(self, index: int, window: int, hidden: torch.Tensor):
        """Layer `index` on window `window`'s hidden states (with grad if enabled)."""
        positional, rest, kwargs = self.calls[index][window]
        layer = self.layers[index]
        if positional:
            return layer_output(layer(hidden, *rest, **kwargs))
        return layer_output(layer(*rest, hidden_states=hidden, **kwargs))

    def run(self, index: int, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.call(index, window, h) for window, h in enumerate(hidden)]

    def names(self, index: int, targets) -> list[str]:
        """The names among `targets` that lie in decoder layer `index`."""
        return [name for name in targets if name.startswith(f"{self.prefix}.{index}.")]


def layer_by_layer(
    model: nn.Module,
    windows: torch.Tensor,
    targets,
    visit,
    desc: str,
    streams: int = 1,
    context: contextlib.AbstractContextManager | None = None,
) -> None:
    """Go through the decoder layers in order, each fed the windows as the layers before it, already
    changed, produce them. `hidden` holds `streams` lists of per-window hidden states (e.g. a
    corrected sparse stream and the dense one); for each layer holding some of `targets`,
    `visit(walk, index, names, hidden)` changes those layers and returns the next layer's `hidden`;
    the other layers run each stream as it is (under `context`, e.g. an autocast). Only one decoder
    layer's inputs are held at a time."""
    walk = LayerInputs(model, windows)
    hidden = [walk.hidden] * streams
    for index in tqdm(range(len(walk.layers)), desc=desc, unit="layer"):
        names = walk.names(index, targets)
        if names:
            hidden = visit(walk, index, names, hidden)
        else:
            with torch.no_grad(), context or contextlib.nullcontext():
                hidden = [walk.run(index, stream) for stream in hidden]
