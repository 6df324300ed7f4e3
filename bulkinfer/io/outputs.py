"""Writing results: checkpoint parts while the job runs, the final dataset once it is done.

Parts hold `row` (the input position) plus the task's columns and `error`. The final outputs put
rows back in input order and attach the id and the kept input columns, a range of rows at a time.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bulkinfer import faults
from bulkinfer.io.atomic import (
    fresh_folder,
    fsync_dir,
    remove_tree,
    write_bytes_atomic,
    write_parquet_atomic,
)
from bulkinfer.io.layout import OutputLayout

OUTPUT_FILE_ROWS = faults.size_setting("BULKINFER_OUTPUT_FILE_ROWS", 1_000_000)
# rows of results sorted in memory at a time
BUCKET_ROWS = faults.size_setting("BULKINFER_BUCKET_ROWS", 262_144)
MAX_BUCKETS = 1024  # open bucket files; beyond BUCKET_ROWS x MAX_BUCKETS rows buckets grow
# rows joined with their id and kept columns at a time, within a bucket: the kept columns are
# read, reordered and written per slice (a bucket's 262,144 rows of 2.5 KB kept documents took
# 1.7-2 GB at once)
SLICE_ROWS = faults.size_setting("BULKINFER_OUTPUT_SLICE_ROWS", 16_384)
# an output file's row groups: this many rows, or fewer where they would hold more than
# GROUP_BYTES (kept documents), whatever the slices and buckets they are written from
GROUP_ROWS = faults.size_setting("BULKINFER_OUTPUT_GROUP_ROWS", 65_536)
GROUP_BYTES = faults.size_setting("BULKINFER_OUTPUT_GROUP_BYTES", 64 << 20)

# `datasets.load_dataset(OUT)` reads this card's config, so it loads outputs/ only, never the
# stats or checkpoint Parquet files beside it.
DATASET_CARD = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: outputs/*.parquet
---
Outputs of a bulkinfer job: one row per input row in `outputs/`, per-batch figures in
`stats/batches.parquet`, totals in `summary.json`.
"""


def part_schema(task_schema: pa.Schema) -> pa.Schema:
    return pa.schema([("row", pa.int64()), *task_schema, ("error", pa.string())])


def rows_table(
    rows: list[int], columns: dict[str, list[Any]], errors: list[str | None], schema: pa.Schema
) -> pa.Table:
    data = {"row": rows, **columns, "error": errors}
    return pa.table({name: data[name] for name in schema.names}, schema=schema)


def error_rows_table(row_errors: dict[int, str], schema: pa.Schema) -> pa.Table:
    """Rows that never ran: nulls in every task column, the reason in `error`."""
    rows = sorted(row_errors)
    n = len(rows)
    columns = {f.name: pa.nulls(n, f.type) for f in schema if f.name not in ("row", "error")}
    return pa.table(
        {"row": pa.array(rows, pa.int64()), **columns, "error": [row_errors[r] for r in rows]},
        schema=schema,
    )


@dataclass(frozen=True)
class OutputCounts:
    rows: int
    errors: int


def assemble_outputs(
    layout: OutputLayout,
    part_files: list[Path],
    error_rows: pa.Table,
    row_columns: Callable[[np.ndarray], pa.Table],
    expected_rows: np.ndarray,
    keep_row: bool = False,
) -> OutputCounts:
    """Write OUT/outputs/*.parquet: every expected input row once, in input order, with its id
    and kept columns (`row_columns(rows)`), and its input position `row` for a shard's
    part. Parts are read one at a time, never all at once."""
    parts = (conformed(pq.read_table(path), error_rows.schema) for path in part_files)
    return write_sorted_outputs(
        layout, chain(parts, [error_rows]), expected_rows, row_columns, keep_row
    )


def conformed(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """A committed part in the job's output schema: a part an earlier version wrote, before a
    column was added (top_logprobs, say), resumes with that column null in its rows."""
    if table.schema.equals(schema):
        return table
    columns = [
        table.column(f.name).cast(f.type)
        if f.name in table.schema.names
        else pa.nulls(table.num_rows, f.type)
        for f in schema
    ]
    return pa.Table.from_arrays(columns, schema=schema)


def write_sorted_outputs(
    layout: OutputLayout,
    tables: Iterable[pa.Table],
    expected_rows: np.ndarray,
    row_columns: Callable[[np.ndarray], pa.Table] | None = None,
    keep_row: bool = False,
) -> OutputCounts:
    """Put result tables (each with a `row` column, in any order) into input order, in bounded
    memory: an external bucket sort. Pass one appends each table's rows to the bucket of their
    row range (Arrow stream files under OUT/outputs.buckets); pass two sorts one bucket at a
    time, checks it holds exactly its expected rows, joins the id and kept columns and appends it
    to the output files, SLICE_ROWS at a time. Memory holds one input table, one bucket of
    results and one slice's kept columns."""
    expected_rows = np.asarray(expected_rows, dtype=np.int64)
    span = int(expected_rows[-1]) + 1 if len(expected_rows) else 0
    width = max(BUCKET_ROWS, -(-span // MAX_BUCKETS))
    folder = layout.outputs_buckets
    fresh_folder(folder)
    buckets = _Buckets(folder, width)
    for table in tables:
        buckets.add(table)
    buckets.close()
    tmp = layout.outputs_tmp
    fresh_folder(tmp)
    files = _OutputFiles(tmp)
    problems = _RowProblems()
    errors = 0
    for k in range(max(-(-span // width), buckets.highest + 1)):
        results = buckets.read(k)
        results = results.take(np.argsort(results.column("row").to_numpy(), kind="stable"))
        lo, hi = np.searchsorted(expected_rows, [k * width, (k + 1) * width])
        expected = expected_rows[lo:hi]
        rows = results.column("row").to_numpy()
        if not problems.add(rows, expected):
            continue
        if results.num_rows:
            errors += results.num_rows - results.column("error").null_count
        for at in range(0, results.num_rows, SLICE_ROWS):  # rows as expected, in order now
            piece = results.slice(at, SLICE_ROWS)
            files.write(_output_table(piece, expected[at : at + SLICE_ROWS], row_columns, keep_row))
    shutil.rmtree(folder, ignore_errors=True)
    problems.raise_if_any(len(expected_rows))
    if files.schema is None:  # no rows at all: one empty file with the right columns
        empty = buckets.schema.empty_table()
        files.write(_output_table(empty, expected_rows[:0], row_columns, keep_row))
    files.close()
    faults.checkpoint("outputs_written")
    _swap_in(layout, tmp)
    return OutputCounts(len(expected_rows), errors)


def _output_table(results: pa.Table, expected: np.ndarray, row_columns, keep_row) -> pa.Table:
    if row_columns is None:
        columns = {n: results.column(n) for n in results.column_names if n != "row"}
    else:
        given = row_columns(expected)
        columns = {"id": given.column("id")}
        columns.update({n: results.column(n) for n in results.column_names if n != "row"})
        columns.update({n: given.column(n) for n in given.column_names if n != "id"})
    if keep_row:
        columns["row"] = results.column("row")
    return pa.table(columns)


class _Buckets:
    """Result rows grouped by input row range, one Arrow stream file per range."""

    def __init__(self, folder: Path, width: int):
        self.folder = folder
        self.width = width
        self.schema: pa.Schema | None = None
        self.highest = -1
        self._writers: dict[int, pa.ipc.RecordBatchStreamWriter] = {}

    def add(self, table: pa.Table) -> None:
        if self.schema is None:
            self.schema = table.schema
        if table.num_rows == 0:
            return
        table = table.cast(self.schema)
        which = table.column("row").to_numpy() // self.width
        order = np.argsort(which, kind="stable")
        which = which[order]
        cuts = np.flatnonzero(np.diff(which)) + 1
        for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, len(which)], strict=True):
            k = int(which[lo])
            writer = self._writer(k)
            faults.write_attempt(self._file(k))
            writer.write_table(table.take(pa.array(order[lo:hi])))

    def _writer(self, k: int) -> pa.ipc.RecordBatchStreamWriter:
        if k not in self._writers:
            faults.write_attempt(self._file(k))
            self._writers[k] = pa.ipc.new_stream(str(self._file(k)), self.schema)
            self.highest = max(self.highest, k)
        return self._writers[k]

    def _file(self, k: int) -> Path:
        return self.folder / f"bucket-{k:06d}.arrow"

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()

    def read(self, k: int) -> pa.Table:
        if k not in self._writers:
            return self.schema.empty_table()
        with pa.memory_map(str(self._file(k))) as source:
            table = pa.ipc.open_stream(source).read_all()
        return table.combine_chunks() if table.num_rows else table


class _RowProblems:
    """rows_in == rows_out, checked bucket by bucket and reported once with the totals."""

    def __init__(self) -> None:
        self.results = self.missing = self.doubled = 0

    def add(self, rows: np.ndarray, expected: np.ndarray) -> bool:
        self.results += len(rows)
        if len(rows) == len(expected) and np.array_equal(rows, expected):
            return True
        self.missing += len(np.setdiff1d(expected, rows))
        self.doubled += len(rows) - len(np.unique(rows))
        return False

    def raise_if_any(self, expected: int) -> None:
        if self.results != expected or self.missing or self.doubled:
            raise RuntimeError(
                f"rows_in != rows_out: {expected} input rows, {self.results} results "
                f"({self.missing} missing, {self.doubled} doubled); the checkpoint is inconsistent"
            )


class _OutputFiles:
    """Output Parquet files of OUTPUT_FILE_ROWS rows each, appended to in order, fsynced. Tables
    written are held until they fill a row group (GROUP_ROWS, or about GROUP_BYTES, rows sized
    by their table's average): each Parquet write is a row group of its own, and the slices are
    far smaller."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.count = 0
        self.schema: pa.Schema | None = None
        self._writer: pq.ParquetWriter | None = None
        self._rows_in_file = 0
        self._held: list[pa.Table] = []
        self._held_rows = self._held_bytes = 0

    def write(self, table: pa.Table) -> None:
        if self.schema is None:
            self.schema = table.schema
        table = table.cast(self.schema)
        # a group past GROUP_BYTES ends within a table: wide kept columns (documents of
        # megabytes) made one group of a whole slice, gigabytes read back whole
        row_bytes = max(1, table.nbytes // max(1, table.num_rows))
        while table.num_rows:
            if self._writer is None or self._rows_in_file == OUTPUT_FILE_ROWS:
                self._next_file()
            fits = max(1, (GROUP_BYTES - self._held_bytes) // row_bytes)
            room = min(OUTPUT_FILE_ROWS - self._rows_in_file, GROUP_ROWS - self._held_rows, fits)
            piece = table.slice(0, min(table.num_rows, room))
            self._held.append(piece)
            self._held_rows += piece.num_rows
            self._held_bytes += piece.nbytes
            self._rows_in_file += piece.num_rows
            table = table.slice(piece.num_rows)
            if piece.num_rows == room or self._held_bytes >= GROUP_BYTES:
                self._write_group()

    def _write_group(self) -> None:
        if not self._held:
            return
        faults.write_attempt(self._path)
        group = pa.concat_tables(self._held)
        self._writer.write_table(group, row_group_size=group.num_rows)
        self._held, self._held_rows, self._held_bytes = [], 0, 0

    def _next_file(self) -> None:
        self._close_file()
        path = self.folder / f"part-{self.count:05d}.parquet"
        faults.write_attempt(path)
        self._writer = pq.ParquetWriter(path, self.schema, compression="zstd")
        self._path = path
        self._rows_in_file = 0
        self.count += 1

    def _close_file(self) -> None:
        if self._writer is None:
            return
        self._write_group()
        self._writer.close()
        with open(self._path, "rb+") as f:
            os.fsync(f.fileno())
        self._writer = None

    def close(self) -> None:
        if self.count == 0 and self.schema is not None:
            self._next_file()
        self._close_file()


def _swap_in(layout: OutputLayout, tmp: Path) -> None:
    """`tmp` becomes outputs/. Where outputs/ is there already the two folders trade places in
    one step (Linux's renameat2 RENAME_EXCHANGE), so a reader never finds no outputs/; where
    that is not to be had (another system, a file system without it), by two renames."""
    fsync_dir(tmp)
    old = layout.outputs_old
    remove_tree(old)  # one left by a killed run; a failure says why, not ENOTEMPTY later
    if layout.outputs_dir.exists() and _exchange(tmp, layout.outputs_dir):
        tmp.rename(old)  # the outputs replaced, now under tmp's name
    else:
        if layout.outputs_dir.exists():
            layout.outputs_dir.rename(old)
        tmp.rename(layout.outputs_dir)
    shutil.rmtree(old, ignore_errors=True)
    write_bytes_atomic(layout.dataset_card, DATASET_CARD.encode())
    fsync_dir(layout.root)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (renameat2 with RENAME_EXCHANGE); False where the system or
    the file system cannot, nothing changed."""
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not Linux, or a C library without it
        return False
    at_cwd, exchange = -100, 2  # AT_FDCWD, RENAME_EXCHANGE
    return renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), exchange) == 0


def write_stats(layout: OutputLayout, table: pa.Table) -> None:
    layout.stats_dir.mkdir(parents=True, exist_ok=True)
    write_parquet_atomic(layout.batch_stats, table)
