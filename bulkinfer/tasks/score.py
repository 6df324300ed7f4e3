"""`score`: log-likelihood of each prompt, or of its completion given the prompt."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa

from bulkinfer.prepare import PreparedRows
from bulkinfer.spec import TaskSpec
from bulkinfer.tasks.base import BatchResult


class ScoreTask:
    name = "score"
    schema = pa.schema(
        [
            ("logprob_sum", pa.float64()),
            ("logprob_mean", pa.float64()),
            ("scored_tokens", pa.int32()),
            ("perplexity", pa.float64()),
        ]
    )

    def __init__(self, spec: TaskSpec, tokenizer, max_context: int | None = None):
        self.spec = spec

    def new_tokens_per_row(self) -> int:
        return 0

    def run(self, engine, prepared: PreparedRows, rows: np.ndarray) -> BatchResult:
        sequences = [prepared.tokens(int(r)) for r in rows]
        starts = [int(prepared.score_from[int(r)]) for r in rows]
        results = engine.loglikelihood(sequences, starts)
        columns = {name: [] for name in self.schema.names}
        for total, count in results:
            mean = total / count if count else None
            columns["logprob_sum"].append(total if count else None)
            columns["logprob_mean"].append(mean)
            columns["scored_tokens"].append(count)
            columns["perplexity"].append(math.exp(-mean) if mean is not None else None)
        return BatchResult(columns)
