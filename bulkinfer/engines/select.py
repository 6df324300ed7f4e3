"""Which engine runs a job, decided once, and what it can do, known before any weights load.

The fast engine runs on a CUDA GPU by default (`model.engine: auto`) unless the spec names an
attention implementation (the user asked for that kernel), and only for models whose config it
implements; everything else runs on the reference engine. The choice and the `EngineLimits`
come from the config and the device alone, so `bulkinfer plan` (which never loads weights) and
`bulkinfer run` plan the same batches. One check needs the weights (plain Linear projections);
a model that fails it runs on the reference engine around the same loaded weights.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from bulkinfer.configs import text_config
from bulkinfer.engines.base import EngineLimits, LoadOptions
from bulkinfer.engines.compiling import use_compile_cache
from bulkinfer.engines.decoder import decoder_blocker
from bulkinfer.engines.encoder import EncoderEngine
from bulkinfer.engines.fast import CPU_SLOTS, DECODE_BUCKETS, FastEngine
from bulkinfer.engines.hf import (
    LOGIT_TRANSFORMS,
    HFEngine,
    device_name,
    load_weights,
    resolve_device,
    resolve_dtype,
)
from bulkinfer.engines.memory import kv_pool_tokens
from bulkinfer.errors import ModelError
from bulkinfer.observe.progress import log

SUPPORTED_TYPES = ("llama", "qwen2", "qwen3", "mistral")
# Weights an embedding never reads: a missing BERT pooler is no reason to refuse the model.
UNUSED_BY_EMBED = ("pooler.",)
# Free device memory is read in whole steps of this, so that `bulkinfer plan` and the run that
# follows, which read it moments apart, size the same budget.
FREE_GRANULE = 1 << 28


def config_blocker(config: Any) -> str | None:
    """Why the fast engine cannot run a model of this config, or None when it can."""
    text = text_config(config)
    if text.model_type not in SUPPORTED_TYPES:
        return f"model type {text.model_type} is not one of {', '.join(SUPPORTED_TYPES)}"
    if any(getattr(text, k, None) for k in LOGIT_TRANSFORMS):
        return "the model scales or caps its logits"
    if getattr(text, "attn_logit_softcapping", None):
        return "the model soft-caps attention scores"
    if "sliding_attention" in (getattr(text, "layer_types", None) or ()):
        return "the model has sliding-window layers"
    if text.model_type == "mistral" and getattr(text, "sliding_window", None):
        return "the model has a sliding attention window"
    return None


def wants_fast(options: LoadOptions) -> bool:
    """Whether `model.engine` asks for the fast engine here (auto: on a CUDA GPU, unless an
    attention implementation is named)."""
    if options.engine == "auto":
        on_gpu = resolve_device(options.device).type == "cuda"
        return on_gpu and options.attn_implementation is None
    return options.engine == "fast"


def choose_kind(options: LoadOptions, config: Any) -> tuple[str, str | None]:
    """("fast" or "reference", why not fast) for a causal model, from its config alone."""
    if not wants_fast(options):
        if options.engine == "reference":
            return "reference", "model.engine is reference"
        if options.attn_implementation is not None:
            return "reference", "model.attn_implementation names a kernel"
        return "reference", "model.engine auto runs the fast engine on a CUDA GPU only"
    blocker = config_blocker(config)
    return ("reference", blocker) if blocker else ("fast", None)


def engine_limits(
    options: LoadOptions,
    config: Any,
    weights_bytes: int,
    causal: bool = True,
    slots: int | None = None,
) -> EngineLimits:
    """What the engine will be able to do, before its weights load: `weights_bytes` of the
    device's free memory now are the weights' (0 when they are already in). `slots` overrides
    the fast engine's decode slots (tests, benchmarks)."""
    device = resolve_device(options.device)
    width = resolve_dtype(options.dtype, device).itemsize
    free = None
    if device.type == "cuda":
        free = max(
            0, torch.cuda.mem_get_info(device)[0] // FREE_GRANULE * FREE_GRANULE - weights_bytes
        )
    kind, why_not_fast = choose_kind(options, config) if causal else ("encoder", None)
    kv_tokens = None
    if kind == "fast":
        slots = slots or (DECODE_BUCKETS[-1] if device.type == "cuda" else CPU_SLOTS)
        if free is not None:
            kv_tokens = kv_pool_tokens(config, width, slots, free)
    else:
        slots = None
    return EngineLimits(
        kind=kind,
        device_name=device_name(device),
        device_type=device.type,
        dtype_bytes=width,
        pads=kind != "fast",
        slots=slots,
        kv_tokens=kv_tokens,
        free_bytes=free,
        why_not_fast=why_not_fast,
    )


def load_causal(options: LoadOptions, tokenizer, limits: EngineLimits) -> HFEngine:
    """The engine `limits` name for a causal LM (score, generate), its weights loaded."""
    from transformers import AutoModelForCausalLM

    if limits.kind == "reference" and wants_fast(options):
        log(f"engine: the reference engine runs this model ({limits.why_not_fast})")
    if limits.kind == "fast" and limits.device_type == "cuda":
        use_compile_cache(options.cache_dir, limits.device_name)
    model, _ = load_weights(AutoModelForCausalLM, options)
    return causal_engine(model, tokenizer, limits)


def causal_engine(model, tokenizer, limits: EngineLimits) -> HFEngine:
    """The engine `limits` name around loaded weights; the reference engine when the fast
    engine cannot run these layers (a quantized or otherwise non-Linear projection)."""
    if limits.kind != "fast":
        return HFEngine(model, tokenizer, limits)
    blocker = decoder_blocker(model)
    if blocker is None:
        return FastEngine(model, tokenizer, limits)
    log(f"engine: the reference engine runs this model ({blocker})")
    reference = dataclasses.replace(
        limits, kind="reference", pads=True, slots=None, kv_tokens=None, why_not_fast=blocker
    )
    return HFEngine(model, tokenizer, reference)


def engine_around(model, tokenizer, engine: str = "fast", slots: int | None = None) -> HFEngine:
    """An engine around weights already in memory (benchmarks, tests), chosen as a job would."""
    options = LoadOptions(
        folder=Path(getattr(model, "name_or_path", "") or "."),
        label="(in memory)",
        device=str(model.device),
        dtype=str(model.dtype).removeprefix("torch."),
        engine=engine,
    )
    limits = engine_limits(options, model.config, 0, causal=True, slots=slots)
    return causal_engine(model, tokenizer, limits)


def load_encoder(options: LoadOptions, tokenizer, head: str, limits: EngineLimits) -> EncoderEngine:
    """head: `embed` (the bare model, AutoModel) or `classify`
    (AutoModelForSequenceClassification, whose trained head must be in the checkpoint)."""
    from transformers import AutoModel, AutoModelForSequenceClassification

    auto_class = AutoModelForSequenceClassification if head == "classify" else AutoModel
    model, missing = load_weights(auto_class, options)
    if head == "embed":
        missing = {k for k in missing if not k.startswith(UNUSED_BY_EMBED)}
    if missing:
        names = ", ".join(sorted(missing)[:3]) + (" ..." if len(missing) > 3 else "")
        what = "a trained classification head" if head == "classify" else "all its weights"
        raise ModelError(
            f"model.path: {options.label} lacks {what} (missing {names}); "
            "transformers would fill them with random values"
        )
    pad_id = tokenizer.pad_token_id
    if not isinstance(pad_id, int):
        pad_id = getattr(model.config, "pad_token_id", None) or 0
    return EncoderEngine(model, pad_id, limits)
