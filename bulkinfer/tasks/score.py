"""`score`: log-likelihood of each prompt, of its completion given the prompt, or of each of its
candidate choices given the prompt (multiple choice, as lm-evaluation-harness scores it)."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa

from bulkinfer.errors import ModelError
from bulkinfer.prepare import PreparedRows
from bulkinfer.spec import TaskSpec
from bulkinfer.tasks.base import BatchResult, load_causal_lm

SEQUENCE_SCHEMA = pa.schema(
    [
        ("logprob_sum", pa.float64()),
        ("logprob_mean", pa.float64()),
        ("scored_tokens", pa.int32()),
        ("perplexity", pa.float64()),
    ]
)

CHOICES_SCHEMA = pa.schema(
    [
        ("choice_logprobs", pa.list_(pa.float64())),
        ("choice_tokens", pa.list_(pa.int32())),
        ("choice_logprob_means", pa.list_(pa.float64())),
        ("best_choice", pa.int32()),
        ("best_choice_norm", pa.int32()),
    ]
)


class ScoreTask:
    name = "score"

    def __init__(
        self,
        spec: TaskSpec,
        tokenizer,
        max_context: int | None = None,
        choices: bool = False,
        share_prefix: int = 0,
    ):
        self.spec = spec
        self.share_prefix = share_prefix  # batching.min_shared_prefix
        self.choices = choices
        self.schema = CHOICES_SCHEMA if choices else SEQUENCE_SCHEMA
        self.max_context = max_context

    engine = "causal"
    streams = False
    load_engine = staticmethod(load_causal_lm)

    def new_tokens_per_row(self) -> int:
        return 0

    def row_costs(self, prepared: PreparedRows) -> np.ndarray:
        return prepared.lengths.astype(np.int64)

    def row_steps(self, prepared: PreparedRows) -> None:
        return None

    def run(self, engine, prepared: PreparedRows, rows: np.ndarray) -> BatchResult:
        if self.choices:
            return self._run_choices(engine, prepared, rows)
        sequences = [prepared.tokens(int(r)) for r in rows]
        starts = [int(prepared.score_from[int(r)]) for r in rows]
        results = engine.loglikelihood(sequences, starts, self.share_prefix)
        _refuse_nan(rows, [total for total, _ in results])
        columns = {name: [] for name in self.schema.names}
        for total, count in results:
            mean = total / count if count else None
            columns["logprob_sum"].append(total if count else None)
            columns["logprob_mean"].append(mean)
            columns["scored_tokens"].append(count)
            columns["perplexity"].append(perplexity(mean) if mean is not None else None)
        return BatchResult(columns)

    def _run_choices(self, engine, prepared: PreparedRows, rows: np.ndarray) -> BatchResult:
        contexts, choices = [], []
        for r in rows:
            tokens = prepared.tokens(int(r))
            start = int(prepared.score_from[int(r)])
            cuts = start + np.cumsum(prepared.choice_token_lengths(int(r)))[:-1]
            contexts.append(tokens[:start])
            choices.append(np.split(tokens[start:], cuts - start))
        columns = {name: [] for name in self.schema.names}
        answers = list(engine.loglikelihood_choices(contexts, choices))
        _refuse_nan(rows, [sum(total for total, _ in scores) for scores in answers])
        for scores in answers:
            sums = [total for total, _ in scores]
            means = [total / count for total, count in scores]
            columns["choice_logprobs"].append(sums)
            columns["choice_tokens"].append([count for _, count in scores])
            columns["choice_logprob_means"].append(means)
            columns["best_choice"].append(int(np.argmax(sums)))
            columns["best_choice_norm"].append(int(np.argmax(means)))
        return BatchResult(columns)


def _refuse_nan(rows: np.ndarray, totals: list[float]) -> None:
    """Stop the job rather than write a NaN score as an `ok` row (generation stops the same
    way, engines/sampling.py)."""
    bad = next((k for k, total in enumerate(totals) if math.isnan(total)), None)
    if bad is not None:
        raise ModelError(
            f"the model's scores for row {int(rows[bad])} are NaN: its weights or this "
            "engine's arithmetic give non-numbers; nothing was written for the rows of this "
            "batch. Check the weights; compare with model.engine: reference, without "
            "model.quantization / model.kv_cache_dtype, or model.dtype: float32"
        )


def perplexity(mean_logprob: float) -> float:
    """exp(-mean): infinity where that is beyond a float (a mean log-prob under about -709, a
    model sure of other tokens), which math.exp raised as an OverflowError, ending the job."""
    try:
        return math.exp(-mean_logprob)
    except OverflowError:
        return math.inf
