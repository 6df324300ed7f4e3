"""Committing results: batches buffered into parts, each written, fsynced and then committed
in the manifest on a background thread while the next batch runs."""

from __future__ import annotations

from collections.abc import Callable

import pyarrow as pa

from bulkinfer import faults
from bulkinfer.io.atomic import write_parquet_atomic
from bulkinfer.io.layout import OutputLayout
from bulkinfer.overlap import SerialThread
from bulkinfer.state.manifest import Manifest, PartRecord


class PartWriter:
    """Accumulates batch results and commits them as one part every `every_rows` rows.

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
    ):
        self.layout = layout
        self.manifest = manifest
        self.schema = schema
        self.every_rows = every_rows
        self.run_id = run_id
        self.on_commit = on_commit
        self._tables: list[pa.Table] = []
        self._batches: list[int] = []
        self._stats: list[dict] = []
        self._rows = 0
        self._thread = SerialThread("bulkinfer-write")

    def __enter__(self) -> PartWriter:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self._thread.close(failing=error)

    def add(self, table: pa.Table, batch: int, stats: dict, elapsed: float) -> None:
        """Buffer a batch; hand a part to the writer thread when enough rows are waiting."""
        self._thread.check()
        self._tables.append(table)
        self._batches.append(batch)
        self._stats.append(stats)
        self._rows += table.num_rows
        if self._rows >= self.every_rows:
            self._hand_over(elapsed)

    def flush(self, elapsed: float) -> None:
        """Commit the buffered batches as one part and wait until every part is committed."""
        self._hand_over(elapsed)
        self._thread.wait()

    def _hand_over(self, elapsed: float) -> None:
        if not self._tables:
            return
        part = (self._tables, self._batches, self._stats, round(elapsed, 3))
        self._tables, self._batches, self._stats, self._rows = [], [], [], 0
        self._thread.submit(self._commit, *part)

    def _commit(self, tables: list, batches: list[int], stats: list[dict], elapsed: float) -> None:
        """Write the part, then commit it in the manifest (on the writer thread)."""
        name = f"part-b{batches[0]:07d}.parquet"
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
        )
        self.manifest.commit(record)
        faults.checkpoint("part_committed")
        if self.on_commit is not None:
            self.on_commit(self.manifest)
