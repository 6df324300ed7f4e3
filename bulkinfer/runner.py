"""The job loop: read -> tokenize -> plan -> run -> write, resumable at any point.

Data flows one way. The output folder holds all state (fingerprint, manifest, parts), so a
rerun of the same job picks up exactly the batches that were not committed. Host work overlaps
the model: the weights load while the input is tokenized, and parts are written on a background
thread while the next batch runs.
"""

from __future__ import annotations

import dataclasses
import shutil
import signal
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from bulkinfer import faults
from bulkinfer.checkpoint import (
    Manifest,
    OutputLayout,
    fingerprint,
    input_files_digest,
    open_job_folder,
    save_job,
)
from bulkinfer.errors import InputError, RowFailedError, SpecError, WriteError
from bulkinfer.io.atomic import write_json_atomic
from bulkinfer.io.outputs import (
    PartWriter,
    assemble_outputs,
    error_rows_table,
    part_schema,
    rows_table,
    write_stats,
)
from bulkinfer.io.readers import (
    ColumnNames,
    file_format,
    peek_columns,
    read_chunks,
    resolve_input_files,
)
from bulkinfer.model_files import (
    load_config,
    load_tokenizer,
    local_model_folder,
    model_identity,
)
from bulkinfer.overlap import in_background, timed
from bulkinfer.plan import Batch, TokenBudget, assign_shards, padding_fraction, plan_batches
from bulkinfer.prepare import (
    PreparedRows,
    RenderOptions,
    prepare_rows,
    prepared_location,
    render_options,
)
from bulkinfer.progress import Progress, log, log_format, set_log_context
from bulkinfer.sharding import Shard
from bulkinfer.spec import JobSpec
from bulkinfer.stats import BatchStats, format_summary, stats_table, summarize
from bulkinfer.tasks.base import InputKind, Task, make_task

ROW_FAILURES = (RuntimeError, IndexError)


@dataclass
class Inputs:
    """The tokenized input, with what the model's tokenizer and config say about it."""

    files: list[str]
    tokenizer: object
    config: object
    max_context: int | None
    prepared: PreparedRows
    kind: InputKind
    task: Task


@dataclass(frozen=True)
class TaskSetup:
    """What reading the input needs, known in a moment from the files' first columns and the
    model's tokenizer and config: no row is read and no weight loaded yet."""

    files: list[str]
    columns: ColumnNames
    tokenizer: object
    config: object
    kind: InputKind
    task: Task
    options: RenderOptions


def set_up_task(spec: JobSpec, files: list[str] | None = None) -> TaskSetup:
    """The task fitted to the model and the input's columns; spec and model-folder errors
    surface here."""
    files = files or resolve_input_files(
        spec.input.path, spec.input.format, spec.output.path, spec.input.split
    )
    per_request = is_openai_batch(spec, files)
    columns = column_names(spec, files[0], per_request)
    tokenizer = load_tokenizer(spec.model)
    config = load_config(spec.model)
    kind = InputKind(per_request=per_request, choices=columns.choices is not None)
    task = make_task(spec, tokenizer, config, kind)
    options = render_options(
        spec.task,
        tokenizer,
        task.max_context,
        columns.completion is not None,
        has_choices=columns.choices is not None,
    )
    if per_request:  # a completions request's prompt is raw text, never a chat turn
        options = dataclasses.replace(options, use_chat_for_text=False)
    return TaskSetup(files, columns, tokenizer, config, kind, task, options)


def read_inputs(
    spec: JobSpec,
    files: list[str] | None = None,
    spill: Path | None = None,
    keep_tokens: bool = False,
) -> Inputs:
    """Read and tokenize the whole input; user errors surface here, before any batch runs."""
    return tokenize_inputs(spec, set_up_task(spec, files), spill, keep_tokens)


def tokenize_inputs(
    spec: JobSpec, setup: TaskSetup, spill: Path | None, keep_tokens: bool
) -> Inputs:
    """Only lengths are kept unless `keep_tokens`: then token ids, ids and kept columns go to
    files in `spill` (a temporary folder when None)."""
    chunks = read_chunks(setup.files, setup.columns, spec.input.format)
    prepared = prepare_rows(chunks, setup.tokenizer, setup.options, spill, keep_tokens)
    max_context = setup.task.max_context
    if prepared.truncated:
        log(
            f"{len(prepared.truncated):,} rows longer than {max_context} tokens are truncated "
            "(task.truncate; counted per row in truncated_tokens)"
        )
    return Inputs(
        setup.files,
        setup.tokenizer,
        setup.config,
        max_context,
        prepared,
        setup.kind,
        setup.task,
    )


def read_while_loading(spec: JobSpec, files: list[str], spill: Path) -> tuple[Inputs, object, dict]:
    """Tokenize the input on this thread while the weights load on another (safetensors and the
    Rust tokenizer both release the GIL); returns the inputs, the engine and the seconds each
    took. An input error stops the job before any batch runs, the loading waited for and
    dropped; a loading error is raised as the loader raised it."""
    setup = set_up_task(spec, files)
    check_output_columns(spec, setup.task)
    load = setup.task.load_engine
    with in_background(timed, load, spec.model, setup.tokenizer, name="bulkinfer-load") as loading:
        start = time.monotonic()
        inputs = tokenize_inputs(spec, setup, spill, keep_tokens=True)
        prepare_seconds = time.monotonic() - start
        check_no_failed_rows(spec, inputs.prepared)
        engine, load_seconds = loading.result()
    return inputs, engine, {"load_seconds": load_seconds, "prepare_seconds": prepare_seconds}


def check_no_failed_rows(spec: JobSpec, prepared: PreparedRows) -> None:
    """With `on_error: fail`, a row that cannot even be tokenized stops the job."""
    if spec.on_error == "fail" and prepared.row_errors:
        row, message = min(prepared.row_errors.items())
        raise RowFailedError(
            f"{prepared_location(prepared, row)}: {message} "
            f"({len(prepared.row_errors)} such rows; on_error: record keeps them as row errors)"
        )


def is_openai_batch(spec: JobSpec, files: list[str]) -> bool:
    """Whether the input is OpenAI Batch API request files (all of it, or none)."""
    kinds = {file_format(f, spec.input.format) == "openai" for f in files}
    if len(kinds) > 1:
        raise InputError("the input mixes OpenAI batch request files with other files")
    if True in kinds and spec.task.type != "generate":
        raise SpecError(
            f"task.type: OpenAI batch requests are answered by generate, not {spec.task.type}"
        )
    if spec.output.format == "openai" and spec.task.type != "generate":
        raise SpecError("output.format: openai responses come from task.type generate")
    return True in kinds


def column_names(spec: JobSpec, first_file: str, per_request: bool = False) -> ColumnNames:
    """The columns to read; with no id_column, an input column named 'id' is the id if present,
    and with the default prompt_column, a file with `messages` but no `prompt` uses `messages`.
    An OpenAI batch file's requests are keyed by custom_id."""
    if per_request:
        keep = tuple(spec.input.keep_columns)
        return ColumnNames(prompt="body", completion=None, id="custom_id", keep=keep)
    present = peek_columns(first_file, spec.input.format)
    id_column = spec.input.id_column
    if id_column is None and "id" in present:
        id_column = "id"
    prompt = spec.input.prompt_column
    if prompt == "prompt" and "prompt" not in present and "messages" in present:
        prompt = "messages"
    return ColumnNames(
        prompt=prompt,
        completion=spec.input.completion_column,
        id=id_column,
        keep=tuple(spec.input.keep_columns),
        choices=spec.input.choices_column,
    )


def shard_rows(prepared: PreparedRows, task, shard: Shard | None) -> np.ndarray:
    """The input rows this process answers for: all of them, or its shard's, balanced by tokens."""
    if shard is None:
        return np.arange(prepared.num_rows)
    costs = prepared.lengths + task.new_tokens_per_row()
    return np.flatnonzero(assign_shards(costs, shard.count) == shard.index)


def all_shards_done(root: Path, count: int) -> bool:
    from bulkinfer.status import shard_states

    return all(s.state == "done" for s in shard_states(root, count))


@contextmanager
def failure_recorded(layout: OutputLayout, shard: Shard | None):
    """A shard that dies of an error leaves failed.json, so `bulkinfer status` can say so."""
    if shard is None:
        yield
        return
    layout.failed.unlink(missing_ok=True)
    try:
        yield
    except Exception as exc:
        if layout.root.exists():
            write_json_atomic(layout.failed, {"error": f"{type(exc).__name__}: {_first_line(exc)}"})
        raise


def check_output_columns(spec: JobSpec, task) -> None:
    """A kept input column must not shadow an output column of the task."""
    taken = {"id", "error", *task.schema.names}
    for name in spec.input.keep_columns:
        if name in taken:
            raise SpecError(
                f"input.keep_columns: '{name}' clashes with the {task.name} task's output column "
                "of the same name; rename it in the input or drop it from keep_columns"
            )


def token_budget(
    spec: JobSpec, max_tokens: int, new_tokens_per_row: int, max_rows: int | None = None
) -> TokenBudget:
    """The planner's budget; `max_rows` is the job's resolved batching.max_batch_size (the
    default's when None, as in `bulkinfer plan`, which loads no engine)."""
    batching = spec.batching
    rows = max_rows or batching.batch_rows()
    return TokenBudget(max_tokens, rows, new_tokens_per_row, batching.max_padding)


def run_job(spec: JobSpec, overwrite: bool = False, shard: Shard | None = None) -> int:
    """Run or resume a job, or one shard of it; returns the process exit code.

    A shard works in its own folder under OUT/shards/; the shard that finishes last merges."""
    root = Path(spec.output.path)
    layout = OutputLayout(shard.folder(root) if shard else root)
    with writes_reported(layout), failure_recorded(layout, shard):
        code = _run_job(spec, layout, overwrite, shard)
    if code == 0 and shard is not None and all_shards_done(root, shard.count):
        from bulkinfer.merge import merge_shards

        with writes_reported(OutputLayout(root)):
            summary = merge_shards(root)
        log(
            f"all {shard.count} shards done: merged {summary['rows_out']:,} rows into {root / 'outputs'}",
            event="merge",
            shards=shard.count,
            rows_out=summary["rows_out"],
        )
    return code


def _run_job(spec: JobSpec, layout: OutputLayout, overwrite: bool, shard: Shard | None) -> int:
    started = time.monotonic()
    run_id = uuid.uuid4().hex[:12]
    files = resolve_input_files(
        spec.input.path, spec.input.format, spec.output.path, spec.input.split
    )
    prints = fingerprint(spec.to_dict(), model_identity(spec.model), input_files_digest(files))
    if shard is not None:
        prints["shard"] = str(shard)
        set_log_context(shard=str(shard))
    folder = open_job_folder(layout, prints, spec.to_dict(), overwrite)
    if folder.finished:
        log(
            f"{layout.root}: this job already finished; nothing to do (--overwrite runs it again)",
            event="finish",
            already_finished=True,
        )
        return 0
    local_model_folder(spec.model)  # a GGUF model is converted (once) before anything else
    inputs, engine, host_seconds = read_while_loading(spec, files, layout.prepared_dir)
    prepared = inputs.prepared
    task = inputs.task
    mine = shard_rows(prepared, task, shard)
    folder.job.setdefault("max_tokens", _max_tokens(spec, task, engine, inputs.config))
    folder.job.setdefault("max_batch_size", _max_batch_size(spec, task, engine))
    folder.job["rows"] = len(mine)
    folder.job["openai_responses"] = spec.output.format == "openai" or (
        spec.output.format == "auto" and inputs.kind.per_request
    )
    _log_capped_requests(prepared, spec.task.max_new_tokens)
    budget = token_budget(
        spec, folder.job["max_tokens"], task.new_tokens_per_row(), folder.job["max_batch_size"]
    )
    runnable = prepared.runnable_rows()
    if shard is not None:
        runnable = np.intersect1d(runnable, mine)
    batches = plan_batches(runnable, prepared.lengths, budget, spec.batching.sort == "length")
    file_order = plan_batches(runnable, prepared.lengths, budget, sort=False)
    file_order_padding = padding_fraction(file_order)
    folder.job["plan"] = plan_facts(prepared, runnable, batches, file_order, len(mine))
    folder.job["device"] = engine.device_name
    save_job(layout, folder.job)  # the budget is kept, so a resume plans the very same batches
    manifest = Manifest(layout)
    for name in manifest.dropped:
        log(
            f"checkpoint: {name} is missing or corrupt; its rows will be recomputed",
            event="checkpoint",
            level="warning",
            dropped=name,
        )
    done = manifest.done_batches()
    todo = [b for b in batches if b.index not in done]
    if folder.resumed:
        log(
            f"resuming: {len(batches) - len(todo)} of {len(batches)} batches already done",
            event="resume",
            batches_done=len(batches) - len(todo),
            batches=len(batches),
        )
    where = f"shard {shard}: " if shard else ""
    log(
        f"{where}{len(mine):,} rows, {len(batches):,} batches, budget {budget.max_tokens:,} tokens, "
        f"padding {padding_fraction(batches):.1%}, device {engine.device_name}",
        event="start",
        rows=len(mine),
        batches=len(batches),
        batches_todo=len(todo),
        max_tokens=budget.max_tokens,
        padding_fraction=round(padding_fraction(batches), 4),
        device=engine.device_name,
        task=task.name,
        output=str(layout.root),
    )
    schema = part_schema(task.schema)
    every = spec.checkpoint.every_rows
    progress = Progress(batches, todo, budget.new_tokens_per_row, spec.progress.log_every_seconds)
    with PartWriter(layout, manifest, schema, every, run_id, log_checkpoint) as writer:
        signum = run_batches(spec, layout, task, engine, prepared, todo, writer, progress, started)
    if signum is not None:
        name = signal.Signals(signum).name
        log(
            f"stopped by {name}: the batch in flight was written; rerun the same command to resume",
            event="signal",
            level="warning",
            signal=name,
            exit_code=128 + signum,
        )
        return 128 + signum
    summary = finish_job(
        layout, manifest, prepared, schema, run_id, started, mine, shard is not None
    )
    if shard is None and folder.job.get("openai_responses"):
        write_responses(layout, spec.model.path)
    summary.update(host_seconds)
    summary.update(hardware_summary(summary, engine))
    summary.update(
        task=task.name,
        device=engine.device_name,
        engine=getattr(engine, "kind", type(engine).__name__),
        padding_fraction_file_order=file_order_padding,
    )
    write_json_atomic(layout.summary, summary)
    shutil.rmtree(layout.prepared_dir, ignore_errors=True)  # a finished job never reads it again
    log(
        f"finished: {summary['rows_out']:,} rows in {layout.root / 'outputs'}",
        event="finish",
        json_only=True,
        **summary,
    )
    if log_format() == "plain":
        print(format_summary(summary))
    return 0


def write_responses(layout: OutputLayout, model_path: str) -> None:
    from bulkinfer.io.openai_batch import write_responses_file

    lines = write_responses_file(layout, model_path)
    log(f"wrote {lines:,} OpenAI batch responses to {layout.responses}")


def _log_capped_requests(prepared: PreparedRows, max_new_tokens: int) -> None:
    """Requests asking for more tokens than the plan reserves get task.max_new_tokens: say so."""
    if prepared.request_params is None:
        return
    asked = prepared.request_params.column("max_new_tokens").to_numpy(zero_copy_only=False)
    capped = int(np.sum(np.nan_to_num(asked.astype(float), nan=0) > max_new_tokens))
    if capped:
        log(
            f"{capped:,} requests ask for more than task.max_new_tokens={max_new_tokens} tokens "
            "and stop there (finish_reason length); raise task.max_new_tokens to honour them"
        )


def plan_facts(
    prepared: PreparedRows, runnable: np.ndarray, batches: list[Batch], file_order, rows: int
) -> dict:
    """What `bulkinfer report` shows of the plan even before the job ends: the token-length
    histogram (fixed buckets, so shards add up), planned batches, padded tokens sorted and in
    file order."""
    from bulkinfer.plan import length_counts

    return {
        "batches": len(batches),
        "rows": rows,
        "row_errors": rows - len(runnable),
        "input_tokens": int(prepared.lengths[runnable].sum()) if len(runnable) else 0,
        "padded_tokens": sum(b.padded_tokens for b in batches),
        "padded_tokens_file_order": sum(b.padded_tokens for b in file_order),
        "length_histogram": length_counts(prepared.lengths[runnable]),
    }


def model_cost(engine):
    """The engine's ModelCost (FLOPs, weight and KV bytes per token, device peaks), if it has a
    torch model."""
    from bulkinfer.stats import ModelCost

    model = getattr(engine, "model", None)
    return ModelCost.of(model, engine.device_name) if model is not None else None


def rows_in_flight(engine, rows: float) -> float:
    """Rows that share a decode step: the batch, or at most the fast engine's slots."""
    slots = getattr(engine, "max_slots", None)
    return min(rows, slots) if slots else rows


def hardware_summary(summary: dict, engine) -> dict:
    cost = model_cost(engine)
    if cost is None or not summary["batches"]:
        return {}
    rows = summary["rows_out"]
    return cost.fractions(
        summary["input_tokens"],
        summary["output_tokens"],
        rows,
        summary["model_seconds"],
        rows_in_flight(engine, rows / summary["batches"]),
    )


def _max_batch_size(spec: JobSpec, task, engine) -> int:
    """Rows per batch at most: the spec's, or with `auto` as many as the engine keeps busy
    (kept in job.json, like the token budget, so a resume plans the same batches)."""
    engine_rows = getattr(engine, "batch_rows", None)
    generate = task.new_tokens_per_row() > 0
    return spec.batching.batch_rows(engine_rows(generate) if engine_rows else None)


def _max_tokens(spec: JobSpec, task, engine, config) -> int:
    """The batch token budget: the spec's, or with `auto` what the device's free memory holds."""
    from bulkinfer.engines.memory import auto_token_budget

    if spec.batching.max_tokens != "auto":
        return spec.batching.max_tokens
    generate = task.new_tokens_per_row() > 0
    if generate and hasattr(engine, "generate_token_budget"):
        return engine.generate_token_budget()
    return auto_token_budget(config, engine.device, engine.model.dtype, generate)


def run_batches(
    spec, layout, task, engine, prepared, todo, writer, progress, started
) -> int | None:
    """Run the batches still to do, committing parts as they fill; returns the signal that
    stopped the loop after its batch in flight, or None when every batch ran."""
    cap = RowCap()
    cost = model_cost(engine)
    with stop_signals() as stop:
        for batch in todo:
            faults.checkpoint("batch_start")
            faults.slow_batch()
            table, stats = run_batch(task, engine, prepared, batch, writer.schema, cap, cost)
            if spec.on_error == "fail" and stats.failed_rows:
                writer.flush(time.monotonic() - started)
                raise RowFailedError(_first_failure(prepared, table))
            writer.add(table, batch.index, stats.to_dict(), time.monotonic() - started)
            progress.update(batch, stats.real_tokens + stats.new_tokens)
            layout.heartbeat.touch()
            if stop.signum is not None:
                break
        writer.flush(time.monotonic() - started)
        progress.close()
        return stop.signum


def log_checkpoint(manifest: Manifest) -> None:
    """A committed part, for log collectors (plain logs stay quiet: parts come every minute);
    called on the writer thread right after the commit."""
    part = manifest.records[-1]
    log(
        f"committed {part.file}: {part.rows:,} rows",
        event="checkpoint",
        json_only=True,
        part=part.file,
        rows=part.rows,
        batches=len(part.batches),
        rows_committed=sum(r.rows for r in manifest.records),
    )


class RowCap:
    """The most rows per model call since the last out-of-memory error, as a share of the
    planned batch: after an OOM split, later batches run in pieces of the size that fitted, so
    one OOM is not paid again on every batch. Pieces keep the batch's identity in the plan, so
    checkpoints and resume are unaffected."""

    def __init__(self) -> None:
        self.padded_tokens: int | None = None

    def pieces(self, batch: Batch, new_tokens_per_row: int) -> list[np.ndarray]:
        if self.padded_tokens is None:
            return [batch.rows]
        per_row = batch.longest + new_tokens_per_row
        size = max(1, self.padded_tokens // max(per_row, 1))
        return [batch.rows[i : i + size] for i in range(0, len(batch.rows), size)][::-1]

    def shrink(self, rows: int, per_row: int) -> None:
        self.padded_tokens = max(per_row, (rows // 2) * per_row)


def run_batch(
    task,
    engine,
    prepared: PreparedRows,
    batch: Batch,
    schema,
    cap: RowCap | None = None,
    cost=None,
) -> tuple:
    """Run one batch; a failing batch is bisected so only the rows that really fail get an error."""
    cap = cap or RowCap()
    per_row = batch.longest + task.new_tokens_per_row()
    start = time.perf_counter()
    tables, failed, splits, new_tokens = [], 0, 0, 0
    pending = cap.pieces(batch, task.new_tokens_per_row())
    while pending:
        rows = pending.pop()
        try:
            faults.out_of_memory(len(rows) * per_row)
            result = task.run(engine, prepared, rows)
        except ROW_FAILURES as exc:
            _release_memory()
            if len(rows) > 1:
                if _is_out_of_memory(exc):
                    cap.shrink(len(rows), per_row)
                half = len(rows) // 2
                pending += [rows[half:], rows[:half]]
                splits += 1
                continue
            message = f"model failed on this row: {type(exc).__name__}: {_first_line(exc)}"
            empty = {n: [None] for n in schema.names if n not in ("row", "error")}
            tables.append(rows_table([int(rows[0])], empty, [message], schema))
            failed += 1
            continue
        new_tokens += result.new_tokens
        tables.append(rows_table(rows.tolist(), result.columns, [None] * len(rows), schema))
    seconds = time.perf_counter() - start
    in_flight = rows_in_flight(engine, len(batch.rows))
    fractions = (
        cost.fractions(batch.real_tokens, new_tokens, len(batch.rows), seconds, in_flight)
        if cost is not None
        else {}
    )
    stats = BatchStats(
        batch=batch.index,
        rows=len(batch.rows),
        real_tokens=batch.real_tokens,
        padded_tokens=batch.padded_tokens if getattr(engine, "pads", True) else batch.real_tokens,
        new_tokens=new_tokens,
        seconds=seconds,
        failed_rows=failed,
        splits=splits,
        ended_at=time.time(),
        **fractions,
    )
    return pa.concat_tables(tables), stats


def finish_job(layout, manifest, prepared, schema, run_id, started, rows, keep_row) -> dict:
    """Assemble the final dataset (or this shard's part of it) and the per-batch stats; returns
    the summary to write last."""
    bad = np.fromiter(prepared.row_errors, dtype=np.int64, count=len(prepared.row_errors))
    bad = bad[np.isin(bad, rows)]
    errors = error_rows_table({int(r): prepared.row_errors[int(r)] for r in bad}, schema)
    counts = assemble_outputs(
        layout, manifest, errors, prepared.row_columns, rows, keep_row=keep_row
    )
    records = [(r.run, s) for r in manifest.records for s in r.stats]
    write_stats(layout, stats_table(records))
    earlier = {}
    for r in manifest.records:
        if r.run != run_id:
            earlier[r.run] = max(earlier.get(r.run, 0.0), r.elapsed)
    wall = sum(earlier.values()) + (time.monotonic() - started)
    summary = summarize(
        stats=[s for _, s in records],
        rows_in=len(rows),
        rows_out=counts.rows,
        rows_by_status={"ok": counts.rows - counts.errors, "error": counts.errors},
        wall_seconds=wall,
    )
    return summary


@contextmanager
def writes_reported(layout: OutputLayout):
    """A failed write (disk full, permissions) ends the run with one line; what was committed
    before it stays valid, so a rerun resumes once the cause is fixed."""
    try:
        yield
    except OSError as exc:
        where = exc.filename
        root = str(layout.root.resolve())
        if not where or not str(Path(where).resolve()).startswith(root):
            raise
        raise WriteError(
            f"cannot write {where}: {exc.strerror or exc}; fix that and rerun to resume"
        ) from None


def _first_failure(prepared: PreparedRows, table) -> str:
    errors = table.column("error").to_pylist()
    rows = table.column("row").to_pylist()
    row, message = next((r, e) for r, e in zip(rows, errors, strict=True) if e is not None)
    return f"{prepared_location(prepared, row)}: {message} (on_error: fail)"


class _StopFlag:
    signum: int | None = None


@contextmanager
def stop_signals():
    """SIGTERM, SIGINT and SIGUSR1 ask the loop to stop after the batch in flight; a second
    SIGINT aborts."""
    flag = _StopFlag()
    previous = {}

    def handler(signum, frame):
        if flag.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag.signum = signum
        log(
            f"{signal.Signals(signum).name} received: finishing the batch in flight, then stopping",
            event="signal",
            signal=signal.Signals(signum).name,
        )

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):  # USR1: Slurm's time warning
        previous[sig] = signal.signal(sig, handler)
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _is_out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _release_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def plan_report(spec: JobSpec, inputs: Inputs, max_tokens: int) -> dict:
    """What `bulkinfer plan` prints: rows, length histogram, batches, padding file order vs sorted."""
    from bulkinfer.plan import length_histogram

    prepared = inputs.prepared
    task = inputs.task
    budget = token_budget(spec, max_tokens, task.new_tokens_per_row())
    rows = prepared.runnable_rows()
    lengths = prepared.lengths
    sorted_plan = plan_batches(rows, lengths, budget, sort=True)
    file_plan = plan_batches(rows, lengths, budget, sort=False)
    return {
        "rows": prepared.num_rows,
        "runnable_rows": int(len(rows)),
        "row_errors": len(prepared.row_errors),
        "input_tokens": int(lengths[rows].sum()) if len(rows) else 0,
        "max_tokens": max_tokens,
        "max_batch_size": budget.max_batch_size,
        "new_tokens_per_row": task.new_tokens_per_row(),
        "histogram": length_histogram(lengths[rows]),
        "batches_sorted": len(sorted_plan),
        "batches_file_order": len(file_plan),
        "padding_sorted": padding_fraction(sorted_plan),
        "padding_file_order": padding_fraction(file_plan),
        "lengths": {
            "min": int(lengths[rows].min()) if len(rows) else 0,
            "median": float(np.median(lengths[rows])) if len(rows) else 0,
            "max": int(lengths[rows].max()) if len(rows) else 0,
        },
        "example_errors": sorted(prepared.row_errors.items())[:5],
    }
