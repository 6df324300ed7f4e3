"""What classify and embed share: one forward pass over each whole row, no new tokens, an input
limit that may cut rows when asked, and the token counts every output row carries."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from bulkinfer.errors import SpecError
from bulkinfer.model_files import SentenceTransformerRecipe, input_limit
from bulkinfer.prepare import PreparedRows

TOKEN_FIELDS = [("prompt_tokens", pa.int32()), ("truncated_tokens", pa.int32())]


def single_pass_limit(job, tokenizer, config, recipe=None) -> int | None:
    """The input limit of a classify or embed job, after checking the spec fits the task."""
    for key in ("completion_column", "choices_column"):
        if getattr(job.input, key, None) is not None:
            raise SpecError(f"input.{key}: {job.task.type} reads the prompt column only; remove it")
    return input_limit(config, tokenizer, job.model, recipe or SentenceTransformerRecipe())


def token_columns(prepared: PreparedRows, rows: np.ndarray) -> dict[str, list[int]]:
    """Tokens the model saw per row, and tokens cut from it by task.truncate."""
    return {
        "prompt_tokens": [int(prepared.lengths[r]) for r in rows],
        "truncated_tokens": [prepared.truncated.get(int(r), 0) for r in rows],
    }
