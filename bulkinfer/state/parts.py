"""Committing results: batches buffered into parts, each written, fsynced and then committed
in the manifest on a background thread while the next batch runs."""

from __future__ import annotations

import re
import time
from collections.abc import Callable

import pyarrow as pa

from bulkinfer import faults
from bulkinfer.io.atomic import write_parquet_atomic
from bulkinfer.io.layout import OutputLayout
from bulkinfer.overlap import SerialThread
from bulkinfer.state.manifest import Manifest, PartRecord


class PartWriter:
    """Accumulates batch results and commits them as one part every `every_rows` rows, or
    sooner once `every_seconds` have passed since the last part (`due`).

    A part is encoded, written, fsynced and committed in the manifest on a background thread,
    so the next batch runs on the device meanwhile. Parts are committed in order and one at a
    time: a full buffer waits for the part before it, so a kill loses at most the part being
    written plus what is buffered, as with inline writes. A write error is raised, unchanged,
    by the next `add` or `flush`, or when the writer closes.
    """

    def __init__(
        self,
        layout: OutputLayout,
        manifest: Manifest,
        schema: pa.Schema,
        every_rows: int,
        run_id: str,
        on_commit: Callable[[Manifest], None] | None = None,
        every_seconds: float = float("inf"),
    ):
        self.layout = layout
        self.manifest = manifest
        self.schema = schema
        self.every_rows = every_rows
        self.every_seconds = every_seconds
        self.run_id = run_id
        self.on_commit = on_commit
        self._tables: list[pa.Table] = []
        self._batches: list[int] = []
        self._partial: dict[str, list[int]] = {}
        self._stats: list[dict] = []
        self._rows = 0
        self._parts = next_piece_number(layout)  # for the names of parts holding pieces
        self._last = time.monotonic()
        self._thread = SerialThread("bulkinfer-write")

    def __enter__(self) -> PartWriter:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self._thread.close(failing=error)

    def add(self, table: pa.Table, batch: int, stats: dict, elapsed: float) -> None:
        """Buffer a batch's rows (all of them, or all not committed before in pieces); hand a
        part to the writer thread when enough rows are waiting or enough time has passed."""
        self._thread.check()
        self._batches.append(batch)
        self._buffer(table, stats)
        if self._rows >= self.every_rows or self.due():
            self._hand_over(elapsed)

    def add_piece(self, table: pa.Table, batch: int, stats: dict) -> None:
        """Buffer finished rows of a batch still running (handed over by the next `add` or
        `commit_now`): what a long batch has done is committed without waiting for its end."""
        self._thread.check()
        rows = table.column("row").to_pylist()
        self._partial.setdefault(str(batch), []).extend(rows)
        self._buffer(table, stats)

    def due(self) -> bool:
        """Whether `every_seconds` have passed since the last part was handed over."""
        return time.monotonic() - self._last >= self.every_seconds

    def commit_now(self, elapsed: float) -> None:
        """Hand what is buffered to the writer thread without waiting for `every_rows`."""
        self._hand_over(elapsed)

    def flush(self, elapsed: float) -> None:
        """Commit the buffered batches as one part and wait until every part is committed."""
        self._hand_over(elapsed)
        self._thread.wait()

    def _buffer(self, table: pa.Table, stats: dict) -> None:
        self._tables.append(table)
        self._stats.append(stats)
        self._rows += table.num_rows

    def _hand_over(self, elapsed: float) -> None:
        self._last = time.monotonic()
        if not self._tables:
            return
        first = self._batches[0] if self._batches else int(next(iter(self._partial)))
        # a part holding rows of a batch still running gets a name of its own (its batch's
        # other rows come in a later part)
        name = f"part-b{first:07d}" + (f"-p{self._parts:06d}" if self._partial else "")
        part = (name, self._tables, self._batches, self._partial, self._stats, round(elapsed, 3))
        self._tables, self._batches, self._partial, self._stats, self._rows = [], [], {}, [], 0
        self._parts += 1
        self._thread.submit(self._commit, *part)

    def _commit(self, name, tables, batches, partial, stats, elapsed: float) -> None:
        """Write the part, then commit it in the manifest (on the writer thread)."""
        name = f"{name}.parquet"
        table = pa.concat_tables(tables)
        sha = write_parquet_atomic(self.layout.parts_dir / name, table)
        faults.checkpoint("part_written")
        record = PartRecord(
            file=name,
            batches=batches,
            rows=table.num_rows,
            sha256=sha,
            run=self.run_id,
            elapsed=elapsed,
            stats=stats,
            partial=partial,
        )
        self.manifest.commit(record)
        faults.checkpoint("part_committed")
        if self.on_commit is not None:
            self.on_commit(self.manifest)


def next_piece_number(layout: OutputLayout) -> int:
    """One past the highest number in the names of the part files already there (committed or
    not): a part holding pieces of a running batch never takes the name of one on disk."""
    numbers = [
        int(match.group(1))
        for path in layout.parts_dir.glob("part-*-p*.parquet")
        if (match := re.search(r"-p(\d+)\.parquet$", path.name))
    ]
    return max(numbers, default=-1) + 1
