"""Facts read off a transformers model config, shared by the layers that look at a model's shape
(engines, tasks, model files, stats) without depending on one another."""

from __future__ import annotations

from typing import Any


def text_config(config: Any) -> Any:
    """The language model's own config: a multimodal config nests it, a plain one is it."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


# The model types whose layers the fast engine implements (engines/decoder.py)
SUPPORTED_TYPES = ("llama", "qwen2", "qwen3", "mistral")


# Rotary scalings that transformers picks per forward call from its longest sequence: batched,
# a row's result would depend on the rows beside it.
LENGTH_SCALED_ROPE = ("dynamic", "longrope")


def length_scaled_rope(config: Any) -> str | None:
    """The model's rope type where it scales by the sequence's length (dynamic, longrope)."""
    text = text_config(config)
    for key in ("rope_parameters", "rope_scaling"):
        params = getattr(text, key, None)
        if isinstance(params, dict):
            kind = params.get("rope_type", params.get("type"))
            if kind in LENGTH_SCALED_ROPE:
                return kind
    return None


# Architectures that carry a recurrent state from token to token (state-space, linear-attention,
# convolution or recurrent layers), wholly or beside attention: their cache is no KV cache
RECURRENT_TYPES = frozenset(
    {
        "bamba",
        "falcon_h1",
        "falcon_mamba",
        "granitemoehybrid",
        "jamba",
        "lfm2",
        "lfm2_moe",
        "mamba",
        "mamba2",
        "nemotron_h",
        "plamo2",
        "qwen3_next",
        "recurrent_gemma",
        "rwkv",
        "xlstm",
        "zamba",
        "zamba2",
    }
)
# words in a config's per-layer kinds (layer_types and its older names) of such layers
RECURRENT_LAYER_WORDS = (
    "mamba",
    "linear",
    "conv",
    "recurrent",
    "lstm",
    "rwkv",
    "ssm",
    "delta",
    "hybrid",
)


def recurrent_state(config: Any) -> str | None:
    """What makes the model carry a recurrent state between tokens (its model type, or the
    kinds of some of its layers), or None for a model whose only state is its KV cache."""
    text = text_config(config)
    kind = getattr(text, "model_type", None)
    if kind in RECURRENT_TYPES:
        return f"model type {kind}"
    for key in ("layer_types", "layers_block_type", "block_types"):
        kinds = getattr(text, key, None)
        if not isinstance(kinds, list | tuple):
            continue
        odd = sorted(
            {str(k) for k in kinds if any(w in str(k).lower() for w in RECURRENT_LAYER_WORDS)}
        )
        if odd:
            return f"its {key} name {', '.join(odd)} layers"
    return None
