"""The batch budget: the only reader of `batching.*`, for `bulkinfer plan` and `bulkinfer run`.

From the spec's numbers, or with `auto` from what the engine will be able to do
(`EngineLimits`, known before any weights load) and the model's shape, it gives the planner its
`TokenBudget`. Plan and run call it with the same limits, so they plan the same batches.
"""

from __future__ import annotations

from typing import Any

from bulkinfer.engines.base import EngineLimits
from bulkinfer.engines.memory import memory_token_budget
from bulkinfer.planner import TokenBudget
from bulkinfer.spec import BatchingSpec

DEFAULT_BATCH_ROWS = 256
# The fast engine on a GPU packs scoring rows without padding, so the token budget alone sizes
# a batch: at 256 rows, 32,000 prompts of ~300 tokens made 127 batches of a 1M-token budget
# instead of 23, each with its own host work (0.5B shape on an H200: 0.2 s more outside the
# model, same model time).
SCORE_BATCH_ROWS = 8192
# The fast engine's generate batch is a unit of checkpointing, not of memory (rows wait for a
# slot): enough rows to keep every decode slot busy until the batch's last ones drain, and
# several KV pools' worth of tokens.
GENERATE_SLOTS_PER_BATCH = 4
GENERATE_POOLS_PER_BATCH = 4


def token_budget(
    batching: BatchingSpec,
    limits: EngineLimits,
    config: Any,
    new_tokens_per_row: int,
    recorded: dict | None = None,
) -> TokenBudget:
    """The planner's budget. `recorded` holds a job's `max_tokens` and `max_batch_size` as its
    first run resolved them (job.json): a resume keeps them, so it plans the very same batches."""
    generate = new_tokens_per_row > 0
    recorded = recorded or {}
    tokens = recorded.get("max_tokens") or max_tokens(batching, limits, config, generate)
    rows = recorded.get("max_batch_size") or max_batch_size(batching, limits, generate)
    return TokenBudget(tokens, rows, new_tokens_per_row, batching.max_padding, not limits.pads)


def max_tokens(batching: BatchingSpec, limits: EngineLimits, config: Any, generate: bool) -> int:
    """Padded tokens per batch: the spec's, or with auto what the device's free memory holds
    (a fixed budget on the CPU), several KV pools for the fast engine's generate on a GPU."""
    if batching.max_tokens != "auto":
        return batching.max_tokens
    if generate and limits.kind == "fast" and limits.kv_tokens is not None:
        return GENERATE_POOLS_PER_BATCH * limits.kv_tokens
    return memory_token_budget(config, limits.dtype_bytes, limits.free_bytes, generate)


def max_batch_size(batching: BatchingSpec, limits: EngineLimits, generate: bool) -> int:
    """Rows per batch at most: the spec's, or with auto what the engine keeps busy; one where
    the model's rows must run alone."""
    if limits.rows_alone:
        return 1
    if batching.max_batch_size != "auto":
        return batching.max_batch_size
    if limits.kind == "fast" and limits.device_type == "cuda":
        return GENERATE_SLOTS_PER_BATCH * limits.slots if generate else SCORE_BATCH_ROWS
    return DEFAULT_BATCH_ROWS
