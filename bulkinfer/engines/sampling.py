"""Next-token choice: greedy, or sampling whose randomness is keyed by (seed, row, step).

Sampling uses the Gumbel-max trick with noise from a counter-based hash instead of a stateful
generator, so a row draws the same tokens whether it runs alone, in any batch, on a resumed run
or in another shard: the result depends on the row, never on its neighbours.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # benchmarks: decode to max_new_tokens whatever the model says

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def row_key(seed: int, row: int, sample: int = 0) -> int:
    """A 63-bit key for one row's random stream (splitmix64 of seed, row and sample index)."""
    z = (
        seed * 0x9E3779B97F4A7C15 + row * 0xBF58476D1CE4E5B9 + sample * 0x94D049BB133111EB
    ) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


def _signed(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


_C2 = _signed(0xBF58476D1CE4E5B9)
_C3 = _signed(0x94D049BB133111EB)


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift on int64 (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def keyed_uniform(keys: torch.Tensor, step: int, vocab: int) -> torch.Tensor:
    """Uniform (0, 1) noise of shape [rows, vocab], a pure function of (key, step, column)."""
    columns = torch.arange(vocab, device=keys.device, dtype=torch.int64)
    step_term = _signed(((step + 1) * 0x9E3779B97F4A7C15) & _MASK64)
    z = keys[:, None] + step_term + columns[None, :] * _C3
    z = (z ^ _shr(z, 30)) * _C2
    z = (z ^ _shr(z, 27)) * _C3
    z = z ^ _shr(z, 31)
    return (_shr(z, 11).double() + 0.5) / float(1 << 53)


@dataclass(frozen=True)
class RowSampling:
    """Sampling settings that differ per row (an OpenAI batch file sets them per request), as
    tensors of shape [rows]; a row with temperature 0 is greedy."""

    temperature: torch.Tensor
    top_p: torch.Tensor
    top_k: torch.Tensor

    @classmethod
    def of(cls, params: list[SamplingParams], device: torch.device) -> RowSampling:
        return cls(
            torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device),
            torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device),
            torch.tensor([p.top_k for p in params], dtype=torch.int64, device=device),
        )


def choose_next_tokens(
    logits: torch.Tensor, params: SamplingParams | RowSampling, keys: torch.Tensor, step: int
) -> torch.Tensor:
    """One token per row from float32 logits [rows, vocab]."""
    if isinstance(params, RowSampling):
        return _choose_per_row(logits, params, keys, step)
    if params.greedy:
        return logits.argmax(-1)
    scores = logits / params.temperature
    if params.top_k > 0 and params.top_k < scores.shape[-1]:
        kth = torch.topk(scores, params.top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        scores = _top_p_filter(scores, params.top_p)
    return _gumbel_argmax(scores, keys, step)


def _choose_per_row(
    logits: torch.Tensor, params: RowSampling, keys: torch.Tensor, step: int
) -> torch.Tensor:
    """The same choice as with one SamplingParams per row, vectorised over the batch: each row's
    filters and noise depend on that row alone, so its tokens do not depend on its neighbours."""
    greedy = params.temperature == 0
    if bool(greedy.all()):
        return logits.argmax(-1)
    scores = logits / torch.where(greedy, 1.0, params.temperature)[:, None]
    vocab = scores.shape[-1]
    k = torch.where((params.top_k > 0) & (params.top_k < vocab), params.top_k, vocab)
    if bool((k < vocab).any()):
        ranked = scores.sort(dim=-1, descending=True).values
        kth = ranked.gather(-1, (k - 1)[:, None])
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if bool((params.top_p < 1.0).any()):
        scores = _top_p_filter(scores, params.top_p[:, None])
    sampled = _gumbel_argmax(scores, keys, step)
    return torch.where(greedy, logits.argmax(-1), sampled)


def _gumbel_argmax(scores: torch.Tensor, keys: torch.Tensor, step: int) -> torch.Tensor:
    gumbel = -torch.log(-torch.log(keyed_uniform(keys, step, scores.shape[-1])))
    return (scores.double().log_softmax(-1) + gumbel).argmax(-1)


def _top_p_filter(scores: torch.Tensor, top_p: float | torch.Tensor) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches top_p (at least one)."""
    sorted_scores, order = scores.sort(dim=-1, descending=True)
    probs = sorted_scores.softmax(-1)
    before = probs.cumsum(-1) - probs
    drop_sorted = (before >= top_p) & (top_p < 1.0)
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return scores.masked_fill(drop, float("-inf"))
