"""Content hashes of files, for the job fingerprint: the bytes decide, not names and sizes.

A model's weights can be many gigabytes, so each file's hash is kept in bulkinfer's cache folder,
keyed by the file's path and what a change to it always changes (size, mtime, ctime, inode): a
rerun stats the file instead of reading it again. ctime and the inode are in the key because
tools that copy weights over (rsync -t, cp -p) keep mtime and size; no tool can keep ctime.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from concurrent.futures import ThreadPoolExecutor

from bulkinfer.cache import cache_root
from bulkinfer.observe.progress import log

BLOCK_BYTES = 1 << 22
PIECE_BYTES = 64 << 20
HASH_THREADS = min(8, os.cpu_count() or 1)


def update_with_file(digest, path: str | os.PathLike) -> None:
    """Feed a file's bytes to a hashlib digest, a block at a time."""
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(BLOCK_BYTES), b""):
            digest.update(block)


def file_blake2b(path: str | os.PathLike) -> str:
    """BLAKE2b over the BLAKE2b of each 64 MiB piece of the file: a tree hash, so the pieces of
    one big weights file hash on several cores at once (hashlib releases the GIL) instead of
    one core reading 16 GB at ~1 GB/s."""
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        starts = range(0, max(size, 1), PIECE_BYTES)
        with ThreadPoolExecutor(HASH_THREADS, thread_name_prefix="bulkinfer-hash") as pool:
            pieces = list(pool.map(lambda start: _piece_digest(fd, start, size), starts))
    finally:
        os.close(fd)
    top = hashlib.blake2b(digest_size=16, person=b"bulkinfer-tree")
    for piece in pieces:
        top.update(piece)
    return top.hexdigest()


def _piece_digest(fd: int, start: int, size: int) -> bytes:
    digest = hashlib.blake2b(digest_size=32)
    stop = min(start + PIECE_BYTES, size)
    while start < stop:
        block = os.pread(fd, min(BLOCK_BYTES, stop - start), start)
        if not block:
            break
        digest.update(block)
        start += len(block)
    return digest.digest()


def cached_file_blake2b(path: str | os.PathLike) -> str:
    """file_blake2b, read from the cache folder when the file has not changed since."""
    real = os.path.realpath(path)
    stat = os.stat(real)
    key = {
        "path": real,
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "ctime_ns": stat.st_ctime_ns,
        "inode": stat.st_ino,
        "scheme": "blake2b-tree-64MiB",
    }
    name = hashlib.sha256(real.encode("utf-8", "surrogateescape")).hexdigest()[:32]
    entry = cache_root() / "digests" / f"{name}.json"
    try:
        cached = json.loads(entry.read_text())
    except (OSError, ValueError):
        cached = None
    if isinstance(cached, dict) and cached.get("key") == key:
        return cached["blake2b"]
    value = file_blake2b(real)
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        # a shared cache folder may be written from several hosts at once: a unique name each
        tmp = entry.with_name(f".{entry.name}.tmp-{secrets.token_hex(8)}")
        tmp.write_text(json.dumps({"key": key, "blake2b": value}))
        os.replace(tmp, entry)
    except OSError as exc:  # the hash is right either way; only the next run pays again
        if entry.parent not in _UNWRITABLE:  # said once per folder, not once per model file
            _UNWRITABLE.add(entry.parent)
            log(
                f"{entry.parent}: cannot keep file hashes in bulkinfer's cache folder "
                f"({exc.strerror}); the next run reads the files again (set BULKINFER_CACHE to a "
                "writable folder)",
                level="warning",
            )
    return value


_UNWRITABLE: set = set()  # cache folders found unwritable by this process
