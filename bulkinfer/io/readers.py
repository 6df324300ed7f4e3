"""Input readers: Parquet, JSONL and .jsonl.gz, from a file, a folder or a glob; a Hugging Face
dataset saved with `save_to_disk`; Parquet/JSONL loaded through `datasets` on request.

They stream: Parquet by record batches, JSONL line by line, so a chunk at a time is in memory; a
saved dataset's Arrow files are memory-mapped, so it needs no `datasets` install to be read.
Whole-input problems (a file that is not Parquet, a malformed JSONL line, a missing column) raise
InputError naming the file and line; row problems (a null prompt) travel on as values.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import queue
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bulkinfer.errors import InputError, did_you_mean
from bulkinfer.io.openai_batch import looks_like_batch_record, request_chunk_fields

CHUNK_ROWS = 8192
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson", ".ndjson.gz", ".json", ".json.gz")
PARQUET_SUFFIXES = (".parquet", ".pq")


@dataclass(frozen=True)
class ColumnNames:
    """The input columns a job reads; `id` None means the row position is the id."""

    prompt: str
    completion: str | None
    id: str | None
    keep: tuple[str, ...]
    choices: str | None = None


@dataclass(frozen=True)
class InputChunk:
    """Consecutive rows of one file. `lines` are 1-based JSONL line numbers, or None for Parquet."""

    path: str
    first_row_in_file: int
    prompts: list[Any]
    completions: list[Any] | None
    ids: list[Any] | None
    keep: pa.Table
    lines: np.ndarray | None
    choices: list[Any] | None = None
    # OpenAI batch requests: per-row settings (io.openai_batch.REQUEST_SCHEMA) and the rows
    # whose request cannot be answered as asked, with the reason.
    requests: pa.Table | None = None
    problems: dict[int, str] | None = None

    def __len__(self) -> int:
        return len(self.prompts)

    def location(self, i: int) -> str:
        """Where row i of this chunk sits in its file, for error messages."""
        if self.lines is not None:
            return f"{self.path}:{int(self.lines[i])}"
        return f"{self.path}: row {self.first_row_in_file + i}"


def resolve_input_files(
    patterns: list[str], fmt: str = "auto", exclude: str | None = None, split: str | None = None
) -> list[str]:
    """Expand files, folders and globs into a sorted, de-duplicated list of data files.

    A folder saved by `datasets` (`save_to_disk`) is one input, itself (for a DatasetDict, the
    folder of its `split`). Files under `exclude` (the job's own output folder, when it sits
    inside an input folder) are never inputs."""
    files: list[str] = []
    for pattern in patterns:
        if os.path.isdir(pattern) and is_saved_dataset(pattern):
            found = [saved_dataset_split(pattern, split)]
        elif os.path.isdir(pattern):
            found = _folder_inputs(pattern, fmt, split)
            if not found:
                raise InputError(f"{pattern}: the folder holds no .parquet or .jsonl files")
        elif os.path.isfile(pattern):
            found = [pattern]
        else:
            found = sorted(
                p if os.path.isfile(p) else saved_dataset_split(p, split)
                for p in glob.glob(pattern, recursive=True)
                if os.path.isfile(p) or (os.path.isdir(p) and is_saved_dataset(p))
            )
            if not found:
                raise InputError(f"{pattern}: matches no file")
        files.extend(found)
    unique = list(dict.fromkeys(os.path.abspath(f) for f in files))
    if exclude is not None:
        inside = os.path.abspath(exclude) + os.sep
        unique = [f for f in unique if not f.startswith(inside)]
        if not unique:
            raise InputError(f"{', '.join(patterns)}: no input files outside the output folder")
    for f in unique:
        file_format(f, fmt)
    return unique


def _folder_inputs(folder: str, fmt: str, split: str | None) -> list[str]:
    """Data files under a folder, in sorted order; a saved dataset inside it is one input (its
    state.json is not read as JSONL)."""
    found = []
    for root, dirs, names in os.walk(folder):
        saved = [d for d in dirs if is_saved_dataset(os.path.join(root, d))]
        found += [saved_dataset_split(os.path.join(root, d), split) for d in saved]
        dirs[:] = sorted(d for d in dirs if d not in saved)
        found += [
            os.path.join(root, name)
            for name in names
            if _is_data_file(name, fmt) and not name.startswith((".", "_"))
        ]
    return sorted(found)


def file_format(path: str, fmt: str = "auto") -> str:
    """How to read `path`: parquet, jsonl, saved (a save_to_disk folder) or datasets (a file
    loaded through the `datasets` library, with input.format hf)."""
    if os.path.isdir(path):
        return "saved"
    if fmt == "hf":
        return "datasets"
    if fmt != "auto":
        return fmt
    lower = path.lower()
    if lower.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if lower.endswith(JSONL_SUFFIXES):
        first = next(_jsonl_records(path), (0, {}))[1]
        return "openai" if looks_like_batch_record(first) else "jsonl"
    raise InputError(
        f"{path}: unknown file type; name it .parquet or .jsonl(.gz), or set input.format"
    )


def _is_data_file(name: str, fmt: str) -> bool:
    lower = name.lower()
    if fmt == "parquet":
        return lower.endswith(PARQUET_SUFFIXES)
    if fmt == "jsonl":
        return lower.endswith(JSONL_SUFFIXES)
    return lower.endswith(PARQUET_SUFFIXES + JSONL_SUFFIXES)


def read_chunks(files: list[str], columns: ColumnNames, fmt: str = "auto") -> Iterator[InputChunk]:
    """Yield the rows of every file in order, a chunk at a time."""
    for path in files:
        kind = file_format(path, fmt)
        if kind == "parquet":
            yield from _read_parquet(path, columns)
        elif kind == "saved":
            yield from _read_saved_dataset(path, columns)
        elif kind == "datasets":
            yield from _read_through_datasets(path, columns)
        elif kind == "openai":
            yield from _read_openai_requests(path, columns)
        else:
            yield from _read_jsonl(path, columns)


def _read_parquet(path: str, columns: ColumnNames) -> Iterator[InputChunk]:
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"{path}: not a readable Parquet file ({_first_line(exc)})") from None
    wanted = _check_columns(path, parquet.schema_arrow.names, columns)
    row = 0
    try:
        for batch in parquet.iter_batches(batch_size=CHUNK_ROWS, columns=wanted):
            yield _table_chunk(path, row, pa.Table.from_batches([batch]), columns)
            row += batch.num_rows
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(
            f"{path}: corrupt Parquet data after row {row} ({_first_line(exc)})"
        ) from None


def _check_columns(path: str, names: list[str], columns: ColumnNames) -> list[str]:
    """The columns to read, all present in `names`, or an error naming the missing one."""
    wanted = _wanted_columns(columns)
    for name in wanted:
        if name not in names:
            raise InputError(
                f"{path}: no column '{name}'{did_you_mean(name, names)}; "
                f"the file has: {', '.join(names)}"
            )
    return wanted


def _table_chunk(path: str, first_row: int, table: pa.Table, columns: ColumnNames) -> InputChunk:
    return InputChunk(
        path=path,
        first_row_in_file=first_row,
        prompts=table.column(columns.prompt).to_pylist(),
        completions=_pylist(table, columns.completion),
        ids=_pylist(table, columns.id),
        keep=table.select(list(columns.keep)),
        lines=None,
        choices=_pylist(table, columns.choices),
    )


def is_saved_dataset(folder: str) -> bool:
    """A folder written by `datasets`' save_to_disk: a Dataset or a DatasetDict."""
    names = set(os.listdir(folder))
    return {"state.json", "dataset_info.json"} <= names or "dataset_dict.json" in names


def saved_dataset_split(folder: str, split: str | None) -> str:
    """The Dataset folder to read: the folder itself, or a DatasetDict's split."""
    dict_file = os.path.join(folder, "dataset_dict.json")
    if not os.path.isfile(dict_file):
        if split is not None:
            raise InputError(f"{folder}: a saved Dataset has no splits; remove input.split")
        return folder
    splits = _json_file(dict_file).get("splits") or []
    if split is None and len(splits) == 1:
        split = splits[0]
    if split not in splits:
        what = "set input.split to one" if split is None else f"no split '{split}'"
        raise InputError(f"{folder}: a DatasetDict with splits {', '.join(splits)}; {what}")
    return os.path.join(folder, split)


def _saved_dataset_table(folder: str) -> pa.Table:
    """All rows of a save_to_disk folder, memory-mapped from its Arrow files, in order."""
    state = _json_file(os.path.join(folder, "state.json"))
    tables = []
    for entry in state.get("_data_files", []):
        path = os.path.join(folder, entry["filename"])
        try:
            tables.append(pa.ipc.open_stream(pa.memory_map(path)).read_all())
        except (pa.ArrowInvalid, OSError) as exc:
            raise InputError(f"{path}: not a readable Arrow file ({_first_line(exc)})") from None
    if not tables:
        raise InputError(f"{folder}: the saved dataset lists no data files in state.json")
    return pa.concat_tables(tables)


def _read_saved_dataset(folder: str, columns: ColumnNames) -> Iterator[InputChunk]:
    table = _saved_dataset_table(folder)
    wanted = _check_columns(folder, table.column_names, columns)
    row = 0
    for batch in table.select(wanted).to_batches(max_chunksize=CHUNK_ROWS):
        yield _table_chunk(folder, row, pa.Table.from_batches([batch]), columns)
        row += batch.num_rows


def _read_through_datasets(path: str, columns: ColumnNames) -> Iterator[InputChunk]:
    """A Parquet or JSONL file loaded by `datasets.load_dataset` (its type inference and cache),
    for input.format hf."""
    datasets = import_datasets()
    builder = "parquet" if file_format(path) == "parquet" else "json"
    datasets.disable_progress_bars()
    try:
        dataset = datasets.load_dataset(builder, data_files=[path], split="train")
    except Exception as exc:  # the library's own parse errors name the problem
        raise InputError(f"{path}: datasets could not load it ({_first_line(exc)})") from None
    wanted = _check_columns(path, dataset.column_names, columns)
    row = 0
    for table in dataset.select_columns(wanted).with_format("arrow").iter(batch_size=CHUNK_ROWS):
        yield _table_chunk(path, row, table, columns)
        row += table.num_rows


def import_datasets():
    """The `datasets` library, imported only when a job asks for it."""
    try:
        import datasets
    except ImportError:
        raise InputError(
            "input.format hf reads files through the `datasets` library, which is not installed: "
            "pip install datasets (a save_to_disk folder needs no format and no datasets)"
        ) from None
    return datasets


def _json_file(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not a readable JSON file ({_first_line(exc)})") from None


def _read_jsonl(path: str, columns: ColumnNames) -> Iterator[InputChunk]:
    rows: list[dict] = []
    lines: list[int] = []
    first_row = 0
    seen_keep = {name: False for name in columns.keep}
    for line_no, record in _jsonl_records(path):
        _check_required_fields(record, columns, f"{path}:{line_no}")
        for name in columns.keep:
            seen_keep[name] = seen_keep[name] or name in record
        rows.append(record)
        lines.append(line_no)
        if len(rows) == CHUNK_ROWS:
            yield _jsonl_chunk(path, first_row, rows, lines, columns)
            first_row += len(rows)
            rows, lines = [], []
    if rows:
        yield _jsonl_chunk(path, first_row, rows, lines, columns)
    missing = [name for name, seen in seen_keep.items() if not seen and first_row + len(rows) > 0]
    if missing:
        raise InputError(f"{path}: no row has the keep column '{missing[0]}'")


def _read_openai_requests(path: str, columns: ColumnNames) -> Iterator[InputChunk]:
    """An OpenAI Batch API request file: one chunk of requests at a time."""
    records: list[dict] = []
    lines: list[int] = []
    first_row = 0
    for line_no, record in _jsonl_records(path):
        records.append(record)
        lines.append(line_no)
        if len(records) == CHUNK_ROWS:
            yield _request_chunk(path, first_row, records, lines, columns)
            first_row += len(records)
            records, lines = [], []
    if records:
        yield _request_chunk(path, first_row, records, lines, columns)


def _request_chunk(
    path: str, first_row: int, records: list[dict], lines: list[int], columns: ColumnNames
) -> InputChunk:
    where = [f"{path}:{n}" for n in lines]
    prompts, ids, urls, requests, problems = request_chunk_fields(records, where)
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


def _jsonl_records(path: str) -> Iterator[tuple[int, dict]]:
    opener = gzip.open if path.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            for line_no, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                try:
                    text = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
                except UnicodeDecodeError as exc:
                    raise InputError(
                        f"{path}:{line_no}: not valid UTF-8 (byte {exc.start + 1} of the line)"
                    ) from None
                try:
                    record = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise InputError(
                        f"{path}:{line_no}:{exc.colno}: not valid JSON: {exc.msg}"
                    ) from None
                if not isinstance(record, dict):
                    raise InputError(
                        f"{path}:{line_no}: expected a JSON object per line, got {type(record).__name__}"
                    )
                yield line_no, record
    except (gzip.BadGzipFile, EOFError) as exc:
        raise InputError(f"{path}: not a readable gzip file ({_first_line(exc)})") from None


def _check_required_fields(record: dict, columns: ColumnNames, where: str) -> None:
    for name in (columns.prompt, columns.completion, columns.id, columns.choices):
        if name is not None and name not in record:
            raise InputError(
                f"{where}: no field '{name}'{did_you_mean(name, record)}; "
                f"the line has: {', '.join(map(str, record)) or 'no fields'}"
            )


def _jsonl_chunk(
    path: str, first_row: int, rows: list[dict], lines: list[int], columns: ColumnNames
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
    )


def _jsonl_keep(path: str, rows: list[dict], lines: list[int], names) -> pa.Table:
    keep_arrays = {}
    for name in names:
        values = [r.get(name) for r in rows]
        try:
            keep_arrays[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise InputError(
                f"{path}: keep column '{name}' mixes value types between lines "
                f"{lines[0]} and {lines[-1]} ({_first_line(exc)})"
            ) from None
    return pa.table(keep_arrays) if keep_arrays else _empty_table(len(rows))


def _empty_table(num_rows: int) -> pa.Table:
    """A table with no columns but the right row count, so chunks concatenate uniformly."""
    return pa.table({"_": pa.nulls(num_rows)}).drop(["_"])


def _wanted_columns(columns: ColumnNames) -> list[str]:
    names = [columns.prompt, columns.completion, columns.choices, columns.id, *columns.keep]
    return list(dict.fromkeys(n for n in names if n is not None))


def _pylist(table: pa.Table, name: str | None) -> list[Any] | None:
    return None if name is None else table.column(name).to_pylist()


def peek_columns(path: str, fmt: str = "auto") -> list[str]:
    """The column names of a file's schema (Parquet, a saved dataset) or first record (JSONL)."""
    kind = file_format(path, fmt)
    if kind == "saved":
        return _saved_dataset_table(path).column_names
    if kind == "openai":
        return ["custom_id", "method", "url", "body"]
    if kind == "parquet" or (kind == "datasets" and file_format(path) == "parquet"):
        try:
            return pq.ParquetFile(path).schema_arrow.names
        except (pa.ArrowInvalid, OSError) as exc:
            raise InputError(f"{path}: not a readable Parquet file ({_first_line(exc)})") from None
    for _, record in _jsonl_records(path):
        return list(record)
    return []


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def read_ahead(chunks: Iterable[InputChunk], depth: int = 2) -> Iterator[InputChunk]:
    """The same chunks, read and parsed up to `depth` chunks ahead in a thread, so parsing
    overlaps the tokenizer (whose Rust code runs without the GIL). A reader error is raised
    here, in order, after the chunks before it."""
    ahead: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def offer(item) -> bool:
        while not stop.is_set():
            try:
                ahead.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for chunk in chunks:
                if not offer(chunk):
                    return
            offer(done)
        except BaseException as exc:  # handed to the consumer, which raises it
            offer(exc)

    thread = threading.Thread(target=produce, name="bulkinfer-read", daemon=True)
    thread.start()
    try:
        while (item := ahead.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
