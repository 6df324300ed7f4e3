"""The token chooser: top-p found among the best candidates equals a sort of the whole
vocabulary, the keyed Gumbel draw follows the softmax, and the compiled draw equals the eager one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bulkinfer.engines.sampling import (
    TOP_P_CANDIDATES,
    RowSampling,
    SamplingParams,
    choose_next_tokens,
    gumbel_argmax,
    hash_constants,
    keyed_uniform,
)

VOCAB = 3 * TOP_P_CANDIDATES


def sorted_nucleus_choice(scores: torch.Tensor, top_p: list[float], keys, step) -> list[int]:
    """The definition, row by row in float64: sort the whole vocabulary, keep tokens while the
    ones before them hold less than top_p, draw with the same keyed noise."""
    chosen = []
    for i, p in enumerate(top_p):
        row = scores[i].double()
        order = row.argsort(descending=True)
        probs = row[order].softmax(-1)
        kept = order[(probs.cumsum(-1) - probs) < p] if p < 1.0 else order
        noise = keyed_uniform(keys[i : i + 1], step, len(row))[0]
        gumbel = -torch.log(-torch.log(noise))
        masked = torch.full_like(row, float("-inf"))
        masked[kept] = row[kept]
        chosen.append(int((masked + gumbel).argmax()))
    return chosen


@pytest.fixture
def mixed_rows():
    """Peaked rows, whose nucleus lies among the candidates, and flat rows, whose nucleus is
    wider than the candidates (the whole vocabulary is sorted for those)."""
    torch.manual_seed(3)
    spread = torch.tensor([8.0, 0.05, 3.0, 0.3, 5.0, 0.01])[:, None]
    logits = torch.randn(6, VOCAB) * spread
    keys = torch.tensor([11, -5, 2**60, 7, 123456789, -(2**55)], dtype=torch.int64)
    return logits, keys


def test_top_p_among_candidates_equals_sorting_the_vocabulary(mixed_rows):
    logits, keys = mixed_rows
    top_p = [0.9, 0.95, 0.5, 1.0, 0.99, 0.7]
    params = [SamplingParams(4, temperature=0.8, top_p=p) for p in top_p]
    for step in range(4):
        together = choose_next_tokens(logits, RowSampling.of(params, logits.device), keys, step)
        expected = sorted_nucleus_choice(logits / 0.8, top_p, keys, step)
        assert together.tolist() == expected
        alone = [
            int(choose_next_tokens(logits[i : i + 1], p, keys[i : i + 1], step))
            for i, p in enumerate(params)
        ]
        assert alone == expected


def test_top_k_per_row_keeps_each_rows_own_k(mixed_rows):
    logits, keys = mixed_rows
    params = [SamplingParams(4, temperature=1.0, top_k=k) for k in (1, 0, 5, VOCAB, 2, 40)]
    chosen = choose_next_tokens(logits, RowSampling.of(params, logits.device), keys, 0)
    for i, p in enumerate(params):
        if 0 < p.top_k < VOCAB:
            allowed = set(logits[i].topk(p.top_k).indices.tolist())
            assert int(chosen[i]) in allowed
    assert int(chosen[0]) == int(logits[0].argmax())  # top_k 1 is greedy


def test_keyed_draws_follow_the_softmax():
    """20,000 rows, each with its own key, drawing from the same six scores: the frequencies
    match the softmax within sampling error (the draw adds no bias)."""
    scores = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    rows = 20_000
    keys = torch.arange(rows, dtype=torch.int64) * 7_919 + 17
    chosen = choose_next_tokens(
        scores.expand(rows, -1).contiguous(), SamplingParams(1, temperature=1.0), keys, 3
    )
    freq = np.bincount(chosen.numpy(), minlength=6) / rows
    expected = scores.softmax(-1).numpy()
    assert np.abs(freq - expected).max() < 0.015, (freq, expected)


def test_compiled_draw_equals_the_eager_draw(mixed_rows):
    """Inductor's generated code for the noise hash (int64 products that wrap, logical shifts)
    and the float64 Gumbel transform gives the very tokens the eager code gives, at any number
    of rows, from one compilation."""
    from torch._dynamo.utils import counters

    logits, _ = mixed_rows
    constants = hash_constants(logits.device)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(gumbel_argmax, dynamic=None, fullgraph=True, backend="inductor")
    gen = torch.Generator().manual_seed(5)
    for rows in (3, 6, 5, 2):
        scores = torch.cat([logits, logits])[:rows] / 0.7
        keys = torch.randint(-(2**62), 2**62, (rows,), dtype=torch.int64, generator=gen)
        torch._dynamo.maybe_mark_dynamic(scores, 0)
        torch._dynamo.maybe_mark_dynamic(keys, 0)
        assert torch.equal(
            compiled(scores, keys, constants), gumbel_argmax(scores, keys, constants)
        )
    assert counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()


@pytest.mark.parametrize("temperature", [1e-44, 1e-38, 1e-300, 9e-6])
def test_a_temperature_too_small_to_divide_by_is_greedy(mixed_rows, temperature):
    """Logits divided by 1e-38 overflow float32 to infinities and the draw took the first of
    them (token 0 on every row); one setting for all rows, and per row beside rows that sample
    (whose float32 tensor held 1e-300 as 0, so the same request ran greedy there): both take
    the argmax now, and the sampling rows still sample as they did alone."""
    logits, keys = mixed_rows
    greedy = logits.argmax(-1)
    tiny = SamplingParams(max_new_tokens=1, temperature=temperature)
    assert torch.equal(choose_next_tokens(logits, tiny, keys, 0), greedy)
    warm = SamplingParams(max_new_tokens=1, temperature=0.9, top_p=0.8)
    mixed = RowSampling.of([tiny, warm] * 3, logits.device)
    chosen = choose_next_tokens(logits, mixed, keys, 0)
    assert torch.equal(chosen[0::2], greedy[0::2])
    alone = RowSampling.of([warm] * 6, logits.device)
    assert torch.equal(chosen[1::2], choose_next_tokens(logits, alone, keys, 0)[1::2])
