"""Constrained decoding: a row's output kept to a grammar (a JSON schema, any JSON object, a
regular expression or a list of allowed strings) by masking, before each token is chosen, every
token the grammar does not allow next.

llguidance does the grammar work: it compiles a JSON schema or a regular expression lazily
against the tokenizer's vocabulary and computes a row's allowed-token bitmask in tens of
microseconds, ships abi3 wheels with no dependencies, and is what vLLM and SGLang call for the
same job. The mask is applied to the logits a step produced (on a GPU, the buffer a CUDA graph
writes), so graph replay and continuous batching are unchanged. The host fills a step's masks
while the GPU runs that step's forward (the masks need only the tokens before it); the tokens
then come back after every step, not every few, for the matchers to consume, which the next
masks need. Filling masks and consuming tokens run on llguidance's threads, for all rows at
once; the scheduler's own bookkeeping stays at every few steps.

Once a grammar is complete only the end-of-sequence token is allowed, so a row ends with
`finish_reason: stop`; a row that reaches its token limit first ends with `length`, its text
cut short (and not valid).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import re

import numpy as np
import torch

from bulkinfer.engines.stops import generated_texts, special_texts
from bulkinfer.errors import ModelError, first_line
from bulkinfer.grammars import SPECIAL_MARK
from bulkinfer.grammars import llguidance_module as _llguidance

# the last few tokenizers' llguidance views (a notebook running job after job keeps no more)
_LL_TOKENIZERS: dict[tuple, tuple[object, object]] = {}
LL_TOKENIZERS_KEPT = 4


@functools.cache
def _executor():
    """llguidance's thread pool, which fills many rows' masks at once."""
    return _llguidance().LLExecutor()


def ll_tokenizer(tokenizer, end: int | None = None):
    """The llguidance view of a Hugging Face tokenizer, built once per tokenizer (0.3 s for a
    49k vocabulary) and checked against the tokenizer's own decoding. `end`: the token a
    complete grammar allows, which ends the row (the engine's end-of-sequence token; by
    default the tokenizer's)."""
    end = tokenizer.eos_token_id if end is None else end
    key = (id(tokenizer), end)
    cached = _LL_TOKENIZERS.get(key)
    if cached is None or cached[0] is not tokenizer:
        cached = (tokenizer, _checked(tokenizer, _build_ll_tokenizer(tokenizer, end)))
        _LL_TOKENIZERS.pop(key, None)
        _LL_TOKENIZERS[key] = cached
        while len(_LL_TOKENIZERS) > LL_TOKENIZERS_KEPT:  # the oldest first
            del _LL_TOKENIZERS[next(iter(_LL_TOKENIZERS))]
            _first_matcher.cache_clear()  # its keys hold the views too
    return cached[1]


def _splitting_view(tokenizer, end: int | None):
    """The llguidance view, but one that reads a special token's text in the grammar (or in a
    text checked against it) as the plain text it is. The view built from the tokenizer's JSON
    tokenizes text as the tokenizer does, special tokens matched, so text a format fixes (a
    const "<|im_end|>") was forced as that one token, which the grammar then refused (or, the
    end token, ended the row). This one tokenizes the text between special tokens' texts as
    that view does, and their texts by the longest plain tokens: a call into Python for each
    forced text, so taken only for grammars that hold a special token's text
    (`mentions_special`)."""
    key = (id(tokenizer), end, "split")
    cached = _LL_TOKENIZERS.get(key)
    if cached is not None and cached[0] is tokenizer:
        return cached[1]
    ll = _llguidance()
    plain = ll_tokenizer(tokenizer, end)
    special = [i for i in range(plain.vocab_size) if plain.is_special_token(i)]
    marked = set(special)
    texts = sorted({plain.decode_bytes([i]) for i in special} - {b""}, key=len, reverse=True)
    pattern = re.compile(b"(" + b"|".join(re.escape(t) for t in texts) + b")")

    class Split:  # the shape llguidance.TokenizerWrapper reads
        eos_token_id = plain.eos_token
        bos_token_id = tokenizer.bos_token_id
        special_token_ids = special
        tokens = [
            SPECIAL_MARK * (i in marked) + plain.decode_bytes([i]) for i in range(plain.vocab_size)
        ]

        def __call__(self, data: bytes) -> list[int]:
            tokens: list[int] = []
            for k, piece in enumerate(pattern.split(data) if texts else [data]):
                if k % 2:  # a special token's text
                    tokens += plain.greedy_tokenize(piece.decode("utf-8"))
                elif piece:
                    tokens += plain.tokenize_bytes(piece)
            return tokens

    view = ll.LLTokenizer(ll.TokenizerWrapper(Split()), eos_token=end)
    _LL_TOKENIZERS[key] = (tokenizer, view)
    while len(_LL_TOKENIZERS) > LL_TOKENIZERS_KEPT:
        del _LL_TOKENIZERS[next(iter(_LL_TOKENIZERS))]
        _first_matcher.cache_clear()
    return view


@functools.lru_cache(maxsize=256)  # asked once per row: a grammar is read once
def mentions_special(tokenizer, text: str) -> bool:
    """Whether `text` (a grammar, or a text checked against one) holds a special token's own
    text, JSON's and regular expressions' escapes read through."""
    specials = {t for t in special_texts(tokenizer).values() if len(t) > 1}
    if not specials:
        return False
    with contextlib.suppress(ValueError):  # a grammar is JSON: its \uXXXX escapes read back
        text = json.dumps(json.loads(text), ensure_ascii=False)
    bare = text.replace("\\", "")
    return any(t in text or t.replace("\\", "") in bare for t in specials)


def _view(tokenizer, end: int | None, *texts: str):
    """The llguidance view for a grammar and the texts checked against it."""
    if any(mentions_special(tokenizer, text) for text in texts):
        return _splitting_view(tokenizer, end)
    return ll_tokenizer(tokenizer, end)


def token_bytes_of(tokenizer):
    """Token id -> the token's own bytes, through the grammar library's view of the tokenizer
    (byte-level BPE, byte-fallback pieces and added tokens alike), a special token's text after
    SPECIAL_MARK (the text leaves those out); None where the library is missing or misreads
    this tokenizer."""
    try:
        ll = ll_tokenizer(tokenizer)
    except (ValueError, ModelError):
        return None

    @functools.lru_cache(maxsize=1 << 16)
    def token_bytes(token_id: int) -> bytes:
        raw = ll.decode_bytes([token_id])
        return SPECIAL_MARK + raw if ll.is_special_token(token_id) else raw

    return token_bytes


def end_token(tokenizer, eos_ids: set[int]) -> int | None:
    """The end-of-sequence token a complete grammar allows: the tokenizer's, or where it has
    none the model's (generation_config.eos_token_id), which the engine also stops at."""
    if isinstance(tokenizer.eos_token_id, int):
        return tokenizer.eos_token_id
    return min(eos_ids, default=None)


def _build_ll_tokenizer(tokenizer, end: int | None):
    """llguidance reads a token's bytes from the tokenizer's JSON, by its decoder. Some
    converters (transformers' GGUF conversion in some versions) write a byte-level BPE
    tokenizer's decoder as a sequence (ByteFallback, Fuse, Replace, ByteLevel), where
    llguidance then takes the byte-level characters literally ('Ġ' for a space) and every
    mask is wrong; such a decoder is given to llguidance as its ByteLevel step alone, which
    decodes a byte-level vocabulary the same."""
    backend = copy.copy(tokenizer.backend_tokenizer)
    backend.no_padding()
    backend.no_truncation()
    spec = json.loads(backend.to_str())
    decoder = spec.get("decoder") or {}
    if decoder.get("type") == "Sequence":
        steps = decoder.get("decoders") or []
        byte_level = [d for d in steps if d.get("type") == "ByteLevel"]
        if byte_level:
            spec["decoder"] = byte_level[0]
    try:
        return _llguidance().LLTokenizer(json.dumps(spec), eos_token=end)
    except ValueError as exc:  # a decoder it does not know (WordPiece, Metaspace)
        raise ModelError(
            f"response_format: the grammar library cannot read this tokenizer "
            f"({first_line(exc)}); structured output cannot run with it"
        ) from None


CHECKED_TOKENS = 2048  # tokens compared between llguidance's view and the tokenizer's


def _checked(tokenizer, ll):
    """`ll` if it reads tokens as the tokenizer decodes them (a sample across the vocabulary),
    else an error: a wrong view would mask the wrong tokens on every row, silently."""
    special = set(tokenizer.all_special_ids)
    size = min(ll.vocab_size, len(tokenizer))
    ids = [i for i in range(0, size, max(1, size // CHECKED_TOKENS)) if i not in special]
    texts = generated_texts(tokenizer, [[i] for i in ids], skip_special=False)
    wrong = [
        (i, text)
        for i, text in zip(ids, texts, strict=True)
        if "\ufffd" not in text and ll.decode_bytes([i]) != text.encode()
    ]
    if len(wrong) > len(ids) // 100:
        i, text = wrong[0]
        raise ModelError(
            f"response_format: the grammar library reads {len(wrong)} of {len(ids)} sampled "
            f"tokens differently from the tokenizer (token {i}: {ll.decode_bytes([i])!r}, the "
            f"tokenizer decodes {text!r}); structured output cannot run with this tokenizer"
        )
    return ll


def matcher(tokenizer, grammar: str | None, end: int | None = None):
    """A fresh matcher of `grammar` for one sequence, or None when it is unconstrained: a copy
    of one built per grammar and tokenizer (building one takes ~0.3 ms; a copy, 12 us).
    `end`: as for ll_tokenizer."""
    if grammar is None:
        return None
    if end is None and tokenizer.eos_token_id is None:
        raise ModelError(NO_END_TOKEN)
    return _first_matcher(_view(tokenizer, end, grammar), grammar).deep_copy()


NO_END_TOKEN = (
    "response_format: the model names no end-of-sequence token (neither its tokenizer's "
    "eos_token nor eos_token_id in config.json or generation_config.json), which ends a row "
    "once its format is complete; structured output cannot run with it (name one in "
    "generation_config.json)"
)


def completes(tokenizer, grammar: str, text: str) -> bool:
    """Whether `text` is a whole answer of `grammar`: for a row that ended at its token limit
    (which may fall just as the grammar completes) or at a stop string (which cuts the text
    wherever it matches). The grammar reads bytes, so the text's own tokens serve."""
    found = matcher(tokenizer, grammar)
    tokens = _view(tokenizer, None, grammar, text).tokenize_str(text)
    if found.validate_tokens(tokens) < len(tokens):  # checked first: a refused token warns
        return False
    return found.consume_tokens(tokens) and found.is_accepting()


@functools.lru_cache(maxsize=64)
def _first_matcher(tokenizer, grammar: str):
    ll = _llguidance()
    found = ll.LLMatcher(tokenizer, grammar, log_level=0)  # failures are read with is_error()
    if found.is_error():
        raise ValueError(f"response_format: {found.get_error()}")
    return found


def mask_logits(logits: torch.Tensor, matchers: list, tokenizer, end: int | None = None) -> None:
    """Set to -inf, in place, the logits [rows, vocab] of every token row i's matcher does not
    allow next (rows without a matcher, or whose matcher has failed, are left as they are).
    Token ids beyond the tokenizer's vocabulary (padded embeddings) are never allowed for a
    constrained row."""
    rows = [i for i, m in enumerate(matchers) if m is not None and not m.is_error()]
    if not rows:
        return
    vocab = ll_tokenizer(tokenizer, end).vocab_size
    words = (vocab + 31) // 32
    bitmask = _host_bitmask(len(rows), words, logits.device)
    if len(rows) == 1:
        matchers[rows[0]].unsafe_compute_mask_ptr(bitmask.data_ptr(), words * 4)
    else:  # on llguidance's threads, without the GIL
        pairs = [(matchers[i], k) for k, i in enumerate(rows)]
        _executor().unsafe_compute_mask_ptr(pairs, bitmask.data_ptr(), words * 4, len(rows))
    # the packed bitmask goes to the device (4 bytes per 32 tokens) and is unpacked there
    device = logits.device
    packed = bitmask.to(device, non_blocking=True)
    bits = torch.arange(32, dtype=torch.int32, device=device)
    allowed = ((packed[:, :, None] >> bits) & 1).bool().flatten(1)  # [rows, words x 32]
    width = min(vocab, logits.shape[1])
    keep = torch.zeros((len(rows), logits.shape[1]), dtype=torch.bool, device=device)
    keep[:, :width] = allowed[:, :width]
    if len(rows) == logits.shape[0]:  # every row constrained (one schema for the job)
        logits.masked_fill_(~keep, float("-inf"))
        return
    index = torch.from_numpy(np.asarray(rows, dtype=np.int64)).to(device)
    picked = logits.index_select(0, index)
    picked.masked_fill_(~keep, float("-inf"))
    logits.index_copy_(0, index, picked)


_BITMASKS: dict[str, torch.Tensor] = {}


def _host_bitmask(rows: int, words: int, device: torch.device) -> torch.Tensor:
    """An int32 [rows, words] host buffer for the masks, reused between steps; pinned when
    the logits are on a GPU, so its copy there is asynchronous. Reuse is safe: every step
    ends with its tokens read back on the host, after this step's copy has run."""
    key = f"{device.type}:{words}"
    buffer = _BITMASKS.get(key)
    if buffer is None or buffer.shape[0] < rows:
        buffer = torch.zeros((max(rows, 64), words), dtype=torch.int32)
        if device.type == "cuda":
            buffer = buffer.pin_memory()
        _BITMASKS[key] = buffer
    return buffer[:rows]


def consume_all(matchers: list, tokens: list[int]) -> None:
    """Advance each row's matcher past its chosen token, on llguidance's threads: a parser step
    costs ~5-10 microseconds a row, which for a thousand rows in the host's critical path
    between two decode steps would take longer than a small model's step. A refused token
    (which the mask makes impossible) leaves a matcher in its error state: that row then runs
    unconstrained, until its engine ends it (`failed`). Rows without a matcher, or whose
    matcher has stopped, are skipped."""
    pairs = [
        (m, t)
        for m, t in zip(matchers, tokens, strict=True)
        if m is not None and not m.is_error() and not m.is_stopped()
    ]
    if len(pairs) == 1:
        pairs[0][0].consume_token(pairs[0][1])
    elif pairs:
        _executor().consume_token_par(pairs)


def failed(found) -> bool:
    """Whether a row's matcher has failed: llguidance gave up on the grammar (its parser's
    limits; a schema no finite value satisfies) or was handed a token it did not allow. The
    row's text is no longer kept to its format, so the engine ends it as GRAMMAR_FAILED."""
    return found is not None and found.is_error()
