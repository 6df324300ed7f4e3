"""What the job hands the engines: where the weights are (`LoadOptions`) and what the engine will
be able to do (`EngineLimits`), worked out the same way for `bulkinfer plan` and `bulkinfer run`
before any weights load."""

from __future__ import annotations

from typing import Any

from bulkinfer.cache import cache_root
from bulkinfer.engines.base import EngineLimits, LoadOptions
from bulkinfer.model_files import ModelFiles, local_model_folder


def load_options(files: ModelFiles, convert: bool = True, engine: str | None = None) -> LoadOptions:
    """The spec's model resolved to a local folder (a GGUF file converted when `convert`; plan
    does not convert, and needs no folder to size its budget); `engine`: the one to run in
    place of the spec's `auto`."""
    model = files.spec
    folder = local_model_folder(files, convert=convert) or files.path
    return LoadOptions(
        folder=folder,
        label=model.path,
        device=model.device,
        dtype=model.dtype,
        engine=engine or model.engine,
        trust_remote_code=model.trust_remote_code,
        allow_pickle=model.allow_pickle,
        attn_implementation=model.attn_implementation,
        cache_dir=cache_root(),
        quantization=model.quantization,
        kv_cache_dtype=model.kv_cache_dtype,
    )


def planned_engine(
    files: ModelFiles, config: Any, task, convert: bool = True, engine: str | None = None
) -> tuple[LoadOptions, EngineLimits]:
    """The load options and the limits of the engine `task` needs, the weights' size taken from
    the model files (they are not in device memory yet)."""
    from bulkinfer.engines.select import engine_limits

    options = load_options(files, convert, engine)
    causal = task.engine == "causal"
    return options, engine_limits(options, config, files.weight_bytes(), causal=causal)
