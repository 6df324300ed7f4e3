"""The job loop: read -> tokenize -> plan -> run -> write, resumable at any point.

Data flows one way. The output folder holds all state (fingerprint, manifest, parts), so a
rerun of the same job picks up exactly the batches that were not committed. Host work overlaps
the model: the weights load while the input is tokenized (in a new folder, from before the
fingerprint, so beside the model's content hash too), and parts are written on a background
thread while the next batch runs.
"""

from __future__ import annotations

import shutil
import time
import uuid
from contextlib import ExitStack
from pathlib import Path

from bulkinfer import faults, process
from bulkinfer.errors import RowFailedError, StopRequested, counted
from bulkinfer.io.layout import OutputLayout
from bulkinfer.io.lock import folder_lock
from bulkinfer.io.outputs import part_schema
from bulkinfer.job.batch import RowCap, first_failure, run_batch
from bulkinfer.job.exits import (
    AtOnce,
    failure_recorded,
    stop_signals,
    stopped,
    stops_at_once,
    writes_reported,
)
from bulkinfer.job.finish import (
    finish_job,
    log_next_steps,
    merge_if_last,
    model_cost,
    write_responses,
    write_summary,
)
from bulkinfer.job.planning import job_size, row_work
from bulkinfer.job.resume import (
    batches_to_do,
    engine_as_ran,
    log_start,
    open_folder,
    record_plan,
)
from bulkinfer.job.setup import (
    Inputs,
    JobSetup,
    set_up,
    start_loading,
    tokenize_while_loading,
)
from bulkinfer.job.stream import run_stream
from bulkinfer.observe.progress import Progress, log
from bulkinfer.observe.stats import imports_seconds
from bulkinfer.prepare.reuse import reuse_key
from bulkinfer.sharding import Shard, refuse_row_column
from bulkinfer.spec import JobSpec
from bulkinfer.state.folder import refuse_foreign, refuse_other_counts, refuse_unsharded
from bulkinfer.state.manifest import Manifest
from bulkinfer.state.parts import PartWriter


def run_job(spec: JobSpec, overwrite: bool = False, shard: Shard | None = None) -> int:
    """Run or resume a job, or one shard of it; returns the process exit code.

    A shard works in its own folder under OUT/shards/; the shard that finishes last merges.
    The folder's lock is taken before anything in it changes: one writer per folder."""
    root = OutputLayout(Path(spec.output.path))
    layout = root.shard(shard.index, shard.count) if shard else root
    if shard is not None:
        refuse_row_column(spec.input.keep_columns)
    refuse_foreign(layout, overwrite)  # before the lock, so a refused folder gets no lock file
    if shard is not None:
        refuse_unsharded(root, overwrite)
        refuse_other_counts(root, shard.count, overwrite)
    with stops_at_once(overwrite) as at_once:
        try:
            with writes_reported(layout), folder_lock(layout), failure_recorded(layout):
                code = _run_job(spec, layout, overwrite, shard, at_once)
            if code == 0 and shard is not None:
                merge_if_last(root, shard)
        except StopRequested:
            return at_once.stopped()
    return code


def _run_job(
    spec: JobSpec, layout: OutputLayout, overwrite: bool, shard: Shard | None, at_once: AtOnce
) -> int:
    started = time.monotonic()
    setup = set_up(spec, hash_model=True)
    with ExitStack() as beside:
        # a folder that holds no job has no fingerprint to refuse this run by, so the weights
        # start loading now, beside the wait for the model's content hash (a box's first run);
        # not in someone's program, whose refused run would wait for the load (in_background)
        early = process.OWN and (overwrite or not layout.holds_job())
        loading = beside.enter_context(start_loading(setup)) if early else None
        folder = open_folder(setup, layout, overwrite, shard)
        setup_seconds = time.monotonic() - started
        if folder.finished:
            return finished_already(setup, layout, shard)
        pinned = engine_as_ran(setup, folder)
        background, options = loading or beside.enter_context(start_loading(setup, pinned))
        key = reuse_key(folder.job.fingerprint, [str(f.path) for f in setup.files])
        inputs, engine, host_seconds = tokenize_while_loading(
            setup, background, layout.prepared_dir, key, folder.resumed
        )
    from bulkinfer.engines.select import fit_to_job  # imports torch: not at --help

    size = job_size(inputs, engine.limits, shard)
    engine = fit_to_job(engine, options, setup.config, size)
    # the process's age at the start is its imports' time only where the process is the command's
    imports = imports_seconds(started) if process.OWN else None
    host_seconds.update(setup_seconds=setup_seconds, imports_seconds=imports)
    at_once.check()  # a stop raised where Python drops exceptions (a callback) is kept here
    plan = record_plan(inputs, engine, folder, shard)
    manifest = Manifest(layout)
    todo = batches_to_do(manifest, plan, folder.resumed, inputs.prepared.lengths)
    log_start(layout, inputs, plan, todo, engine, shard)
    schema = part_schema(inputs.task.schema)
    progress = Progress(
        plan.batches,
        todo,
        row_work(inputs),
        spec.progress.log_every_seconds,
        "new" if inputs.task.streams else "input",
    )
    run_id = uuid.uuid4().hex[:12]
    every_rows, every_seconds = spec.checkpoint.every_rows, spec.checkpoint.every_seconds
    try:
        with PartWriter(
            layout, manifest, schema, every_rows, run_id, log_checkpoint, every_seconds
        ) as writer:
            at_once.check()
            signum = run_batches(inputs, engine, todo, writer, progress, started, host_seconds)
    finally:  # a terminal's bar ends its line before whatever is said of an error or a stop
        progress.close()
    if signum is not None:
        return stopped(signum, overwrite)
    at_once.finish()
    summary = finish_job(
        layout, manifest, inputs.prepared, schema, run_id, started, plan.rows, shard is not None
    )
    if shard is None and folder.job.openai_responses:
        write_responses(layout, spec.model.path, inputs.setup.tokenizer)
    write_summary(layout, summary, inputs, plan, engine, host_seconds)
    from bulkinfer.engines.select import remember_compiled

    remember_compiled(engine, options, inputs.setup.config)
    if shard is None:
        log_next_steps(layout, folder.job.openai_responses)
    return 0


def finished_already(setup: JobSetup, layout: OutputLayout, shard: Shard | None) -> int:
    """A run of a job whose folder says it finished: nothing to do but what a run killed after
    its summary, or a job that finished without OpenAI responses asked of it now, left out."""
    # a run killed between writing the summary and removing its tokenized input left it
    shutil.rmtree(layout.prepared_dir, ignore_errors=True)
    written = layout.responses.exists() and layout.errors.exists()
    if shard is None and setup.openai_responses and not written:
        # output.format: openai asked of a job that finished without it
        write_responses(layout, setup.spec.model.path, setup.tokenizer)
        return 0
    log(
        f"{layout.root}: this job already finished; nothing to do (--overwrite runs it again)",
        event="finish",
        already_finished=True,
    )
    if shard is None:
        log_next_steps(layout, layout.responses.exists())
    return 0


def run_batches(inputs: Inputs, engine, todo, writer, progress, started, timings) -> int | None:
    """Run the batches still to do, committing parts as they fill; returns the signal that
    stopped the run after its batches in flight, or None when every batch ran. Generation runs
    as one stream over the whole job (job/stream.py); the rest a batch at a time."""
    cap, cost = RowCap(), model_cost(engine)
    if len(todo):  # start-up, load included (none where every batch had run)
        timings["first_batch_seconds"] = time.monotonic() - started
    with stop_signals() as stop:
        if inputs.task.streams:
            todo = run_stream(inputs, engine, todo, writer, progress, started, stop, cost)
        for batch in todo:
            if stop.signum is not None:
                break
            faults.checkpoint("batch_start")
            faults.slow_batch()
            stats = run_one(inputs, engine, batch, writer, cap, cost, started)
            progress.update(batch, stats.new_tokens if inputs.task.streams else batch.real_tokens)
        writer.flush(time.monotonic() - started)
        progress.close()
        return stop.signum


def run_one(inputs: Inputs, engine, batch, writer, cap, cost, started):
    """One batch, bisected down to the rows that fail, handed to the part writer."""
    prepared = inputs.prepared
    table, stats = run_batch(inputs.task, engine, prepared, batch, writer.schema, cap, cost)
    if inputs.setup.spec.on_error == "fail" and stats.failed_rows:
        writer.flush(time.monotonic() - started)
        raise RowFailedError(first_failure(prepared, table))
    writer.add(table, batch.index, stats.to_dict(), time.monotonic() - started)
    return stats


def log_checkpoint(manifest: Manifest) -> None:
    """A committed part, for log collectors (plain logs stay quiet: parts come every minute);
    called on the writer thread right after the commit."""
    part = manifest.records[-1]
    log(
        f"committed {part.file}: {counted(part.rows, 'row')}",
        event="checkpoint",
        json_only=True,
        part=part.file,
        rows=part.rows,
        batches=len(part.batches),
        rows_committed=manifest.rows_committed,  # (a sum over the records: parts squared)
    )
