"""The layer-by-layer walk gives each decoder layer exactly the inputs of the model's own forward."""

import pytest
import torch

from actprune.walk import LayerInputs, decoder_layers

from .tiny import gemma3_multimodal, gemma3_text, llama, qwen2


def hooked_inputs(model, windows):
    """Each decoder layer's input hidden states in a plain full forward."""
    _, layers = decoder_layers(model)
    seen = [[] for _ in layers]
    handles = [
        layer.register_forward_pre_hook(
            lambda module, args, kwargs, i=i: seen[i].append(args[0] if args else kwargs["hidden_states"]),
            with_kwargs=True,
        )
        for i, layer in enumerate(layers)
    ]
    try:
        with torch.no_grad():
            for window in windows:
                model(window[None], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return seen


@pytest.mark.parametrize("build", [llama, qwen2, gemma3_text, gemma3_multimodal])
def test_chained_layers_reproduce_the_full_forward(build):
    model = build(num_hidden_layers=4) if build is not gemma3_multimodal else build()
    windows = torch.randint(5, 200, (2, 40))
    expected = hooked_inputs(model, windows)
    walk = LayerInputs(model, windows)
    hidden = walk.hidden
    with torch.no_grad():
        for index in range(len(walk.layers)):
            for window, h in enumerate(hidden):
                torch.testing.assert_close(h, expected[index][window], rtol=0, atol=1e-6)
            hidden = walk.run(index, hidden)
    _, layers = decoder_layers(model)
    assert all(type(layer).__name__.endswith("DecoderLayer") for layer in layers)  # the real layers are back


def test_gemma3_layers_differ_in_their_attention_arguments():
    """Sliding-window and full-attention layers get other masks and positions: not those of layer 0."""
    model = gemma3_text(num_hidden_layers=4, sliding_window=8)
    walk = LayerInputs(model, torch.randint(5, 200, (1, 40)))
    types = model.config.layer_types
    assert len(set(types)) == 2
    full = types.index("full_attention")
    first, other = walk.calls[0][0][2], walk.calls[full][0][2]
    assert not torch.equal(first["position_embeddings"][0], other["position_embeddings"][0])
