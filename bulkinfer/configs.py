"""Facts read off a transformers model config, shared by the layers that look at a model's shape
(engines, tasks, model files, stats) without depending on one another."""

from __future__ import annotations

from typing import Any


def text_config(config: Any) -> Any:
    """The language model's own config: a multimodal config nests it, a plain one is it."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config
