"""Prompt rendering: plain text or chat messages into the text the tokenizer encodes, and
the per-row problems (empty prompt, bad messages, too long) found on the way."""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass
from typing import Any

from bulkinfer.errors import InputError, SpecError, not_unicode
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
    chat_never: bool = False  # task.chat_template: never (messages cannot be rendered then)


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
    if has_completion and task.type == "generate":  # it was read, then not used
        raise SpecError(
            "input.completion_column: a completion is scored by task.type score, not generate"
        )
    if task.system_prompt is not None and task.chat_template == "never":
        raise SpecError(
            "task.system_prompt: it is a turn of the chat template, which task.chat_template: "
            "never leaves out; remove one of them"
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
        chat_never=task.chat_template == "never",
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


def truncated_ids(ids: list[int], limit: int, keep_last: int) -> list[int]:
    """The first tokens of a row, ending with the special tokens the tokenizer appended."""
    keep_last = min(keep_last, limit - 1)
    return ids[: limit - keep_last] + (ids[len(ids) - keep_last :] if keep_last else [])


class RowError(ValueError):
    """A row that cannot run; its message goes into the output's `error` column."""


def render(value: Any, tokenizer, options: RenderOptions) -> tuple[str, bool]:
    """The text to tokenize and whether it came from a chat template (special tokens included)."""
    if isinstance(value, dict):
        value = _messages_by_field(value)
    if isinstance(value, str):
        if not value.strip():
            raise RowError("prompt is empty" if not value else "prompt is empty (only whitespace)")
        if not options.use_chat_for_text:
            return check_unicode(value, "prompt"), False
        messages = [{"role": "user", "content": value}]
    elif isinstance(value, list):
        if options.chat_never:
            raise InputError(
                "the prompts are chat messages, which only the chat template renders, and "
                "task.chat_template is never; set it to auto, or give plain text prompts"
            )
        messages = _check_messages(value)
    else:
        raise RowError(f"prompt is {describe(value)}, expected a string or a list of messages")
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
    return check_unicode(text, "prompt"), True


def messages_as_text(value: Any) -> bool:
    """Whether a string prompt is the text of a message list, as JSON or as Python writes it (a
    CSV or pandas export stores lists so): it runs as the plain text it is, which is seldom what
    was meant."""
    if not isinstance(value, str) or not value.lstrip().startswith("["):
        return False
    if '"role"' in value:
        try:
            parsed = json.loads(value)
        except ValueError:
            return False
    elif "'role'" in value:  # Python's repr of the list: what pandas' to_csv writes
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return False
    else:
        return False
    return (
        isinstance(parsed, list)
        and bool(parsed)
        and all(isinstance(m, dict) and "role" in m and "content" in m for m in parsed)
    )


def check_unicode(text: str, what: str) -> str:
    """The text itself, or a row error if it holds a lone surrogate (JSON's "\\ud800" decodes
    to one), which no tokenizer or Parquet file can take."""
    problem = not_unicode(text)
    if problem:
        raise RowError(f"{what} is not valid Unicode: {problem}")
    return text


def _messages_by_field(value: dict) -> Any:
    """Messages stored a field at a time, as `datasets` stores a Sequence of role and content
    (`{"role": [...], "content": [...]}`), as the list of messages they are; any other object
    as it is."""
    if "role" not in value or "content" not in value:
        return value
    fields = list(value.values())
    if not all(isinstance(f, list) and len(f) == len(fields[0]) for f in fields):
        return value
    return [dict(zip(value, turn, strict=True)) for turn in zip(*fields, strict=True)]


def _check_messages(value: list) -> list[dict]:
    if not value:
        raise RowError("messages list is empty")
    value = [_map_as_object(message) for message in value]
    for k, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise RowError(f"messages[{k}] is not an object with 'role' and 'content'")
        if not isinstance(message["role"], str):
            raise RowError(f"messages[{k}].role is {describe(message['role'])}, expected a string")
        if not isinstance(message["content"], str | list):
            raise RowError(
                f"messages[{k}].content is {describe(message['content'])}, expected a string"
            )
    messages = [_text_content(dict(m), k) for k, m in enumerate(value)]
    if not any(m["content"].strip() for m in messages):  # as an empty prompt is
        raise RowError("messages hold no text (every content is empty or whitespace)")
    return messages


def _map_as_object(message: Any) -> Any:
    """A message stored as a map (Spark's MapType, Arrow's map<string, string>), which pyarrow
    reads as a list of (key, value) pairs, as the object it is."""
    if isinstance(message, list) and all(
        isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str) for pair in message
    ):
        return dict(message)
    return message


def _text_content(message: dict, k: int) -> dict:
    """A message whose content is a list of text parts (OpenAI's [{"type": "text", "text":
    ...}]) with the parts joined, as an OpenAI batch file's are: most chat templates add the
    content to a string and fail on a list."""
    content = message["content"]
    if isinstance(content, list):
        for j, part in enumerate(content):
            if not (
                isinstance(part, dict)
                and part.get("type") == "text"
                and isinstance(part.get("text"), str)
            ):
                raise RowError(
                    f"messages[{k}].content[{j}] is not a text part "
                    '({"type": "text", "text": "..."}); only text is supported'
                )
        message["content"] = "".join(part["text"] for part in content)
    return message


def length_problem(n_tokens: int, options: RenderOptions, what: str = "prompt") -> str | None:
    """Why a row of `n_tokens` cannot run, or None. `what` the tokens are: the prompt, or
    the prompt with its completion or its longest choice (score)."""
    if n_tokens == 0:
        return f"{what} has no tokens after tokenization"
    if n_tokens < options.min_tokens:
        return f"{what} has {n_tokens} token; scoring needs at least {options.min_tokens}"
    limit = options.max_context
    if limit is None:
        return None
    if options.reserve_new_tokens and n_tokens > limit:
        return f"{what} has {n_tokens:,} tokens, more than the model's context of {limit:,}"
    if options.reserve_new_tokens and n_tokens == limit:
        return f"{what} has {n_tokens:,} tokens; the model's context is {limit:,}, leaving no room to generate"
    if n_tokens > limit:
        hint = f"; task.truncate: true keeps the first {limit:,}" if options.can_truncate else ""
        return f"{what} has {n_tokens:,} tokens, more than the model's context of {limit:,}{hint}"
    return None


# What a value of the input is, in the words of JSON and Parquet rather than Python's.
KINDS = (
    (bool, "a boolean"),
    (int, "an integer"),
    (float, "a float"),
    (bytes, "binary data"),
    (dict, "an object"),
    ((list, tuple), "a list"),
)


def describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, str):
        return "an empty string" if not value else "a string"
    for kind, words in KINDS:
        if isinstance(value, kind):
            return words
    name = type(value).__name__
    return f"{'an' if name[0].lower() in 'aeiou' else 'a'} {name}"
