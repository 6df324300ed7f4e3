"""Continuous batching: which rows decode when, and where their keys and values live.

The scheduler keeps up to the engine's `slots` rows in flight over a whole job: rows arrive in
groups (a checkpoint batch each), a finished row's slot and pool region go to the next queued
row whatever group it belongs to, and finished rows are reported after the decode steps that
finished them (with the tokens made meanwhile), so a job can commit them and show progress.
Each row owns a region of the engine's KV pool sized to its prompt plus its own new-token limit
(a `RegionAllocator` here is the only record of who owns what). New rows are prefilled
together; the host looks at the tokens every SYNC_EVERY decode steps (EOS, stop strings,
limits) instead of after every step. Rows entering together that share a long prompt prefix
get it once: copied from a row in flight that holds it, else computed once for them. The
engine is asked only for its pool's size, a prefill, some decode steps and a shared prefix
computed or copied (nano-vllm's scheduler / model-runner split).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from bulkinfer.engines.base import GRAMMAR_FAILED, GenerateRequests, StreamUpdate
from bulkinfer.engines.constraints import failed, matcher
from bulkinfer.engines.hf import Generation
from bulkinfer.engines.kv import DecodeInputs, RegionAllocator, shared_prefix_groups
from bulkinfer.engines.memory import PREFILL_TOKENS
from bulkinfer.engines.sampling import NAN_TOKEN, RowSampling, SamplingParams, nan_error
from bulkinfer.engines.stops import stop_hit

SYNC_EVERY = 8  # decode steps between looks at the tokens on the host


@dataclass
class Row:
    """One prompt being generated: its limit, key, pool region and what it has produced."""

    group: Hashable
    index: int
    prompt: np.ndarray
    limit: int
    key: int
    params: SamplingParams
    want_logprobs: bool = False
    top: int = 0  # most likely alternatives to keep per token
    share: int = 0  # first tokens a row must share with others to share their prefix (0: off)
    start: int = -1
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_ids: list[list[int]] = field(default_factory=list)
    top_logprobs: list[list[float]] = field(default_factory=list)
    reason: str = "length"
    matcher: object = None  # its grammar's matcher, for a constrained row

    @property
    def need(self) -> int:
        """Pool slots: the prompt, every new token, and room for the steps a row may run past
        its end before the host next looks (their tokens are dropped)."""
        return len(self.prompt) + self.limit + SYNC_EVERY


def decode_inputs(rows: list[Row]) -> DecodeInputs:
    """What a decode step needs of each row in flight."""
    return DecodeInputs(
        last_tokens=[r.tokens[-1] for r in rows],
        lengths=[len(r.prompt) + len(r.tokens) for r in rows],
        starts=[r.start for r in rows],
        keys=[r.key for r in rows],
        generated=[len(r.tokens) for r in rows],
    )


class Scheduler:
    """Rows enter as slots and pool regions free up and leave when done; groups of rows come
    in through `add`, and `step` reports the rows it finished."""

    def __init__(self, engine):
        self.engine = engine
        self.slots = engine.slots
        self.queue: deque[Row] = deque()
        self.active: list[Row] = []
        self.allocator: RegionAllocator | None = None
        # rows finished and tokens made since the last report; a group of no rows is reported
        # at once (as finished, with nothing in it)
        self.finished: dict[Hashable, dict[int, Generation]] = {}
        self.new_tokens = 0
        self.prompt_tokens = 0  # of the rows prefilled since the last report

    def add(self, group: Hashable, requests: GenerateRequests) -> None:
        rows = [
            Row(
                group,
                i,
                np.asarray(p, dtype=np.int64),
                int(limit),
                int(key),
                params,
                requests.logprobs or requests.top_logprobs > 0,
                requests.top_logprobs,
                requests.share_prefix,
            )
            for i, (p, key, params, limit) in enumerate(
                zip(requests.prompts, requests.keys, requests.params, requests.limits, strict=True)
            )
        ]
        if not rows:
            self.finished.setdefault(group, {})
            return
        for row in rows:
            row.matcher = matcher(self.engine.tokenizer, row.params.grammar, self.engine.end_token)
        if self.allocator is None:
            self.allocator = RegionAllocator(self.engine.reserve(sum(r.need for r in rows)), 1)
        # longest limit first: the rows that need the most steps start first, so the end of
        # a group is not a few long rows decoding alone (equal limits keep the given order)
        self.queue.extend(sorted(rows, key=lambda r: -r.limit))

    @property
    def queued(self) -> int:
        return len(self.queue)

    @property
    def busy(self) -> bool:
        return bool(self.queue or self.active or self.finished)

    def step(self) -> list[StreamUpdate]:
        """Admit rows where slots and regions are free, run a few decode steps, and report the
        rows finished and the tokens made."""
        if self._should_admit():
            self._admit()
        if self.active:
            self._decode_chunk()
        # the tokens made first, then the rows that finished: a row started and finished in
        # this step has its tokens counted before they are taken off as its own
        updates = [StreamUpdate(None, {}, self.new_tokens, self.prompt_tokens)]
        updates += [StreamUpdate(g, rows) for g, rows in self.finished.items()]
        self.finished, self.new_tokens, self.prompt_tokens = {}, 0, 0
        return updates

    def _should_admit(self) -> bool:
        if not self.queue:
            return False
        free = self.slots - len(self.active)
        return not self.active or free >= min(len(self.queue), max(1, self.slots // 8))

    def _admit(self) -> None:
        """Move queued rows into free slots and pool regions, then prefill them packed."""
        entering = []
        while self.queue and len(self.active) + len(entering) < self.slots:
            row = self.queue[0]
            start = self.allocator.allocate(row.need)
            if start is None and not self.active and not entering:
                start = self._grow_pool(row)
            if start is None:
                break
            row.start = start
            entering.append(self.queue.popleft())
        past = self._share_prefixes(entering)
        group: list[int] = []  # entering rows of one prefill forward
        tokens = 0  # what it computes: the rows' tokens after their shared prefixes
        for i, row in enumerate(entering):
            own = len(row.prompt) - past[i]
            if group and tokens + own > PREFILL_TOKENS:
                self._prefill([entering[k] for k in group], [past[k] for k in group])
                group, tokens = [], 0
            group.append(i)
            tokens += own
        if group:
            self._prefill([entering[k] for k in group], [past[k] for k in group])

    def _grow_pool(self, row: Row) -> int | None:
        """With nothing in flight, the engine may give a larger pool (on the CPU it grows to
        what is asked; on a GPU its size is fixed): a row that fits no pool is an error."""
        needed = max(row.need, sum(r.need for r in list(self.queue)[: self.slots]))
        size = self.engine.reserve(needed)
        if size != self.allocator.size:
            self.allocator = RegionAllocator(size, 1)
        start = self.allocator.allocate(row.need)
        if start is None:
            raise RuntimeError(
                f"a prompt of {len(row.prompt)} tokens plus {row.limit} new tokens does "
                f"not fit the KV pool of {self.allocator.size:,} tokens"
            )
        return start

    def _prefill(self, rows: list[Row], past: list[int]) -> None:
        self.prompt_tokens += sum(len(r.prompt) for r in rows)
        want = any(r.want_logprobs for r in rows)
        top = max(r.top for r in rows)
        first, first_logprobs, first_top = self.engine.prefill(
            [r.prompt for r in rows],
            [r.start for r in rows],
            [r.key for r in rows],
            self._chooser(rows),
            want,
            _matchers(rows),
            top,
            past,
        )
        for i, (row, token) in enumerate(zip(rows, first, strict=True)):
            alternatives = (first_top[0][i], first_top[1][i]) if top else None
            if not self._accept(row, token, first_logprobs[i] if want else None, alternatives):
                self.active.append(row)

    def _share_prefixes(self, rows: list[Row]) -> list[int]:
        """Rows entering together whose prompts start with the same tokens (at least their
        `share`) get that prefix once: copied from a row in flight that holds it in its region
        (its prompt's keys and values stay there until it finishes), else computed once
        (`engine.fill_prefix`). Returns the tokens of each row already in its region."""
        past = [0] * len(rows)
        share = rows[0].share if rows else 0
        if share <= 0:
            return past
        lenders = [r for r in self.active if len(r.prompt) > share]
        prompts = [r.prompt for r in rows] + [r.prompt for r in lenders]
        for members, shared in shared_prefix_groups(prompts, share):
            entering = [rows[i] for i in members if i < len(rows)]
            held = [lenders[i - len(rows)] for i in members if i >= len(rows)]
            if not entering:
                continue
            if held:
                self.engine.copy_prefix(shared, held[0].start, [r.start for r in entering])
            else:
                first = entering[0]
                self.engine.fill_prefix(
                    first.prompt[:shared], first.start, [r.start for r in entering[1:]]
                )
            for i in members:
                if i < len(rows):
                    past[i] = shared
        return past

    def _decode_chunk(self) -> None:
        """Up to SYNC_EVERY decode steps without looking at the tokens, then account for them."""
        rows = self.active
        matchers = _matchers(rows)
        steps = min(SYNC_EVERY, max(r.limit - len(r.tokens) for r in rows))
        want = any(r.want_logprobs for r in rows)
        top = max(r.top for r in rows)
        chosen, chosen_logprobs, chosen_top = self.engine.decode(
            decode_inputs(rows), steps, self._chooser(rows), want, matchers, top
        )
        still = []
        for k, (row, new, lps) in enumerate(zip(rows, chosen, chosen_logprobs, strict=True)):
            tops = (chosen_top[0][k], chosen_top[1][k]) if top else None
            if failed(row.matcher):  # its tokens are not kept to the format: it ends here
                row.reason = GRAMMAR_FAILED
                self._release(row)
                continue
            if row.params.stop:  # stop strings are looked for after every token
                alts = zip(*tops, strict=True) if top else [None] * len(new)
                taken = zip(new, lps, alts, strict=True)
                done = any(self._accept(row, t, lp, alt) for t, lp, alt in taken)
            else:
                done = self._take(row, new, lps, tops)
            if not done:
                still.append(row)
        self.active = still

    def _chooser(self, rows: list[Row]) -> SamplingParams | RowSampling:
        """One setting for all rows where they choose alike (the common case: one job's task
        settings, or requests differing only in max_tokens), else per-row tensors."""
        first = rows[0].params
        choice = first.choice
        if all(r.params.choice == choice for r in rows):
            return first
        return RowSampling.of([r.params for r in rows], self.engine.device)

    def _accept(self, row: Row, token: int, logprob: float | None, top=None) -> bool:
        """Take one new token for a row (reference-engine rules); True when the row is done,
        whose region then goes back to the pool. `top`: the step's most likely alternatives
        (ids, log-probs), when any row in flight wants them. A constrained row's matcher has
        consumed the token already (the engine's step did)."""
        if token == NAN_TOKEN:
            raise nan_error(f"{row.index} of batch {row.group}", len(row.tokens))
        if token in self.engine.eos_ids and not row.params.ignore_eos:
            return self._ended(row, stopped=True)
        row.tokens.append(token)
        self.new_tokens += 1
        if row.want_logprobs:
            row.logprobs.append(logprob)
        if row.top:
            row.top_ids.append(top[0][: row.top])
            row.top_logprobs.append(top[1][: row.top])
        stop = row.params.stop
        return self._ended(row, bool(stop) and stop_hit(self.engine.tokenizer, row.tokens, stop))

    def _take(self, row: Row, new: list[int], logprobs: list[float], tops) -> bool:
        """`_accept` over a chunk's tokens at once, for a row without stop strings (the host's
        work between chunks, while the GPU waits, is per row here rather than per token):
        tokens up to the row's limit or its first EOS, which ends it. True when it is done."""
        take = new[: row.limit - len(row.tokens)]
        end = len(take)
        if not row.params.ignore_eos and not self.engine.eos_ids.isdisjoint(take):
            end = next(j for j, t in enumerate(take) if t in self.engine.eos_ids)
        if NAN_TOKEN in take[:end]:
            at = len(row.tokens) + take.index(NAN_TOKEN)
            raise nan_error(f"{row.index} of batch {row.group}", at)
        row.tokens.extend(take[:end])
        self.new_tokens += end
        if row.want_logprobs:
            row.logprobs.extend(logprobs[:end])
        if row.top:
            row.top_ids.extend(ids[: row.top] for ids in tops[0][:end])
            row.top_logprobs.extend(values[: row.top] for values in tops[1][:end])
        return self._ended(row, stopped=end < len(take))

    def _ended(self, row: Row, stopped: bool) -> bool:
        """Whether a row that took its tokens is done: `stopped` (EOS or a stop string), or at
        its limit; a done row's region goes back to the pool and its generation is reported."""
        if stopped:
            row.reason = "stop"
        elif len(row.tokens) < row.limit:
            return False
        self._release(row)
        return True

    def _release(self, row: Row) -> None:
        self.allocator.release(row.start, row.need)
        self._row_done(row)

    def _row_done(self, row: Row) -> None:
        logprobs = row.logprobs if row.want_logprobs else None
        top_ids, top_logprobs = (row.top_ids, row.top_logprobs) if row.top else (None, None)
        self.finished.setdefault(row.group, {})[row.index] = Generation(
            row.tokens, row.reason, logprobs, top_ids, top_logprobs
        )


def _matchers(rows: list[Row]) -> list | None:
    """The rows' grammar matchers, or None when no row is constrained."""
    matchers = [r.matcher for r in rows]
    return matchers if any(m is not None for m in matchers) else None


def stream(engine, groups: Iterable[tuple[Hashable, GenerateRequests]]) -> Iterator[StreamUpdate]:
    """Generate group after group through one scheduler, reporting rows as they finish; the
    next groups are drawn from `groups` while fewer rows than slots wait, so the slots stay
    full across groups (a job's checkpoint batches) instead of draining at each."""
    scheduler = Scheduler(engine)
    pending = iter(groups)
    exhausted = False
    while True:
        while not exhausted and scheduler.queued < scheduler.slots:
            item = next(pending, None)
            if item is None:
                exhausted = True
            else:
                scheduler.add(*item)
        if not scheduler.busy:
            return
        yield from scheduler.step()
