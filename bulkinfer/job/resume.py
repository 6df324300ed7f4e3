"""Where a job stands in its output folder: started afresh, resumed, or refused; the plan it
keeps there, so a resume runs the very same batches; the batches still to do."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np

from bulkinfer.errors import OutputFolderError, counted
from bulkinfer.io.layout import OutputLayout
from bulkinfer.job.budget import token_budget
from bulkinfer.job.loading import load_options
from bulkinfer.job.planning import (
    PLAN_ORDER,
    JobPlan,
    make_plan,
    plan_facts,
    warn_rows_over_budget,
)
from bulkinfer.job.setup import Inputs, JobSetup
from bulkinfer.observe.progress import log, set_log_context
from bulkinfer.planner import Batch, padding_fraction
from bulkinfer.sharding import Shard
from bulkinfer.state.fingerprint import RunIdentity, fingerprint, input_files_digest
from bulkinfer.state.folder import JobFolder, open_job_folder, refuse_unlike_shards, save_job
from bulkinfer.state.manifest import Manifest


def open_folder(
    setup: JobSetup, layout: OutputLayout, overwrite: bool, shard: Shard | None
) -> JobFolder:
    """Start, resume or refuse, by the fingerprint of spec, model files and input contents, and
    by what the spec's `auto` settings resolve to on this machine."""
    spec = setup.spec
    run = run_identity(setup, shard)
    if shard is not None:
        set_log_context(shard=str(shard))
        root = OutputLayout(Path(spec.output.path))
        refuse_unlike_shards(root, shard.index, shard.count, run, overwrite)
    return open_job_folder(layout, run, overwrite)


def run_identity(setup: JobSetup, shard: Shard | None = None) -> RunIdentity:
    """The fingerprint a folder's record is compared with: spec, model files (hashed, or from
    the digest cache) and input contents, and what `auto` resolves to here."""
    spec = setup.spec
    model = setup.model.identity()
    prints = fingerprint(spec.to_dict(), model, input_files_digest([f.path for f in setup.files]))
    # Each model file's hash is kept too, so a refused resume can say which file changed.
    prints.update({f"model/{name}": f["blake2b"] for name, f in model["files"].items()})
    if shard is not None:
        prints["shard"] = str(shard)
    return RunIdentity(prints, spec.to_dict(), resolved_settings(setup))


def resolved_settings(setup: JobSetup) -> dict:
    """What the spec's `auto` settings that change outputs resolve to here (RESOLVED_KEYS):
    the dtype the model runs in on this machine's device, an embed task's pooling and
    normalisation as the model's files give them."""
    from bulkinfer.engines.hf import resolve_device, resolve_dtype  # imports torch

    model = setup.spec.model
    dtype = resolve_dtype(model.dtype, resolve_device(model.device))
    resolved = {"dtype": str(dtype).removeprefix("torch.")}
    for name in ("pooling", "normalize"):  # an embed task's, never `auto` once it is made
        if hasattr(setup.task, name):
            resolved[name] = getattr(setup.task, name)
    return resolved


def record_plan(inputs: Inputs, engine, folder: JobFolder, shard: Shard | None) -> JobPlan:
    """The budget and batches of this run, kept in job.json: a resume reads the budget back
    (the device's free memory may differ by then) and so plans the very same batches."""
    setup, job = inputs.setup, folder.job
    new_tokens = setup.task.new_tokens_per_row()
    recorded = {"max_tokens": job.max_tokens, "max_batch_size": job.max_batch_size}
    budget = token_budget(setup.spec.batching, engine.limits, setup.config, new_tokens, recorded)
    # a folder planned before plans recorded their order was planned by length
    order = job.plan_order or ("length" if job.plan is not None else PLAN_ORDER)
    plan = make_plan(inputs, budget, shard, order)
    digest = plan_digest(plan)
    if job.plan_digest is not None and job.plan_digest != digest:
        raise OutputFolderError(
            f"{folder.layout.root}: this run plans other batches than the run that committed "
            "its parts, so what they hold cannot be told apart from what is left (the input "
            "tokenized otherwise: another tokenizers or transformers version, or another "
            "bulkinfer); run it with the versions it started with, or pass --overwrite to "
            "start afresh"
        )
    job.max_tokens, job.max_batch_size = budget.max_tokens, budget.max_batch_size
    job.plan_digest, job.engine = digest, engine.limits.kind
    job.plan_order = order
    job.rows = len(plan.rows)
    job.openai_responses = setup.openai_responses
    job.plan = plan_facts(inputs.prepared, plan)
    job.device = engine.limits.device_name
    save_job(folder.layout, job)
    return plan


def plan_digest(plan: JobPlan) -> str:
    """A hash of the planned batches' rows, in order: parts name the batches they complete by
    number, so a resume must plan the very same ones."""
    digest = hashlib.blake2b(digest_size=16)
    for batch in plan.batches:
        digest.update(np.int64(len(batch.rows)).tobytes())
        digest.update(np.ascontiguousarray(batch.rows, dtype=np.int64).tobytes())
    return digest.hexdigest()


def engine_as_ran(setup: JobSetup, folder: JobFolder) -> str | None:
    """The engine `model.engine: auto` resolves to on a resume: the one that ran the folder's
    rows (job.json), not what this machine or the rows left would pick (a warm compile cache,
    another GPU), which would plan other batches and compute the rest otherwise; None where
    the spec names one, or the folder is new or keeps no record of it."""
    from bulkinfer.engines.select import wants_fast

    ran = folder.job.engine
    if not folder.resumed or setup.spec.model.engine != "auto" or ran not in ("fast", "reference"):
        return None
    here = "fast" if wants_fast(load_options(setup.model, convert=False)) else "reference"
    if ran != here:  # (where auto would pick it anyway, nothing to say)
        log(
            f"engine: the {ran} engine runs the rest of this job, as it ran the rows committed "
            "(model.engine: auto)",
            event="engine",
            engine=ran,
        )
    return ran


def batches_to_do(
    manifest: Manifest, plan: JobPlan, resumed: bool, lengths: np.ndarray
) -> list[Batch]:
    """The planned batches no committed part completes, less the rows parts already hold (a
    long batch commits finished rows as it goes); parts found corrupt are recomputed and
    repeated records ignored, each with a warning."""
    for name in manifest.dropped:
        log(
            f"checkpoint: {name} is missing or corrupt; its rows will be recomputed",
            event="checkpoint",
            level="warning",
            dropped=name,
        )
    for name in manifest.repeated:
        log(
            f"checkpoint: {name} repeats a part or batches already recorded (two writers at "
            "once, or a killed launcher's workers); the later copy is ignored",
            event="checkpoint",
            level="warning",
            repeated=name,
        )
    for name in manifest.redone:
        log(
            f"checkpoint: {name} completes a batch whose earlier rows were in a part now lost; "
            "its rows will be recomputed with them",
            event="checkpoint",
            level="warning",
            dropped=name,
        )
    if manifest.unlisted:
        log(
            f"checkpoint: {manifest.layout.manifest} is missing, so the {manifest.unlisted:,} "
            f"part files in {manifest.layout.parts_dir} cannot be checked; their rows will be "
            "recomputed",
            event="checkpoint",
            level="warning",
            unlisted=manifest.unlisted,
        )
    done, pieces = manifest.done_batches(), manifest.done_pieces()
    todo = [b for b in plan.batches if b.index not in done]
    todo = [remaining(b, pieces.get(b.index), lengths) for b in todo]
    todo = [b for b in todo if len(b.rows)]
    if resumed:
        begun = sum(len(rows) for rows in pieces.values())
        log(
            f"resuming: {len(plan.batches) - len(todo):,} of {len(plan.batches):,} batches already done"
            + (f", and {begun:,} rows of batches begun" if begun else ""),
            event="resume",
            batches_done=len(plan.batches) - len(todo),
            batches=len(plan.batches),
            rows_of_batches_begun=begun,
        )
    return todo


def remaining(batch: Batch, committed: set[int] | None, lengths: np.ndarray) -> Batch:
    """The rows of `batch` that no part holds yet (rows a long batch committed before it was
    stopped are not run again)."""
    if not committed:
        return batch
    rows = batch.rows[~np.isin(batch.rows, np.fromiter(committed, dtype=np.int64))]
    if not len(rows):
        return dataclasses.replace(batch, rows=rows)
    longest, real = int(lengths[rows].max()), int(lengths[rows].sum())
    return dataclasses.replace(batch, rows=rows, longest=longest, real_tokens=real)


def fp8_parts(limits, decodes: bool, where: str) -> list[str]:
    """What the start line says of fp8 ("fp8 weights", "fp8 KV cache"); an fp8 KV cache asked
    of a job that decodes nothing (score keeps no cache) is a warning."""
    parts = ["fp8 weights"] if limits.quantization == "fp8" else []
    if limits.kv_cache_dtype == "fp8" and decodes:
        parts.append("fp8 KV cache")
    elif limits.kv_cache_dtype == "fp8":
        log(
            f"{where}model.kv_cache_dtype: fp8 has no effect on this job: it generates nothing, "
            "so it keeps no KV cache",
            level="warning",
        )
    return parts


def log_start(
    layout: OutputLayout, inputs: Inputs, plan: JobPlan, todo: list, engine, shard: Shard | None
) -> None:
    where = f"shard {shard}: " if shard else ""
    device = engine.limits.device_name
    padding = padding_fraction(plan.batches)
    failed = len(plan.rows) - len(plan.runnable)  # written with their error, never run
    not_run = f" ({failed:,} with errors, not run)" if failed else ""
    rows, batches = counted(len(plan.rows), "row"), counted(len(plan.batches), "batch")
    fp8 = fp8_parts(engine.limits, inputs.task.streams, where)
    log(
        f"{where}{rows}{not_run}, {batches}, budget {plan.budget.max_tokens:,} tokens, "
        f"padding {padding:.1%}, device {device}" + "".join(f", {part}" for part in fp8),
        event="start",
        rows=len(plan.rows),
        rows_with_errors=failed,
        batches=len(plan.batches),
        batches_todo=len(todo),
        max_tokens=plan.budget.max_tokens,
        padding_fraction=round(padding, 4),
        device=device,
        quantization=engine.limits.quantization,
        kv_cache_dtype=engine.limits.kv_cache_dtype,
        task=inputs.task.name,
        output=str(layout.root),
    )
    warn_rows_over_budget(inputs, plan, where)
