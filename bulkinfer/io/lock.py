"""One writer per output folder: an advisory lock on OUT/.lock, held for the whole run.

The kernel releases an flock when its process dies, however it dies, so a killed run never
leaves a stale lock and nothing has to be cleaned up. The holder writes who it is (pid, host,
start time) into the file, so a second run can say whom it is waiting for. The file itself is
never removed, not even by --overwrite: a new file would be a new lock beside the held one.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bulkinfer.errors import OutputFolderError
from bulkinfer.io.layout import OutputLayout

# A `bulkinfer status` probe holds the lock for microseconds; a run retries past it.
ATTEMPTS = 20
ATTEMPT_PAUSE_SECONDS = 0.05


class FolderInUseError(OutputFolderError):
    """Another live process holds the output folder's lock."""


@contextmanager
def folder_lock(layout: OutputLayout) -> Iterator[None]:
    """Hold OUT/.lock for the duration, or refuse with one line naming the holder."""
    root = layout.root
    if root.exists() and not root.is_dir():
        raise OutputFolderError(f"output.path: {root} exists and is not a folder")
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(layout.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        if not _take(fd):
            raise in_use(layout)
        os.ftruncate(fd, 0)
        os.pwrite(fd, _holder_line().encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def in_use(layout: OutputLayout) -> FolderInUseError:
    return FolderInUseError(
        f"{layout.root} is in use by another bulkinfer run ({holder_text(layout)}); "
        "wait for it to end or stop it, then rerun"
    )


def is_locked(layout: OutputLayout) -> bool:
    """Whether a live process holds the folder's lock (probed without waiting, then let go)."""
    return lock_held(layout.lock)


def lock_held(path: Path) -> bool:
    """Whether a live process holds the lock on the file at `path` (probed without waiting)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def holder_text(layout: OutputLayout) -> str:
    """'pid 123 on host-a since 2026-01-02 03:04:05', from what the holder wrote."""
    try:
        holder = json.loads(layout.lock.read_text(encoding="utf-8"))
        return f"pid {holder['pid']} on {holder['host']} since {holder['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder not yet recorded"  # it took the lock a moment ago and is writing


def _take(fd: int) -> bool:
    for attempt in range(ATTEMPTS):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if attempt + 1 < ATTEMPTS:
                time.sleep(ATTEMPT_PAUSE_SECONDS)
    return False


def _holder_line() -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": started}
    return json.dumps(holder) + "\n"
