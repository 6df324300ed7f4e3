"""job/budget.py: the one place `batching.*` is read, from the spec and the engine's limits."""

from __future__ import annotations

from types import SimpleNamespace

from bulkinfer.engines.base import EngineLimits
from bulkinfer.engines.memory import bytes_per_token
from bulkinfer.job.budget import token_budget
from bulkinfer.spec import BatchingSpec

CONFIG = SimpleNamespace(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    vocab_size=1000,
)
GIB = 1 << 30


def limits(kind: str, device: str, free: int | None = None, kv: int | None = None):
    fast = kind == "fast"
    return EngineLimits(
        kind=kind,
        device_name=device,
        device_type=device,
        dtype_bytes=2,
        pads=not fast,
        slots=1024 if fast else None,
        kv_tokens=kv,
        free_bytes=free,
    )


def test_auto_on_the_cpu_is_a_fixed_budget_and_256_rows():
    for kind in ("fast", "reference", "encoder"):
        for new_tokens in (0, 8):
            budget = token_budget(BatchingSpec(), limits(kind, "cpu"), CONFIG, new_tokens)
            assert (budget.max_tokens, budget.max_batch_size) == (16384, 256)


def test_auto_on_a_gpu_follows_free_memory_and_the_fast_engines_pool():
    free = GIB // 8  # under the 1M-token cap
    expected = int(free * 0.8) // bytes_per_token(CONFIG, 2, False)
    reference = token_budget(BatchingSpec(), limits("reference", "cuda", free), CONFIG, 0)
    assert (reference.max_tokens, reference.max_batch_size) == (expected, 256)
    fast = limits("fast", "cuda", free, kv=50_000)
    scoring = token_budget(BatchingSpec(), fast, CONFIG, 0)
    assert (scoring.max_tokens, scoring.max_batch_size) == (expected, 8192)
    generating = token_budget(BatchingSpec(), fast, CONFIG, 16)
    assert (generating.max_tokens, generating.max_batch_size) == (200_000, 4096)
    tiny = token_budget(BatchingSpec(), limits("reference", "cuda", 0), CONFIG, 0)
    assert tiny.max_tokens == 256


def test_the_spec_and_a_recorded_budget_win_over_auto():
    fast = limits("fast", "cuda", GIB, kv=50_000)
    spec = BatchingSpec(max_tokens=600, max_batch_size=8, max_padding=0.2)
    budget = token_budget(spec, fast, CONFIG, 4)
    assert (budget.max_tokens, budget.max_batch_size, budget.max_padding) == (600, 8, 0.2)
    resumed = token_budget(BatchingSpec(), fast, CONFIG, 4, {"max_tokens": 7, "max_batch_size": 3})
    assert (resumed.max_tokens, resumed.max_batch_size, resumed.new_tokens_per_row) == (7, 3, 4)
