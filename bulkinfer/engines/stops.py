"""Generated text: what a row's new tokens add to its prompt, and stop strings (text-level ends
of a row, checked on the decoded tail only)."""

from __future__ import annotations

import functools
import re

import torch


class StopStrings:
    """Text-level stop strings of a batch's rows (rows may have none)."""

    def __init__(self, stops: list[tuple[str, ...]], tokenizer):
        self.stops = stops
        self.tokenizer = tokenizer

    def check(
        self, generated: torch.Tensor, counts: torch.Tensor, active: torch.Tensor
    ) -> torch.Tensor:
        """Which active rows now end in (or contain, near the end) a stop string."""
        hits = []
        rows = zip(generated.tolist(), counts.tolist(), active.tolist(), self.stops, strict=True)
        for row, n, live, stops in rows:
            hits.append(live and bool(stops) and stop_hit(self.tokenizer, row[:n], stops))
        return torch.tensor(hits, device=generated.device)


def stop_hit(tokenizer, tokens: list[int], stops: tuple[str, ...]) -> bool:
    """Whether the text of these tokens ends in (or holds, near the end) one of `stops`. Only
    the tail is decoded, so a check costs O(window); the window is the row's own (a row's
    result never depends on the stop strings of rows beside it).

    The window counts a stop string's UTF-8 bytes (a byte-level tokenizer may spend a token on
    each byte), and the decoded tail drops replacement characters at its ends: the bytes of a
    character not finished yet, or the tail of one the window cut, are not text a stop string
    can match. A window never starts inside a run of byte-fallback pieces (`<0x0A>`): a
    SentencePiece-style decoder turns the whole run into U+FFFD when it starts mid-character,
    a newline piece in it too, and decodes it whole or not at all. A stop string that is a
    special token's own text (`<|im_end|>`, which decoded text drops) matches that token."""
    if tokens and special_texts(tokenizer).get(tokens[-1]) in stops:
        return True  # a special token's own text: decoded text drops it, so the id tells
    window = max(len(s.encode("utf-8", "surrogatepass")) for s in stops) + 8
    start = max(0, len(tokens) - window)
    pieces = byte_pieces(tokenizer)
    while start > 0 and tokens[start] in pieces:
        start -= 1
    text = generated_texts(tokenizer, [tokens[start:]])[0]
    text = text.rstrip(REPLACEMENT)
    if start > 0:
        text = text.lstrip(REPLACEMENT)
    return any(s in text for s in stops)


def _per_tokenizer(fn):
    """`fn(tokenizer)` computed once per tokenizer (the last few), and every time for one that
    cannot be a cache key."""
    cached = functools.lru_cache(maxsize=2)(fn)

    @functools.wraps(fn)
    def call(tokenizer):
        try:
            return cached(tokenizer)
        except TypeError:
            return fn(tokenizer)

    return call


@_per_tokenizer
def byte_pieces(tokenizer) -> frozenset[int]:
    """The ids of a byte-fallback vocabulary's byte pieces (`<0x00>`..`<0xFF>`; none in
    byte-level BPE)."""
    vocab = tokenizer.get_vocab()
    return frozenset(i for t, i in vocab.items() if len(t) == 6 and BYTE_PIECE.fullmatch(t))


BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


@_per_tokenizer
def special_texts(tokenizer) -> dict[int, str]:
    """The special tokens' ids and their own texts (`<|im_end|>`): the tokens that decoding
    with skip_special_tokens drops, so a stop string naming one is matched by its id."""
    named = {
        i: t.content for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special
    }
    for text, i in zip(tokenizer.all_special_tokens, tokenizer.all_special_ids, strict=False):
        named.setdefault(i, text)
    return named


REPLACEMENT = "\ufffd"  # what a tokenizer decodes an incomplete UTF-8 sequence to


def generated_texts(tokenizer, sequences: list[list[int]], skip_special: bool = True) -> list[str]:
    """The text each token sequence adds after a word, as vLLM and transformers' text-generation
    pipeline give it (both decode the new tokens with the prompt before them). Decoded alone, a
    SentencePiece-style decoder strips the text's leading space (Llama-2's `▁Paris` alone is
    'Paris', after a word ' Paris'), so each sequence is decoded after one anchor token and the
    anchor's text cut off; where that does not hold (a decoder that rewrites across the join),
    the sequence decoded alone. Byte-level BPE decodes the same either way."""
    anchor = _anchor(tokenizer)
    if not anchor:
        return tokenizer.batch_decode(sequences, skip_special_tokens=skip_special)
    ids, base = anchor
    joined = tokenizer.batch_decode(
        [[*ids, *s] for s in sequences], skip_special_tokens=skip_special
    )
    return [
        text[len(base) :]
        if text.startswith(base)
        else tokenizer.decode(s, skip_special_tokens=skip_special)
        for text, s in zip(joined, sequences, strict=True)
    ]


@_per_tokenizer
def _anchor(tokenizer) -> tuple[list[int], str] | None:
    """A word of one token, not a special one (a WordPiece vocabulary may lack "a": [UNK]), and
    its text; None where the tokenizer has none of these."""
    special = set(tokenizer.all_special_ids)
    for word in ("a", "the", "I", "x", "1", "."):
        ids = tokenizer.encode(word, add_special_tokens=False)
        if len(ids) == 1 and ids[0] not in special:
            base = tokenizer.decode(ids, skip_special_tokens=True)
            if base:
                return ids, base
    return None


def truncate_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """Cut text at the earliest stop string (the stop string itself is not kept)."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)
