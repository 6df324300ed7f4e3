"""The task interface: what to compute per row, the columns it adds to the output, and the
model (engine) it needs.

A task turns a batch of prepared rows into output columns by calling one engine operation; the
runner never needs to know which task it runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

from bulkinfer.errors import ModelError
from bulkinfer.prepare import PreparedRows


@dataclass(frozen=True)
class BatchResult:
    """Output columns for the rows of one batch, in batch order, plus tokens produced.
    `errors`: rows (by position in the batch) the task found it cannot answer, their columns
    null. `cut_short`: samples kept to a response_format whose text is not a whole answer of it
    (cut at their token limit or by a stop string; None where no row is constrained)."""

    columns: dict[str, list[Any]]
    new_tokens: int = 0
    errors: dict[int, str] | None = None
    cut_short: int | None = None

    def error_list(self, rows: int) -> list[str | None]:
        """Each row's error (None for a row answered), in batch order."""
        errors = self.errors or {}
        return [errors.get(k) for k in range(rows)]


class Task(Protocol):
    name: str
    schema: pa.Schema
    max_context: int | None  # the most tokens a row may have (prompt plus any new tokens)

    def new_tokens_per_row(self) -> int:
        """Tokens each row adds beyond its prompt; counted in the batch token budget."""

    def row_costs(self, prepared: PreparedRows) -> np.ndarray:
        """Tokens each row holds on an engine that packs rows without padding (the plan of
        such an engine sums them)."""

    def row_steps(self, prepared: PreparedRows) -> np.ndarray | None:
        """Decode steps each row may take (its new-token limit); None for a task that decodes
        nothing. A packed plan starts the rows with most steps first."""

    engine: str  # the engine it runs on: causal (score, generate), embed or classify
    # True for generation: `ask` a batch's sequences, the engine streams them, `answer` turns
    # its generations into the batch's columns (job/stream.py runs the whole job as one loop)
    streams: bool

    def load_engine(self, options, tokenizer, limits):
        """Load the weights (`engines.base.LoadOptions`) as the engine this task runs, the one
        `limits` (`engines.base.EngineLimits`) describe."""

    def run(self, engine, prepared: PreparedRows, rows: np.ndarray) -> BatchResult:
        """Compute the outputs of `rows` (input positions) in one engine call."""


def make_task(spec, model, tokenizer, config, source: InputKind | None = None) -> Task:
    """The task of a job spec, fitted to its model (labels, pooling, context) and to what the
    input holds, without loading the weights, so that `bulkinfer plan` and input errors stay
    cheap. `model`: the resolved model files (`model_files.ModelFiles`)."""
    from bulkinfer.model_files import model_context
    from bulkinfer.tasks.classify import ClassifyTask
    from bulkinfer.tasks.embed import EmbeddingRequests, EmbedTask
    from bulkinfer.tasks.generate import GenerateTask
    from bulkinfer.tasks.score import ScoreTask

    source = source or InputKind()
    task = spec.task
    if task.type == "classify":
        return ClassifyTask.for_model(spec, tokenizer, config)
    if task.type == "embed":
        return EmbedTask.for_model(spec, model, tokenizer, config, source.per_request)
    max_context = model_context(config, spec.model)
    if task.type == "generate":
        embeddings = None
        if source.per_request:  # /v1/embeddings requests beside chat and completions
            embeddings = EmbeddingRequests.for_model(model, config, max_context)
        share = spec.batching.min_shared_prefix
        made = GenerateTask(task, tokenizer, max_context, source.per_request, embeddings, share)
        if task.response_format is not None and not names_an_end_token(model, tokenizer, config):
            from bulkinfer.engines.constraints import NO_END_TOKEN

            raise ModelError(NO_END_TOKEN)  # (after a tokenizer the grammar library misreads)
        return made
    share = spec.batching.min_shared_prefix
    return ScoreTask(task, tokenizer, max_context, choices=source.choices, share_prefix=share)


def names_an_end_token(model, tokenizer, config) -> bool:
    """Whether the model names an end-of-sequence token where the engines look for one (the
    tokenizer, the generation config, config.json); True where that cannot be told before the
    weights load (a GGUF file's own)."""
    if tokenizer.eos_token_id is not None or not model.path.is_dir():
        return True
    found = [getattr(config, "eos_token_id", None)]
    found.append(getattr(getattr(config, "text_config", None), "eos_token_id", None))
    generation = model.path / "generation_config.json"
    if generation.is_file():
        try:
            found.append(json.loads(generation.read_text(encoding="utf-8")).get("eos_token_id"))
        except (ValueError, AttributeError, OSError):
            return True  # the loader says what is wrong with the file
    return any(value not in (None, [], ()) for value in found)


@dataclass(frozen=True)
class InputKind:
    """What the input holds beyond prompts, which shapes a task's output: per-request settings
    (an OpenAI batch file) or choices to score."""

    per_request: bool = False
    choices: bool = False


def load_causal_lm(options, tokenizer, limits):
    """The engine of generate and score: the fast engine or the reference one, as `limits` say
    (`engines.select` chose)."""
    from bulkinfer.engines.select import load_causal

    return load_causal(options, tokenizer, limits)
