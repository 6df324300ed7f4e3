"""JSON Lines (also compressed: gzip, zstd, bzip2, xz; and OpenAI Batch request files) read a
chunk at a time, with the line number of every row for error messages."""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from bulkinfer.errors import InputError, did_you_mean, first_line
from bulkinfer.io.chunks import (
    CHUNK_ROWS,
    ColumnNames,
    InputChunk,
    _empty_table,
)
from bulkinfer.io.openai_batch import request_chunk_fields

# Sniffing a file's format and columns looks at its first lines up to this size (the default
# input.max_line_bytes); longer ones are passed over, read a block at a time.
PEEK_LINE_BYTES = 8 * 2**20
SKIP_BLOCK_BYTES = 2**20


@dataclass(frozen=True)
class LongLine:
    """A line over the size limit, read past without being kept; it stands in for its record."""

    size: int
    limit: int

    def problem(self) -> str:
        return f"the line is {self.size:,} bytes, more than input.max_line_bytes ({self.limit:,})"


def _json_file(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not a readable JSON file ({first_line(exc)})") from None


def _read_jsonl(path: str, columns: ColumnNames, max_line_bytes: int) -> Iterator[InputChunk]:
    rows: list[dict] = []
    lines: list[int] = []
    problems: dict[int, str] = {}
    first_row = 0
    seen_keep = {name: False for name in columns.keep}
    for line_no, record in _jsonl_lines(path, max_line_bytes):
        if isinstance(record, LongLine):
            problems[len(rows)] = record.problem()
            record = _long_line_row(path, line_no, record, columns)
        else:
            _check_required_fields(record, columns, f"{path}:{line_no}")
            columns.refuse_absent_id(record, f"{path}:{line_no}", "field")
            for name in columns.keep:
                seen_keep[name] = seen_keep[name] or name in record
        rows.append(record)
        lines.append(line_no)
        if len(rows) == CHUNK_ROWS:
            yield _jsonl_chunk(path, first_row, rows, lines, columns, problems)
            first_row += len(rows)
            rows, lines, problems = [], [], {}
    if rows:
        yield _jsonl_chunk(path, first_row, rows, lines, columns, problems)
    missing = [name for name, seen in seen_keep.items() if not seen and first_row + len(rows) > 0]
    if missing:
        raise InputError(f"{path}: no row has the keep column '{missing[0]}'")


def _long_line_row(path: str, line_no: int, line: LongLine, columns: ColumnNames) -> dict:
    """The stand-in row of an over-long line: a row error, where the row position is its id;
    with an id column its id is unknown, and that stops the job."""
    if columns.id is not None:
        raise InputError(
            f"{path}:{line_no}: {line.problem()}, so its {columns.id} cannot be read; "
            "raise input.max_line_bytes or shorten the line"
        )
    return dict.fromkeys((columns.prompt, columns.completion, columns.choices))


def _read_openai_requests(
    path: str, columns: ColumnNames, max_line_bytes: int
) -> Iterator[InputChunk]:
    """An OpenAI Batch API request file: one chunk of requests at a time. A keep column no
    request line has is refused (as in any JSONL file), not written as nulls."""
    records: list[dict] = []
    lines: list[int] = []
    first_row = 0
    seen_keep = {name: False for name in columns.keep if name != "url"}
    for line_no, record in _jsonl_lines(path, max_line_bytes):
        if isinstance(record, LongLine):
            record = _long_line_row(path, line_no, record, columns)
        for name in seen_keep:
            seen_keep[name] = seen_keep[name] or name in record
        records.append(record)
        lines.append(line_no)
        if len(records) == CHUNK_ROWS:
            yield _request_chunk(path, first_row, records, lines, columns)
            first_row += len(records)
            records, lines = [], []
    if records:
        yield _request_chunk(path, first_row, records, lines, columns)
    missing = [name for name, seen in seen_keep.items() if not seen and first_row + len(records)]
    if missing:
        raise InputError(f"{path}: no row has the keep column '{missing[0]}'")


def _request_chunk(
    path: str, first_row: int, records: list[dict], lines: list[int], columns: ColumnNames
) -> InputChunk:
    where = [f"{path}:{n}" for n in lines]
    prompts, ids, urls, requests, problems = request_chunk_fields(
        records, where, columns.request_urls
    )
    keep = _jsonl_keep(path, records, lines, [k for k in columns.keep if k != "url"])
    return InputChunk(
        path=path,
        first_row_in_file=first_row,
        prompts=prompts,
        completions=None,
        ids=ids,
        keep=keep.append_column("url", pa.array(urls, pa.string())),
        lines=np.asarray(lines, dtype=np.int64),
        requests=requests,
        problems=problems,
    )


def _jsonl_records(path: str, max_line_bytes: int = PEEK_LINE_BYTES) -> Iterator[tuple[int, dict]]:
    """The records of a JSONL file, over-long lines left out: for looking at its first rows."""
    for line_no, record in _jsonl_lines(path, max_line_bytes):
        if not isinstance(record, LongLine):
            yield line_no, record


# compressed JSONL by the file name's last suffix, and the codec's name in messages
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".bz2": "bzip2", ".xz": "xz"}
COMPRESSION_ERRORS = (EOFError, zlib.error, lzma.LZMAError, OSError)  # gzip's BadGzipFile too


def compression_of(path: str) -> str | None:
    """The codec a JSONL file's name says it is compressed with (.gz, .zst, .bz2, .xz)."""
    return next((name for s, name in COMPRESSIONS.items() if path.lower().endswith(s)), None)


def _open_binary(path: str, codec: str | None):
    if codec == "gzip":
        return gzip.open(path, "rb")
    if codec == "zstd":  # pyarrow's codec: the standard library has none before Python 3.14
        return io.BufferedReader(pa.input_stream(path, compression="zstd"))
    if codec == "bzip2":
        return bz2.open(path, "rb")
    if codec == "xz":
        return lzma.open(path, "rb")
    return open(path, "rb")


def _jsonl_lines(path: str, max_line_bytes: int) -> Iterator[tuple[int, dict | LongLine]]:
    codec = compression_of(path)
    line_no = 0
    try:
        with _open_binary(path, codec) as f:
            for line_no, raw in _bounded_lines(f, max_line_bytes):
                if isinstance(raw, LongLine):
                    yield line_no, raw
                elif (raw.removeprefix(BOM) if line_no == 1 else raw).strip():
                    yield line_no, _parse_line(path, line_no, raw)
    except COMPRESSION_ERRORS as exc:
        if codec is None or isinstance(exc, FileNotFoundError | PermissionError):
            raise
        if line_no == 0:
            raise InputError(f"{path}: not a readable {codec} file ({first_line(exc)})") from None
        raise InputError(
            f"{path}: corrupt {codec} data after line {line_no} ({first_line(exc)})"
        ) from None


BOM = b"\xef\xbb\xbf"  # UTF-8's byte order mark, which some editors put first


def _bounded_lines(f, limit: int) -> Iterator[tuple[int, bytes | LongLine]]:
    """Numbered lines of a binary file; a line over `limit` bytes (newline not counted) is
    skipped a block at a time and comes back as a LongLine, so memory stays within `limit`."""
    line_no = 0
    while raw := f.readline(limit + 1):
        line_no += 1
        if len(raw) <= limit or raw.endswith(b"\n"):
            yield line_no, raw
            continue
        size = len(raw)
        del raw
        while block := f.readline(SKIP_BLOCK_BYTES):
            size += len(block)
            if block.endswith(b"\n"):
                size -= 1
                break
        yield line_no, LongLine(size, limit)


def _parse_line(path: str, line_no: int, raw: bytes) -> dict:
    try:
        text = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(
            f"{path}:{line_no}: not valid UTF-8 (byte {exc.start + 1} of the line)"
        ) from None
    try:
        record = json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as exc:
        raise InputError(
            f"{path}:{line_no}:{exc.colno}: not valid JSON: {exc.msg}"
            + _whole_file_hint(line_no, text)
        ) from None
    except _DuplicateKey as exc:
        raise InputError(
            f"{path}:{line_no}: key {exc.args[0]!r} appears twice in one object (which value "
            f"is meant is not known; JSON parsers differ on it)"
        ) from None
    except RecursionError:  # the parser recurses once per level of nesting
        raise InputError(
            f"{path}:{line_no}: JSON nested too deeply "
            f"(more than about {sys.getrecursionlimit()} levels)"
        ) from None
    if not isinstance(record, dict):
        raise InputError(
            f"{path}:{line_no}: expected a JSON object per line, got {type(record).__name__}"
            + _whole_file_hint(line_no, text)
        )
    return record


def _whole_file_hint(line_no: int, line: str) -> str:
    """Where the first line opens a JSON array or an object spread over lines: the file is
    likely one JSON document, not JSON Lines; what reads it."""
    start = line.lstrip()[:1]
    if line_no != 1 or start not in ("[", "{"):
        return ""
    what = "an array" if start == "[" else "an object spread over several lines"
    return (
        f" (this looks like {what}: JSONL holds one object per line; input.format: hf reads "
        "a JSON file that is one array of objects)"
    )


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """An object's keys and values, refused where a key repeats (`json` keeps the last value
    silently, pyarrow's reader refuses the line)."""
    record = dict(pairs)
    if len(record) != len(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return record


def _check_required_fields(record: dict, columns: ColumnNames, where: str) -> None:
    for name in (columns.prompt, columns.completion, columns.id, columns.choices):
        if name is not None and name not in record:
            raise InputError(
                f"{where}: no field '{name}'{did_you_mean(name, record)}; "
                f"the line has: {', '.join(map(str, record)) or 'no fields'}"
            )


def _jsonl_chunk(
    path: str,
    first_row: int,
    rows: list[dict],
    lines: list[int],
    columns: ColumnNames,
    problems: dict[int, str],
) -> InputChunk:
    keep = _jsonl_keep(path, rows, lines, columns.keep)
    return InputChunk(
        path=path,
        first_row_in_file=first_row,
        prompts=[r[columns.prompt] for r in rows],
        completions=[r[columns.completion] for r in rows] if columns.completion else None,
        ids=[r[columns.id] for r in rows] if columns.id else None,
        keep=keep,
        lines=np.asarray(lines, dtype=np.int64),
        choices=[r[columns.choices] for r in rows] if columns.choices else None,
        problems=problems or None,
    )


def _jsonl_keep(path: str, rows: list[dict], lines: list[int], names) -> pa.Table:
    keep_arrays = {}
    for name in names:
        values = [r.get(name) for r in rows]
        try:
            keep_arrays[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            line = _first_mixed(values, lines)
            raise InputError(
                f"{path}:{line}: keep column '{name}' mixes value types: this line's does not "
                f"go with the lines' before it ({first_line(exc)}); make them all one type"
            ) from None
        except OverflowError:
            line = _first_unconvertible(values, lines)
            raise InputError(
                f"{path}:{line}: keep column '{name}' holds an integer that does not fit in "
                "64 bits; give it as a string"
            ) from None
        except UnicodeEncodeError:
            line = _first_unconvertible(values, lines)
            raise InputError(
                f"{path}:{line}: keep column '{name}' is not valid Unicode (a lone surrogate)"
            ) from None
        if _empty_struct(keep_arrays[name].type):
            raise InputError(
                f"{path}:{lines[0]}: keep column '{name}' has objects without fields ({{}}) "
                f"throughout lines {lines[0]}-{lines[-1]}, which Parquet cannot store; give "
                "them a field or drop the column from keep_columns"
            )
    return pa.table(keep_arrays) if keep_arrays else _empty_table(len(rows))


def _empty_struct(kind: pa.DataType) -> bool:
    """Whether a type holds a struct of no fields (Arrow's type of `{}`) at any depth."""
    if pa.types.is_struct(kind):
        return kind.num_fields == 0 or any(_empty_struct(f.type) for f in kind)
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        return _empty_struct(kind.value_type)
    return False


def _first_mixed(values: list, lines: list[int]) -> int:
    """The line of the first value Arrow cannot take together with the values before it."""
    low, high = 1, len(values)  # values[:high] fails; find the shortest failing prefix
    while low < high:
        middle = (low + high) // 2
        try:
            pa.array(values[:middle])
            low = middle + 1
        except (pa.ArrowInvalid, pa.ArrowTypeError, ValueError, OverflowError):
            high = middle
    return lines[high - 1]


def _first_unconvertible(values: list, lines: list[int]) -> int:
    """The line of the first value Arrow cannot take on its own (the culprit of a chunk's
    conversion error)."""
    for value, line in zip(values, lines, strict=True):
        try:
            pa.array([value])
        except (ValueError, OverflowError):
            return line
    return lines[0]
