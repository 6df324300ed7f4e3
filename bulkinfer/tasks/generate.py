"""`generate`: text continuations, greedy or sampled, with stop strings."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from bulkinfer.engines.hf import truncate_at_stop
from bulkinfer.engines.sampling import SamplingParams, row_key
from bulkinfer.prepare import PreparedRows
from bulkinfer.spec import TaskSpec
from bulkinfer.tasks.base import BatchResult


class GenerateTask:
    name = "generate"
    schema = pa.schema(
        [
            ("text", pa.string()),
            ("prompt_tokens", pa.int32()),
            ("output_tokens", pa.int32()),
            ("finish_reason", pa.string()),
        ]
    )

    def __init__(self, spec: TaskSpec, tokenizer, max_context: int | None = None):
        self.spec = spec
        self.tokenizer = tokenizer
        self.max_context = max_context
        self.params = SamplingParams(
            max_new_tokens=spec.max_new_tokens,
            temperature=spec.temperature,
            top_p=spec.top_p,
            top_k=spec.top_k,
            seed=spec.seed,
            stop=tuple(spec.stop),
        )

    def new_tokens_per_row(self) -> int:
        return self.spec.max_new_tokens

    def run(self, engine, prepared: PreparedRows, rows: np.ndarray) -> BatchResult:
        prompts = [prepared.tokens(int(r)) for r in rows]
        keys = [row_key(self.spec.seed, int(r)) for r in rows]
        limits = [self._room(len(p)) for p in prompts]
        generations = engine.generate(prompts, keys, self.params, limits)
        columns = {name: [] for name in self.schema.names}
        for prompt, gen in zip(prompts, generations, strict=True):
            text = self.tokenizer.decode(gen.tokens, skip_special_tokens=True)
            text, hit_stop = truncate_at_stop(text, self.params.stop)
            columns["text"].append(text)
            columns["prompt_tokens"].append(len(prompt))
            columns["output_tokens"].append(len(gen.tokens))
            columns["finish_reason"].append("stop" if hit_stop else gen.finish_reason)
        return BatchResult(columns, new_tokens=sum(len(g.tokens) for g in generations))

    def _room(self, prompt_len: int) -> int:
        """New tokens this row may take: max_new_tokens, less whatever the context cannot hold."""
        if self.max_context is None:
            return self.spec.max_new_tokens
        return max(1, min(self.spec.max_new_tokens, self.max_context - prompt_len))
