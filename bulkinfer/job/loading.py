"""What the job hands the engines: where the weights are (`LoadOptions`) and what the engine will
be able to do (`EngineLimits`), worked out the same way for `bulkinfer plan` and `bulkinfer run`
before any weights load."""

from __future__ import annotations

from typing import Any

from bulkinfer.engines.base import EngineLimits, LoadOptions
from bulkinfer.model_files import (
    cache_root,
    local_model_folder,
    model_identity,
    resolve_model_path,
)
from bulkinfer.spec import JobSpec, ModelSpec


def load_options(model: ModelSpec, convert: bool = True) -> LoadOptions:
    """The spec's model resolved to a local folder (a GGUF file converted when `convert`; plan
    does not convert, and needs no folder to size its budget)."""
    folder = local_model_folder(model, convert=convert) or resolve_model_path(model.path)
    return LoadOptions(
        folder=folder,
        label=model.path,
        device=model.device,
        dtype=model.dtype,
        engine=model.engine,
        trust_remote_code=model.trust_remote_code,
        allow_pickle=model.allow_pickle,
        attn_implementation=model.attn_implementation,
        cache_dir=cache_root(),
    )


def planned_engine(
    spec: JobSpec, config: Any, task, convert: bool = True
) -> tuple[LoadOptions, EngineLimits]:
    """The load options and the limits of the engine `task` needs, the weights' size taken from
    the model files (they are not in device memory yet)."""
    from bulkinfer.engines.select import engine_limits

    options = load_options(spec.model, convert)
    weights = sum(model_identity(spec.model)["files"].values())
    return options, engine_limits(options, config, weights, causal=task.engine == "causal")
