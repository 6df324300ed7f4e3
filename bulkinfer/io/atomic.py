"""Durable, all-or-nothing file writes: a reader sees the old file or the complete new one.

Each write goes to a temporary name in the same folder, is fsynced, then renamed into place, and
the folder is fsynced so the rename itself survives a power cut.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from bulkinfer import faults


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_atomic(path: Path, data: bytes, injected: bool = True) -> None:
    """`injected=False`: not one of the writes fault injection counts or kills at (a write on a
    thread of its own, which lands at no fixed point of a run)."""
    _write_atomic(path, [data], "wb", injected)


def write_lines_atomic(path: Path, lines: Iterable[str]) -> None:
    """Stream text lines to `path`, all or nothing (a file too big to build in memory)."""
    _write_atomic(path, lines, "w")


def _write_atomic(path: Path, pieces: Iterable, mode: str, injected: bool = True) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        if injected:
            faults.write_attempt(path)
        with open(tmp, mode, **({"encoding": "utf-8"} if "b" not in mode else {})) as f:
            f.writelines(pieces)
            f.flush()
            os.fsync(f.fileno())
        if injected:
            faults.checkpoint("temp_written")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)


def fresh_folder(folder: Path) -> Path:
    """`folder`, created empty: what was there is removed first. A leftover that cannot be
    removed (another user's, a read-only folder) raises its own error, say permission denied,
    naming the file, rather than a later "File exists"."""
    remove_tree(folder)
    folder.mkdir(parents=True)
    return folder


def remove_tree(path: Path) -> None:
    """Remove a file or folder if there; an entry that cannot go raises, naming its full path."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path, onerror=_raise_with_full_path)


def _raise_with_full_path(function, path: str, exc_info) -> None:
    """rmtree's errors name an entry relative to its folder; the message names the full path
    (onerror, not 3.12's onexc: Python 3.10 and 3.11 have only this one)."""
    error = exc_info[1]
    raise OSError(error.errno, error.strerror, path) from None


def parquet_bytes(table: pa.Table, row_group_rows: int = 65536) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, row_group_size=row_group_rows, compression="zstd")
    return sink.getvalue()


def write_parquet_atomic(path: Path, table: pa.Table) -> str:
    """Write `table` to `path` atomically and return the sha256 of the bytes written."""
    data = parquet_bytes(table)
    write_bytes_atomic(path, data)
    return hashlib.sha256(data).hexdigest()


def write_json_atomic(path: Path, obj) -> None:
    write_bytes_atomic(
        path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode()
    )


def append_line_durable(path: Path, line: str) -> None:
    """Append one line and fsync: the manifest's commit point for a part."""
    faults.write_attempt(path)
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
