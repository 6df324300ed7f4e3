"""The tokenized input kept for a resume.

A run tokenizes the whole input into the job's folder before its first batch: ~26 s a million
rows on two cores, minutes at ten million, paid again by every resume after a preemption. So a
run that tokenized records what it made: the rows' in-memory state in files of data only (numpy
arrays, Arrow tables; no pickle, so a file planted in the folder runs no code), then RECORD,
written last once all of them are on disk, naming each file by its size, inode and change times
and holding a key of everything the tokens depend on (the job's fingerprint of spec, model files
and input contents, the input's paths, the versions of the code that tokenized). A resume whose
key is the same, and whose files are those the record names, reads them instead of the input.
Anything else (no record, another key, a file replaced or copied in, damage) is not used: the
input is tokenized again, as before there were records.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import sys
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa

from bulkinfer.io.atomic import write_bytes_atomic
from bulkinfer.io.chunks import InputChunk
from bulkinfer.io.spill import RowColumnFiles, TokenFile, rows_file_name
from bulkinfer.prepare.rows import PreparedRows, empty_table

RECORD = "prepared.json"
ARRAYS = "prepared-arrays.npz"
ERRORS = "prepared-errors.arrow"
REQUESTS = "prepared-requests.arrow"
FORMAT = 2
# fields that are files or follow from the others: rebuilt, not recorded
NOT_RECORDED = ("token_file", "columns", "folder", "temporary", "lengths")
# the fields the record holds (tests check that these and NOT_RECORDED are all of them)
RECORDED = (
    "offsets",
    "score_from",
    "row_errors",
    "id_type",
    "request_params",
    "choice_counts",
    "choice_lengths",
    "locations",
    "truncated",
    "chat_prompts",
    "plain_prompts",
    "prefix_heads",
    "prefix_shared",
    "prefix_length",
)


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
    thread = threading.Thread(
        target=_write_record,
        args=(prepared.folder, key, state, _spill_files(prepared)),
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
        record = json.loads((folder / RECORD).read_text(encoding="utf-8"))
        if record["format"] != FORMAT or record["key"] != key:
            return None
        if record.pop("digest") != _digest(record):  # damaged, however well it parses
            return None
        if not _named(record) <= set(record["files"]):  # every file it reads, checked
            return None
        for name, signature in record["files"].items():
            if _signature(os.stat(folder / name)) != signature:
                return None
        return _rows(folder, record)
    # a damaged record fails in whatever way reading it does, or has another shape: either way
    # the resume tokenizes again, as without one
    except Exception:  # noqa: BLE001
        return None


def _digest(record: dict) -> str:
    """Of a record's every value, so a record damaged into other valid JSON is not read."""
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def _named(record: dict) -> set[str]:
    """The files a record's rows are read from."""
    names = {ARRAYS, ERRORS} | ({REQUESTS} if record["requests"] else set())
    names |= {record["tokens"][0]} if record["tokens"] else set()
    columns = record["columns"]
    return names | {rows_file_name(k) for k in range(len(columns["starts"]) if columns else 0)}


def _signature(stat: os.stat_result) -> list[int]:
    """What any rewrite or copy of a file changes: its size, inode and modification and change
    times (a file of the same size from another job's folder has another inode and ctime)."""
    return [stat.st_size, stat.st_ino, stat.st_mtime_ns, stat.st_ctime_ns]


def _state(prepared: PreparedRows) -> dict:
    """The recorded fields, copied now, as arrays, tables and JSON values."""
    arrays = {"offsets": prepared.offsets}
    if prepared.score_from.strides != (0,):  # else every row scored from its first token
        arrays["score_from"] = np.ascontiguousarray(prepared.score_from)
    for name in ("choice_counts", "choice_lengths", "prefix_heads"):
        if getattr(prepared, name) is not None:
            arrays[name] = getattr(prepared, name)
    arrays["truncated_rows"] = np.fromiter(prepared.truncated, np.int64)
    arrays["truncated_tokens"] = np.fromiter(prepared.truncated.values(), np.int64)
    arrays["shared_heads"] = np.fromiter(prepared.prefix_shared, np.uint64)
    arrays["shared_tokens"] = np.fromiter(prepared.prefix_shared.values(), np.int64)
    locations = []
    for k, (start, chunk) in enumerate(prepared.locations):
        lines = chunk.lines
        if isinstance(lines, range):
            lines = [lines.start, lines.stop]
        elif lines is not None:
            arrays[f"lines_{k}"], lines = np.asarray(lines), f"lines_{k}"
        locations.append([start, chunk.path, chunk.first_row_in_file, lines])
    errors = pa.table(
        {
            "row": pa.array(list(prepared.row_errors), pa.int64()),
            "message": pa.array(list(prepared.row_errors.values()), pa.string()),
        }
    )
    tokens, columns = prepared.token_file, prepared.columns
    return {
        "arrays": arrays,
        "errors": errors,
        "requests": prepared.request_params,
        "values": {
            "id_type": None
            if prepared.id_type is None
            else _schema_text(pa.schema([("id", prepared.id_type)])),
            "locations": locations,
            "chat_prompts": prepared.chat_prompts,
            "plain_prompts": prepared.plain_prompts,
            "prefix_length": prepared.prefix_length,
            "tokens": None if tokens is None else [tokens.path.name, tokens.count],
            "columns": None
            if columns is None
            else {
                "starts": list(columns.starts),
                "rows": columns.rows,
                "schema": _schema_text(columns.schema),
            },
        },
    }


def _schema_text(schema: pa.Schema) -> str:
    return base64.b64encode(schema.serialize().to_pybytes()).decode("ascii")


def _schema(text: str) -> pa.Schema:
    return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(text)))


def _spill_files(prepared: PreparedRows) -> list[Path]:
    files = [] if prepared.token_file is None else [prepared.token_file.path]
    return files + ([] if prepared.columns is None else prepared.columns.files())


def _write_record(folder: Path, key: str, state: dict, spill: list[Path]) -> None:
    # what stops the record (the job's end removing the folder meanwhile, a full disk) costs
    # a resume its tokenizing only: never a run's failure, nor a thread's traceback
    with contextlib.suppress(Exception):
        with open(folder / ARRAYS, "wb") as f:
            np.savez(f, **state["arrays"])
        _write_table(folder / ERRORS, state["errors"])
        written = [folder / ARRAYS, folder / ERRORS]
        if state["requests"] is not None:
            _write_table(folder / REQUESTS, state["requests"])
            written.append(folder / REQUESTS)
        files = {}
        for path in spill + written:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                files[path.name] = _signature(os.fstat(fd))
            finally:
                os.close(fd)
        record = {"format": FORMAT, "key": key, "files": files, **state["values"]}
        record["requests"] = state["requests"] is not None
        record["digest"] = _digest(record)
        write_bytes_atomic(folder / RECORD, json.dumps(record).encode(), injected=False)


def _write_table(path: Path, table: pa.Table) -> None:
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


def _read_table(path: Path) -> pa.Table:
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_file(source).read_all()


def _rows(folder: Path, record: dict) -> PreparedRows:
    with np.load(folder / ARRAYS, allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    errors = _read_table(folder / ERRORS)
    offsets = arrays["offsets"]
    score_from = arrays.get("score_from")
    if score_from is None:
        score_from = np.broadcast_to(np.int32(1), (len(offsets) - 1,))
    locations = []
    for start, path, first_row, lines in record["locations"]:
        if isinstance(lines, list):
            lines = range(lines[0], lines[1])
        elif lines is not None:
            lines = arrays[lines]
        chunk = InputChunk(path, first_row, [], None, None, empty_table(0), lines)
        locations.append((start, chunk))
    tokens, columns = record["tokens"], record["columns"]
    if columns is not None:
        schema = _schema(columns["schema"])
        columns = RowColumnFiles.reopened(folder, columns["starts"], schema, columns["rows"])
    shared = zip(arrays["shared_heads"].tolist(), arrays["shared_tokens"].tolist(), strict=True)
    truncated = zip(
        arrays["truncated_rows"].tolist(), arrays["truncated_tokens"].tolist(), strict=True
    )
    return PreparedRows(
        offsets=offsets,
        score_from=score_from,
        row_errors=dict(zip(errors["row"].to_pylist(), errors["message"].to_pylist(), strict=True)),
        id_type=None if record["id_type"] is None else _schema(record["id_type"]).field("id").type,
        request_params=_read_table(folder / REQUESTS) if record["requests"] else None,
        choice_counts=arrays.get("choice_counts"),
        choice_lengths=arrays.get("choice_lengths"),
        locations=locations,
        truncated=dict(truncated),
        chat_prompts=record["chat_prompts"],
        plain_prompts=record["plain_prompts"],
        token_file=None if tokens is None else TokenFile.written(folder / tokens[0], tokens[1]),
        columns=columns,
        folder=folder,
        prefix_heads=arrays.get("prefix_heads"),
        prefix_shared=dict(shared),
        prefix_length=record["prefix_length"],
    )
