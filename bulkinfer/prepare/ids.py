"""The id and kept columns of every row: checked (ids present, strings or 64-bit integers,
valid Unicode, unique) and spilled beside the token ids."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa

from bulkinfer.errors import InputError
from bulkinfer.io.readers import InputChunk
from bulkinfer.io.spill import RowColumnFiles
from bulkinfer.prepare.render import describe
from bulkinfer.prepare.rows import ID_COLUMN, PreparedRows, prepared_location

INT64 = range(-(2**63), 2**63)


def add_row_columns(
    columns: RowColumnFiles, chunk: InputChunk, id_type: pa.DataType | None, first_row: int
) -> pa.DataType | None:
    """Spill a chunk's ids (unless the row position is the id) and kept columns; returns the
    id type, which every chunk must share."""
    table = chunk.keep
    if chunk.ids is not None:
        ids = chunk_ids(chunk, id_type)
        if id_type is not None and ids.type != id_type and first_row > 0:
            raise InputError(
                f"{chunk.location(0)}: the ids here are {_kind(ids.type)}, those before "
                f"{_kind(id_type)}; the id column has different types in different files or "
                "row groups: make them all one type"
            )
        id_type = ids.type
        table = table.add_column(0, ID_COLUMN, ids)
    if table.num_columns == 0:
        return id_type
    try:
        columns.append(_writable(table))
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        name, row = _clashing(columns.schema, _writable(table))
        what = f"keep column '{name}'" if name else "a keep column"
        raise InputError(
            f"{chunk.location(row)}: {what} holds another type here than in the rows before: "
            f"{exc}; make its values one type"
        ) from None
    return id_type


def _clashing(before: pa.Schema | None, table: pa.Table) -> tuple[str | None, int]:
    """The kept column of `table` whose type cannot join the one `before` gives it, and its
    first value (nulls take any type); (None, 0) where no single column is to blame."""
    for field in table.schema:
        if before is None or field.name not in before.names:
            continue
        earlier = before.field(field.name)
        try:
            joined = pa.unify_schemas(
                [pa.schema([earlier]), pa.schema([field])], promote_options="permissive"
            )
            table.column(field.name).cast(joined.field(0).type)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
            valid = table.column(field.name).is_valid().to_numpy(zero_copy_only=False)
            return field.name, int(np.argmax(valid)) if valid.any() else 0
    return None, 0


def declared_id_type(
    declared: pa.DataType | None, chunk: InputChunk, first_row: int
) -> pa.DataType | None:
    """The id type the outputs keep: the one every typed file gives its id column (an int32
    or large_string id column comes out as such, so the outputs join back to the input), or
    None where files differ or a file has no types (JSONL: int64 or strings then)."""
    if chunk.ids is None:
        return declared
    given = _plain(chunk.id_type) if chunk.id_type is not None else None
    if given is not None and not (
        pa.types.is_integer(given) or pa.types.is_string(given) or pa.types.is_large_string(given)
    ):
        given = None
    if first_row == 0:
        return given
    return given if given == declared else None


def _kind(t: pa.DataType) -> str:
    return "strings" if pa.types.is_string(t) or pa.types.is_large_string(t) else str(t)


def _writable(table: pa.Table) -> pa.Table:
    """Kept columns in types the outputs can be written in: view types (string_view and the
    like, which Arrow cannot yet take rows of) and dictionary-encoded columns (pandas'
    categoricals; one file's column may be encoded where another's is not) as their plain
    forms; any other type Arrow cannot take rows of is refused with its column's name."""
    plain = pa.schema([f.with_type(_plain(f.type)) for f in table.schema])
    if not plain.equals(table.schema):
        table = table.cast(plain)
    for name, column in zip(table.column_names, table.columns, strict=True):
        try:
            column.take(pa.array([], pa.int64()))
        except pa.ArrowNotImplementedError:
            raise InputError(
                f"input.keep_columns: the column {name!r} is of type {column.type}, which cannot "
                "be written to the outputs; cast it to another type or leave it out"
            ) from None
    return table


def _plain(t: pa.DataType) -> pa.DataType:
    if pa.types.is_dictionary(t):
        return _plain(t.value_type)
    if t == pa.string_view():
        return pa.string()
    if t == pa.binary_view():
        return pa.binary()
    if pa.types.is_list(t):
        return pa.list_(t.value_field.with_type(_plain(t.value_type)))
    if pa.types.is_large_list(t):
        return pa.large_list(t.value_field.with_type(_plain(t.value_type)))
    if pa.types.is_struct(t):
        return pa.struct([f.with_type(_plain(f.type)) for f in t])
    return t


def _refuse_missing(chunk: InputChunk) -> None:
    """A column of integer ids with a gap comes as floats (pandas, reading CSV): the row
    without an id is the one to name."""
    for i, value in enumerate(chunk.ids):
        if value is None or (isinstance(value, float) and math.isnan(value)):
            raise InputError(
                f"{chunk.location(i)}: the id is missing, and the column's ids read as floats "
                "(a column of integers with a gap is); every row needs an id"
            )


def chunk_ids(chunk: InputChunk, before: pa.DataType | None = None) -> pa.Array:
    """A chunk's ids as an Arrow array, or an InputError naming the first one that is null,
    not a string or an integer, beyond 64 bits or not valid Unicode, or the first of the other
    kind than the ids `before` it (earlier chunks' type; else the chunk's first id's)."""
    for i, value in enumerate(chunk.ids):
        if value is None:
            raise InputError(f"{chunk.location(i)}: the id is null; every row needs an id")
        if isinstance(value, float):
            _refuse_missing(chunk)
        if not isinstance(value, str | int) or isinstance(value, bool):
            raise InputError(
                f"{chunk.location(i)}: the id is {describe(value)}; ids must be strings or integers"
            )
        if isinstance(value, int) and value not in INT64:
            raise InputError(
                f"{chunk.location(i)}: the id {value} does not fit in a signed 64-bit integer; "
                "give such ids as strings"
            )
    try:
        return pa.array(chunk.ids)
    except UnicodeEncodeError:
        i = next(i for i, v in enumerate(chunk.ids) if isinstance(v, str) and not _encodes(v))
        raise InputError(
            f"{chunk.location(i)}: the id {shown(chunk.ids[i], ascii)} is not valid Unicode "
            "(a lone surrogate)"
        ) from None
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        if before is not None:
            first = pa.types.is_string(before) or pa.types.is_large_string(before)
        else:
            first = isinstance(chunk.ids[0], str)
        i = next(i for i, v in enumerate(chunk.ids) if isinstance(v, str) != first)
        kind, others = ("a string", "numbers") if not first else ("a number", "strings")
        raise InputError(
            f"{chunk.location(i)}: the id {shown(chunk.ids[i])} is {kind}, the ids before it "
            f"are {others}; the id column mixes strings and numbers: make them all one type"
        ) from None


def shown(value, form=repr, most: int = 60) -> str:
    """An id as an error line shows it: its repr, cut past `most` characters (an id may be
    megabytes long, and the error is one line)."""
    text = form(value)
    return text if len(text) <= most else f"{text[:most]}... ({len(text):,} characters)"


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def first_duplicate(chunk: InputChunk) -> None:
    """An InputError for the first id that appears twice within one chunk (`validate` reads
    the first chunk; `run` checks every id, by hash, across the whole input)."""
    seen: dict = {}
    for i, value in enumerate(chunk.ids or []):
        if value in seen:
            where = chunk.location(seen[value]), chunk.location(i)
            raise InputError(
                f"duplicate id {shown(value)} at {where[0]} and {where[1]}; ids must be unique"
            )
        seen[value] = i


def id_hashes(ids: list) -> np.ndarray:
    """64-bit hashes of a chunk's ids: 8 bytes a row find duplicates, where the ids themselves
    could be any length."""
    return np.fromiter(map(hash, ids), dtype=np.int64, count=len(ids))


def check_unique_ids(prepared: PreparedRows, hashes: np.ndarray) -> None:
    """Rows whose id hashes collide are compared by value; the duplicate that appears first in
    the input is reported, with its first two places."""
    ordered = np.sort(hashes)
    repeated = np.unique(ordered[1:][ordered[1:] == ordered[:-1]])
    del ordered
    if not len(repeated):
        return
    groups: dict[int, list[int]] = {}
    for row in np.flatnonzero(np.isin(hashes, repeated)).tolist():
        groups.setdefault(int(hashes[row]), []).append(row)
    for rows in sorted(groups.values()):
        values = [prepared.row_columns(r, r + 1).column(ID_COLUMN)[0].as_py() for r in rows]
        for a, value in enumerate(values):
            twin = next((b for b in range(a + 1, len(values)) if values[b] == value), None)
            if twin is not None:
                where = [
                    prepared_location(prepared, rows[a]),
                    prepared_location(prepared, rows[twin]),
                ]
                raise InputError(
                    f"duplicate id {shown(value)} at {where[0]} and {where[1]}; ids must be unique"
                )
