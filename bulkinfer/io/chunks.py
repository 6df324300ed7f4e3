"""What the readers yield: consecutive rows of one file, with where each row came from."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from bulkinfer.errors import InputError
from bulkinfer.faults import size_setting

CHUNK_ROWS = size_setting("BULKINFER_CHUNK_ROWS", 8192)


@dataclass(frozen=True)
class ColumnNames:
    """The input columns a job reads; `id` None means the row position is the id."""

    prompt: str
    completion: str | None
    id: str | None
    keep: tuple[str, ...]
    choices: str | None = None
    # OpenAI batch input: the request urls the job answers (others are row errors); None: all
    request_urls: tuple[str, ...] | None = None
    # the column that would have been the ids had the first row had it ('id', no id_column
    # set): a row or file that has it is refused, since its ids would be replaced by positions
    absent_id: str | None = None

    def refuse_absent_id(self, names, where: str, what: str) -> None:
        """An error if `names` (a row's fields, a file's columns: `what`) hold `absent_id`."""
        if self.absent_id is not None and self.absent_id in names:
            raise InputError(
                f"{where} has an '{self.absent_id}' {what}, but the input's first rows have "
                f"none, so row positions are the ids: give every row an '{self.absent_id}' "
                "(or none), or name the id column with input.id_column"
            )


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
    # The Arrow type a typed file (Parquet, a saved dataset) gives its id column, which the
    # outputs' id column keeps (ids are checked and spilled as int64 or strings); None for JSONL.
    id_type: pa.DataType | None = None

    def __len__(self) -> int:
        return len(self.prompts)

    def head(self, n: int) -> InputChunk:
        """The chunk's first n rows."""

        def first(values):
            return None if values is None else values[:n]

        return dataclasses.replace(
            self,
            prompts=self.prompts[:n],
            completions=first(self.completions),
            ids=first(self.ids),
            keep=self.keep.slice(0, n),
            lines=first(self.lines),
            choices=first(self.choices),
            requests=None if self.requests is None else self.requests.slice(0, n),
            problems={i: p for i, p in (self.problems or {}).items() if i < n} or None,
        )

    def location(self, i: int) -> str:
        """Where row i of this chunk sits in its file, for error messages."""
        if self.lines is not None:
            return f"{self.path}:{int(self.lines[i])}"
        return f"{self.path}: row {self.first_row_in_file + i}"


def _empty_table(num_rows: int) -> pa.Table:
    """A table with no columns but the right row count, so chunks concatenate uniformly."""
    return pa.table({"_": pa.nulls(num_rows)}).drop(["_"])


def _wanted_columns(columns: ColumnNames) -> list[str]:
    names = [columns.prompt, columns.completion, columns.choices, columns.id, *columns.keep]
    return list(dict.fromkeys(n for n in names if n is not None))


def _pylist(table: pa.Table, name: str | None) -> list[Any] | None:
    return None if name is None else table.column(name).to_pylist()
