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


def make_task(
    spec, tokenizer, max_context: int | None = None, source: InputKind | None = None
) -> Task:
    from bulkinfer.tasks.generate import GenerateTask
    from bulkinfer.tasks.score import ScoreTask

    source = source or InputKind()
    if spec.type == "generate":
        return GenerateTask(spec, tokenizer, max_context, per_request=source.per_request)
    if spec.type == "score":
        return ScoreTask(spec, tokenizer, max_context, choices=source.choices)
    tasks: dict[str, type] = {}
    return tasks[spec.type](spec, tokenizer, max_context)


@dataclass(frozen=True)
class InputKind:
    """What the input holds beyond prompts, which shapes a task's output: per-request settings
    (an OpenAI batch file) or choices to score."""

    per_request: bool = False
    choices: bool = False
