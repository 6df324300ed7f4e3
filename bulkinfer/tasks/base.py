"""The task interface: what to compute per row and the columns it adds to the output.

A task turns a batch of prepared rows into output columns by calling one engine operation; the
runner never needs to know which task it runs, so classify and embed slot in beside these.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

from bulkinfer.prepare import PreparedRows


@dataclass(frozen=True)
class BatchResult:
    """Output columns for the rows of one batch, in batch order, plus tokens produced."""

    columns: dict[str, list[Any]]
    new_tokens: int = 0


class Task(Protocol):
    name: str
    schema: pa.Schema

    def new_tokens_per_row(self) -> int:
        """Tokens each row adds beyond its prompt; counted in the batch token budget."""

    def run(self, engine, prepared: PreparedRows, rows: np.ndarray) -> BatchResult:
        """Compute the outputs of `rows` (input positions) in one engine call."""


def make_task(spec, tokenizer, max_context: int | None = None) -> Task:
    from bulkinfer.tasks.generate import GenerateTask
    from bulkinfer.tasks.score import ScoreTask

    tasks = {"generate": GenerateTask, "score": ScoreTask}
    return tasks[spec.type](spec, tokenizer, max_context)
