"""Tiny random models built in the tests, one per architecture family."""

import torch
from transformers import AutoModelForCausalLM, Gemma3Config, Gemma3TextConfig, LlamaConfig, Qwen2Config

SHAPE = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


def _randomize_biases(model):
    """transformers zero-initialises biases; random ones make 'bias kept' testable."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(0, 0.5)
    return model


def llama(**overrides):
    return AutoModelForCausalLM.from_config(LlamaConfig(**{**SHAPE, **overrides})).eval()


def qwen2(**overrides):
    """Qwen2 has biases on q/k/v: the earlier code dropped them."""
    return _randomize_biases(AutoModelForCausalLM.from_config(Qwen2Config(**{**SHAPE, **overrides}))).eval()


def gemma3_multimodal():
    text = dict(SHAPE, head_dim=16)
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=28, patch_size=14
    )
    return AutoModelForCausalLM.from_config(
        Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)
    ).eval()


def gemma3_text(**overrides):
    """Gemma-3 alternates sliding-window and full-attention layers (other masks and RoPE bases)."""
    shape = dict(SHAPE, head_dim=16, sliding_window=8, layer_types=None)
    shape.update(overrides)
    if shape["layer_types"] is None:  # every second layer full attention, as with sliding_window_pattern=2
        shape["layer_types"] = [
            "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(shape["num_hidden_layers"])
        ]
    return AutoModelForCausalLM.from_config(Gemma3TextConfig(**shape)).eval()
