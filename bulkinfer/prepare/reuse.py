"""The tokenized input kept for a resume.

A run tokenizes the whole input into the job's folder before its first batch: ~26 s a million
rows on two cores, minutes at ten million, paid again by every resume after a preemption. So a
run that tokenized records what it made (RECORD, written last, once the spill files are on
disk), under a key that names everything the tokens depend on (the job's fingerprint of spec,
model files and input contents, the input's paths, the versions of the code that tokenized);
a resume whose key is the same reads the record instead of the input. A record that is
missing, unreadable, of another key, or whose spill files have other sizes is not used: the
input is tokenized again, as before there were records.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import pickle
import sys
import threading
from pathlib import Path

import numpy as np

from bulkinfer.io.atomic import fsync_dir
from bulkinfer.io.spill import RowColumnFiles, TokenFile
from bulkinfer.prepare.rows import PreparedRows

RECORD = "prepared.pickle"
FORMAT = 1
# fields that are files or follow from the others: rebuilt, not recorded
NOT_RECORDED = ("token_file", "columns", "folder", "temporary", "lengths")


def reuse_key(fingerprint: dict, paths: list[str]) -> str:
    """What a job's tokenized input depends on: its fingerprint (spec, model files and input
    contents), the input's paths (row errors name them), and the code and libraries that read
    and tokenized it."""
    import pyarrow
    import tokenizers
    import transformers

    libraries = [sys.version, np.__version__, pyarrow.__version__]
    libraries += [tokenizers.__version__, transformers.__version__]
    what = {"fingerprint": fingerprint, "paths": paths, "code": _code_digest(), "libs": libraries}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


def _code_digest() -> str:
    """Of bulkinfer's own source files (an edited checkout tokenizes otherwise, perhaps)."""
    digest = hashlib.blake2b(digest_size=16)
    package = Path(__file__).resolve().parents[1]
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def keep_for_resume(prepared: PreparedRows, key: str) -> threading.Thread:
    """Record `prepared` (tokenized into a job's folder) under `key`, on a thread: the spill
    files are flushed to disk first (seconds for gigabytes of tokens, which the first batch does
    not wait for); a run that ends or dies before the record is written leaves none."""
    state = _state(prepared)  # now: the thread must not see the rows change under it
    files = _spill_files(prepared)
    thread = threading.Thread(
        target=_write_record,
        args=(prepared.folder, key, state, files),
        name="bulkinfer-keep-tokens",
        daemon=True,
    )
    thread.start()
    return thread


def reuse(folder: Path, key: str) -> PreparedRows | None:
    """The tokenized input a run of the same key recorded in `folder`, or None."""
    if not (folder / RECORD).is_file():
        return None
    try:
        with open(folder / RECORD, "rb") as f:
            record = pickle.load(f)
        if record["format"] != FORMAT or record["key"] != key:
            return None
        for name, size in record["sizes"].items():
            if os.path.getsize(folder / name) != size:
                return None
        return _rows(folder, record["state"])
    # a damaged record fails in whatever way unpickling its bytes does, or has another shape:
    # either way the resume tokenizes again, as without one
    except Exception:  # noqa: BLE001
        return None


def _state(prepared: PreparedRows) -> dict:
    state = {
        f.name: getattr(prepared, f.name)
        for f in dataclasses.fields(prepared)
        if f.name not in NOT_RECORDED
    }
    for name in ("row_errors", "truncated", "prefix_shared"):
        state[name] = dict(state[name])
    state["locations"] = list(state["locations"])
    score_from = prepared.score_from
    if score_from.strides == (0,):  # every row scored from its first token: not materialised
        state["score_from"] = None
    tokens = prepared.token_file
    state["tokens"] = None if tokens is None else (tokens.path.name, tokens.count)
    state["columns"] = None if prepared.columns is None else prepared.columns.state()
    return state


def _spill_files(prepared: PreparedRows) -> list[Path]:
    files = [] if prepared.token_file is None else [prepared.token_file.path]
    return files + ([] if prepared.columns is None else prepared.columns.files())


def _write_record(folder: Path, key: str, state: dict, files: list[Path]) -> None:
    # what stops the record (the job's end removing the folder meanwhile, a full disk, a value
    # pickle cannot take) costs a resume its tokenizing only: never a run's failure, nor a
    # thread's traceback on its stderr
    with contextlib.suppress(Exception):
        sizes = {}
        for path in files:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                sizes[path.name] = os.fstat(fd).st_size
            finally:
                os.close(fd)
        record = {"format": FORMAT, "key": key, "sizes": sizes, "state": state}
        # all or nothing, as io/atomic.py writes, but not one of the writes its fault
        # injection counts: this one lands at no fixed point of a run
        temporary = folder / f".{RECORD}.tmp-{os.getpid()}"
        try:
            with open(temporary, "wb") as f:
                pickle.dump(record, f, protocol=5)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, folder / RECORD)
        finally:
            temporary.unlink(missing_ok=True)
        fsync_dir(folder)


def _rows(folder: Path, state: dict) -> PreparedRows:
    state = dict(state)
    tokens, columns = state.pop("tokens"), state.pop("columns")
    if state["score_from"] is None:
        state["score_from"] = np.broadcast_to(np.int32(1), (len(state["offsets"]) - 1,))
    return PreparedRows(
        **state,
        token_file=None if tokens is None else TokenFile.written(folder / tokens[0], tokens[1]),
        columns=None if columns is None else RowColumnFiles.reopened(folder, columns),
        folder=folder,
    )
