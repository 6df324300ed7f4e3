"""The tokenized input: per-row lengths in memory, token ids, ids and kept columns in spill
files."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from bulkinfer.io.readers import InputChunk
from bulkinfer.io.spill import RowColumnFiles, TokenFile

ID_COLUMN = "id"


@dataclass
class PreparedRows:
    """Every input row, in input order: lengths in memory, everything else in spill files.

    What these rows keep in memory grows by 12 bytes a row (offset and length; 4 more with
    completions); token ids, ids and kept columns are read back from disk when a batch or the
    outputs need them. A whole run's memory grew by ~110-140 bytes a row on 0.4-1M rows of a
    score job (the plan, the progress and the sort's arrays beside these).
    """

    offsets: np.ndarray
    score_from: np.ndarray
    row_errors: dict[int, str]
    id_type: pa.DataType | None
    # Per-row generation settings from the input (an OpenAI batch file's request bodies), one
    # row per input row, null where the job's setting holds; None for other inputs.
    request_params: pa.Table | None = None
    # Choices scoring: a row's tokens are its prompt then each choice in turn; choice_counts[row]
    # choices, whose token counts are consecutive in choice_lengths. None without choices.
    choice_counts: np.ndarray | None = None
    choice_lengths: np.ndarray | None = None
    locations: list[tuple[int, InputChunk]] = field(default_factory=list, repr=False)
    truncated: dict[int, int] = field(default_factory=dict)  # row -> tokens cut (task.truncate)
    # Prompts the chat template rendered and prompts tokenized as given (rows failed earlier,
    # a null prompt say, in neither): what the length figures are lengths of.
    chat_prompts: int = 0
    plain_prompts: int = 0
    token_file: TokenFile | None = field(default=None, repr=False)
    columns: RowColumnFiles | None = field(default=None, repr=False)
    folder: Path | None = None
    temporary: Any = field(default=None, repr=False)
    # Shared prefixes (prepare/prefixes.py): each row's head hash, 0 for a row too short (None
    # when no row is long enough), and the prefix length of each group followed, by head.
    prefix_heads: np.ndarray | None = field(default=None, repr=False)
    prefix_shared: dict[int, int] = field(default_factory=dict, repr=False)
    prefix_length: int = 0
    lengths: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.lengths = np.diff(self.offsets).astype(np.int32)

    @property
    def num_rows(self) -> int:
        return len(self.offsets) - 1

    @property
    def chat_template(self) -> str:
        """Which prompts the chat template rendered: all, some or none."""
        if self.chat_prompts and self.plain_prompts:
            return "some"
        return "all" if self.chat_prompts else "none"

    def tokens(self, row: int) -> np.ndarray:
        if self.token_file is None:
            raise RuntimeError("these rows were prepared for planning only; no token ids kept")
        start = int(self.offsets[row])
        return self.token_file.read(start, int(self.offsets[row + 1]) - start)

    def choice_token_lengths(self, row: int) -> np.ndarray:
        """Token counts of a row's choices, in order."""
        if self._choice_starts is None:
            self._choice_starts = np.concatenate([[0], np.cumsum(self.choice_counts)])
        start = self._choice_starts[row]
        return self.choice_lengths[start : self._choice_starts[row + 1]]

    _choice_starts = None

    def runnable_rows(self) -> np.ndarray:
        mask = np.ones(self.num_rows, dtype=bool)
        if self.row_errors:
            mask[np.fromiter(self.row_errors, dtype=np.int64)] = False
        return np.flatnonzero(mask)

    def columns_of(self, rows: np.ndarray) -> pa.Table:
        """The `id` and kept input columns of `rows` (ascending input positions)."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) and rows[-1] - rows[0] + 1 == len(rows):  # a range: read as it lies
            return self.row_columns(int(rows[0]), int(rows[-1]) + 1)
        table = empty_table(len(rows)) if self.columns is None else self.columns.take(rows)
        if self.id_type is None:
            return table.add_column(0, ID_COLUMN, pa.array(rows))
        return self._typed_ids(table)

    def row_columns(self, start: int, stop: int) -> pa.Table:
        """The `id` and kept input columns of rows start..stop-1."""
        if self.columns is None:
            table = empty_table(stop - start)
        else:
            table = self.columns.read(start, stop)
        if self.id_type is None:
            positions = pa.array(np.arange(start, stop, dtype=np.int64))
            return table.add_column(0, ID_COLUMN, positions)
        return self._typed_ids(table)

    def _typed_ids(self, table: pa.Table) -> pa.Table:
        """The id column in the input's own type (spilled as int64 or strings, checked)."""
        ids = table.column(ID_COLUMN)
        if ids.type == self.id_type:
            return table
        at = table.schema.get_field_index(ID_COLUMN)
        return table.set_column(at, ID_COLUMN, ids.cast(self.id_type))


def prepared_location(prepared: PreparedRows, row: int) -> str:
    """Where an input row came from, as file:line or file: row N."""
    starts = [start for start, _ in prepared.locations]
    k = int(np.searchsorted(starts, row, side="right")) - 1
    start, chunk = prepared.locations[k]
    return chunk.location(row - start)


def empty_table(num_rows: int) -> pa.Table:
    return pa.table({"_": pa.nulls(num_rows)}).drop(["_"])
