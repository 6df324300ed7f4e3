"""`batching.max_tokens: auto`: a token budget sized from free device memory and the model shape.

Per padded token a batch holds its KV cache (2 x layers x kv_heads x head_dim values, generate
only) and the activations of one layer at a time (hidden states, attention and MLP temporaries).
The budget is what fits in the free memory after the weights, with a safety margin; an
out-of-memory error still splits the batch, so the estimate only has to be close.
"""

from __future__ import annotations

import torch

CPU_TOKEN_BUDGET = 16384
GPU_MEMORY_SHARE = 0.80
MAX_AUTO_TOKENS = 1 << 20


def bytes_per_token(config, dtype: torch.dtype, generate: bool) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = text.hidden_size
    layers = text.num_hidden_layers
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    intermediate = getattr(text, "intermediate_size", None) or 4 * hidden
    width = torch.tensor([], dtype=dtype).element_size()
    activations = (6 * hidden + 3 * intermediate) * width
    kv_cache = 2 * layers * kv_heads * head_dim * width if generate else 0
    return activations + kv_cache


def auto_token_budget(config, device: torch.device, dtype: torch.dtype, generate: bool) -> int:
    """Padded tokens per batch that fit the device; a fixed modest budget on the CPU."""
    if device.type != "cuda":
        return CPU_TOKEN_BUDGET
    free, _ = torch.cuda.mem_get_info(device)
    budget = int(free * GPU_MEMORY_SHARE) // bytes_per_token(config, dtype, generate)
    return max(256, min(MAX_AUTO_TOKENS, budget))


def planning_budget(spec, config) -> int:
    """The budget `bulkinfer plan` assumes, without loading weights: weights are estimated from
    the model files' size."""
    if spec.batching.max_tokens != "auto":
        return spec.batching.max_tokens
    from bulkinfer.engines.hf import resolve_device, resolve_dtype
    from bulkinfer.model_files import model_identity

    device = resolve_device(spec.model.device)
    if device.type != "cuda":
        return CPU_TOKEN_BUDGET
    dtype = resolve_dtype(spec.model.dtype, device)
    weights = sum(model_identity(spec.model)["files"].values())
    free, _ = torch.cuda.mem_get_info(device)
    generate = spec.task.type == "generate"
    budget = int((free - weights) * GPU_MEMORY_SHARE) // bytes_per_token(config, dtype, generate)
    return max(256, min(MAX_AUTO_TOKENS, budget))
