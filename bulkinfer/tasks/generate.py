"""`generate`: text continuations, greedy or sampled, with stop strings, n samples per prompt and
per-token log-probs.

With one sample per prompt the text columns are plain values; with `n` > 1 (or an OpenAI batch
input, whose requests each choose their own n) they are lists, one entry per sample, so the
output keeps exactly one row per input row.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pyarrow as pa

from bulkinfer.engines.base import GRAMMAR_FAILED, GenerateRequests, whole_groups
from bulkinfer.engines.constraints import completes, ll_tokenizer
from bulkinfer.engines.sampling import SamplingParams, row_key
from bulkinfer.engines.stops import generated_texts, truncate_at_stop
from bulkinfer.grammars import breaks_schema, grammar_for, grammar_of_json
from bulkinfer.prepare import PreparedRows
from bulkinfer.spec import TaskSpec
from bulkinfer.tasks.base import BatchResult, load_causal_lm
from bulkinfer.tasks.embed import REQUEST_FIELDS, EmbeddingRequests

SAMPLE_COLUMNS = (
    "text",
    "output_tokens",
    "finish_reason",
    "token_ids",
    "tokens",
    "token_logprobs",
    "top_logprobs",
)
# one of a token's most likely alternatives (top_logprobs), most likely first
ALTERNATIVE = pa.struct(
    [("token_id", pa.int32()), ("token", pa.string()), ("logprob", pa.float32())]
)


@dataclasses.dataclass(frozen=True)
class Sample:
    """One generated continuation, cut at its stop string."""

    text: str
    output_tokens: int
    finish_reason: str
    token_ids: list[int] | None
    tokens: list[str] | None
    token_logprobs: list[float] | None
    top_logprobs: list[list[dict]] | None = None  # per token, ALTERNATIVE values


class GenerateTask:
    name = "generate"

    def __init__(
        self,
        spec: TaskSpec,
        tokenizer,
        max_context: int | None = None,
        per_request: bool = False,
        embeddings: EmbeddingRequests | None = None,
        share_prefix: int = 0,
    ):
        self.spec = spec
        self.share_prefix = share_prefix  # batching.min_shared_prefix: the fast engine shares
        self.embeddings = embeddings  # how /v1/embeddings requests are answered
        self.tokenizer = tokenizer
        self.max_context = max_context
        self.per_request = per_request
        self.as_lists = spec.n > 1 or per_request
        self.with_logprobs = spec.logprobs or spec.top_logprobs > 0 or per_request
        self.with_top = spec.top_logprobs > 0 or per_request
        self.params = SamplingParams(
            max_new_tokens=spec.max_new_tokens,
            temperature=spec.temperature,
            top_p=spec.top_p,
            top_k=spec.top_k,
            seed=spec.seed,
            stop=tuple(spec.stop),
            grammar=grammar_for(spec.response_format),
        )
        if self.params.grammar is not None:  # a tokenizer the grammar library misreads fails here
            ll_tokenizer(tokenizer)
        self.schema = generate_schema(self.as_lists, self.with_logprobs, self.with_top)
        if per_request:
            self.schema = pa.schema([*self.schema, *REQUEST_FIELDS])

    engine = "causal"
    streams = True  # generation runs as one stream over the whole job
    load_engine = staticmethod(load_causal_lm)

    def new_tokens_per_row(self) -> int:
        """The job's max_new_tokens, at most the model's context (no row makes more)."""
        if self.max_context is None:
            return self.spec.max_new_tokens
        return min(self.spec.max_new_tokens, self.max_context)

    def row_costs(self, prepared: PreparedRows) -> np.ndarray:
        """Tokens each row holds on an engine that packs rows: n sequences of its prompt plus
        the new tokens it may take (its request's own limit, at most the job's)."""
        lengths = prepared.lengths.astype(np.int64)
        return self.row_samples(prepared) * (lengths + self.row_steps(prepared))

    def row_samples(self, prepared: PreparedRows) -> np.ndarray:
        """The sequences each row generates: its request's n, else the job's (one for an
        embeddings request, which generates nothing)."""
        n = np.full(prepared.num_rows, self.spec.n, dtype=np.int64)
        params = prepared.request_params if self.per_request else None
        if params is not None:
            n = _filled(params.column("n"), self.spec.n)
            n[_embedding_rows(params)] = 1
        return n

    def row_steps(self, prepared: PreparedRows) -> np.ndarray:
        """The new tokens each row may take: its request's own limit, at most the job's, and
        no more than the model's context leaves after its prompt."""
        lengths = prepared.lengths.astype(np.int64)
        limit = np.full(len(lengths), self.spec.max_new_tokens, dtype=np.int64)
        params = prepared.request_params if self.per_request else None
        if params is not None:
            limit = np.minimum(
                limit, _filled(params.column("max_new_tokens"), self.spec.max_new_tokens)
            )
        if self.max_context is not None:
            limit = np.maximum(1, np.minimum(limit, self.max_context - lengths))
        if params is not None:
            limit[_embedding_rows(params)] = 0  # embedded in one forward, nothing decoded
        return limit

    def run(self, engine, prepared: PreparedRows, rows: np.ndarray) -> BatchResult:
        """One batch in one engine call (a piece of it at a time on a padded engine)."""
        ask = self.ask(prepared, rows, engine)
        generations = []
        if len(ask.requests):
            generations = next(whole_groups(engine, [(0, ask.requests)]))[1]
        return self.answer(prepared, rows, ask, generations)

    def ask(self, prepared: PreparedRows, rows: np.ndarray, engine=None) -> BatchAsk:
        """What a batch asks the engine for: n sequences a row, each keyed by (seed, row,
        sample) so its tokens do not depend on the batch or the rows beside it. Embeddings
        requests (OpenAI input) ask for no sequence: `engine` embeds them here, at once."""
        requests = self._requests(prepared, rows)
        prompts, keys, params, limits, owners = [], [], [], [], []
        for k, (row, request) in enumerate(zip(rows, requests, strict=True)):
            prompt = prepared.tokens(int(row))
            for sample in range(request.n):
                prompts.append(prompt)
                keys.append(row_key(request.params.seed, int(row), sample))
                params.append(request.params)
                limits.append(self._room(len(prompt), request.params.max_new_tokens))
                owners.append(k)
        want_logprobs = any(r.logprobs for r in requests)
        top = max((r.top_logprobs for r in requests), default=0)
        # n samples of a row run as n sequences; a padded engine's calls stay the batch's
        # planned size so memory stays within the budget whatever n is.
        group = GenerateRequests(
            prompts, keys, params, limits, want_logprobs, max(1, len(rows)), top, self.share_prefix
        )
        return BatchAsk(group, owners, requests, *self._embedded(engine, requests))

    def _embedded(self, engine, requests: list[RowRequest]) -> tuple[dict, dict]:
        """The batch's embeddings requests answered, by position: their columns and errors."""
        positions = [k for k, r in enumerate(requests) if r.embed is not None]
        if not positions:
            return {}, {}
        columns, errors = self.embeddings.answer(
            engine, self.tokenizer, [requests[k].embed for k in positions]
        )
        answers = {
            k: {name: values[j] for name, values in columns.items()}
            for j, k in enumerate(positions)
        }
        return answers, {positions[j]: message for j, message in errors.items()}

    def answer(self, prepared: PreparedRows, rows: np.ndarray, ask, generations) -> BatchResult:
        """The batch's output columns from its sequences' generations (in `ask` order)."""
        samples: list[list[Sample]] = [[] for _ in rows]
        new_tokens, constrained, cut_short = 0, False, 0
        errors = dict(ask.errors)
        triples = zip(ask.owners, ask.requests.params, generations, strict=True)
        for owner, p, gen in triples:
            sample = self._sample(gen, p.stop, ask.rows[owner])
            samples[owner].append(sample)
            new_tokens += len(gen.tokens)
            constrained |= p.grammar is not None
            if gen.finish_reason == GRAMMAR_FAILED:
                errors[owner] = (
                    "response_format: the grammar library gave up on this row's output after "
                    f"{len(gen.tokens)} tokens (its parser's limits: a schema no finite value "
                    "satisfies, nesting too deep, or text the format fixes that is a special "
                    "token's, such as '<|im_end|>'); the text is not kept to the format"
                )
            elif p.grammar is not None:
                cut_short += self._cut_short(sample, p)
        columns = {name: [] for name in self.schema.names}
        for k, (row, row_samples) in enumerate(zip(rows, samples, strict=True)):
            if k in ask.embedded:  # an embeddings request: its vectors, no text
                for name in columns:
                    columns[name].append(ask.embedded[k].get(name))
                continue
            columns["prompt_tokens"].append(len(prepared.tokens(int(row))))
            for name in SAMPLE_COLUMNS:
                if name not in columns:
                    continue
                values = [getattr(s, name) for s in row_samples]
                columns[name].append(values if self.as_lists else values[0])
            for name, _ in REQUEST_FIELDS:
                if name in columns:
                    columns[name].append(None)
        return BatchResult(
            columns,
            new_tokens,
            errors=errors,
            cut_short=cut_short if constrained else None,
        )

    def _requests(self, prepared: PreparedRows, rows: np.ndarray) -> list[RowRequest]:
        """The job's settings, or each row's own where its request sets them (OpenAI input)."""
        base = RowRequest(
            self.params,
            self.spec.n,
            self.spec.logprobs or self.spec.top_logprobs > 0,
            self.spec.top_logprobs,
        )
        overrides = prepared.request_params
        if not self.per_request or overrides is None:
            return [base] * len(rows)
        return [base.with_overrides(v) for v in overrides.take(pa.array(rows)).to_pylist()]

    def _sample(self, gen, stop: tuple[str, ...], request: RowRequest) -> Sample:
        text = generated_texts(self.tokenizer, [gen.tokens])[0]
        text, hit_stop = truncate_at_stop(text, stop)
        token_ids = tokens = token_logprobs = top = None
        if request.logprobs:
            token_ids = list(gen.tokens)
            tokens = self._token_texts(gen.tokens)
            token_logprobs = gen.logprobs
        if request.top_logprobs:
            top = self._alternatives(gen, request.top_logprobs)
        reason = "stop" if hit_stop else gen.finish_reason
        return Sample(text, len(gen.tokens), reason, token_ids, tokens, token_logprobs, top)

    def _cut_short(self, sample: Sample, params) -> bool:
        """Whether a constrained sample's text is not a whole, valid answer of its format: one
        that ended at its token limit before the grammar completed, or that a stop string cut
        (a row that ended at its end token completed it: the grammar allows that token only
        then), or JSON that breaks its schema where the grammar library lets it through."""
        completed = sample.finish_reason != "length" and not params.stop
        if not completed and not completes(self.tokenizer, params.grammar, sample.text):
            return True
        return breaks_schema(params.grammar, sample.text)

    def _token_texts(self, ids: list[int]) -> list[str]:
        """Each token's text as it adds it after a word (a token that is part of a character
        decodes to U+FFFD)."""
        return generated_texts(self.tokenizer, [[t] for t in ids], skip_special=False)

    def _alternatives(self, gen, k: int) -> list[list[dict]]:
        """Per generated token, its row's k most likely tokens (ALTERNATIVE values). Tokens
        of log-prob -inf are left out: the ones a response_format's grammar did not allow
        there (a position may allow fewer than k), or the model itself rules out."""
        pairs = [
            [(t, v) for t, v in zip(row[:k], values[:k], strict=True) if v != -math.inf]
            for row, values in zip(gen.top_ids, gen.top_logprobs, strict=True)
        ]
        texts = iter(self._token_texts([t for row in pairs for t, _ in row]))
        return [
            [{"token_id": t, "token": next(texts), "logprob": v} for t, v in row] for row in pairs
        ]

    def _room(self, prompt_len: int, max_new_tokens: int) -> int:
        """New tokens this row may take: its max, less whatever the context cannot hold."""
        if self.max_context is None:
            return max_new_tokens
        return max(1, min(max_new_tokens, self.max_context - prompt_len))


@dataclasses.dataclass(frozen=True)
class BatchAsk:
    """A batch's sequences, the row each belongs to, and each row's request."""

    requests: GenerateRequests
    owners: list[int]
    rows: list[RowRequest]
    embedded: dict[int, dict] = dataclasses.field(default_factory=dict)  # position -> columns
    errors: dict[int, str] = dataclasses.field(default_factory=dict)  # position -> row error

    def subset(self, positions: list[int]) -> tuple[BatchAsk, list[int]]:
        """The ask of the batch's rows at `positions` (in that order), and the indices of
        their sequences in this ask."""
        where = {k: j for j, k in enumerate(positions)}
        seqs = [i for i, k in enumerate(self.owners) if k in where]
        r = self.requests
        requests = GenerateRequests(
            [r.prompts[i] for i in seqs],
            [r.keys[i] for i in seqs],
            [r.params[i] for i in seqs],
            [r.limits[i] for i in seqs],
            r.logprobs,
            r.piece,
            r.top_logprobs,
            r.share_prefix,
        )
        owners = [where[self.owners[i]] for i in seqs]
        embedded = {where[k]: v for k, v in self.embedded.items() if k in where}
        errors = {where[k]: v for k, v in self.errors.items() if k in where}
        rows = [self.rows[k] for k in positions]
        return BatchAsk(requests, owners, rows, embedded, errors), seqs


@dataclasses.dataclass(frozen=True)
class RowRequest:
    """What one row asks for: sampling settings, samples, whether log-probs are wanted and how
    many most likely alternatives per token."""

    params: SamplingParams
    n: int
    logprobs: bool
    top_logprobs: int = 0
    embed: dict | None = None  # an embeddings request's settings (it generates nothing)

    def with_overrides(self, values: dict) -> RowRequest:
        """Apply a row's own settings (null keeps the job's); max_new_tokens is capped by the
        job's, which the batch plan reserved."""
        if values.get("embed_input") is not None:
            return RowRequest(self.params, 0, False, 0, values)
        changes = {
            k: values[k]
            for k in ("temperature", "top_p", "top_k", "seed")
            if values.get(k) is not None
        }
        if values.get("max_new_tokens") is not None:
            changes["max_new_tokens"] = min(values["max_new_tokens"], self.params.max_new_tokens)
        if values.get("stop") is not None:
            changes["stop"] = tuple(values["stop"])
        if values.get("response_format") is not None:
            changes["grammar"] = grammar_of_json(values["response_format"])
        n = values["n"] if values.get("n") is not None else self.n
        logprobs = values["logprobs"] if values.get("logprobs") is not None else self.logprobs
        top = values.get("top_logprobs")
        if top is None:  # a request's own `logprobs: false` turns the job's alternatives off
            top = 0 if values.get("logprobs") is False else self.top_logprobs
        params = dataclasses.replace(self.params, **changes)
        return RowRequest(params, n, logprobs or top > 0, top)


def _filled(column: pa.ChunkedArray, default) -> np.ndarray:
    """A request setting per row as int64, the job's where a request leaves it unset (whole
    numbers up to 2**63-1 exactly: through float64, 2**63-1 became 2**63 and wrapped)."""
    return column.fill_null(int(default)).to_numpy().astype(np.int64)


def _embedding_rows(params: pa.Table) -> np.ndarray:
    """Which rows are embeddings requests (OpenAI input)."""
    return params.column("embed_input").is_valid().to_numpy(zero_copy_only=False)


def generate_schema(as_lists: bool, with_logprobs: bool, with_top: bool = False) -> pa.Schema:
    def per_sample(t: pa.DataType) -> pa.DataType:
        return pa.list_(t) if as_lists else t

    fields = [
        ("text", per_sample(pa.string())),
        ("prompt_tokens", pa.int32()),
        ("output_tokens", per_sample(pa.int32())),
        ("finish_reason", per_sample(pa.string())),
    ]
    if with_logprobs:
        fields += [
            ("token_ids", per_sample(pa.list_(pa.int32()))),
            ("tokens", per_sample(pa.list_(pa.string()))),
            ("token_logprobs", per_sample(pa.list_(pa.float32()))),
        ]
    if with_top:
        fields.append(("top_logprobs", per_sample(pa.list_(pa.list_(ALTERNATIVE)))))
    return pa.schema(fields)
