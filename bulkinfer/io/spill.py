"""Spill files: what tokenization produces for every row, kept on disk instead of in memory.

Token ids go to one flat int32 file, appended chunk by chunk and read back per row with pread;
ids and kept input columns go to Parquet files of about SPILL_FILE_ROWS rows each, read back by
row range when the outputs are written. Only per-row lengths stay in memory, so a job's host
memory does not grow with its input. Dirty pages of these files are the kernel's cache, not the
process's memory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bulkinfer import faults
from bulkinfer.faults import size_setting
from bulkinfer.io.atomic import fresh_folder
from bulkinfer.process import host_tag, pid_alive

SPILL_FILE_ROWS = size_setting("BULKINFER_SPILL_FILE_ROWS", 65_536)
# a kept-columns file's row groups: what a read of a few of its rows decodes
SPILL_GROUP_ROWS = size_setting("BULKINFER_SPILL_GROUP_ROWS", 4096)
SPILL_PREFIX = "bulkinfer-spill-"  # a temporary spill folder: PREFIX + host + "-" + pid + "-"


class TokenFile:
    """Every row's token ids, one after the other, in one int32 file."""

    def __init__(self, path: Path):
        self.path = path
        faults.write_attempt(path)
        self._out = open(path, "wb")  # noqa: SIM115 - open until finish()
        self._fd: int | None = None
        self.count = 0

    def append(self, ids: np.ndarray) -> None:
        faults.write_attempt(self.path)
        self._out.write(memoryview(np.ascontiguousarray(ids, dtype=np.int32)).cast("B"))
        self.count += len(ids)

    def finish(self) -> None:
        self._out.close()
        self._open_for_reading()

    @classmethod
    def written(cls, path: Path, count: int) -> TokenFile:
        """A token file of `count` tokens that an earlier run wrote, opened for reading."""
        file = cls.__new__(cls)
        file.path, file._out, file.count = path, None, count
        file._open_for_reading()
        return file

    def _open_for_reading(self) -> None:
        self._fd = os.open(self.path, os.O_RDONLY)
        weakref.finalize(self, os.close, self._fd)

    def read(self, start: int, count: int) -> np.ndarray:
        """Tokens start..start+count, read straight into a fresh array."""
        out = np.empty(count, dtype=np.int32)
        if count:
            got = os.preadv(self._fd, [out], start * 4)
            if got != count * 4:
                raise RuntimeError(f"{self.path}: short read ({got} of {count * 4} bytes)")
        return out


def rows_file_name(k: int) -> str:
    """The name of the k-th file of ids and kept columns."""
    return f"rows-{k:06d}.parquet"


class RowColumnFiles:
    """The id and kept columns of every row, as Parquet files of consecutive rows.

    Chunks may disagree on a column's type (a JSONL chunk whose values are all null reads as
    type null); the files are written as they come and read back cast to the unified schema."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.starts: list[int] = []
        self.schema: pa.Schema | None = None
        self._pending: list[pa.Table] = []
        self._rows = 0
        self._pending_rows = 0
        self._group_index = None  # the files' row groups, built when first read

    def append(self, table: pa.Table) -> None:
        """Add the next rows; raises pa.ArrowTypeError/ArrowInvalid where types cannot unify,
        or where a unified type cannot hold some rows' values (an integer beyond 2**53 in one
        file, a float in the next)."""
        if self.schema is None:
            self.schema = table.schema
        else:
            schema = pa.unify_schemas([self.schema, table.schema], promote_options="permissive")
            changed = [f.name for f in self.schema if schema.field(f.name).type != f.type]
            self._check_casts(self._earlier(changed), schema)
            self.schema = schema
        self._check_casts([table], self.schema)
        self._pending.append(table)
        self._pending_rows += table.num_rows
        if self._pending_rows >= SPILL_FILE_ROWS:
            self._flush()

    def finish(self) -> None:
        self._flush()

    def files(self) -> list[Path]:
        return [self._file(k) for k in range(len(self.starts))]

    @property
    def rows(self) -> int:
        """The rows written to the files."""
        return self._rows

    @classmethod
    def reopened(cls, folder: Path, starts: list[int], schema: pa.Schema, rows: int):
        """The files an earlier run wrote in `folder`: their first rows, schema and row count."""
        files = cls(folder)
        files.starts, files.schema, files._rows = starts, schema, rows
        return files

    def _flush(self) -> None:
        if not self._pending:
            return
        table = pa.concat_tables(self._pending, promote_options="permissive")
        path = self._file(len(self.starts))
        faults.write_attempt(path)
        pq.write_table(table, path, compression="zstd", row_group_size=SPILL_GROUP_ROWS)
        self.starts.append(self._rows)
        self._rows += table.num_rows
        self._pending, self._pending_rows = [], 0
        self._group_index = None  # a file more

    def _earlier(self, names: list[str]) -> Iterator[pa.Table]:
        """The columns `names` of every row added so far (read back from the files written)."""
        if not names:
            return
        for k in range(len(self.starts)):
            yield pq.read_table(self._file(k), columns=names)
        for table in self._pending:
            yield table.select(names)

    @staticmethod
    def _check_casts(tables: Iterable[pa.Table], schema: pa.Schema) -> None:
        for table in tables:
            for name, column in zip(table.column_names, table.columns, strict=True):
                wanted = schema.field(name).type
                if column.type == wanted:
                    continue
                try:
                    column.cast(wanted)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                    raise pa.ArrowInvalid(
                        f"column {name!r} is {column.type} in some rows and {wanted} cannot "
                        f"hold all of them: {exc}"
                    ) from None

    def _file(self, k: int) -> Path:
        return self.folder / rows_file_name(k)

    def read(self, start: int, stop: int) -> pa.Table:
        """Rows start..stop-1, in the unified schema; only the row groups that hold them are
        read (a file's 65,536 rows of kept documents are hundreds of MB)."""
        starts, sizes, _ = self._groups()
        needed = np.flatnonzero((starts < stop) & (starts + sizes > start))
        if not len(needed):
            return self.schema.empty_table()
        return self._read(needed).slice(start - starts[needed[0]], stop - start)

    def take(self, rows: np.ndarray) -> pa.Table:
        """The rows at input positions `rows` (ascending), in the unified schema, reading only
        the row groups that hold them (a shard's rows are spread over the whole input)."""
        rows = np.asarray(rows, dtype=np.int64)
        if not len(rows):
            return self.schema.empty_table()
        starts, sizes, _ = self._groups()
        group = np.searchsorted(starts, rows, side="right") - 1
        needed = np.unique(group)
        base = np.zeros(len(starts), dtype=np.int64)  # each needed group's first row, as read
        base[needed] = np.concatenate([[0], np.cumsum(sizes[needed])[:-1]])
        return self._read(needed).take(pa.array(base[group] + rows - starts[group]))

    def _read(self, needed: np.ndarray) -> pa.Table:
        """The row groups `needed` (ascending indices into `_groups`), read one after another."""
        where = self._groups()[2]
        tables = []
        for k in np.unique(where[needed, 0]):
            in_file = needed[where[needed, 0] == k]
            file = pq.ParquetFile(self._file(int(k)))
            tables.append(file.read_row_groups(where[in_file, 1].tolist()).cast(self.schema))
        return pa.concat_tables(tables)

    def _groups(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every row group of the files, in row order: its first row, its size and (file,
        group in the file)."""
        if self._group_index is None:
            starts, sizes, where = [], [], []
            for k, at in enumerate(self.starts):
                meta = pq.ParquetFile(self._file(k)).metadata
                for g in range(meta.num_row_groups):
                    starts.append(at)
                    sizes.append(meta.row_group(g).num_rows)
                    where.append((k, g))
                    at += sizes[-1]
            self._group_index = (
                np.asarray(starts, dtype=np.int64),
                np.asarray(sizes, dtype=np.int64),
                np.asarray(where, dtype=np.int64).reshape(-1, 2),
            )
        return self._group_index


def spill_folder(folder: Path | None) -> tuple[Path, tempfile.TemporaryDirectory | None]:
    """The given folder, emptied, or a temporary one (removed when its handle is dropped).
    A temporary folder's name carries the host and process: a process killed outright (a
    preemption's SIGKILL) leaves its folder, which the next one on the host removes."""
    if folder is None:
        prefix = f"{SPILL_PREFIX}{host_tag()}-{os.getpid()}-"
        remove_orphans(Path(tempfile.gettempdir()))
        temporary = tempfile.TemporaryDirectory(prefix=prefix)
        return Path(temporary.name), temporary
    return fresh_folder(folder), None


def remove_orphans(parent: Path) -> None:
    """Remove this host's temporary spill folders whose process is gone. Folders of other
    hosts (a temporary folder on a shared file system) and of live processes stay."""
    mine = f"{SPILL_PREFIX}{host_tag()}-"
    with contextlib.suppress(OSError):  # a folder that cannot be listed: nothing to tidy
        for path in parent.glob(f"{mine}*"):
            pid = path.name[len(mine) :].split("-", 1)[0]
            if pid.isdigit() and 0 < int(pid) < 2**31 and not pid_alive(int(pid)):
                shutil.rmtree(path, ignore_errors=True)
