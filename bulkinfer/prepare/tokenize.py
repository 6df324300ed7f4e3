"""Batched tokenization of the input chunks into spill files.

The output is compact: token ids go to a spill file chunk by chunk, so the text can be dropped as
soon as a chunk is tokenized and only per-row lengths stay in memory. Rows that cannot run (null
prompt, too long for the model) get a per-row error here and never reach the model.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np
import pyarrow as pa

from bulkinfer.errors import InputError
from bulkinfer.io.readers import InputChunk, read_ahead
from bulkinfer.io.spill import RowColumnFiles, TokenFile, spill_folder
from bulkinfer.observe.progress import log
from bulkinfer.prepare.ids import (
    add_row_columns,
    check_unique_ids,
    declared_id_type,
    id_hashes,
)
from bulkinfer.prepare.prefixes import PrefixFinder
from bulkinfer.prepare.render import (
    RenderOptions,
    RowError,
    check_unicode,
    describe,
    length_problem,
    messages_as_text,
    render,
    truncated_ids,
)
from bulkinfer.prepare.rows import PreparedRows, empty_table


def prepare_rows(
    chunks: Iterable[InputChunk],
    tokenizer,
    options: RenderOptions,
    spill: Path | None = None,
    keep_tokens: bool = True,
    prefix_tokens: int = 0,
    log_every: float | None = None,
    source: str = "",
) -> PreparedRows:
    """Render and tokenize every chunk; token ids, ids and kept columns go to files in `spill`
    (a temporary folder when None), per-row errors and lengths stay in memory.

    Reading runs a chunk ahead in a thread and the Rust tokenizer encodes the next chunk while
    this one's ids are collected, so parsing, encoding and writing overlap. `keep_tokens=False`
    (planning) measures lengths and drops the ids. `prefix_tokens`: rows longer than this get
    the hash of their first tokens, for the plan's shared prefixes (prepare/prefixes.py).
    `log_every`: seconds between lines saying how far a long read has got. `source`: the
    input's files, for the error an input without rows gets."""
    global _said_messages_as_text
    _said_messages_as_text = False  # (said once an input read)
    folder, temporary = spill_folder(spill)
    token_file = TokenFile(folder / "tokens.int32") if keep_tokens else None
    collected = _Collected(options, RowColumnFiles(folder), PrefixFinder(prefix_tokens))
    progress = _ReadProgress(log_every)
    for chunk, encoded in _encoded_ahead(read_ahead(chunks), tokenizer, options):
        ids = collected.add(chunk, encoded)
        if token_file is not None:
            token_file.append(ids)
        progress.show(collected.rows, int(collected.length_parts[-1].sum()))
    if collected.rows == 0:
        raise InputError(f"the input has no rows{f' ({source})' if source else ''}")
    if token_file is not None:
        token_file.finish()
    prepared = collected.finish(token_file, folder, temporary)
    if collected.hash_parts:
        hashes = np.concatenate(collected.hash_parts)
        collected.hash_parts.clear()
        check_unique_ids(prepared, hashes)
    return prepared


class _ReadProgress:
    """A line every `every` seconds while the input is read and tokenized (millions of rows
    take minutes before the first batch); nothing for an input read sooner."""

    def __init__(self, every: float | None):
        self.every = every
        self.started = self.last = time.monotonic()
        self.tokens = 0

    def show(self, rows: int, tokens: int) -> None:
        self.tokens += tokens
        now = time.monotonic()
        if self.every is None or now - self.last < self.every:
            return
        self.last = now
        rate = rows / (now - self.started)
        log(
            f"reading and tokenizing the input: {rows:,} rows so far ({self.tokens:,} tokens), "
            f"{rate:,.0f} rows/s",
            event="tokenize",
            rows_read=rows,
            tokens_read=self.tokens,
            rows_per_second=round(rate, 1),
        )


class _Collected:
    """What prepare_rows keeps of each chunk while the next one encodes."""

    def __init__(self, options: RenderOptions, columns: RowColumnFiles, prefixes: PrefixFinder):
        self.options = options
        self.columns = columns
        self.prefixes = prefixes
        self.scored_from = options.has_completion or options.has_choices
        self.length_parts, self.score_parts, self.hash_parts = [], [], []
        self.count_parts, self.choice_parts, self.request_parts = [], [], []
        self.row_errors: dict[int, str] = {}
        self.truncated: dict[int, int] = {}
        self.chat_prompts = self.plain_prompts = 0
        self.locations: list[tuple[int, InputChunk]] = []
        self.id_type: pa.DataType | None = None
        self.declared_id_type: pa.DataType | None = None
        self.rows = 0

    def add(self, chunk: InputChunk, encoded) -> list:
        """Keep a chunk's lengths, errors, ids and columns; returns its token ids."""
        first = self.rows
        self.locations.append((first, _without_text(chunk)))
        ids, lengths, score_from, errors, choices, cut = _collect_tokens(
            chunk, encoded, self.options
        )
        if chunk.requests is not None:
            self.request_parts.append(chunk.requests)
        if self.options.has_choices:
            self.count_parts.append(choices[0])
            self.choice_parts.append(choices[1])
        self.truncated.update({first + i: n for i, n in cut.items()})
        chat = sum(encoded.rendered.is_chat)
        self.chat_prompts += chat
        self.plain_prompts += len(encoded.rendered.is_chat) - chat
        self.length_parts.append(lengths.astype(np.int32))
        self.prefixes.add(ids, lengths)
        if self.scored_from:
            self.score_parts.append(score_from)
        self.row_errors.update({first + i: msg for i, msg in errors.items()})
        self.id_type = add_row_columns(self.columns, chunk, self.id_type, first)
        self.declared_id_type = declared_id_type(self.declared_id_type, chunk, first)
        if chunk.ids is not None:
            self.hash_parts.append(id_hashes(chunk.ids))
        self.rows += len(chunk)
        return ids

    def finish(self, token_file, folder: Path, temporary) -> PreparedRows:
        self.columns.finish()
        lengths = np.concatenate(self.length_parts)
        self.length_parts.clear()
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        del lengths
        has_choices = self.options.has_choices
        heads, shared = self.prefixes.finish()
        return PreparedRows(
            offsets=offsets,
            score_from=np.concatenate(self.score_parts)
            if self.scored_from
            else np.broadcast_to(np.int32(1), (self.rows,)),
            row_errors=self.row_errors,
            id_type=(self.declared_id_type or self.id_type) if self.id_type else None,
            request_params=pa.concat_tables(self.request_parts) if self.request_parts else None,
            choice_counts=np.concatenate(self.count_parts) if has_choices else None,
            choice_lengths=np.concatenate(self.choice_parts) if has_choices else None,
            locations=self.locations,
            truncated=self.truncated,
            chat_prompts=self.chat_prompts,
            plain_prompts=self.plain_prompts,
            token_file=token_file,
            columns=self.columns if self.columns.schema is not None else None,
            folder=folder,
            temporary=temporary,
            prefix_heads=heads,
            prefix_shared=shared,
            prefix_length=self.prefixes.length,
        )


def _encoded_ahead(chunks: Iterable[InputChunk], tokenizer, options: RenderOptions):
    """(chunk, its rendered and encoded rows), the next chunk encoding in a thread meanwhile:
    the Rust encoder releases the GIL, so collecting one chunk's ids overlaps encoding the next."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="bulkinfer-encode") as pool:
        pending = None
        for chunk in chunks:
            rendered = _render_chunk(chunk, tokenizer, options)
            job = pool.submit(_encode_rendered, tokenizer, rendered, chunk, options)
            if pending is not None:
                yield pending[0], pending[1].result()
            pending = (chunk, job)
        if pending is not None:
            yield pending[0], pending[1].result()


@dataclass(frozen=True)
class RenderedChunk:
    """A chunk's runnable rows as text (`positions` in the chunk), and the rows already failed."""

    texts: list[str]
    is_chat: list[bool]
    positions: list[int]
    errors: dict[int, str]


@dataclass(frozen=True)
class EncodedChunk:
    """Token ids of a rendered chunk's rows, and of each row's completion or choices."""

    rendered: RenderedChunk
    prompts: list[list[int]]
    continuations: list[list[list[int]]] | None


def row_problems(chunk: InputChunk, tokenizer, options: RenderOptions) -> dict[int, str]:
    """Each row's error, by its index in `chunk`, as a run finds it (the row read, rendered,
    its completion or choices, its length in tokens), without keeping any token."""
    encoded = _encode_rendered(tokenizer, _render_chunk(chunk, tokenizer, options), chunk, options)
    return _collect_tokens(chunk, encoded, options)[3]


def _render_chunk(chunk: InputChunk, tokenizer, options: RenderOptions) -> RenderedChunk:
    errors: dict[int, str] = {}
    texts: list[str] = []
    is_chat: list[bool] = []
    positions: list[int] = []
    problems = chunk.problems or {}
    for i, value in enumerate(chunk.prompts):
        if i in problems:
            errors[i] = problems[i]
            continue
        try:
            text, chat = render(value, tokenizer, options)
            _check_continuations(chunk, i, options)
        except RowError as exc:
            errors[i] = str(exc)
            continue
        except InputError as exc:  # the whole job's: said with the first row that meets it
            raise InputError(f"{chunk.location(i)}: {exc}") from None
        if not _said_messages_as_text and messages_as_text(value):
            _say_messages_as_text(chunk.location(i))
        texts.append(text)
        is_chat.append(chat)
        positions.append(i)
    return RenderedChunk(texts, is_chat, positions, errors)


_said_messages_as_text = False


def _say_messages_as_text(where: str) -> None:
    """Once an input read: a prompt that is a message list stored as text."""
    global _said_messages_as_text
    _said_messages_as_text = True
    log(
        f"{where}: the prompt is the text of a message list (JSON, or Python's), a string: it "
        "runs as that text, not as chat messages through the chat template; store them as a list "
        "(a JSON array in JSONL, a list column in Parquet) to have them rendered as a "
        "conversation",
        level="warning",
    )


def _encode_rendered(
    tokenizer, rendered: RenderedChunk, chunk: InputChunk, options: RenderOptions
) -> EncodedChunk:
    texts, moved = rendered.texts, None
    if options.has_completion or options.has_choices:
        texts, moved = _trailing_space_moved(texts, rendered.is_chat)
    prompts = _encode(tokenizer, texts, rendered.is_chat)
    continuations = _encode_continuations(chunk, rendered.positions, tokenizer, options, moved)
    return EncodedChunk(rendered, prompts, continuations)


def _trailing_space_moved(texts: list[str], is_chat: list[bool]) -> tuple[list[str], list[str]]:
    """Each prompt less its trailing whitespace, and that whitespace, which its completion or
    choices begin with instead: lm-evaluation-harness's split (a prompt 'Answer: ' scores
    ' yes', not 'yes' after a lone space token, a word no text ever split so). Not a prompt
    the chat template rendered: the newline ending its assistant header is the template's, and
    moved it was scored as the answer's first token."""
    kept, moved = [], []
    for text, chat in zip(texts, is_chat, strict=True):
        cut = len(text) if chat else len(text.rstrip())
        kept.append(text[:cut])
        moved.append(text[cut:])
    return kept, moved


def _collect_tokens(chunk: InputChunk, encoded: EncodedChunk, options: RenderOptions):
    """A chunk's token ids as one flat int32 array; rows too short or too long get an error and
    zero tokens.

    A completion or the choices are tokenized on their own (no special tokens) and appended to
    the prompt's tokens, so the scored tokens are exactly the completion's own."""
    errors = dict(encoded.rendered.errors)
    truncated: dict[int, int] = {}
    lengths = np.zeros(len(chunk), dtype=np.int64)
    score_from = np.ones(len(chunk), dtype=np.int32)
    choice_counts = np.zeros(len(chunk), dtype=np.int32)
    kept, choice_lengths = [], []
    continuations = encoded.continuations
    embedded = _embedding_requests(chunk)
    embedding_options = dataclasses.replace(options, reserve_new_tokens=0)
    for j, i in enumerate(encoded.rendered.positions):
        ids = encoded.prompts[j]
        longest = len(ids)
        if continuations is not None:
            score_from[i] = len(ids)
            parts = continuations[j]
            longest += max(len(p) for p in parts)
            ids = ids + [t for p in parts for t in p]
            empty = [k for k, p in enumerate(parts) if not p]
            if empty and options.has_choices:
                errors[i] = f"choice {empty[0]} has no tokens after tokenization"
                continue
        limit = options.max_context
        if options.truncate and limit is not None and len(ids) > limit:
            truncated[i] = len(ids) - limit
            keep_last = 0 if encoded.rendered.is_chat[j] else options.keep_last
            ids = truncated_ids(ids, limit, keep_last)
            longest = len(ids)
        if i in embedded:  # an embeddings request: one forward, nothing generated after it
            message = length_problem(longest, embedding_options, "embeddings input")
        else:
            message = length_problem(longest, options, _measured(options, continuations))
        if message:
            errors[i] = message
            continue
        if options.has_choices:
            choice_counts[i] = len(parts)
            choice_lengths.extend(len(p) for p in parts)
        lengths[i] = len(ids)
        kept.append(ids)
    flat = np.fromiter(chain.from_iterable(kept), dtype=np.int32, count=int(lengths.sum()))
    choices = (choice_counts, np.asarray(choice_lengths, dtype=np.int32))
    return flat, lengths, score_from, errors, choices, truncated


def _embedding_requests(chunk: InputChunk) -> set[int]:
    """The rows of an OpenAI batch chunk that are embeddings requests."""
    requests = chunk.requests
    if requests is None or "embed_input" not in requests.column_names:
        return set()
    return set(np.flatnonzero(requests.column("embed_input").is_valid().to_numpy()).tolist())


def _measured(options: RenderOptions, continuations) -> str:
    """What a row's length counts, for its message."""
    if continuations is None:
        return "prompt"
    return "prompt with its longest choice" if options.has_choices else "prompt with its completion"


def _check_continuations(chunk: InputChunk, i: int, options: RenderOptions) -> None:
    if options.has_completion:
        completion = chunk.completions[i]
        if not isinstance(completion, str) or completion == "":
            raise RowError(f"completion is {describe(completion)}, expected a non-empty string")
        check_unicode(completion, "completion")
    if options.has_choices:
        choices = chunk.choices[i]
        if not isinstance(choices, list | tuple) or not choices:
            what = "an empty list" if isinstance(choices, list | tuple) else describe(choices)
            raise RowError(f"choices is {what}, expected a non-empty list of strings")
        for k, choice in enumerate(choices):
            if not isinstance(choice, str) or choice == "":
                raise RowError(f"choice {k} is {describe(choice)}, expected a non-empty string")
            check_unicode(choice, f"choice {k}")


def _encode_continuations(
    chunk: InputChunk, positions: list[int], tokenizer, options: RenderOptions, moved=None
) -> list[list[list[int]]] | None:
    """Per runnable row, the token ids of its completion (one part) or of each choice, after
    the whitespace `moved` from the end of its prompt."""
    if options.has_completion:
        per_row = [[chunk.completions[i]] for i in positions]
    elif options.has_choices:
        per_row = [list(chunk.choices[i]) for i in positions]
    else:
        return None
    if moved is not None:
        per_row = [[space + t for t in texts] for space, texts in zip(moved, per_row, strict=True)]
    flat = [text for texts in per_row for text in texts]
    encoded = iter(_after_text(tokenizer, flat))
    return [[next(encoded) for _ in texts] for texts in per_row]


# Texts that continuations are tokenized after, in turn: the first whose tokens a continuation
# joins cleanly. One is not enough: after "a", SentencePiece merges "nd" into "▁and".
CONTEXT_ANCHORS = ("a", ".", "x", "1", "the")


def _after_text(tokenizer, texts: list[str]) -> list[list[int]]:
    """Each continuation's tokens as they follow other text, where they join it cleanly (the
    tokens of anchor + text begin with the anchor's own): a SentencePiece-style tokenizer
    puts '▁' before a text it encodes alone, so ' Paris' alone is ['▁', '▁Pa', 'ris'] where
    after a word it is ['▁Pa', 'ris'], and 'nd' alone ['▁', 'n', 'd'] where after '.' it is
    ['n', 'd'], as lm-evaluation-harness splits the context and continuation encoded together.
    A continuation that merges with every anchor is encoded alone; byte-level BPE gives the
    same tokens either way."""
    out: list[list[int] | None] = [None] * len(texts)
    for text in CONTEXT_ANCHORS:
        todo = [i for i, ids in enumerate(out) if ids is None]
        if not todo:
            break
        anchor = _encode(tokenizer, [text], [True])[0]
        joined = _encode(tokenizer, [text + texts[i] for i in todo], [True] * len(todo))
        for i, ids in zip(todo, joined, strict=True):
            if len(ids) > len(anchor) and ids[: len(anchor)] == anchor:
                out[i] = ids[len(anchor) :]
    alone = [i for i, ids in enumerate(out) if ids is None]
    encoded = _encode(tokenizer, [texts[i] for i in alone], [True] * len(alone))
    for i, ids in zip(alone, encoded, strict=True):
        out[i] = ids
    return out


def _encode(tokenizer, texts: list[str], is_chat: list[bool]) -> list[list[int]]:
    """Batch-encode with the Rust tokenizer directly; chat text already has its special tokens.

    Calling the backend skips the Python wrapper's per-row conversion, which costs more than the
    encoding itself on short prompts; the ids are the same.
    """
    backend = untruncated_backend(tokenizer)
    out: list[list[int] | None] = [None] * len(texts)
    for special in (True, False):
        idx = [i for i, chat in enumerate(is_chat) if chat != special]
        if not idx:
            continue
        batch = [texts[i] for i in idx]
        if backend is not None:
            encodings = backend.encode_batch_fast(batch, add_special_tokens=special)
            ids_list = [e.ids for e in encodings]
        else:
            ids_list = tokenizer(
                batch,
                add_special_tokens=special,
                return_attention_mask=False,
                return_token_type_ids=False,
                verbose=False,
            )["input_ids"]
        for i, ids in zip(idx, ids_list, strict=True):
            out[i] = ids
    return out


def untruncated_backend(tokenizer):
    """The tokenizers.Tokenizer behind a fast tokenizer, with truncation and padding off
    (a copy, so the tokenizer itself is untouched); None where there is none."""
    cached = getattr(tokenizer, "_bulkinfer_backend", None)
    if cached is not None:
        return cached
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "encode_batch_fast"):
        return None
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(backend.to_str())
    backend.no_truncation()
    backend.no_padding()
    tokenizer._bulkinfer_backend = backend
    return backend


def _without_text(chunk: InputChunk) -> InputChunk:
    """Keep a chunk's location data only, so the prompt text can be freed; line numbers without
    gaps shrink to a range."""
    lines = chunk.lines
    if lines is not None and len(lines) and int(lines[-1]) - int(lines[0]) == len(lines) - 1:
        lines = range(int(lines[0]), int(lines[-1]) + 1)
    return InputChunk(chunk.path, chunk.first_row_in_file, [], None, None, empty_table(0), lines)
