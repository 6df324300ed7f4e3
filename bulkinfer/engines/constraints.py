"""Constrained decoding: a row's output kept to a grammar (a JSON schema, any JSON object, a
regular expression or a list of allowed strings) by masking, before each token is chosen, every
token the grammar does not allow next.

llguidance does the grammar work: it compiles a JSON schema or a regular expression lazily
against the tokenizer's vocabulary and computes a row's allowed-token bitmask in tens of
microseconds, ships abi3 wheels with no dependencies, and is what vLLM and SGLang call for the
same job. The mask is applied to the logits a step produced (on a GPU, the buffer a CUDA graph
writes), so graph replay and continuous batching are unchanged; a constrained row makes the
fast engine look at its tokens after every step instead of every few, since the next mask
depends on the last token.

Once a grammar is complete only the end-of-sequence token is allowed, so a row ends with
`finish_reason: stop`; a row that reaches its token limit first ends with `length`, its text
cut short (and not valid).
"""

from __future__ import annotations

import functools

import torch

from bulkinfer.grammars import llguidance_module as _llguidance

_LL_TOKENIZERS: dict[int, tuple[object, object]] = {}


@functools.cache
def _executor():
    """llguidance's thread pool, which fills many rows' masks at once."""
    return _llguidance().LLExecutor()


def ll_tokenizer(tokenizer):
    """The llguidance view of a Hugging Face tokenizer, built once per tokenizer (0.3 s for a
    49k vocabulary)."""
    cached = _LL_TOKENIZERS.get(id(tokenizer))
    if cached is None or cached[0] is not tokenizer:
        cached = (tokenizer, _llguidance().hf.from_tokenizer(tokenizer))
        _LL_TOKENIZERS[id(tokenizer)] = cached
    return cached[1]


def matcher(tokenizer, grammar: str | None):
    """A fresh matcher of `grammar` for one sequence, or None when it is unconstrained."""
    if grammar is None:
        return None
    ll = _llguidance()
    found = ll.LLMatcher(ll_tokenizer(tokenizer), grammar)
    if found.is_error():
        raise ValueError(f"response_format: {found.get_error()}")
    return found


def mask_logits(logits: torch.Tensor, matchers: list, tokenizer) -> None:
    """Set to -inf, in place, the logits [rows, vocab] of every token row i's matcher does not
    allow next (rows without a matcher, or whose matcher has failed, are left as they are).
    Token ids beyond the tokenizer's vocabulary (padded embeddings) are never allowed for a
    constrained row."""
    rows = [i for i, m in enumerate(matchers) if m is not None and not m.is_error()]
    if not rows:
        return
    ll = _llguidance()
    vocab = ll_tokenizer(tokenizer).vocab_size
    bitmask = ll.torch.allocate_token_bitmask(len(rows), vocab)
    if len(rows) == 1:
        ll.torch.fill_next_token_bitmask(matchers[rows[0]], bitmask, 0)
    else:  # on llguidance's threads, without the GIL
        pairs = [(matchers[i], k) for k, i in enumerate(rows)]
        ll.torch.fill_next_token_bitmask_par(_executor(), pairs, bitmask)
    # the packed bitmask goes to the device (4 bytes per 32 tokens) and is unpacked there
    device = logits.device
    words = bitmask.to(device, non_blocking=True)
    bits = torch.arange(32, dtype=torch.int32, device=device)
    allowed = ((words[:, :, None] >> bits) & 1).bool().flatten(1)  # [rows, words x 32]
    width = min(vocab, logits.shape[1])
    keep = torch.zeros((len(rows), logits.shape[1]), dtype=torch.bool, device=device)
    keep[:, :width] = allowed[:, :width]
    index = torch.tensor(rows, device=device)
    picked = logits.index_select(0, index)
    picked.masked_fill_(~keep, float("-inf"))
    logits.index_copy_(0, index, picked)


def consume(found, token: int) -> None:
    """Advance a row's matcher past its chosen token (a refused token, which the mask makes
    impossible, leaves the matcher in its error state: the row then runs unconstrained)."""
    if found is not None and not found.is_error() and not found.is_stopped():
        found.consume_token(token)
