"""Prompt rendering (plain text or chat messages) and batched tokenization.

The output is compact: token ids go to a spill file chunk by chunk, so the text can be dropped as
soon as a chunk is tokenized and only per-row lengths stay in memory. Rows that cannot run (null
prompt, too long for the model) get a per-row error here and never reach the model.
"""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from bulkinfer.errors import InputError, SpecError
from bulkinfer.io.readers import InputChunk, read_ahead
from bulkinfer.io.spill import RowColumnFiles, TokenFile, spill_folder
from bulkinfer.spec import TaskSpec

ID_COLUMN = "id"


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
    """Every input row, in input order: lengths in memory, everything else in spill files.

    What stays in memory grows by 12 bytes a row (offset and length; 4 more with completions);
    token ids, ids and kept columns are read back from disk when a batch or the outputs need them.
    """

    offsets: np.ndarray
    score_from: np.ndarray
    row_errors: dict[int, str]
    id_type: pa.DataType | None
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
    token_file: TokenFile | None = field(default=None, repr=False)
    columns: RowColumnFiles | None = field(default=None, repr=False)
    folder: Path | None = None
    temporary: Any = field(default=None, repr=False)
    lengths: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.lengths = np.diff(self.offsets).astype(np.int32)

    @property
    def num_rows(self) -> int:
        return len(self.offsets) - 1

    def tokens(self, row: int) -> np.ndarray:
        if self.token_file is None:
            raise RuntimeError("these rows were prepared for planning only; no token ids kept")
        start = int(self.offsets[row])
        return self.token_file.read(start, int(self.offsets[row + 1]) - start)

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

    def row_columns(self, start: int, stop: int) -> pa.Table:
        """The `id` and kept input columns of rows start..stop-1."""
        if self.columns is None:
            table = _empty_table(stop - start)
        else:
            table = self.columns.read(start, stop)
        if self.id_type is None:
            positions = pa.array(np.arange(start, stop, dtype=np.int64))
            return table.add_column(0, ID_COLUMN, positions)
        return table

    @property
    def ids(self) -> pa.ChunkedArray:
        """Every row's id (reads the whole column: for small inputs and tests)."""
        return self.row_columns(0, self.num_rows).column(ID_COLUMN)

    @property
    def keep(self) -> pa.Table:
        """Every row's kept columns (reads them all: for small inputs and tests)."""
        return self.row_columns(0, self.num_rows).drop([ID_COLUMN])


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


def prepare_rows(
    chunks: Iterable[InputChunk],
    tokenizer,
    options: RenderOptions,
    spill: Path | None = None,
    keep_tokens: bool = True,
) -> PreparedRows:
    """Render and tokenize every chunk; token ids, ids and kept columns go to files in `spill`
    (a temporary folder when None), per-row errors and lengths stay in memory.

    Reading runs a chunk ahead in a thread and the Rust tokenizer encodes the next chunk while
    this one's ids are collected, so parsing, encoding and writing overlap. `keep_tokens=False`
    (planning) measures lengths and drops the ids."""
    folder, temporary = spill_folder(spill)
    token_file = TokenFile(folder / "tokens.int32") if keep_tokens else None
    columns = RowColumnFiles(folder)
    length_parts, score_parts, hash_parts = [], [], []
    count_parts, choice_parts, request_parts = [], [], []
    row_errors: dict[int, str] = {}
    truncated: dict[int, int] = {}
    locations: list[tuple[int, InputChunk]] = []
    id_type: pa.DataType | None = None
    first_row = 0
    for chunk, encoded in _encoded_ahead(read_ahead(chunks), tokenizer, options):
        locations.append((first_row, _without_text(chunk)))
        ids, lengths, score_from, errors, choices, cut = _collect_tokens(chunk, encoded, options)
        if chunk.requests is not None:
            request_parts.append(chunk.requests)
        if options.has_choices:
            count_parts.append(choices[0])
            choice_parts.append(choices[1])
        truncated.update({first_row + i: n for i, n in cut.items()})
        if token_file is not None:
            token_file.append(ids)
        length_parts.append(lengths.astype(np.int32))
        if options.has_completion or options.has_choices:
            score_parts.append(score_from)
        row_errors.update({first_row + i: msg for i, msg in errors.items()})
        id_type = _add_row_columns(columns, chunk, id_type, first_row)
        if chunk.ids is not None:
            hash_parts.append(_id_hashes(chunk.ids))
        first_row += len(chunk)
    if first_row == 0:
        raise InputError("the input has no rows")
    if token_file is not None:
        token_file.finish()
    columns.finish()
    lengths = np.concatenate(length_parts)
    del length_parts
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    score = (
        np.concatenate(score_parts)
        if options.has_completion or options.has_choices
        else np.broadcast_to(np.int32(1), (first_row,))
    )
    prepared = PreparedRows(
        offsets=offsets,
        score_from=score,
        row_errors=row_errors,
        id_type=id_type,
        input_tokens=int(lengths.sum()),
        request_params=pa.concat_tables(request_parts) if request_parts else None,
        choice_counts=np.concatenate(count_parts) if options.has_choices else None,
        choice_lengths=np.concatenate(choice_parts) if options.has_choices else None,
        locations=locations,
        truncated=truncated,
        token_file=token_file,
        columns=columns if columns.schema is not None else None,
        folder=folder,
        temporary=temporary,
    )
    del lengths, offsets
    if hash_parts:
        hashes = np.concatenate(hash_parts)
        hash_parts.clear()
        _check_unique_ids(prepared, hashes)
    return prepared


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
            text, chat = _render(value, tokenizer, options)
            _check_continuations(chunk, i, options)
        except RowError as exc:
            errors[i] = str(exc)
            continue
        texts.append(text)
        is_chat.append(chat)
        positions.append(i)
    return RenderedChunk(texts, is_chat, positions, errors)


def _encode_rendered(
    tokenizer, rendered: RenderedChunk, chunk: InputChunk, options: RenderOptions
) -> EncodedChunk:
    prompts = _encode(tokenizer, rendered.texts, rendered.is_chat)
    continuations = _encode_continuations(chunk, rendered.positions, tokenizer, options)
    return EncodedChunk(rendered, prompts, continuations)


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
            ids = _truncated(ids, limit, keep_last)
            longest = len(ids)
        message = _length_problem(longest, options)
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


def _add_row_columns(
    columns: RowColumnFiles, chunk: InputChunk, id_type: pa.DataType | None, first_row: int
) -> pa.DataType | None:
    """Spill a chunk's ids (unless the row position is the id) and kept columns; returns the
    id type, which every chunk must share."""
    table = chunk.keep
    if chunk.ids is not None:
        ids = _chunk_ids(chunk)
        if id_type is not None and ids.type != id_type and first_row > 0:
            raise InputError("the id column has different types in different files or row groups")
        id_type = ids.type
        table = table.add_column(0, ID_COLUMN, ids)
    if table.num_columns == 0:
        return id_type
    try:
        columns.append(table)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise InputError(f"a keep column has different types in different files: {exc}") from None
    return id_type


def _chunk_ids(chunk: InputChunk) -> pa.Array:
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


def _id_hashes(ids: list) -> np.ndarray:
    """64-bit hashes of a chunk's ids: 8 bytes a row find duplicates, where the ids themselves
    could be any length."""
    return np.fromiter(map(hash, ids), dtype=np.int64, count=len(ids))


def _check_unique_ids(prepared: PreparedRows, hashes: np.ndarray) -> None:
    """Rows whose id hashes collide are compared by value; the duplicate that appears first in
    the input is reported, with its first two places."""
    ordered = np.sort(hashes)
    repeated = np.unique(ordered[1:][ordered[1:] == ordered[:-1]])
    del ordered
    if not len(repeated):
        return
    groups: dict[int, list[int]] = {}
    for row in np.flatnonzero(np.isin(hashes, repeated)).tolist():
        groups.setdefault(int(hashes[row]), []).append(row)
    for rows in sorted(groups.values()):
        values = [prepared.row_columns(r, r + 1).column(ID_COLUMN)[0].as_py() for r in rows]
        for a, value in enumerate(values):
            twin = next((b for b in range(a + 1, len(values)) if values[b] == value), None)
            if twin is not None:
                where = [
                    prepared_location(prepared, rows[a]),
                    prepared_location(prepared, rows[twin]),
                ]
                raise InputError(
                    f"duplicate id {value!r} at {where[0]} and {where[1]}; ids must be unique"
                )


def prepared_location(prepared: PreparedRows, row: int) -> str:
    """Where an input row came from, as file:line or file: row N."""
    starts = [start for start, _ in prepared.locations]
    k = int(np.searchsorted(starts, row, side="right")) - 1
    start, chunk = prepared.locations[k]
    return chunk.location(row - start)


def _without_text(chunk: InputChunk) -> InputChunk:
    """Keep a chunk's location data only, so the prompt text can be freed; line numbers without
    gaps shrink to a range."""
    lines = chunk.lines
    if lines is not None and len(lines) and int(lines[-1]) - int(lines[0]) == len(lines) - 1:
        lines = range(int(lines[0]), int(lines[-1]) + 1)
    return InputChunk(chunk.path, chunk.first_row_in_file, [], None, None, _empty_table(0), lines)


def _empty_table(num_rows: int) -> pa.Table:
    return pa.table({"_": pa.nulls(num_rows)}).drop(["_"])
