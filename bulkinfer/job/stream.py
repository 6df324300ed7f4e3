"""Generation as one loop over the whole job: the engine draws the next checkpoint batches
while earlier ones still decode, so its slots never drain at a batch boundary; each batch is
committed as soon as its last row is done, and a batch still running commits the rows it has
finished once `checkpoint.every_seconds` have passed since the last part.

Checkpointing stays exactly-once: a row is committed in one part only (the manifest records
the rows of batches in progress), whatever else is in flight, and every row's sampling is keyed
by (seed, row, sample), so rows that run again after a kill give the tokens they would have
given. A model failure inside the loop hands the batches in flight (less their committed rows)
and the rest back to the batch-at-a-time loop, which bisects down to the rows that fail.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from bulkinfer import faults
from bulkinfer.errors import counted
from bulkinfer.io.outputs import rows_table
from bulkinfer.job.batch import ROW_FAILURES, batch_stats, counted_tokens, release_memory
from bulkinfer.observe.progress import log
from bulkinfer.planner import Batch


@dataclasses.dataclass
class InFlight:
    """A batch fed to the engine: its ask, the sequences done, the rows done and committed."""

    batch: Batch
    ask: object
    done: dict  # sequence index -> Generation
    left: np.ndarray  # sequences not done, per row position
    ready: list  # row positions whose sequences are all done, not committed yet
    spent: np.ndarray  # prompt and new tokens of the done sequences, per row position
    committed: int = 0  # rows committed in pieces

    @classmethod
    def of(cls, batch: Batch, ask) -> InFlight:
        left = np.bincount(np.asarray(ask.owners, dtype=np.int64), minlength=len(batch.rows))
        ready = [k for k in range(len(batch.rows)) if left[k] == 0]
        return cls(batch, ask, {}, left, ready, np.zeros(len(batch.rows), dtype=np.int64))

    def take(self, finished: dict) -> list[int]:
        """Record finished sequences; returns the row positions they completed."""
        completed = []
        for i, generation in finished.items():
            self.done[i] = generation
            k = self.ask.owners[i]
            self.left[k] -= 1
            self.spent[k] += len(self.ask.requests.prompts[i]) + len(generation.tokens)
            if self.left[k] == 0:
                self.ready.append(k)
                completed.append(k)
        return completed

    @property
    def complete(self) -> bool:
        return self.committed + len(self.ready) == len(self.batch.rows)


def run_stream(inputs, engine, todo: list[Batch], writer, progress, started, stop, cost):
    """Generate `todo` through the engine's stream, committing each batch as it completes and
    finished rows of running batches when a part is due; returns the batches left for the
    batch-at-a-time loop (none unless the model failed)."""
    task, prepared = inputs.task, inputs.prepared
    running: dict[int, InFlight] = {}
    preparing: list[Batch] = []  # taken from the queue, not yet in the engine
    queue = iter(todo)

    def feed():
        for batch in queue:
            if stop.signum is not None:  # the batches in flight finish; no new one starts
                return
            preparing[:] = [batch]
            faults.checkpoint("batch_start")
            faults.slow_batch()
            faults.out_of_memory(len(batch.rows) * (batch.longest + task.new_tokens_per_row()))
            faults.failing_row(batch.rows)
            ask = task.ask(prepared, batch.rows, engine)
            flight = running[batch.index] = InFlight.of(batch, ask)
            if flight.ready:  # rows with nothing to generate (an embeddings request among
                # completions): done as they enter
                progress.advance(0, batch.rows[flight.ready], 0)
            preparing.clear()
            yield batch.index, ask.requests

    def commit(flight: InFlight, whole: bool) -> None:
        positions = sorted(flight.ready)
        flight.ready.clear()
        ask, seqs = flight.ask.subset(positions)
        rows = flight.batch.rows[positions]
        result = task.answer(prepared, rows, ask, [flight.done[i] for i in seqs])
        table = rows_table(
            rows.tolist(), result.columns, result.error_list(len(rows)), writer.schema
        )
        # a piece's rows ran padded to the batch's longest row, not their own (a padding engine
        # runs the batch in one call): the summary's padding is then the plan's
        piece = dataclasses.replace(
            flight.batch, rows=rows, real_tokens=int(prepared.lengths[rows].sum())
        )
        piece = counted_tokens(piece, table)
        nonlocal last
        now = time.perf_counter()
        stats = batch_stats(
            engine, piece, result.new_tokens, now - last, 0, 0, cost, result.cut_short
        )
        last = now
        flight.committed += len(rows)
        if whole:
            writer.add(table, flight.batch.index, stats.to_dict(), time.monotonic() - started)
        else:
            writer.add_piece(table, flight.batch.index, stats.to_dict())

    last = time.perf_counter()
    try:
        for update in engine.generate_stream(feed()):
            faults.slow_step()
            rows, made = np.empty(0, dtype=np.int64), 0
            if update.group is not None:
                flight = running[update.group]
                completed = flight.take(update.finished)
                rows, made = flight.batch.rows[completed], int(flight.spent[completed].sum())
                if flight.complete:
                    commit(running.pop(update.group), whole=True)
            progress.advance(update.new_tokens, rows, made, update.prompt_tokens)
            if writer.due() and any(f.ready for f in running.values()):
                for flight in running.values():
                    if flight.ready:
                        commit(flight, whole=False)
                writer.commit_now(time.monotonic() - started)
    except ROW_FAILURES as exc:
        release_memory()
        rest = [_rest(f) for f in sorted(running.values(), key=lambda f: f.batch.index)]
        rest = [b for b in rest if len(b.rows)] + preparing + list(queue)
        log(
            f"generation failed with {counted(len(rest), 'batch')} to go ({type(exc).__name__}); "
            "running them one at a time to find the rows that fail",
            level="warning",
        )
        return rest
    return []


def _rest(flight: InFlight) -> Batch:
    """A batch in flight less the rows already handed to the writer."""
    if not flight.committed:
        return flight.batch
    done = np.zeros(len(flight.batch.rows), dtype=bool)
    done[flight.left == 0] = True
    done[flight.ready] = False  # finished but not handed over: run again
    return dataclasses.replace(flight.batch, rows=flight.batch.rows[~done])
