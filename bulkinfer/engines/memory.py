"""How many tokens fit: the token budget of `batching.max_tokens: auto` and the fast engine's KV
pool, both from the model's shape and the device memory left once the weights are in.

Per padded token a batch holds its KV cache (2 x layers x kv_heads x head_dim values, generate
only) and the activations of one layer at a time (hidden states, attention and MLP temporaries).
The budget is what fits in the free memory after the weights, with a safety margin; an
out-of-memory error still splits the batch, so the estimate only has to be close. Plain
arithmetic on the config (no torch), so `bulkinfer plan` computes the same numbers as a run.
"""

from __future__ import annotations

from typing import Any

from bulkinfer.configs import text_config

CPU_TOKEN_BUDGET = 16384
GPU_MEMORY_SHARE = 0.80
MAX_AUTO_TOKENS = 1 << 20
MIN_AUTO_TOKENS = 256
PREFILL_TOKENS = 16384  # tokens per prefill forward of the fast engine
# of the free memory after the fast engine's per-step working memory: an 8B job on an H200
# with 0.93 peaked at 129.9 of 139.8 GiB reserved (scripts/profile_job.py); at 0.85 its KV
# pool held 922 rows of 1,024 slots on average, at 0.93 971
GPU_POOL_SHARE = 0.92
MIN_POOL_TOKENS = 4096


def kv_bytes_per_token(config: Any, width: int, fp8: bool = False) -> int:
    """Bytes of keys and values one token keeps, over all layers (`fp8`: a byte a value and a
    float32 scale a head vector, model.kv_cache_dtype: fp8)."""
    text = text_config(config)
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    per_head = head_dim + 4 if fp8 else head_dim * width
    return 2 * text.num_hidden_layers * kv_heads * per_head


def fp8_saved_bytes(config: Any, width: int) -> int:
    """Device bytes model.quantization: fp8 frees once the weights are in: every decoder
    layer's q/k/v/o and MLP matrices go from `width` bytes a value to one (their float32
    scales, one per output channel, are a rounding error)."""
    text = text_config(config)
    hidden = text.hidden_size
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    intermediate = getattr(text, "intermediate_size", None) or 4 * hidden
    attention = hidden * head_dim * (2 * heads + 2 * kv_heads)
    per_layer = attention + 3 * hidden * intermediate
    return text.num_hidden_layers * per_layer * max(0, width - 1)


def resident_weight_bytes(
    config: Any,
    file_bytes: int,
    width: int,
    quantize: bool,
    stored_fp8: bool,
    file_width: int | None = None,
) -> int:
    """Device bytes a model's weights take once loaded, from its files' size: scaled from the
    files' dtype (`file_width` bytes a value) to the run's (`width`: a bf16 checkpoint run in
    float32 takes twice its files), less the bytes model.quantization: fp8 (`quantize`) frees,
    unless the files already hold those matrices in fp8 (`stored_fp8`: a 70B fp8 checkpoint's
    72 GB stay 72 GB)."""
    if file_width and not stored_fp8 and file_width != width:
        file_bytes = file_bytes * width // file_width
    if quantize and not stored_fp8:
        return max(0, file_bytes - fp8_saved_bytes(config, width))
    return file_bytes


def bytes_per_token(config: Any, width: int, generate: bool) -> int:
    """Device bytes one padded token of a batch costs; `width` is the dtype's size in bytes."""
    text = text_config(config)
    hidden = text.hidden_size
    intermediate = getattr(text, "intermediate_size", None) or 4 * hidden
    activations = (6 * hidden + 3 * intermediate) * width
    return activations + (kv_bytes_per_token(config, width) if generate else 0)


def memory_token_budget(config: Any, width: int, free_bytes: int | None, generate: bool) -> int:
    """Padded tokens per batch that fit `free_bytes`; a fixed modest budget on the CPU (None)."""
    if free_bytes is None:
        return CPU_TOKEN_BUDGET
    budget = int(free_bytes * GPU_MEMORY_SHARE) // bytes_per_token(config, width, generate)
    return max(MIN_AUTO_TOKENS, min(MAX_AUTO_TOKENS, budget))


def kv_pool_tokens(config: Any, width: int, slots: int, free_bytes: int, fp8: bool = False) -> int:
    """Tokens of the fast engine's KV pool on a GPU: what is left after one step's working
    memory (step logits, a prefill forward, a GiB of slack), with a margin."""
    text = text_config(config)
    working = (
        slots * text.vocab_size * 16  # step logits (bf16 + float32) and sampling temporaries
        + PREFILL_TOKENS * bytes_per_token(config, width, False)
        + PREFILL_TOKENS * text.hidden_size * 4
        + (1 << 30)
    )
    per_token = kv_bytes_per_token(config, width, fp8)
    return max(MIN_POOL_TOKENS, int((free_bytes - working) * GPU_POOL_SHARE) // per_token)
