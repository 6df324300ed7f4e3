"""`bulkinfer validate`: check a job before it is queued, in seconds, without loading weights.

It checks what `run` would otherwise find only after the queue wait: the spec, the model's
tokenizer and config, every input file's columns (Parquet schema, JSONL first records), and the
output folder. Rows are counted where that is cheap; no prompt is tokenized.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import pyarrow.parquet as pq

from bulkinfer.errors import (
    InputError,
    OutputFolderError,
    RowFailedError,
    WriteError,
    counted,
    did_you_mean,
)
from bulkinfer.io.chunks import ColumnNames
from bulkinfer.io.files import DataFile
from bulkinfer.io.jsonl import _jsonl_records, compression_of
from bulkinfer.io.layout import OutputLayout
from bulkinfer.io.readers import datasets_rows, peek_columns, read_chunks
from bulkinfer.prepare.ids import chunk_ids, first_duplicate
from bulkinfer.prepare.tokenize import row_problems
from bulkinfer.spec import JobSpec
from bulkinfer.state.fingerprint import RunIdentity
from bulkinfer.state.folder import (
    differences,
    finished_damage,
    foreign_message,
    has_results,
    holds_foreign,
    refuse_file_above,
    refuse_not_a_folder,
)
from bulkinfer.state.records import JobRecord, read_json

# JSONL records read to find the keep columns (the reader only needs one row to have each).
KEEP_SCAN_RECORDS = 10_000
FIRST_ROWS = 100  # rendered by validate, as run renders them
# Uncompressed JSONL up to this size has its rows counted (a fast line scan).
COUNT_JSONL_BYTES = 4 << 30


@dataclass(frozen=True)
class InputFile:
    path: str
    format: str
    rows: int | None  # None: not cheap to count (large or compressed JSONL)


@dataclass(frozen=True)
class JobCheck:
    """What validate found: enough for a short OK summary."""

    model: str
    max_context: int | None
    task: str
    columns: ColumnNames
    files: list[InputFile]
    output: str
    output_state: str
    # of the first rows rendered: how many, and where and why each that cannot run fails
    rows_checked: int = 0
    row_problems: tuple[str, ...] = ()


def check_job(spec: JobSpec) -> JobCheck:
    """Raise a UserError naming the first problem; return what was checked when all is well.
    The set-up is `run`'s own (job/setup.py), so validate accepts exactly the jobs run does."""
    from bulkinfer.engines.hf import refuse_unknown_attention, resolve_device
    from bulkinfer.job.resume import run_identity
    from bulkinfer.job.setup import set_up

    setup = set_up(spec)
    resolve_device(spec.model.device)  # a GPU asked for where none is visible, as run refuses it
    refuse_unknown_attention(spec.model.attn_implementation)  # (run's loader refuses it)
    line_bytes = spec.input.max_line_bytes
    checked = [check_input_file(file, setup.columns, line_bytes) for file in setup.files]
    if all(f.rows == 0 for f in checked):  # as run finds it, before loading the model
        shown = checked[0].path if len(checked) == 1 else f"{len(checked)} files"
        raise InputError(f"the input has no rows ({shown})")
    checked_rows, problems = render_first_rows(setup)
    return JobCheck(
        model=spec.model.path,
        max_context=setup.task.max_context,
        task=setup.task.name,
        columns=setup.columns,
        files=checked,
        output=spec.output.path,
        output_state=output_state(Path(spec.output.path), lambda: run_identity(setup)),
        rows_checked=checked_rows,
        row_problems=tuple(problems),
    )


def render_first_rows(setup) -> tuple[int, list[str]]:
    """The first rows of the first file checked as `run` checks them, without the weights:
    the first chunk's ids (null, mixed, not Unicode, repeated within it) and its first rows
    rendered, so what is wrong with the whole input there (chat messages for a tokenizer
    without a chat template) is found; a row's own problem stays that row's error, unless
    the job says `on_error: fail`. Returns the rows rendered and each problem found, with
    where its row is."""
    chunks = read_chunks(setup.files[:1], setup.columns, setup.spec.input.max_line_bytes)
    try:
        chunk = next(iter(chunks), None)
    finally:
        chunks.close()
    if chunk is None:
        return 0, []
    if chunk.ids is not None:
        chunk_ids(chunk)
        first_duplicate(chunk)
    problems = row_problems(chunk.head(FIRST_ROWS), setup.tokenizer, setup.options)
    if setup.spec.on_error == "fail" and problems:
        i = min(problems)
        raise RowFailedError(
            f"{chunk.location(i)}: {problems[i]} (on_error: fail; on_error: record keeps such "
            "rows as row errors)"
        )
    rendered = min(len(chunk.prompts), FIRST_ROWS)
    return rendered, [
        f"{chunk.location(i)}: {problems[i]}" for i in sorted(problems) if i < rendered
    ]


def check_input_file(file: DataFile, columns: ColumnNames, max_line_bytes: int) -> InputFile:
    """The file's columns hold everything the job reads; its rows counted if cheap. An empty
    file among others is passed over, as run passes it over."""
    path, kind = file.path, file.kind
    layout = kind if kind in ("saved", "openai", "datasets") else file.layout
    names = peek_columns(file, max_line_bytes)
    if not names:  # no row, or only lines too long to read (row errors when run)
        return InputFile(path, kind, count_rows(path, layout))
    columns.refuse_absent_id(names, path, "column" if layout != "jsonl" else "field")
    required = [columns.prompt, columns.completion, columns.choices, columns.id]
    lines = layout in ("jsonl", "openai")  # records that each hold the fields they have
    if not lines:  # a file with a schema: every column is in it
        required += list(columns.keep)
    for name in (n for n in required if n is not None):
        if name not in names:
            raise InputError(
                f"{path}: no column '{name}'{did_you_mean(name, names)}; "
                f"the {'first line' if lines else 'file'} has: {', '.join(names)}"
            )
    if lines:
        _check_jsonl_keep_columns(path, columns.keep)
    return InputFile(path, kind, count_rows(path, layout))


def _check_jsonl_keep_columns(path: str, keep: tuple[str, ...]) -> None:
    """A keep column must appear in some row; it is looked for in the first records only."""
    missing = set(keep)
    seen: dict[str, None] = {}
    scanned = 0
    for _, record in islice(_jsonl_records(path), KEEP_SCAN_RECORDS):
        missing -= record.keys()
        seen.update(dict.fromkeys(record))
        scanned += 1
        if not missing:
            return
    if missing and scanned < KEEP_SCAN_RECORDS:
        name = sorted(missing)[0]
        raise InputError(
            f"{path}: no row has the keep column '{name}'{did_you_mean(name, seen)}; "
            f"the rows have: {', '.join(seen)}"
        )


def count_rows(path: str, kind: str) -> int | None:
    if kind == "parquet":
        return pq.ParquetFile(path).metadata.num_rows
    if kind == "datasets":
        return datasets_rows(path)
    if kind not in ("jsonl", "openai"):  # a saved dataset: counted when run reads it
        return None
    if compression_of(path) or os.path.getsize(path) > COUNT_JSONL_BYTES:
        return None
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip(b" \t\r\n\xef\xbb\xbf"))  # BOM: not a row


def output_state(root: Path, identity: Callable[[], RunIdentity]) -> str:
    """What `run` will do with the output folder; a folder it would refuse is an error here.
    `identity`: this job's fingerprint (job/resume.py run_identity), which hashes the model's
    files where the digest cache has not, so it is taken only for a folder holding a job."""
    refuse_not_a_folder(root)
    if not root.exists():
        refuse_file_above(root)
        _refuse_unwritable(root, next(p for p in root.parents if p.is_dir()))
        return "new folder"
    _refuse_unwritable(root, root)
    layout = OutputLayout(root)
    record = JobRecord.read(layout.job_file)  # an unreadable record: the line run gives
    splits = sorted({n for _, n in layout.shard_folders()}) if record is None else []
    if splits:  # a sharded run: its shards' records say which job it is (any one of them)
        for folder in layout.shard_folders().values():
            shard = OutputLayout(folder)
            record = JobRecord.read_if_there(shard.job_file)
            if record is not None and has_results(shard):
                layout = shard
                break
    ours = record is not None and has_results(layout)  # (run replaces a job with none)
    # as run compares them: the spec, the model's files, the input's contents, what `auto`
    # resolves to (a finished job whose input was edited since is another job's folder)
    reasons = differences(record, identity()) if ours else None
    if reasons:
        raise OutputFolderError(
            f"output.path: {root} holds another job's outputs ({reasons}); run "
            "would refuse it: use another --output, or pass --overwrite to run"
        )
    if splits:
        n = splits[-1]
        return (
            f"holds a run of a job split into {n} shards: `run --shard I/{n}` (or --gpus {n}) "
            "resumes it if spec, model and input are unchanged; run without them refuses it"
        )
    if layout.job_file.exists() and _finished(layout):
        return (
            "holds this job, finished: run has nothing to do if spec, model and input are "
            "unchanged; --overwrite runs it again"
        )
    if layout.job_file.exists() or layout.shards_dir.is_dir():
        return "holds a bulkinfer job: run resumes it if spec, model and input are unchanged"
    if holds_foreign(layout):
        raise OutputFolderError(f"output.path: {foreign_message(layout)}")
    return "empty folder"


def _finished(layout: OutputLayout) -> bool:
    """Whether run would find the job finished (its summary complete, nothing damaged)."""
    summary = read_json(layout.summary) or {}
    return bool(summary.get("complete")) and finished_damage(layout) is None


def _refuse_unwritable(root: Path, where: Path) -> None:
    """`run` would stop at its first write (exit 74): a folder made and removed in `where` (the
    output folder, or the nearest folder above it that exists) says so now. Permission bits
    alone do not (root ignores them; a read-only mount or a network file system decides)."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".bulkinfer-probe-", dir=where))
    except OSError as exc:
        raise WriteError(
            f"output.path: cannot write {root}: {exc.strerror or exc} (in {where})"
        ) from None


def format_check(job: str, check: JobCheck) -> str:
    """The short OK summary `bulkinfer validate` prints."""
    rows = [f.rows for f in check.files]
    total = (
        counted(sum(rows), "row")
        if None not in rows
        else "rows not counted here (compressed, large or a saved dataset)"
    )
    cols = check.columns
    column_text = f"prompt '{cols.prompt}'"
    if cols.completion:
        column_text += f", completion '{cols.completion}'"
    if cols.choices:
        column_text += f", choices '{cols.choices}'"
    column_text += f", id '{cols.id}'" if cols.id else ", id: the row position"
    if cols.keep:
        column_text += f", keep {', '.join(cols.keep)}"
    first = check.files[0].path
    more = f" and {len(check.files) - 1} more" if len(check.files) > 1 else ""
    context = f"context {check.max_context:,} tokens" if check.max_context else "context unknown"
    lines = [
        f"{job}: OK (weights not loaded)",
        ("model", f"{check.model} ({context})"),
        ("task", check.task),
        ("input", f"{len(check.files)} file{'s' * (len(check.files) > 1)}, {total}: {first}{more}"),
        ("columns", column_text),
        ("output", f"{check.output} ({check.output_state})"),
    ]
    if check.row_problems:
        n, of = len(check.row_problems), check.rows_checked
        if of == 1:
            share = "the input's one row cannot run"
        elif n == of:
            share = f"none of the first {of} rows can run"
        else:
            share = f"{n} of the first {of} rows cannot run"
        first = check.row_problems[0]
        lines.append(("rows", f"{share} (run writes them with their error); first: {first}"))
    return "\n".join([lines[0], *(f"  {k:<8} {v}" for k, v in lines[1:])])
