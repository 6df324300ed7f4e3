"""Prompt rendering (plain text or chat messages) and batched tokenization.

The output is compact: one flat int32 array of token ids plus offsets, so the text can be dropped
as soon as a chunk is tokenized. Rows that cannot run (null prompt, too long for the model) get a
per-row error here and never reach the model.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bulkinfer.errors import InputError, SpecError
from bulkinfer.io.readers import InputChunk
from bulkinfer.spec import TaskSpec


@dataclass(frozen=True)
class RenderOptions:
    """How prompts become model input."""

    use_chat_for_text: bool
    system_prompt: str | None
    max_context: int | None
    reserve_new_tokens: int
    has_completion: bool
    min_tokens: int = 1
    has_choices: bool = False
    # classify and embed may cut a long row to max_context (when asked) rather than refuse it,
    # keeping the `keep_last` special tokens the tokenizer appends (BERT's [SEP]).
    can_truncate: bool = False
    truncate: bool = False
    keep_last: int = 0


@dataclass
class PreparedRows:
    """Token ids of every input row, in input order, plus what the output needs besides results."""

    token_ids: np.ndarray
    offsets: np.ndarray
    score_from: np.ndarray
    row_errors: dict[int, str]
    ids: pa.ChunkedArray
    keep: pa.Table
    input_tokens: int = 0
    # Per-row generation settings from the input (an OpenAI batch file's request bodies), one
    # row per input row, null where the job's setting holds; None for other inputs.
    request_params: pa.Table | None = None
    # Choices scoring: a row's tokens are its prompt then each choice in turn; choice_counts[row]
    # choices, whose token counts are consecutive in choice_lengths. None without choices.
    choice_counts: np.ndarray | None = None
    choice_lengths: np.ndarray | None = None
    locations: list[tuple[int, InputChunk]] = field(default_factory=list, repr=False)
    truncated: dict[int, int] = field(default_factory=dict)  # row -> tokens cut (task.truncate)

    @property
    def num_rows(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def tokens(self, row: int) -> np.ndarray:
        return self.token_ids[self.offsets[row] : self.offsets[row + 1]]

    def choice_token_lengths(self, row: int) -> np.ndarray:
        """Token counts of a row's choices, in order."""
        if self._choice_starts is None:
            self._choice_starts = np.concatenate([[0], np.cumsum(self.choice_counts)])
        start = self._choice_starts[row]
        return self.choice_lengths[start : self._choice_starts[row + 1]]

    _choice_starts = None

    def runnable_rows(self) -> np.ndarray:
        mask = np.ones(self.num_rows, dtype=bool)
        if self.row_errors:
            mask[np.fromiter(self.row_errors, dtype=np.int64)] = False
        return np.flatnonzero(mask)


def render_options(
    task: TaskSpec,
    tokenizer,
    max_context: int | None,
    has_completion: bool,
    has_choices: bool = False,
):
    if has_choices and task.type != "score":
        raise SpecError(
            f"input.choices_column: choices are scored by task.type score, not {task.type}"
        )
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if task.chat_template == "always" and not has_template:
        raise InputError(
            "task.chat_template is 'always' but the model's tokenizer has no chat template"
        )
    use_chat = task.chat_template == "always" or (
        task.chat_template == "auto" and task.type == "generate" and has_template
    )
    reserve = task.max_new_tokens if task.type == "generate" else 0
    # Scoring a prompt scores every token after the first, so it needs two.
    min_tokens = 2 if task.type == "score" and not (has_completion or has_choices) else 1
    can_truncate = task.type in ("classify", "embed")
    return RenderOptions(
        use_chat,
        task.system_prompt,
        max_context,
        reserve,
        has_completion,
        min_tokens,
        has_choices,
        can_truncate=can_truncate,
        truncate=can_truncate and task.truncate,
        keep_last=appended_special_tokens(tokenizer) if can_truncate else 0,
    )


def appended_special_tokens(tokenizer) -> int:
    """How many special tokens the tokenizer puts after a text (1 for BERT's [SEP], 0 for most
    decoders), found by encoding one word with and without them."""
    plain = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a", add_special_tokens=True)
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return len(full) - start - len(plain)
    return 0


def prepare_rows(chunks: Iterable[InputChunk], tokenizer, options: RenderOptions) -> PreparedRows:
    """Render and tokenize every chunk; collect ids, kept columns and per-row errors."""
    id_parts, keep_parts, token_parts, length_parts, score_parts = [], [], [], [], []
    count_parts, choice_parts, request_parts = [], [], []
    row_errors: dict[int, str] = {}
    truncated: dict[int, int] = {}
    locations: list[tuple[int, InputChunk]] = []
    first_row = 0
    for chunk in chunks:
        locations.append((first_row, _without_text(chunk)))
        ids, lengths, score_from, errors, choices, cut = _tokenize_chunk(chunk, tokenizer, options)
        if chunk.requests is not None:
            request_parts.append(chunk.requests)
        count_parts.append(choices[0])
        choice_parts.append(choices[1])
        truncated.update({first_row + i: n for i, n in cut.items()})
        token_parts.append(ids)
        length_parts.append(lengths)
        score_parts.append(score_from)
        row_errors.update({first_row + i: msg for i, msg in errors.items()})
        id_parts.append(_chunk_ids(chunk, first_row))
        keep_parts.append(chunk.keep)
        first_row += len(chunk)
    if first_row == 0:
        raise InputError("the input has no rows")
    lengths = np.concatenate(length_parts)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    prepared = PreparedRows(
        token_ids=np.concatenate(token_parts),
        offsets=offsets,
        score_from=np.concatenate(score_parts),
        row_errors=row_errors,
        ids=_concat_ids(id_parts),
        keep=_concat_keep(keep_parts),
        input_tokens=int(lengths.sum()),
        request_params=pa.concat_tables(request_parts) if request_parts else None,
        choice_counts=np.concatenate(count_parts) if options.has_choices else None,
        choice_lengths=np.concatenate(choice_parts) if options.has_choices else None,
        locations=locations,
        truncated=truncated,
    )
    _check_unique_ids(prepared)
    return prepared


def _tokenize_chunk(chunk: InputChunk, tokenizer, options: RenderOptions):
    """Token ids of a chunk's runnable rows; errored rows get zero tokens and a message.

    A completion or the choices are tokenized on their own (no special tokens) and appended to
    the prompt's tokens, so the scored tokens are exactly the completion's own."""
    errors: dict[int, str] = {}
    truncated: dict[int, int] = {}
    texts: list[str] = []
    is_chat: list[bool] = []
    positions: list[int] = []
    problems = chunk.problems or {}
    for i, value in enumerate(chunk.prompts):
        if i in problems:
            errors[i] = problems[i]
            continue
        try:
            text, chat = _render(value, tokenizer, options)
            _check_continuations(chunk, i, options)
        except RowError as exc:
            errors[i] = str(exc)
            continue
        texts.append(text)
        is_chat.append(chat)
        positions.append(i)
    encoded = _encode(tokenizer, texts, is_chat)
    continuations = _encode_continuations(chunk, positions, tokenizer, options)
    lengths = np.zeros(len(chunk), dtype=np.int64)
    score_from = np.ones(len(chunk), dtype=np.int32)
    choice_counts = np.zeros(len(chunk), dtype=np.int32)
    pieces, choice_lengths = [], []
    for j, i in enumerate(positions):
        ids = encoded[j]
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
            ids = _truncated(ids, limit, 0 if is_chat[j] else options.keep_last)
            longest = len(ids)
        message = _length_problem(longest, options)
        if message:
            errors[i] = message
            continue
        if options.has_choices:
            choice_counts[i] = len(parts)
            choice_lengths.extend(len(p) for p in parts)
        lengths[i] = len(ids)
        pieces.append(np.asarray(ids, dtype=np.int32))
    flat = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
    choices = (choice_counts, np.asarray(choice_lengths, dtype=np.int32))
    return flat, lengths, score_from, errors, choices, truncated


def _check_continuations(chunk: InputChunk, i: int, options: RenderOptions) -> None:
    if options.has_completion:
        completion = chunk.completions[i]
        if not isinstance(completion, str) or completion == "":
            raise RowError(f"completion is {_describe(completion)}, expected a non-empty string")
    if options.has_choices:
        choices = chunk.choices[i]
        if not isinstance(choices, list | tuple) or not choices:
            what = "an empty list" if isinstance(choices, list | tuple) else _describe(choices)
            raise RowError(f"choices is {what}, expected a non-empty list of strings")
        for k, choice in enumerate(choices):
            if not isinstance(choice, str) or choice == "":
                raise RowError(f"choice {k} is {_describe(choice)}, expected a non-empty string")


def _encode_continuations(
    chunk: InputChunk, positions: list[int], tokenizer, options: RenderOptions
) -> list[list[list[int]]] | None:
    """Per runnable row, the token ids of its completion (one part) or of each choice."""
    if options.has_completion:
        per_row = [[chunk.completions[i]] for i in positions]
    elif options.has_choices:
        per_row = [list(chunk.choices[i]) for i in positions]
    else:
        return None
    flat = [text for texts in per_row for text in texts]
    encoded = iter(_encode(tokenizer, flat, [True] * len(flat)))
    return [[next(encoded) for _ in texts] for texts in per_row]


def _truncated(ids: list[int], limit: int, keep_last: int) -> list[int]:
    """The first tokens of a row, ending with the special tokens the tokenizer appended."""
    keep_last = min(keep_last, limit - 1)
    return ids[: limit - keep_last] + (ids[len(ids) - keep_last :] if keep_last else [])


class RowError(ValueError):
    """A row that cannot run; its message goes into the output's `error` column."""


def _render(value: Any, tokenizer, options: RenderOptions) -> tuple[str, bool]:
    """The text to tokenize and whether it came from a chat template (special tokens included)."""
    if isinstance(value, str):
        if not value.strip():
            raise RowError("prompt is empty")
        if not options.use_chat_for_text:
            return value, False
        messages = [{"role": "user", "content": value}]
    elif isinstance(value, list):
        messages = _check_messages(value)
    else:
        raise RowError(f"prompt is {_describe(value)}, expected a string or a list of messages")
    if options.system_prompt and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": options.system_prompt}, *messages]
    if not getattr(tokenizer, "chat_template", None):
        raise InputError(
            "the prompts are chat messages but the model's tokenizer has no chat template; "
            "give plain text prompts or a model with a chat template"
        )
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # the template is user code (Jinja); its errors are row errors
        raise RowError(f"chat template failed: {exc}") from None
    return text, True


def _check_messages(value: list) -> list[dict]:
    if not value:
        raise RowError("messages list is empty")
    for k, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise RowError(f"messages[{k}] is not an object with 'role' and 'content'")
        if not isinstance(message["role"], str):
            raise RowError(f"messages[{k}].role is {_describe(message['role'])}, expected a string")
        if not isinstance(message["content"], str | list):
            raise RowError(
                f"messages[{k}].content is {_describe(message['content'])}, expected a string"
            )
    return [dict(m) for m in value]


def _encode(tokenizer, texts: list[str], is_chat: list[bool]) -> list[list[int]]:
    """Batch-encode with the Rust tokenizer directly; chat text already has its special tokens.

    Calling the backend skips the Python wrapper's per-row conversion, which costs more than the
    encoding itself on short prompts; the ids are the same.
    """
    backend = _untruncated_backend(tokenizer)
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


def _untruncated_backend(tokenizer):
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


def _length_problem(n_tokens: int, options: RenderOptions) -> str | None:
    if n_tokens == 0:
        return "prompt has no tokens after tokenization"
    if n_tokens < options.min_tokens:
        return f"prompt has {n_tokens} token; scoring needs at least {options.min_tokens}"
    limit = options.max_context
    if limit is None:
        return None
    if options.reserve_new_tokens and n_tokens >= limit:
        return f"prompt has {n_tokens} tokens; the model's context is {limit}, leaving no room to generate"
    if n_tokens > limit:
        hint = f"; task.truncate: true keeps the first {limit}" if options.can_truncate else ""
        return f"prompt has {n_tokens} tokens, more than the model's context of {limit}{hint}"
    return None


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, str):
        return "an empty string" if not value else "a string"
    return f"a {type(value).__name__}"


def _chunk_ids(chunk: InputChunk, first_row: int) -> pa.Array:
    if chunk.ids is None:
        return pa.array(np.arange(first_row, first_row + len(chunk), dtype=np.int64))
    for i, value in enumerate(chunk.ids):
        if value is None:
            raise InputError(f"{chunk.location(i)}: the id is null; every row needs an id")
        if not isinstance(value, str | int) or isinstance(value, bool):
            raise InputError(
                f"{chunk.location(i)}: the id is {_describe(value)}; ids must be strings or integers"
            )
    try:
        return pa.array(chunk.ids)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        raise InputError(
            f"{chunk.path}: the id column mixes strings and numbers; make them all one type"
        ) from None


def _concat_ids(parts: list[pa.Array]) -> pa.ChunkedArray:
    types = {p.type for p in parts}
    if len(types) > 1:
        raise InputError("the id column has different types in different files or row groups")
    return pa.chunked_array(parts)


def _concat_keep(parts: list[pa.Table]) -> pa.Table:
    try:
        return pa.concat_tables(parts, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise InputError(f"a keep column has different types in different files: {exc}") from None


def _check_unique_ids(prepared: PreparedRows) -> None:
    ids = prepared.ids
    if len(pc.unique(ids)) == len(ids):
        return
    counts = pc.value_counts(ids)
    dup = next(v["values"] for v in counts.to_pylist() if v["counts"] > 1)
    where = [prepared_location(prepared, int(r)) for r in np.flatnonzero(pc.equal(ids, dup))[:2]]
    raise InputError(f"duplicate id {dup!r} at {where[0]} and {where[1]}; ids must be unique")


def prepared_location(prepared: PreparedRows, row: int) -> str:
    """Where an input row came from, as file:line or file: row N."""
    starts = [start for start, _ in prepared.locations]
    k = int(np.searchsorted(starts, row, side="right")) - 1
    start, chunk = prepared.locations[k]
    return chunk.location(row - start)


def _without_text(chunk: InputChunk) -> InputChunk:
    """Keep a chunk's location data only, so the prompt text can be freed."""
    return InputChunk(
        chunk.path, chunk.first_row_in_file, [], None, None, chunk.keep.slice(0, 0), chunk.lines
    )
