"""Generation as one loop over the whole job: the engine draws the next checkpoint batches
while earlier ones still decode, so its slots never drain at a batch boundary, and each batch
is committed as soon as its last row is done.

Checkpointing stays exactly-once: a batch is committed whole or not at all, whatever else is
in flight, and every row's sampling is keyed by (seed, row, sample), so a batch that runs again
after a kill gives the tokens it would have given. A model failure inside the loop hands the
batches in flight and the rest back to the batch-at-a-time loop, which bisects down to the
rows that fail.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from bulkinfer import faults
from bulkinfer.io.outputs import rows_table
from bulkinfer.job.batch import ROW_FAILURES, batch_stats, release_memory
from bulkinfer.observe.progress import log
from bulkinfer.planner import Batch


def run_stream(inputs, engine, todo: list[Batch], writer, progress, started, stop, cost):
    """Generate `todo` through the engine's stream, committing each batch as it completes;
    returns the batches left for the batch-at-a-time loop (none unless the model failed)."""
    task, prepared = inputs.task, inputs.prepared
    waiting: dict[int, tuple[Batch, object]] = {}  # fed to the engine, not yet complete
    queue = iter(todo)

    def feed() -> Iterator[tuple[int, object]]:
        for batch in queue:
            if stop.signum is not None:  # the batches in flight finish; no new one starts
                return
            waiting[batch.index] = (batch, None)
            faults.checkpoint("batch_start")
            faults.slow_batch()
            faults.out_of_memory(len(batch.rows) * (batch.longest + task.new_tokens_per_row()))
            ask = task.ask(prepared, batch.rows)
            waiting[batch.index] = (batch, ask)
            yield batch.index, ask.requests

    last = time.perf_counter()
    try:
        for index, generations in engine.generate_stream(feed()):
            batch, ask = waiting.pop(index)
            result = task.answer(prepared, batch.rows, ask, generations)
            table = rows_table(
                batch.rows.tolist(), result.columns, [None] * len(batch.rows), writer.schema
            )
            now = time.perf_counter()
            stats = batch_stats(engine, batch, result.new_tokens, now - last, 0, 0, cost)
            last = now
            writer.add(table, batch.index, stats.to_dict(), time.monotonic() - started)
            progress.update(batch, stats.real_tokens + stats.new_tokens)
    except ROW_FAILURES as exc:
        release_memory()
        rest = sorted([b for b, _ in waiting.values()], key=lambda b: b.index) + list(queue)
        log(
            f"generation failed with {len(rest):,} batches to go ({type(exc).__name__}); "
            "running them one at a time to find the rows that fail",
            level="warning",
        )
        return rest
    return []
