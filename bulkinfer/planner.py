"""Length sort and token-budget packing: pure functions on token lengths, no torch, no I/O.

A batch's cost is what the device really holds: on an engine that pads, rows x (longest row +
tokens to generate); on one that packs rows without padding (the fast engine), the sum of what
each row holds (its prompt plus the new tokens it may take, n times for n samples). Sorting by length puts rows of similar length together so that padding nearly vanishes; the
longest rows go first so a budget that is too big fails in the first minute, not at 3 a.m.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Padded tokens from which a batch counts as big enough to keep an accelerator busy.
FULL_BATCH_TOKENS = 8192


@dataclass(frozen=True)
class TokenBudget:
    """Limits of one batch: padded tokens (including new tokens per row) and rows."""

    max_tokens: int
    max_batch_size: int
    new_tokens_per_row: int = 0
    max_padding: float = 1.0
    packed: bool = False  # the engine packs rows without padding: a batch costs its rows' sum

    def rows_fitting(self, longest: int) -> int:
        per_row = longest + self.new_tokens_per_row
        return max(1, min(self.max_batch_size, self.max_tokens // max(per_row, 1)))


@dataclass(frozen=True)
class Batch:
    """One batch of the plan: input row positions, longest first."""

    index: int
    rows: np.ndarray
    longest: int
    real_tokens: int
    packed: bool = False

    @property
    def padded_tokens(self) -> int:
        """Prompt tokens the device runs: padded to the longest row, or packed (no padding)."""
        return self.real_tokens if self.packed else len(self.rows) * self.longest


def sort_by_length(
    rows: np.ndarray,
    lengths: np.ndarray,
    steps: np.ndarray | None = None,
    groups: np.ndarray | None = None,
) -> np.ndarray:
    """Rows ordered longest first; equal lengths keep input order (a stable, deterministic sort).
    With `steps` (decode steps per row, indexed by row), rows with the most steps come first
    and length only breaks ties. Otherwise with `groups` (each row's shared-prefix group, -1
    for none, indexed by row) the rows of a group stay together, longest first, where the
    group's longest row sorts: a packed batch then holds many rows of one prefix and computes
    it once for all of them (a packed engine pays nothing for mixing lengths)."""
    rows = np.asarray(rows, dtype=np.int64)
    mine = lengths[rows]
    if steps is not None:
        keys = (rows, -mine, -steps[rows])
    elif groups is not None and (groups[rows] >= 0).any():
        label = groups[rows]
        grouped = label >= 0
        longest = np.zeros(int(label.max()) + 1, dtype=np.int64)
        np.maximum.at(longest, label[grouped], mine[grouped])
        where = np.where(grouped, longest[np.maximum(label, 0)], mine)
        keys = (rows, -mine, label, -where)
    else:
        keys = (rows, -mine)
    return rows[np.lexsort(keys)]


def pack_sorted(order: np.ndarray, lengths: np.ndarray, budget: TokenBudget) -> list[Batch]:
    """Cut rows sorted longest-first into batches: each takes as many rows as fit its first row,
    but stops early, once it holds enough work to keep the device busy (a quarter of the budget,
    or FULL_BATCH_TOKENS), where more rows would push its padding past `max_padding`: a big GPU
    budget must not pack 2,000-token rows with 200-token ones."""
    batches = []
    start = 0
    while start < len(order):
        longest = int(lengths[order[start]])
        stop = min(len(order), start + budget.rows_fitting(longest))
        stop = start + _rows_within_padding(lengths[order[start:stop]], longest, budget)
        rows = order[start:stop]
        batches.append(Batch(len(batches), rows, longest, int(lengths[rows].sum())))
        start = stop
    return batches


def _rows_within_padding(candidates: np.ndarray, longest: int, budget: TokenBudget) -> int:
    """How many of the candidate rows (longest first) to take before padding gets too high.

    Generation is exempt: its cost is the decode steps, which a bigger batch shares among more
    rows, so cutting a batch to save prefill padding would cost far more than it saves (measured:
    4x slower on an H100, docs/perf.md)."""
    if budget.max_padding >= 1.0 or budget.new_tokens_per_row > 0 or len(candidates) <= 1:
        return len(candidates)
    per_row = longest + budget.new_tokens_per_row
    n = np.arange(1, len(candidates) + 1)
    real = np.cumsum(candidates + budget.new_tokens_per_row)
    padding = 1.0 - real / (n * per_row)
    full_enough = n * per_row >= min(budget.max_tokens / 4, FULL_BATCH_TOKENS)
    too_much = (padding > budget.max_padding) & full_enough
    first_bad = np.flatnonzero(too_much)
    return int(first_bad[0]) if len(first_bad) else len(candidates)


def pack_in_order(order: np.ndarray, lengths: np.ndarray, budget: TokenBudget) -> list[Batch]:
    """Greedy packing without sorting: the baseline that file order gives."""
    batches = []
    start = 0
    longest = 0
    for i, row in enumerate(order):
        candidate = max(longest, int(lengths[row]))
        n = i - start + 1
        fits = (
            n <= budget.max_batch_size
            and n * (candidate + budget.new_tokens_per_row) <= budget.max_tokens
        )
        if not fits and n > 1:
            rows = order[start:i]
            batches.append(Batch(len(batches), rows, longest, int(lengths[rows].sum())))
            start, candidate = i, int(lengths[row])
        longest = candidate
    if start < len(order):
        rows = order[start:]
        batches.append(Batch(len(batches), rows, longest, int(lengths[rows].sum())))
    return batches


def pack_by_cost(
    order: np.ndarray, lengths: np.ndarray, costs: np.ndarray, budget: TokenBudget
) -> list[Batch]:
    """Cut rows (in the given order) into batches whose summed cost fits the budget: the plan
    of an engine that packs rows without padding, where a row holds its own tokens only."""
    batches = []
    start = 0
    cumulative = np.cumsum(costs[order])
    while start < len(order):
        spent = cumulative[start - 1] if start else 0
        fit = int(np.searchsorted(cumulative, spent + budget.max_tokens, side="right")) - start
        stop = start + max(1, min(fit, budget.max_batch_size))
        rows = order[start:stop]
        longest = int(lengths[rows].max())
        batches.append(Batch(len(batches), rows, longest, int(lengths[rows].sum()), packed=True))
        start = stop
    return batches


def plan_batches(
    rows: np.ndarray,
    lengths: np.ndarray,
    budget: TokenBudget,
    sort: bool = True,
    costs: np.ndarray | None = None,
    steps: np.ndarray | None = None,
    groups: np.ndarray | None = None,
) -> list[Batch]:
    """The deterministic batch plan for `rows`: the same rows and lengths give the same batches.
    A packed budget needs each row's cost (`costs`, indexed by row; lengths plus the budget's
    new tokens per row when None).

    A packed generation plan may order rows by their decode steps (`steps`), most first:
    longest-processing-time first over the whole job, so the rows that need the most steps
    start early beside the others and the job does not end with a few long rows decoding
    alone in a nearly empty batch. Other packed plans keep the rows of each shared-prefix
    group (`groups`) together. A padded plan sorts by length only (padding is its cost)."""
    rows = np.asarray(rows, dtype=np.int64)
    order = rows
    if sort and budget.packed:
        order = sort_by_length(rows, lengths, steps, groups)
    elif sort:
        order = sort_by_length(rows, lengths)
    if budget.packed:
        if costs is None:
            costs = np.asarray(lengths, dtype=np.int64) + budget.new_tokens_per_row
        return pack_by_cost(order, lengths, np.asarray(costs, dtype=np.int64), budget)
    if sort:
        return pack_sorted(order, lengths, budget)
    return pack_in_order(rows, lengths, budget)


def padding_fraction(batches: list[Batch]) -> float:
    """Share of the padded token grid that is padding (0 when nothing was planned)."""
    padded = sum(b.padded_tokens for b in batches)
    real = sum(b.real_tokens for b in batches)
    return 0.0 if padded == 0 else 1.0 - real / padded


def length_histogram(lengths: np.ndarray, bins: int = 10) -> list[tuple[int, int, int]]:
    """(low, high, count) buckets on a log-ish scale: token lengths are usually heavy-tailed."""
    lengths = np.asarray(lengths)
    if len(lengths) == 0:
        return []
    low = max(int(lengths.min()), 1)
    top = max(int(lengths.max()), low)
    edges = np.unique(np.geomspace(low, top + 1, num=bins + 1).astype(np.int64))
    if len(edges) < 2:
        edges = np.array([low, top + 1])
    counts, _ = np.histogram(lengths, bins=edges)
    return [
        (int(lo), int(hi) - 1, int(c))
        for lo, hi, c in zip(edges[:-1], edges[1:], counts, strict=True)
    ]


def assign_shards(costs: np.ndarray, n_shards: int) -> np.ndarray:
    """The shard of every row, balanced by cost (tokens), not by row count, so shards finish
    together. Longest-processing-time first: rows longest first, each to the shard with the least
    work so far (ties to the lowest shard). Deterministic: same costs and count, same shards."""
    import heapq

    costs = np.asarray(costs, dtype=np.int64)
    order = np.lexsort((np.arange(len(costs)), -costs))
    heap = [(0, k) for k in range(n_shards)]
    shard_of = np.empty(len(costs), dtype=np.int32)
    for row in order.tolist():
        total, k = heapq.heappop(heap)
        shard_of[row] = k
        heapq.heappush(heap, (total + int(costs[row]), k))
    return shard_of


def length_counts(lengths: np.ndarray) -> list[tuple[int, int, int]]:
    """(low, high, count) over fixed quarter-octave buckets (1, 2, 3, 4, 5, 6, 7, 8, 10, 11, ...),
    non-empty buckets only: the same edges for every shard, so shards' counts simply add up."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) == 0:
        return []
    top = max(int(lengths.max()), 1)
    edges = np.unique(np.round(2 ** (np.arange(0, 4 * np.log2(top) + 8) / 4)).astype(np.int64))
    edges = np.concatenate([[0], edges[edges > 0]])
    counts, _ = np.histogram(lengths, bins=edges)
    return [
        (int(lo), int(hi) - 1, int(c))
        for lo, hi, c in zip(edges[:-1], edges[1:], counts, strict=True)
        if c
    ]
