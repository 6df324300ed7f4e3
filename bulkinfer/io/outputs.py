"""Writing results: checkpoint parts while the job runs, the final dataset once it is done.

Parts hold `row` (the input position) plus the task's columns and `error`. The final outputs put
rows back in input order and attach the id and the kept input columns.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bulkinfer import faults
from bulkinfer.checkpoint import Manifest, OutputLayout, PartRecord
from bulkinfer.io.atomic import fsync_dir, parquet_bytes, write_bytes_atomic, write_parquet_atomic

OUTPUT_FILE_ROWS = 1_000_000

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


class PartWriter:
    """Accumulates batch results and commits them as one part every `every_rows` rows."""

    def __init__(
        self,
        layout: OutputLayout,
        manifest: Manifest,
        schema: pa.Schema,
        every_rows: int,
        run_id: str,
    ):
        self.layout = layout
        self.manifest = manifest
        self.schema = schema
        self.every_rows = every_rows
        self.run_id = run_id
        self._tables: list[pa.Table] = []
        self._batches: list[int] = []
        self._stats: list[dict] = []
        self._rows = 0

    def add(self, table: pa.Table, batch: int, stats: dict, elapsed: float) -> bool:
        """Buffer a batch; commit a part when enough rows are waiting. True if it committed."""
        self._tables.append(table)
        self._batches.append(batch)
        self._stats.append(stats)
        self._rows += table.num_rows
        if self._rows >= self.every_rows:
            self.flush(elapsed)
            return True
        return False

    def flush(self, elapsed: float) -> None:
        """Write the buffered batches as one part, then commit it in the manifest."""
        if not self._tables:
            return
        name = f"part-b{self._batches[0]:07d}.parquet"
        table = pa.concat_tables(self._tables)
        sha = write_parquet_atomic(self.layout.parts_dir / name, table)
        faults.checkpoint("part_written")
        self.manifest.commit(
            PartRecord(
                file=name,
                batches=list(self._batches),
                rows=table.num_rows,
                sha256=sha,
                run=self.run_id,
                elapsed=round(elapsed, 3),
                stats=list(self._stats),
            )
        )
        self._tables, self._batches, self._stats, self._rows = [], [], [], 0
        faults.checkpoint("part_committed")


def assemble_outputs(
    layout: OutputLayout,
    manifest: Manifest,
    error_rows: pa.Table,
    ids: pa.ChunkedArray,
    keep: pa.Table,
    expected_rows: np.ndarray,
    keep_row: bool = False,
) -> pa.Table:
    """Write OUT/outputs/*.parquet: every expected input row once, in input order, with its id
    and kept columns (and its input position `row`, for a shard's part). Returns the results."""
    parts = [pq.read_table(layout.parts_dir / r.file) for r in manifest.records]
    results = pa.concat_tables([*parts, error_rows])
    order = np.argsort(results.column("row").to_numpy(), kind="stable")
    results = results.take(order)
    check_every_row_once(results.column("row").to_numpy(), expected_rows)
    take = pa.array(expected_rows)
    columns = {"id": ids.take(take)}
    columns.update({n: results.column(n) for n in results.column_names if n != "row"})
    columns.update({n: keep.column(n).take(take) for n in keep.column_names})
    if keep_row:
        columns["row"] = results.column("row")
    write_output_files(layout, pa.table(columns))
    return results


def check_every_row_once(rows: np.ndarray, expected: np.ndarray) -> None:
    """rows_in == rows_out: the sorted result rows must be exactly the expected rows."""
    if len(rows) != len(expected) or not np.array_equal(rows, expected):
        missing = np.setdiff1d(expected, rows)
        doubled = len(rows) - len(np.unique(rows))
        raise RuntimeError(
            f"rows_in != rows_out: {len(expected)} input rows, {len(rows)} results "
            f"({len(missing)} missing, {doubled} doubled); the checkpoint is inconsistent"
        )


def write_output_files(layout: OutputLayout, table: pa.Table) -> None:
    """Write into outputs.tmp, then swap it in, so outputs/ is never half written."""
    tmp = layout.root / "outputs.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for k, start in enumerate(range(0, max(table.num_rows, 1), OUTPUT_FILE_ROWS)):
        piece = table.slice(start, OUTPUT_FILE_ROWS)
        write_bytes_atomic(tmp / f"part-{k:05d}.parquet", parquet_bytes(piece))
    faults.checkpoint("outputs_written")
    old = layout.root / "outputs.old"
    shutil.rmtree(old, ignore_errors=True)
    if layout.outputs_dir.exists():
        layout.outputs_dir.rename(old)
    tmp.rename(layout.outputs_dir)
    shutil.rmtree(old, ignore_errors=True)
    write_bytes_atomic(layout.dataset_card, DATASET_CARD.encode())
    fsync_dir(layout.root)


def write_stats(layout: OutputLayout, table: pa.Table) -> None:
    layout.stats_dir.mkdir(parents=True, exist_ok=True)
    write_parquet_atomic(Path(layout.stats_dir) / "batches.parquet", table)
