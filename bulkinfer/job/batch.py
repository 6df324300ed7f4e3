"""One batch through the model: out-of-memory splits, and bisection down to the rows that fail.

A failing batch is halved until each failure is pinned to one row, so only the rows the model
really fails on get an `error`; after an out-of-memory error, later batches run in pieces of the
size that fitted, so one OOM is not paid again on every batch.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bulkinfer import faults
from bulkinfer.errors import first_line
from bulkinfer.io.outputs import rows_table
from bulkinfer.observe.stats import BatchStats
from bulkinfer.planner import Batch
from bulkinfer.prepare import PreparedRows, prepared_location
from bulkinfer.tasks.single_pass import token_columns

# what a model's forward raises for rows it cannot take (a BART classifier's ValueError for a
# row whose text holds </s>): bisected down to those rows, each a row error
ROW_FAILURES = (RuntimeError, IndexError, ValueError)


class RowCap:
    """The most rows per model call since the last out-of-memory error, as a share of the
    planned batch. Pieces keep the batch's identity in the plan, so checkpoints and resume are
    unaffected."""

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


def run_batch(task, engine, prepared: PreparedRows, batch: Batch, schema, cap: RowCap, cost):
    """Run one batch; returns its rows' table (in no particular order) and its stats."""
    per_row = batch.longest + task.new_tokens_per_row()
    start = time.perf_counter()
    tables, failed, splits, oom_splits, new_tokens, cut_short = [], 0, 0, 0, 0, None
    pending = cap.pieces(batch, task.new_tokens_per_row())
    while pending:
        rows = pending.pop()
        try:
            faults.out_of_memory(len(rows) * per_row)
            faults.failing_row(rows)
            result = task.run(engine, prepared, rows)
        except ROW_FAILURES as exc:
            release_memory()
            if len(rows) > 1:
                out_of_memory = is_out_of_memory(exc)
                if out_of_memory:
                    cap.shrink(len(rows), per_row)
                half = len(rows) // 2
                pending += [rows[half:], rows[:half]]
                splits += 1
                oom_splits += out_of_memory  # the others halve to find the rows that fail
                continue
            tables.append(failed_row_table(int(rows[0]), exc, schema, prepared))
            failed += 1
            continue
        new_tokens += result.new_tokens
        if result.cut_short is not None:
            cut_short = (cut_short or 0) + result.cut_short
        tables.append(
            rows_table(rows.tolist(), result.columns, result.error_list(len(rows)), schema)
        )
    seconds = time.perf_counter() - start
    table = pa.concat_tables(tables)
    batch = counted_tokens(batch, table)
    stats = batch_stats(
        engine, batch, new_tokens, seconds, failed, splits, cost, cut_short, oom_splits=oom_splits
    )
    return table, stats


def counted_tokens(batch: Batch, table: pa.Table) -> Batch:
    """The batch with its input tokens as its rows' outputs count them (`prompt_tokens`),
    where they do: an OpenAI embeddings request of several inputs is planned as its longest
    input (what its memory needs) but runs every input, and a request refused as its batch
    runs (its `dimensions`, say) runs none; the stats count what ran."""
    if "prompt_tokens" not in table.column_names:
        return batch
    counted = pc.sum(table.column("prompt_tokens")).as_py() or 0
    if counted == batch.real_tokens:
        return batch
    return dataclasses.replace(batch, real_tokens=counted)


def failed_row_table(
    row: int, exc: BaseException, schema: pa.Schema, prepared: PreparedRows
) -> pa.Table:
    """A row the model failed on: its error, and its token counts (the tokens it was given,
    which the summary's input tokens count), nothing else."""
    message = f"model failed on this row: {type(exc).__name__}: {first_line(exc)}"
    columns = {n: [None] for n in schema.names if n not in ("row", "error")}
    counts = token_columns(prepared, np.array([row]))
    columns.update({n: v for n, v in counts.items() if n in columns})
    return rows_table([row], columns, [message], schema)


def batch_stats(
    engine, batch: Batch, new_tokens, seconds, failed, splits, cost, cut_short=None, oom_splits=0
) -> BatchStats:
    """`splits`: the batch's halvings; `oom_splits`: those of them for out of memory."""
    in_flight = rows_in_flight(engine, len(batch.rows))
    fractions = (
        cost.fractions(batch.real_tokens, new_tokens, len(batch.rows), seconds, in_flight)
        if cost is not None
        else {}
    )
    return BatchStats(
        batch=batch.index,
        rows=len(batch.rows),
        real_tokens=batch.real_tokens,
        # (a padded batch's inputs counted past its plan ran in calls of their own)
        padded_tokens=max(batch.padded_tokens, batch.real_tokens)
        if engine.limits.pads
        else batch.real_tokens,
        new_tokens=new_tokens,
        seconds=seconds,
        failed_rows=failed,
        splits=splits,
        oom_splits=oom_splits,
        ended_at=time.time(),
        constrained_cut_short=cut_short,
        **fractions,
    )


def rows_in_flight(engine, rows: float) -> float:
    """Rows that share a decode step: the batch, or at most the engine's decode slots."""
    slots = engine.limits.slots
    return min(rows, slots) if slots else rows


def first_failure(prepared: PreparedRows, table: pa.Table) -> str:
    """`file:line: message` of the first failed row in a batch's table (on_error: fail)."""
    errors = table.column("error").to_pylist()
    rows = table.column("row").to_pylist()
    row, message = next((r, e) for r, e in zip(rows, errors, strict=True) if e is not None)
    return f"{prepared_location(prepared, row)}: {message} (on_error: fail)"


def is_out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def release_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
