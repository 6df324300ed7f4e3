"""Input readers: Parquet, JSONL and .jsonl.gz, from a file, a folder or a glob; a Hugging Face
dataset saved with `save_to_disk`; Parquet/JSONL loaded through `datasets` on request.

They stream: Parquet by record batches, JSONL line by line, so a chunk at a time is in memory; a
saved dataset's Arrow files are memory-mapped, so it needs no `datasets` install to be read.
Whole-input problems (a file that is not Parquet, a malformed JSONL line, a missing column) raise
InputError naming the file and line; row problems (a null prompt) travel on as values.
"""

from __future__ import annotations

import functools
import io
import os
import queue
import threading
from collections.abc import Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from bulkinfer.errors import InputError, did_you_mean, first_line
from bulkinfer.io.chunks import (
    CHUNK_ROWS,
    ColumnNames,
    InputChunk,
    _pylist,
    _wanted_columns,
)
from bulkinfer.io.files import DataFile
from bulkinfer.io.jsonl import (
    COMPRESSION_ERRORS,
    PEEK_LINE_BYTES,
    _json_file,
    _jsonl_records,
    _open_binary,
    _read_jsonl,
    _read_openai_requests,
    compression_of,
)
from bulkinfer.io.openai_batch import refuse_not_a_request


def read_chunks(
    files: list[DataFile], columns: ColumnNames, max_line_bytes: int
) -> Iterator[InputChunk]:
    """Yield the rows of every file in order, a chunk at a time; a JSONL line over
    `max_line_bytes` is not parsed (a row error, or an error when the row needs its id)."""
    for file in files:
        path, kind = file.path, file.kind
        if kind == "parquet":
            yield from _read_parquet(path, columns)
        elif kind == "saved":
            yield from _read_saved_dataset(path, columns)
        elif kind == "datasets":
            yield from _read_through_datasets(path, columns)
        elif kind == "openai":
            yield from _read_openai_requests(path, columns, max_line_bytes)
        else:
            yield from _read_jsonl(path, columns, max_line_bytes)


def _read_parquet(path: str, columns: ColumnNames) -> Iterator[InputChunk]:
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"{path}: not a readable Parquet file ({first_line(exc)})") from None
    if parquet.metadata.num_rows == 0:  # passed over, as an empty JSONL file is: its schema
        return  # (a writer's, with no row to hold) need not have the job's columns
    wanted = _check_columns(path, parquet.schema_arrow.names, columns)
    _refuse_json_text(path, parquet.schema_arrow, columns)
    row = 0
    try:
        for batch in parquet.iter_batches(batch_size=CHUNK_ROWS, columns=wanted):
            yield _table_chunk(path, row, pa.Table.from_batches([batch]), columns)
            row += batch.num_rows
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(
            f"{path}: corrupt Parquet data after row {row} ({first_line(exc)})"
        ) from None


def _check_columns(path: str, names: list[str], columns: ColumnNames) -> list[str]:
    """The columns to read, all present in `names`, or an error naming the missing one."""
    wanted = _wanted_columns(columns)
    columns.refuse_absent_id(names, path, "column")
    for name in wanted:
        if names.count(name) > 1:
            raise InputError(
                f"{path}: {names.count(name)} columns are named '{name}'; rename all but one"
            )
        if name not in names:
            raise InputError(
                f"{path}: no column '{name}'{did_you_mean(name, names)}; "
                f"the file has: {', '.join(names)}"
            )
    return wanted


def _table_chunk(path: str, first_row: int, table: pa.Table, columns: ColumnNames) -> InputChunk:
    try:
        prompts = table.column(columns.prompt).to_pylist()
        completions = _pylist(table, columns.completion)
        ids = _pylist(table, columns.id)
        choices = _pylist(table, columns.choices)
    except UnicodeDecodeError:  # a writer that does not check UTF-8 (Arrow reads it as is)
        raise InputError(_not_utf8(path, first_row, table, columns)) from None
    return InputChunk(
        path=path,
        first_row_in_file=first_row,
        prompts=prompts,
        completions=completions,
        ids=ids,
        keep=table.select(list(columns.keep)),
        lines=None,
        choices=choices,
        id_type=table.schema.field(columns.id).type if columns.id else None,
    )


def _not_utf8(path: str, first_row: int, table: pa.Table, columns: ColumnNames) -> str:
    """Where a chunk's text is not valid UTF-8: the first row and column found."""
    for name in (columns.id, columns.prompt, columns.completion, columns.choices):
        if name is None:
            continue
        for i, value in enumerate(table.column(name)):
            try:
                value.as_py()
            except UnicodeDecodeError:
                return f"{path}: row {first_row + i}: column '{name}' is not valid UTF-8"
    return f"{path}: rows from {first_row}: text that is not valid UTF-8"


def _saved_dataset_table(folder: str) -> pa.Table:
    """All rows of a save_to_disk folder, memory-mapped from its Arrow files, in order."""
    state = _json_file(os.path.join(folder, "state.json"))
    tables = []
    for entry in state.get("_data_files", []):
        path = os.path.join(folder, entry["filename"])
        try:
            tables.append(pa.ipc.open_stream(pa.memory_map(path)).read_all())
        except (pa.ArrowInvalid, OSError) as exc:
            raise InputError(f"{path}: not a readable Arrow file ({first_line(exc)})") from None
    if not tables:  # an empty dataset's (datasets writes none for it): passed over, as empty
        return pa.table({})
    return pa.concat_tables(tables)


def _read_saved_dataset(folder: str, columns: ColumnNames) -> Iterator[InputChunk]:
    table = _saved_dataset_table(folder)
    if not table.num_rows:
        return  # an empty input among others is passed over
    wanted = _check_columns(folder, table.column_names, columns)
    _refuse_json_text(folder, table.schema, columns)
    row = 0
    for batch in table.select(wanted).to_batches(max_chunksize=CHUNK_ROWS):
        yield _table_chunk(folder, row, pa.Table.from_batches([batch]), columns)
        row += batch.num_rows


def _refuse_json_text(path: str, schema: pa.Schema, columns: ColumnNames) -> None:
    """`datasets` stores values that mix types as JSON text (its Json feature, an Arrow
    extension type), a whole column or a field inside one (a message's content, a string here
    and a list of parts there): read as is, its strings would keep their quotes. Any extension
    type is refused, named, wherever it sits in a column bulkinfer reads values of (prompt,
    completion, choices, id); a kept column is passed through as it is (a uuid column, say)."""
    read = [columns.prompt, columns.completion, columns.choices, columns.id]
    for name in dict.fromkeys(n for n in read if n is not None):
        found = _extension_at(schema.field(name).type, name)
        if found is not None:
            where, kind = found
            part = "column" if where == name else "field"
            if "json" in str(getattr(kind, "extension_name", "")).lower():
                raise InputError(
                    f"{path}: {part} '{where}' is {kind} (datasets stores values that mix types "
                    "as JSON text); give its values one type"
                )
            raise InputError(  # a uuid id column, say, as DuckDB and Spark write them
                f"{path}: {part} '{where}' is {kind}, which bulkinfer does not read as text or "
                "numbers; cast it to strings"
            )


LIST_TYPES = tuple(
    getattr(pa, name)
    for name in (
        "ListType",
        "LargeListType",
        "FixedSizeListType",
        "ListViewType",
        "LargeListViewType",
    )
    if hasattr(pa, name)
)


def _extension_at(kind: pa.DataType, where: str) -> tuple[str, pa.DataType] | None:
    """Where in a value of type `kind` (named `where`) an extension type sits, and that type."""
    if isinstance(kind, pa.BaseExtensionType):
        return where, kind
    inner: list[tuple[pa.DataType, str]] = []
    if pa.types.is_struct(kind):
        inner = [
            (kind.field(i).type, f"{where}.{kind.field(i).name}") for i in range(kind.num_fields)
        ]
    elif pa.types.is_map(kind):
        inner = [(kind.key_type, f"{where}{{}}"), (kind.item_type, f"{where}{{}}")]
    elif isinstance(kind, LIST_TYPES):
        inner = [(kind.value_type, f"{where}[]")]
    for value_type, name in inner:
        found = _extension_at(value_type, name)
        if found is not None:
            return found
    return None


def _read_through_datasets(path: str, columns: ColumnNames) -> Iterator[InputChunk]:
    """A file loaded by `datasets.load_dataset` (its type inference and cache), for
    input.format hf."""
    dataset = _load_through_datasets(path)
    if not dataset.num_rows:
        return  # an empty input among others is passed over
    wanted = _check_columns(path, dataset.column_names, columns)
    _refuse_json_text(path, dataset.data.schema, columns)
    row = 0
    for table in dataset.select_columns(wanted).with_format("arrow").iter(batch_size=CHUNK_ROWS):
        yield _table_chunk(path, row, table, columns)
        row += table.num_rows


DATASETS_BUILDERS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".tsv": "csv"}


def _load_through_datasets(path: str):
    """`path` as a `datasets` Dataset: Parquet, CSV (.tsv split at tabs), else JSON (lines, or
    one array of objects). Peeking its columns, counting its rows and reading it load it once
    (the dataset is memory-mapped); a file changed since is loaded again."""
    stat = os.stat(path)
    return _loaded_through_datasets(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _loaded_through_datasets(path: str, size: int, mtime_ns: int):
    datasets = import_datasets()
    suffix = os.path.splitext(path.lower().removesuffix(".gz"))[1]
    builder = DATASETS_BUILDERS.get(suffix, "json")
    options = {"sep": "\t"} if suffix == ".tsv" else {}
    if _holds_no_rows(path, builder):  # which datasets fails to load ("corresponds to no data")
        return datasets.Dataset.from_dict({})
    was_on = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # a job logs its own progress; a notebook keeps its bars
    try:
        return datasets.load_dataset(builder, data_files=[path], split="train", **options)
    except Exception as exc:  # the library's own parse errors name the problem
        raise InputError(f"{path}: datasets could not load it ({first_line(exc)})") from None
    finally:
        if was_on:
            datasets.enable_progress_bars()


def _holds_no_rows(path: str, builder: str, block: int = 1 << 16) -> bool:
    """Whether a file for `datasets` holds no rows: a Parquet file of none, a text file of
    blank lines (or `[]`), a CSV file of its header alone. Only the first `block` characters
    of a text file are read."""
    if builder == "parquet":
        try:
            return pq.ParquetFile(path).metadata.num_rows == 0
        except (pa.ArrowInvalid, OSError):
            return False  # datasets names the problem
    try:
        binary = _open_binary(path, compression_of(path))
        with io.TextIOWrapper(binary, encoding="utf-8", errors="replace") as f:
            text = f.read(block)
            whole = not f.read(1)
    except COMPRESSION_ERRORS:
        return False  # datasets names the problem
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if builder == "csv":
        return whole and len(lines) <= 1
    return whole and lines in ([], ["[]"])


def datasets_rows(path: str) -> int:
    """The rows of a file `datasets` reads (from its cache once loaded)."""
    return _load_through_datasets(path).num_rows


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


def peek_columns(file: DataFile, max_line_bytes: int = PEEK_LINE_BYTES) -> list[str]:
    """The column names of a file's schema (Parquet, a saved dataset, a file `datasets` reads)
    or first record (JSONL; lines over `max_line_bytes` passed over)."""
    path, kind = file.path, file.kind
    if kind == "saved":
        return _saved_dataset_table(path).column_names
    if kind == "openai":
        for line, record in _jsonl_records(path, max_line_bytes):
            refuse_not_a_request(f"{path}:{line}", record)  # before a kept column is looked for
            break
        return ["custom_id", "method", "url", "body"]
    if kind == "datasets":
        return _load_through_datasets(path).column_names
    if file.layout == "parquet":
        try:
            parquet = pq.ParquetFile(path)
            return parquet.schema_arrow.names if parquet.metadata.num_rows else []
        except (pa.ArrowInvalid, OSError) as exc:
            raise InputError(f"{path}: not a readable Parquet file ({first_line(exc)})") from None
    for _, record in _jsonl_records(path, max_line_bytes):
        return list(record)
    return []


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
