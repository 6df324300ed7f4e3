"""Facts read off a transformers model config, shared by the layers that look at a model's shape
(engines, tasks, model files, stats) without depending on one another."""

from __future__ import annotations

from typing import Any


def text_config(config: Any) -> Any:
    """The language model's own config: a multimodal config nests it, a plain one is it."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


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
