"""`model.engine: auto` weighs a job's planned tokens against compiling the fast engine."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import LlamaConfig

from bulkinfer.engines.base import EngineLimits, LoadOptions
from bulkinfer.engines.compiling import compiled_marker
from bulkinfer.engines.select import AUTO_FAST_TOKENS_COLD, AUTO_FAST_TOKENS_WARM, by_job_size

CONFIG = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2)
GPU = EngineLimits("fast", "NVIDIA H200", "cuda", 2, pads=False, slots=256, kv_tokens=1 << 20)


def options(cache: Path, engine: str = "auto") -> LoadOptions:
    return LoadOptions(
        folder=cache, label="m", device="auto", dtype="auto", engine=engine, cache_dir=cache
    )


def test_a_small_job_runs_on_the_reference_engine_and_says_why(tmp_path):
    limits, why = by_job_size(GPU, options(tmp_path), CONFIG, 74_000)
    assert limits.kind == "reference" and limits.pads and limits.slots is None
    assert "74,000 planned tokens are too few" in why and "compiling it the first time" in why
    assert limits.why_not_fast == why

    limits, why = by_job_size(GPU, options(tmp_path), CONFIG, AUTO_FAST_TOKENS_COLD)
    assert limits == GPU and "pay back" in why


def test_a_cached_compilation_lowers_the_bar(tmp_path):
    between = (AUTO_FAST_TOKENS_WARM + AUTO_FAST_TOKENS_COLD) // 2
    assert by_job_size(GPU, options(tmp_path), CONFIG, between)[0].kind == "reference"
    marker = compiled_marker(tmp_path, GPU.device_name, CONFIG)
    marker.parent.mkdir(parents=True)
    marker.touch()
    limits, why = by_job_size(GPU, options(tmp_path), CONFIG, between)
    assert limits.kind == "fast" and "cached" in why
    # another model shape has not compiled
    other = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2)
    assert by_job_size(GPU, options(tmp_path), other, between)[0].kind == "reference"


@pytest.mark.parametrize("engine", ["fast", "reference"])
def test_a_named_engine_is_never_second_guessed(tmp_path, engine):
    limits, why = by_job_size(GPU, options(tmp_path, engine), CONFIG, 10)
    assert limits == GPU and why is None


def test_the_cpu_and_encoders_are_not_weighed(tmp_path):
    cpu = EngineLimits("reference", "cpu", "cpu", 4, pads=True)
    assert by_job_size(cpu, options(tmp_path), CONFIG, 10) == (cpu, None)


def test_generation_weighs_the_reference_engines_decode_steps(tmp_path):
    """A generation job's reference plan runs each batch for its longest-asked row's steps:
    three batches of 64 steps on a 30-layer model outlast compiling; one of 16 does not."""
    deep = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=30)
    limits, why = by_job_size(GPU, options(tmp_path), deep, 5_409, reference_steps=3 * 64)
    assert limits.kind == "fast" and "192 decode steps on the reference engine" in why
    limits, why = by_job_size(GPU, options(tmp_path), deep, 500, reference_steps=16)
    assert limits.kind == "reference" and "too few to pay back" in why


def test_generation_of_long_prompts_and_few_new_tokens_runs_on_the_fast_engine(tmp_path):
    """Few decode steps, but prompts whose prefill outweighs compiling (a few-shot job)."""
    deep = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=30)
    limits, why = by_job_size(
        GPU, options(tmp_path), deep, AUTO_FAST_TOKENS_COLD, reference_steps=16
    )
    assert limits.kind == "fast" and "planned tokens pay back" in why
