"""Shared prompt prefixes, found while the rows are tokenized: rows whose first
`batching.min_shared_prefix` tokens are identical (a long instruction, few-shot examples or a
system prompt rendered by the chat template) form a group, and the group's prefix is as long as
the tokens all its rows share.

Per row only an 8-byte hash of its first tokens is kept, and only when some row is that long
(a job of short rows keeps nothing). Each group's exact length comes from comparing its rows'
tokens with the first row's as the chunks go by (up to MAX_PREFIX tokens; at most
MAX_REFERENCES groups are followed at once), so `bulkinfer plan` knows it without keeping any
token ids. The fast engine's scheduler finds the same groups among the rows entering its slots
together and computes each prefix once for them (engines/scheduler.py).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

MAX_PREFIX = 8192  # tokens of a prefix followed at most
MAX_REFERENCES = 1024  # groups whose first row's tokens are kept while tokenizing
_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)


@dataclass(frozen=True)
class PrefixGroups:
    """Rows sharing a prefix: `labels[row]` is the row's group (-1: none), group g's prefix
    is `prefix_tokens[g]` long and `rows[g]` rows use it; largest saving first."""

    labels: np.ndarray
    prefix_tokens: np.ndarray
    rows: np.ndarray

    @property
    def saved_tokens(self) -> int:
        """Prompt tokens not computed again when each prefix is computed once."""
        return int(((self.rows - 1) * self.prefix_tokens).sum())


class PrefixFinder:
    """Collects each chunk's row heads (hashes of their first `length` tokens) and follows
    the prefix every group of rows shares."""

    def __init__(self, length: int):
        self.length = length
        self.parts: list[np.ndarray] = []
        self.any = False  # a row long enough was seen
        self.rows_before = 0  # rows before it
        self._powers: np.ndarray | None = None  # of the hash's multiplier, computed once
        # head -> (first row's tokens, tokens shared by every row seen so far)
        self.references: OrderedDict[int, list] = OrderedDict()

    def add(self, flat: np.ndarray, lengths: np.ndarray) -> None:
        """A chunk's token ids (rows one after the other) and its rows' lengths. Until a row
        long enough comes, only a count of rows is kept."""
        candidates = np.flatnonzero(lengths > self.length) if self.length > 0 else []
        if not self.any and not len(candidates):
            self.rows_before += len(lengths)
            return
        if not self.any:
            self.any = True
            self.parts.append(np.zeros(self.rows_before, dtype=np.uint64))
        heads = np.zeros(len(lengths), dtype=np.uint64)
        if len(candidates):
            starts = np.cumsum(lengths) - lengths
            heads[candidates] = self._hashes(flat, starts[candidates])
            self._follow(flat, starts, lengths, candidates, heads)
        self.parts.append(heads)

    def _hashes(self, flat: np.ndarray, starts: np.ndarray) -> np.ndarray:
        """A 64-bit polynomial hash of `length` tokens from each start (never 0)."""
        if self._powers is None:
            with np.errstate(over="ignore"):
                self._powers = _MULTIPLIER ** np.arange(self.length, dtype=np.uint64)
        out = np.zeros(len(starts), dtype=np.uint64)
        for k in range(0, len(starts), 1024):  # a bounded block of tokens at a time
            block = flat[starts[k : k + 1024, None] + np.arange(self.length)]
            with np.errstate(over="ignore"):
                out[k : k + 1024] = (block.astype(np.uint64) * self._powers).sum(axis=1)
        out[out == 0] = 1
        return out

    def _follow(self, flat, starts, lengths, candidates, heads) -> None:
        """Shorten each group's shared prefix to what this chunk's rows share with its first
        row (a row keeps at least one token of its own)."""
        for head in np.unique(heads[candidates]):
            rows = candidates[heads[candidates] == head]
            reference = self.references.get(int(head))
            if reference is None:
                first = rows[0]
                n = min(int(lengths[first]) - 1, MAX_PREFIX)
                if not self._room():
                    continue
                reference = [flat[starts[first] : starts[first] + n].copy(), n, 1]
                self.references[int(head)] = reference
                rows = rows[1:]
            tokens, shared, _ = reference
            for k in range(0, len(rows), 256):  # a bounded block of tokens at a time
                piece = rows[k : k + 256]
                own = np.minimum(shared, lengths[piece] - 1)  # each row keeps a token
                columns = np.arange(shared)
                block = flat[np.minimum(starts[piece, None] + columns, len(flat) - 1)]
                differ = (block != tokens[:shared]) | (columns >= own[:, None])
                first = np.where(differ.any(axis=1), differ.argmax(axis=1), shared)
                shared = int(first.min())
            reference[1], reference[2] = shared, reference[2] + len(rows)

    def _room(self) -> bool:
        """Whether a new group can be followed: the oldest group of one row makes way."""
        if len(self.references) < MAX_REFERENCES:
            return True
        for head, (_, _, count) in self.references.items():
            if count == 1:
                del self.references[head]
                return True
        return False

    def finish(self) -> tuple[np.ndarray | None, dict[int, int]]:
        """Every row's head (None when no row is long enough to have one) and the prefix
        length of each followed group, by head."""
        heads = np.concatenate(self.parts) if self.any else None
        self.parts.clear()
        shared = {head: r[1] for head, r in self.references.items() if r[2] > 1}
        return heads, shared


def prefix_groups(
    heads: np.ndarray, shared: dict[int, int], rows: np.ndarray, length: int
) -> PrefixGroups:
    """The groups among `rows` (input positions): rows with equal heads, two or more; a group
    not followed while tokenizing counts its prefix as the `length` tokens the heads cover."""
    labels = np.full(len(heads), -1, dtype=np.int64)
    picked = heads[rows]
    candidates = rows[picked != 0]
    if not len(candidates):
        return PrefixGroups(labels, np.zeros(0, np.int64), np.zeros(0, np.int64))
    unique, inverse, counts = np.unique(heads[candidates], return_inverse=True, return_counts=True)
    keep = counts >= 2
    tokens = np.array([shared.get(int(h), length) for h in unique], dtype=np.int64)
    saving = np.where(keep, (counts - 1) * tokens, -1)
    order = np.argsort(-saving, kind="stable")[: int(keep.sum())]
    new_label = np.full(len(unique), -1, dtype=np.int64)
    new_label[order] = np.arange(len(order))
    labels[candidates] = new_label[inverse]
    return PrefixGroups(labels, tokens[order], counts[order].astype(np.int64))
