"""The engines' written protocols, and what an engine tells the planner about itself.

The runner asks an engine what it can do (`EngineLimits`) instead of probing it with getattr:
two protocols name every operation a task may call. A causal engine scores and generates; an
encoder engine classifies and embeds. Which engine runs a job is decided once, in
`engines.select`, so no engine carries fallback branches to another.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

# a temperature under this is greedy (as vLLM's sampler takes it): dividing logits by less
# overflows float32 to infinities, and the sampler would take the first of them
GREEDY_BELOW = 1e-5
# the finish reason of a constrained row whose grammar matcher failed (llguidance gave up on
# the grammar, e.g. a schema with no finite value): its text was not kept to the format
GRAMMAR_FAILED = "grammar_failed"


@dataclass(frozen=True)
class LoadOptions:
    """What loading weights needs, resolved from the job spec by the job's set-up."""

    folder: Path  # a local folder with config, tokenizer and weights (GGUF already converted)
    label: str  # the model as the user named it (model.path), for messages
    device: str = "auto"
    dtype: str = "auto"
    engine: str = "auto"  # auto | fast | reference
    trust_remote_code: bool = False
    allow_pickle: bool = False
    attn_implementation: str | None = None
    cache_dir: Path | None = None  # where compiled kernels are kept between jobs
    quantization: str = "none"  # none | fp8 (the fast engine's linear weights)
    kv_cache_dtype: str = "auto"  # auto (the model's dtype) | fp8 (the fast engine's KV pool)


@dataclass(frozen=True)
class EngineLimits:
    """What the planner must know of an engine, known before its weights load.

    `pads`: a batch runs padded to its longest row (the reference engine), or packed without
    padding (the fast engine). `slots`: rows decoded together at most (None: a whole batch at
    once). `kv_tokens`: tokens the fast engine's KV pool holds (None where no pool is kept).
    `free_bytes`: device memory left for batches once the weights are in (None on the CPU).
    `dtype_bytes`: the size of one weight or activation value (2 for bf16), for budgets.
    `rows_alone`: each row must run in a call of its own; the model's rope type (a rotary
    scaling that transformers picks from a call's longest sequence), else None."""

    kind: str  # fast | reference | encoder
    device_name: str
    device_type: str  # cuda | cpu | mps
    dtype_bytes: int
    pads: bool
    slots: int | None = None
    kv_tokens: int | None = None
    free_bytes: int | None = None
    why_not_fast: str | None = None
    quantization: str = "none"  # fp8: the fast engine quantizes its linear weights at load
    kv_cache_dtype: str = "auto"  # fp8: the fast engine's KV pool in float8 with scales
    rows_alone: str | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def as_reference(self, why: str | None = None) -> EngineLimits:
        """These limits for the reference engine on the same device (padded, no slots, no
        pool): where the fast engine cannot run, or would not pay back, `why`."""
        return dataclasses.replace(
            self, kind="reference", pads=True, slots=None, kv_tokens=None, why_not_fast=why
        )


@dataclass(frozen=True)
class GenerateRequests:
    """One group of sequences to continue (a checkpoint batch's rows, n sequences a row):
    prompts, sampling keys and settings, each sequence's own new-token limit, whether log-probs
    are wanted, and `piece`: how many sequences a padded engine runs per call (the batch's
    planned rows, so memory stays within the budget whatever n is). `top_logprobs`: how many
    most likely alternatives to report per generated token (0: none; implies log-probs)."""

    prompts: list[np.ndarray]
    keys: list[int]
    params: list[Any]  # SamplingParams, one per sequence
    limits: list[int]
    logprobs: bool = False
    piece: int | None = None
    top_logprobs: int = 0
    share_prefix: int = 0  # rows sharing this many first tokens share their prefix (0: off)

    def __len__(self) -> int:
        return len(self.prompts)

    def pieces(self) -> list[GenerateRequests]:
        """Consecutive groups of at most `piece` sequences."""
        size = self.piece or max(1, len(self))
        return [
            GenerateRequests(
                self.prompts[i : i + size],
                self.keys[i : i + size],
                self.params[i : i + size],
                self.limits[i : i + size],
                self.logprobs,
                size,
                self.top_logprobs,
                self.share_prefix,
            )
            for i in range(0, len(self), size)
        ]

    def shared_params(self) -> Any:
        """The one setting every sequence shares, or the list of them."""
        first = self.params[0] if self.params else None
        return first if all(p == first for p in self.params) else self.params


@dataclass(frozen=True)
class StreamUpdate:
    """One report of a generation stream: the sequences of `group` that finished since its
    last report (by their index in the group), the tokens every row in flight produced since
    the stream's last report, and the prompt tokens of the sequences it started meanwhile (the
    progress's work done before a first new token). A group is done once all its sequences were
    reported; an update with no group only reports tokens (progress within a long batch)."""

    group: Hashable | None
    finished: dict[int, Any]  # index in the group -> Generation
    new_tokens: int = 0
    prompt_tokens: int = 0


def whole_groups(
    engine, groups: Iterable[tuple[Hashable, GenerateRequests]]
) -> Iterator[tuple[Hashable, list[Generation]]]:
    """The engine's stream of `groups`, as each group's generations (in request order) once its
    last sequence is done."""
    sizes: dict[Hashable, int] = {}
    got: dict[Hashable, dict[int, Any]] = {}

    def feed():
        for tag, requests in groups:
            sizes[tag], got[tag] = len(requests), {}
            yield tag, requests

    for update in engine.generate_stream(feed()):
        if update.group is None:
            continue
        done = got[update.group]
        done.update(update.finished)
        if len(done) == sizes[update.group]:
            del got[update.group]
            yield update.group, [done[i] for i in range(sizes.pop(update.group))]


class Generation(Protocol):
    tokens: list[int]
    finish_reason: str
    logprobs: list[float] | None
    top_ids: list[list[int]] | None  # per token, the most likely alternatives, when asked
    top_logprobs: list[list[float]] | None


class CausalEngine(Protocol):
    """Scoring and generation on a causal LM (the lm-evaluation-harness interface)."""

    limits: EngineLimits
    model: Any  # the torch module (its shape gives FLOP and byte counts for the stats)
    counters: dict[str, float]  # what it did: prefill and decode seconds, tokens, steps

    def loglikelihood(
        self, sequences: list[np.ndarray], score_from: list[int], share_prefix: int = 0
    ) -> list[tuple[float, int]]:
        """(sum of log-probs, token count) of tokens score_from.. of each sequence; an engine
        may compute once a prefix of `share_prefix` tokens or more that rows share."""

    def loglikelihood_choices(
        self, contexts: list[np.ndarray], choices: list[list[np.ndarray]]
    ) -> list[list[tuple[float, int]]]:
        """Per context, (sum of log-probs, token count) of each of its choices given it."""

    def generate(
        self,
        prompts: list[np.ndarray],
        row_keys: list[int],
        params: Any,
        max_new: list[int],
        logprobs: bool = False,
        top_logprobs: int = 0,
    ) -> list[Generation]:
        """Continue every prompt until EOS, a stop string or its own max_new tokens."""

    def embed(self, sequences: list[np.ndarray], pooling: str, normalize: bool) -> np.ndarray:
        """One float32 vector per sequence from the final hidden states (OpenAI embeddings
        requests in a generate job)."""

    def generate_stream(
        self, groups: Iterable[tuple[Hashable, GenerateRequests]]
    ) -> Iterator[StreamUpdate]:
        """Continue group after group (a job's checkpoint batches), reporting sequences as they
        finish and the tokens made meanwhile, every few decode steps (`StreamUpdate`), so the
        job can commit finished rows and show progress within a long batch. An engine that
        keeps rows in flight draws the next groups while earlier ones still decode, so its
        slots never drain between checkpoint batches; groups may finish in another order than
        they went in. `whole_groups` turns the stream into whole groups."""


class EncoderEngine(Protocol):
    """One forward pass per batch: pooled hidden states or classifier logits."""

    limits: EngineLimits
    model: Any
    counters: dict[str, float]

    def embed(self, sequences: list[np.ndarray], pooling: str, normalize: bool) -> np.ndarray:
        """One float32 vector per sequence."""

    def classify(self, sequences: list[np.ndarray]) -> np.ndarray:
        """Float32 logits [rows, labels]."""
