"""Which engine runs a job, decided once, and what it can do, known before any weights load.

The fast engine runs on a CUDA GPU by default (`model.engine: auto`) unless the spec names an
attention implementation (the user asked for that kernel), and only for models whose config it
implements; everything else runs on the reference engine. The choice and the `EngineLimits`
come from the config and the device alone, so `bulkinfer plan` (which never loads weights) and
`bulkinfer run` plan the same batches. One check needs the weights (plain Linear projections);
a model that fails it runs on the reference engine around the same loaded weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from bulkinfer import process
from bulkinfer.configs import (
    SUPPORTED_TYPES,
    length_scaled_rope,
    recurrent_state,
    text_config,
)
from bulkinfer.engines import read_ahead
from bulkinfer.engines.base import EngineLimits, LoadOptions
from bulkinfer.engines.compiling import (
    compile_backend,
    compiled_marker,
    compiler_import_ahead,
    use_compile_cache,
)
from bulkinfer.engines.decoder import decoder_blocker
from bulkinfer.engines.encoder import EncoderEngine
from bulkinfer.engines.fast import CPU_SLOTS, FastEngine, gpu_slots
from bulkinfer.engines.fp8 import fp8_unsupported
from bulkinfer.engines.fp8_loading import (
    checkpoint_files,
    checkpoint_in_fp8,
    load_by_tensor,
    load_fp8_weights,
    stored_width,
)
from bulkinfer.engines.hf import (
    LOGIT_TRANSFORMS,
    HFEngine,
    device_name,
    load_weights,
    pad_id_in_table,
    resolve_device,
    resolve_dtype,
)
from bulkinfer.engines.memory import kv_pool_tokens, resident_weight_bytes
from bulkinfer.errors import ModelError
from bulkinfer.observe.progress import log

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
    scaled = length_scaled_rope(config)
    if scaled:
        return f"rope_type {scaled} scales positions by a call's longest sequence"
    return None


def wants_fast(options: LoadOptions) -> bool:
    """Whether `model.engine` asks for the fast engine here (auto: on a CUDA GPU, unless an
    attention implementation is named; fp8 weights or KV cache run on the fast engine only)."""
    if fp8_keys(options):
        return True
    if options.engine == "auto":
        on_gpu = resolve_device(options.device).type == "cuda"
        return on_gpu and options.attn_implementation is None
    return options.engine == "fast"


def fp8_keys(options: LoadOptions | EngineLimits) -> str:
    """The spec keys asking for fp8 (model.quantization, model.kv_cache_dtype), or ''."""
    keys = [
        f"model.{name}"
        for name in ("quantization", "kv_cache_dtype")
        if getattr(options, name) == "fp8"
    ]
    return " and ".join(keys)


def fp8_needs_fast(keys: str, model: str, blocker: str) -> ModelError:
    """The one-line refusal of fp8 for a model the fast engine cannot run."""
    return ModelError(f"{keys}: fp8 needs the fast engine, which cannot run {model} ({blocker})")


def choose_kind(options: LoadOptions, config: Any) -> tuple[str, str | None]:
    """("fast" or "reference", why not fast) for a causal model, from its config alone."""
    if not wants_fast(options):
        if options.engine == "reference":
            return "reference", "model.engine is reference"
        if options.attn_implementation is not None:
            return "reference", "model.attn_implementation names a kernel"
        return "reference", "model.engine auto runs the fast engine on a CUDA GPU only"
    blocker = config_blocker(config)
    if blocker and fp8_keys(options):
        raise fp8_needs_fast(fp8_keys(options), options.label, blocker)
    if blocker:
        return "reference", blocker
    if options.attn_implementation is not None:
        log(
            f"model.attn_implementation {options.attn_implementation} is not used: the fast "
            "engine runs its own attention (model.engine: reference runs the named kernel)",
            event="engine",
            level="warning",
        )
    return "fast", None


# model.engine auto on a GPU weighs compiling the fast engine against what the reference engine
# would spend on the job (H200, SmolLM2-135M, docs/perf.md: the 300-prompt sample took 9.7 s in
# the model on a cold fast engine, 3.1 s once its kernels were cached, 19-28 s on the reference
# engine). Every task weighs its planned tokens (prompts, and the new tokens rows may take);
# a generation job with fewer also weighs the reference engine's decode steps: it runs every
# batch for as many as its longest-asked row, each launch-bound at these sizes (60 ms for 30
# layers). (Weighing steps alone ran a few-shot job of 1,000 rows of 1,150 prompt tokens and 20
# new ones on the reference engine: 56 s in the model on an H200 where prefill takes ~4 s.)
COMPILE_SECONDS_COLD = 7.0  # the first time a model shape compiles on this torch and GPU
COMPILE_SECONDS_WARM = 2.0  # its kernels loaded from the compile cache, graphs captured
REFERENCE_STEP_SECONDS_PER_LAYER = 0.002
AUTO_FAST_TOKENS_COLD = 250_000
AUTO_FAST_TOKENS_WARM = 150_000


def by_job_size(
    limits: EngineLimits,
    options: LoadOptions,
    config: Any,
    planned_tokens: int,
    reference_steps: int | None = None,
) -> tuple[EngineLimits, str | None]:
    """The limits of the engine `model.engine: auto` runs a job on, and why, where the job's
    size decides (auto, a GPU, a model the fast engine runs). `planned_tokens`: prompts plus
    the new tokens rows may take; `reference_steps`: the decode steps the reference engine's
    plan runs (generation; None for other tasks)."""
    if options.engine != "auto" or limits.kind != "fast" or fp8_keys(limits):
        return limits, None
    marker = compiled_marker(options.cache_dir, limits.device_name, config)
    warm = marker is not None and marker.exists()
    cache = "its compiled kernels cached" if warm else "compiling it the first time"
    needed = AUTO_FAST_TOKENS_WARM if warm else AUTO_FAST_TOKENS_COLD
    size, pays, bar = f"{planned_tokens:,} planned tokens", planned_tokens >= needed, f"{needed:,}"
    if reference_steps is not None and not pays:  # a generation job's many tokens pay anyway
        layers = text_config(config).num_hidden_layers
        reference = reference_steps * layers * REFERENCE_STEP_SECONDS_PER_LAYER
        compiling = COMPILE_SECONDS_WARM if warm else COMPILE_SECONDS_COLD
        size = f"{reference_steps:,} decode steps on the reference engine (~{reference:.0f} s)"
        size += f" and {planned_tokens:,} planned tokens"
        pays = reference >= compiling
        bar = f"~{compiling:.0f} s, {needed:,} tokens"
    if pays:
        return limits, f"{size} pay back {cache} ({bar})"
    why = (
        f"{size} are too few to pay back {cache} for the fast engine ({bar}); "
        "model.engine: fast runs it anyway"
    )
    return limits.as_reference(why), why


def fit_to_job(engine, options: LoadOptions, config: Any, size: tuple[int, int | None]):
    """The loaded engine, or the reference engine around its weights where `model.engine: auto`
    finds the job too small to pay back compiling the fast one (`size`: by_job_size's planned
    tokens and reference steps); the choice is logged."""
    limits, why = by_job_size(engine.limits, options, config, *size)
    if why is None:
        return engine
    if limits.kind == engine.limits.kind:
        log(f"engine: the fast engine runs this job ({why})", event="engine", engine="fast")
        return engine
    log(f"engine: the reference engine runs this job ({why})", event="engine", engine="reference")
    return HFEngine(engine.model, engine.tokenizer, limits)


def remember_compiled(engine, options: LoadOptions, config: Any) -> None:
    """After a job the fast engine ran on a GPU: its compiled kernels are in the cache now, so
    the next small job of this model shape on this box may weigh them as warm. `config`: the
    one `by_job_size` is given (the model folder's, not the loaded model's, whose dtype and
    attention fields the loading has changed)."""
    if not isinstance(engine, FastEngine) or engine.limits.device_type != "cuda":
        return
    marker = compiled_marker(options.cache_dir, engine.limits.device_name, config)
    if marker is not None:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()


# Encoders that transformers' AutoModelForCausalLM still loads (as *LMHeadModel/*ForCausalLM),
# meant as the decoder of an encoder-decoder pair: unless their config says is_decoder, the
# attention is bidirectional (a "log-likelihood" sees the tokens after it) and the head random.
ENCODER_ONLY_TYPES = frozenset(
    {
        "bert",
        "bert-generation",
        "big_bird",
        "camembert",
        "data2vec-text",
        "electra",
        "ernie",
        "megatron-bert",
        "reformer",
        "rembert",
        "roberta",
        "roberta-prelayernorm",
        "roc_bert",
        "roformer",
        "xlm",  # a causal XLM (`causal: true`) runs
        "xlm-roberta",
        "xlm-roberta-xl",
        "xlnet",  # permutation language modelling: its logits see the tokens after them
        "xmod",
    }
)


def refuse_not_decoder(label: str, config: Any, generates: bool = False) -> None:
    """Generate and score run decoder-only models: an encoder (BERT and kin) or an
    encoder-decoder (T5, BART) is refused in one line before any weights load; so is a model
    with a recurrent state (Mamba and its hybrids), which scores but does not generate here:
    the reference engine's decode keeps a KV cache only."""
    kind = getattr(config, "model_type", "?")
    recurrent = recurrent_state(config) if generates else None
    if recurrent:
        raise ModelError(
            f"model.path: {label} carries a recurrent state from token to token ({recurrent}), "
            "which bulkinfer's engines do not decode: it can score (task.type: score), not "
            "generate"
        )
    if getattr(config, "is_encoder_decoder", False):
        raise ModelError(
            f"model.path: {label} is an encoder-decoder (seq2seq) model ({kind}); "
            "generate and score run decoder-only models"
        )
    decoder = getattr(config, "is_decoder", False) or getattr(config, "causal", False)
    if kind in ENCODER_ONLY_TYPES and not decoder:
        raise ModelError(
            f"model.path: {label} is an encoder-only model ({kind}): it cannot "
            "generate or score text; use task.type embed or classify"
        )


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
    files = checkpoint_files(Path(options.folder))
    stored_fp8 = checkpoint_in_fp8(config, files)
    if device.type == "cuda":
        if weights_bytes and files:  # the files that load (a GGUF model's: its conversion's)
            weights_bytes = sum(f.stat().st_size for f in files)
        weights_bytes = resident_weight_bytes(
            config,
            weights_bytes,
            width,
            options.quantization == "fp8",
            stored_fp8,
            stored_width(files),
        )
        free = max(0, read_ahead.free_memory(device) // FREE_GRANULE * FREE_GRANULE - weights_bytes)
    asked = fp8_keys(options)
    if stored_fp8 and options.quantization != "fp8":
        raise ModelError(
            f"{options.label}: its weights are stored in fp8: set model.quantization: fp8 to "
            "run them (on the fast engine)"
        )
    if asked and not causal:
        raise ModelError(
            f"{asked}: fp8 applies to causal models (generate, score), not to an encoder's "
            "classify or embed job"
        )
    kind, why_not_fast = choose_kind(options, config) if causal else ("encoder", None)
    if asked:  # one line before any weights load
        unsupported = fp8_unsupported(device, asked, config)
        if unsupported:
            raise ModelError(unsupported)
    kv_tokens = None
    if kind == "fast":
        slots = slots or (gpu_slots() if device.type == "cuda" else CPU_SLOTS)
        if free is not None:
            kv_tokens = kv_pool_tokens(config, width, slots, free, options.kv_cache_dtype == "fp8")
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
        quantization=options.quantization if kind == "fast" else "none",
        kv_cache_dtype=options.kv_cache_dtype if kind == "fast" else "auto",
        rows_alone=length_scaled_rope(config) if causal else None,
    )


def load_causal(options: LoadOptions, tokenizer, limits: EngineLimits) -> HFEngine:
    """The engine `limits` name for a causal LM (score, generate), its weights loaded."""
    from transformers import AutoModelForCausalLM

    if limits.kind == "reference" and wants_fast(options):
        asked = options.engine == "fast"  # asked by name: a warning, not news
        log(
            f"engine: the reference engine runs this model ({limits.why_not_fast})"
            + ("; model.engine fast cannot" if asked else ""),
            level="warning" if asked else "info",
        )
    if limits.rows_alone:
        log(
            "engine: each row runs in a call of its own: the model's rope_type "
            f"{limits.rows_alone} scales positions by a call's longest sequence, so batched rows "
            "would change each other's results"
        )
    if limits.kind == "fast" and limits.device_type == "cuda" and process.OWN:
        # (its environment variables are the process's: a program calling bulkinfer keeps its
        # own, and torch's default caches)
        use_compile_cache(options.cache_dir, limits.device_name)
    fast, fp8 = limits.kind == "fast", options.quantization == "fp8"
    ahead = read_ahead.take(options.folder, resolve_device(options.device), fp8, used=fast)
    seconds = ahead.seconds if ahead is not None else None
    if limits.quantization == "fp8":  # never all in the model's dtype on the device
        model = load_fp8_weights(AutoModelForCausalLM, options, ahead)
    else:
        model = by_tensor(options, ahead) if ahead is not None else None
        if model is None:
            seconds = None
            compiles = limits.kind == "fast" and compile_backend(resolve_device(options.device))
            model, missing = load_weights(
                AutoModelForCausalLM, options, compiler_import_ahead() if compiles else None
            )
            refuse_missing(options, model, missing, "weights the model needs")
    engine = causal_engine(model, tokenizer, limits)
    if seconds is not None:  # the weights came from the read-ahead (engines/read_ahead.py)
        engine.counters["read_ahead_seconds"] = seconds
    return engine


def by_tensor(options: LoadOptions, ahead: read_ahead.ReadAhead):
    """The model in the model's dtype, its tensors taken from the run's read-ahead; None where
    the checkpoint's names are not the model's (transformers' loader maps those) or its layers
    compute buffers of their own."""
    from transformers import AutoModelForCausalLM

    try:
        return load_by_tensor(AutoModelForCausalLM, options, fp8=False, ahead=ahead)
    except Exception:  # noqa: BLE001 (transformers' loader says what is wrong, if anything)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return None


def refuse_missing(options: LoadOptions, model, missing: set[str], what: str) -> None:
    """A checkpoint that lacks weights the model has (tied ones aside) is refused: transformers
    fills them with random values, which differ from run to run, so a resumed job would mix
    rows of two random models."""
    params = {name for name, _ in model.named_parameters()}  # tied weights are named once
    missing = sorted(k for k in missing if k in params)
    if missing:
        names = ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else "")
        raise ModelError(
            f"model.path: {options.label} lacks {what} (missing {names}); "
            "transformers would fill them with random values"
        )


def causal_engine(model, tokenizer, limits: EngineLimits) -> HFEngine:
    """The engine `limits` name around loaded weights; the reference engine when the fast
    engine cannot run these layers (a quantized or otherwise non-Linear projection)."""
    if limits.kind != "fast":
        return HFEngine(model, tokenizer, limits)
    blocker = decoder_blocker(model)
    if blocker is None:
        return FastEngine(model, tokenizer, limits)
    if fp8_keys(limits):
        raise fp8_needs_fast(fp8_keys(limits), "this model", blocker)
    log(f"engine: the reference engine runs this model ({blocker})")
    return HFEngine(model, tokenizer, limits.as_reference(blocker))


def engine_around(
    model, tokenizer, engine: str = "fast", slots: int | None = None, kv_cache_dtype: str = "auto"
) -> HFEngine:
    """An engine around weights already in memory (benchmarks, tests), chosen as a job would."""
    options = LoadOptions(
        folder=Path(getattr(model, "name_or_path", "") or "."),
        label="(in memory)",
        device=str(model.device),
        dtype=str(model.dtype).removeprefix("torch."),
        engine=engine,
        kv_cache_dtype=kv_cache_dtype,
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
    what = "a trained classification head" if head == "classify" else "weights the model needs"
    refuse_missing(options, model, missing, what)
    config_pad = getattr(model.config, "pad_token_id", None)
    candidates = (tokenizer.pad_token_id, config_pad, tokenizer.eos_token_id)
    pad_id = pad_id_in_table(model, candidates)
    if head == "embed" and getattr(model.config, "is_encoder_decoder", False):
        model = model.get_encoder()  # T5, BART: the encoder's states embed the text
    return EncoderEngine(model, pad_id, limits)
